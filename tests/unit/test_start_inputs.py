"""What engines announce about starting an execution, and how ``start`` checks an input
against it without the code (no server: the announcement and the check are plain data).

* ``describe_workflow`` announces the input's JSON Schema and, only where it is provable,
  the message field the execution id comes from.
* ``reactive.cli.schema.problems`` accepts exactly what msgspec decodes, for the types whose
  schema says it all (checked property-based against msgspec itself), and names every
  problem at its path.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reactive import ExecutionState, RuleContext, Workflow, definition_of, rule
from reactive.cli.schema import problems
from reactive.meta import describe_workflow
from reactive.meta.inputs import id_field

# --------------------------------------------------------------------------- the announcement


class Plan(ExecutionState):
    title: str = ""


class PlanSubmitted(msgspec.Struct):
    plan_id: str
    title: str = ""
    steps: int = 1


class Submitted(msgspec.Struct, rename="camel"):
    plan_id: str


def _by_field(m: PlanSubmitted) -> str:
    """A def that reads one field, as a lambda does."""
    return m.plan_id


class _Keys:
    def key(self, m: PlanSubmitted) -> str:
        return m.plan_id


@pytest.mark.parametrize(
    ("state_key", "message", "expected"),
    [
        (lambda m: m.plan_id, PlanSubmitted, "plan_id"),
        (_by_field, PlanSubmitted, "plan_id"),
        (operator.attrgetter("plan_id"), PlanSubmitted, "plan_id"),
        (lambda m: m.plan_id, Submitted, "planId"),  # its name in the JSON
        # Anything that is not "return this one field as it is": only the code knows.
        (lambda m: f"{m.plan_id}-{m.steps}", PlanSubmitted, ""),
        (lambda m: m.plan_id.lower(), PlanSubmitted, ""),
        (lambda m, prefix="p-": prefix + m.plan_id, PlanSubmitted, ""),
        (lambda m: m.title or m.plan_id, PlanSubmitted, ""),
        (operator.attrgetter("plan_id", "title"), PlanSubmitted, ""),
        (operator.attrgetter("plan_id.real"), PlanSubmitted, ""),
        (_Keys().key, PlanSubmitted, ""),
        (lambda m: m.not_a_field, PlanSubmitted, ""),
        (lambda m: m.plan_id, dict, ""),
    ],
)
def test_the_id_field_is_announced_only_where_it_is_provable(
    state_key: Any, message: Any, expected: str
) -> None:
    assert id_field(state_key, message) == expected


class Review(Workflow, id="review", state=Plan):
    @rule(on_subject="plans.in", state_key=lambda m: m.plan_id, mutate=True)
    def accept(self, ctx: RuleContext[Plan, PlanSubmitted]) -> None:
        ctx.state.title = ctx.message.title


class Drafts(Workflow, id="drafts", state=Plan):
    @rule(watch_kv=True, mutate=True, when=lambda ctx: ctx.state.phase == "")
    def begin(self, ctx: RuleContext[Plan, None]) -> None:
        ctx.state.phase = "drafting"


def test_a_message_started_workflow_announces_its_message_schema_and_id_field() -> None:
    info = describe_workflow(definition_of(Review))
    assert info.id_field == "plan_id"
    assert info.input_schema == msgspec.json.schema(PlanSubmitted)
    # The announcement travels as JSON and comes back whole.
    back = msgspec.json.decode(msgspec.json.encode(info), type=type(info))
    assert back.input_schema == info.input_schema and back.id_field == "plan_id"


def test_a_state_started_workflow_announces_its_state_schema() -> None:
    info = describe_workflow(definition_of(Drafts))
    assert info.id_field == ""
    assert info.input_schema == msgspec.json.schema(Plan)
    assert problems(info.input_schema, {"title": "t"}) == []
    assert problems(info.input_schema, {"title": 3}) == ["$.title: expected string, got integer 3"]


# --------------------------------------------------------------------------- the check


class Item(msgspec.Struct):
    sku: str
    count: int = 1


class Order(msgspec.Struct):
    order_id: str
    items: list[Item]
    note: str | None = None
    kind: Literal["a", "b"] = "a"


def test_every_problem_is_named_at_its_path() -> None:
    schema = msgspec.json.schema(Order)
    found = problems(schema, {"items": [{"count": "2"}, {"sku": "x"}], "note": 5, "kind": "c"})
    assert found == [
        "$: missing required field 'order_id'",
        "$.items[0]: missing required field 'sku'",
        '$.items[0].count: expected integer, got string "2"',
        "$.note: expected string or null, got integer 5",
        '$.kind: expected one of "a", "b", got string "c"',
    ]
    assert problems(schema, {"order_id": "o1", "items": []}) == []
    assert problems(schema, [1]) == ["$: expected object, got array"]


# Types whose JSON Schema says everything msgspec checks (no formats such as date-time).
class Inner(msgspec.Struct):
    name: str
    size: float = 0.0


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    flag: bool


class Everything(msgspec.Struct):
    text: str
    count: int = 0
    ratio: float = 0.5
    maybe: int | None = None
    choice: Literal["x", "y", 3] = "x"
    tags: list[str] = []
    weights: dict[str, float] = {}
    pair: tuple[int, str] = (0, "")
    inner: Inner | None = None
    strict: Strict | None = None
    small: Annotated[int, msgspec.Meta(ge=0, lt=10)] = 0
    short: Annotated[str, msgspec.Meta(max_length=3, pattern="^[a-z]*$")] = ""
    few: Annotated[list[int], msgspec.Meta(max_length=2)] = []
    even: Annotated[int, msgspec.Meta(multiple_of=2)] = 0


SCHEMA = msgspec.json.schema(Everything)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-20, 20),
    st.floats(-5, 5, allow_nan=False),
    st.sampled_from(["", "x", "y", "abc", "ABCD", "name"]),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["name", "size", "flag", "other"]), inner, max_size=3),
    ),
    max_leaves=8,
)
# A valid value for each field (some near a bound, on either side), then up to two changes:
# a field set to any JSON at all, or removed.
_valid = st.fixed_dictionaries(
    {"text": st.text(max_size=3)},
    optional={
        "count": st.integers(-5, 5),
        "ratio": st.one_of(st.integers(-3, 3), st.floats(-1, 1)),
        "maybe": st.one_of(st.none(), st.integers(-3, 3)),
        "choice": st.sampled_from(["x", "y", 3]),
        "tags": st.lists(st.sampled_from(["a", "b"]), max_size=2),
        "weights": st.dictionaries(st.sampled_from(["a", "b"]), st.floats(-1, 1), max_size=2),
        "pair": st.tuples(st.integers(0, 3), st.sampled_from(["", "s"])).map(list),
        "inner": st.one_of(
            st.none(),
            st.fixed_dictionaries({"name": st.just("n")}, optional={"size": st.floats(0, 1)}),
        ),
        "strict": st.one_of(st.none(), st.fixed_dictionaries({"flag": st.booleans()})),
        "small": st.integers(-1, 10),
        "short": st.sampled_from(["", "ab", "abc", "abcd", "aB"]),
        "few": st.lists(st.integers(0, 3), max_size=3),
        "even": st.integers(-3, 3),
    },
)
_REMOVE = object()
_changes = st.lists(
    st.tuples(
        st.sampled_from([*Everything.__struct_fields__, "unknown"]),
        st.one_of(st.just(_REMOVE), _json),
    ),
    max_size=2,
)


@settings(max_examples=500, deadline=None)
@given(_valid, _changes)
def test_the_check_accepts_exactly_what_msgspec_decodes(
    value: dict[str, Any], changes: list[tuple[str, Any]]
) -> None:
    for name, change in changes:
        if change is _REMOVE:
            value.pop(name, None)
        else:
            value[name] = change
    try:
        msgspec.json.decode(msgspec.json.encode(value), type=Everything)
        decodes = True
    except msgspec.ValidationError:
        decodes = False
    found = problems(SCHEMA, value)
    assert (found == []) == decodes, (value, found)
