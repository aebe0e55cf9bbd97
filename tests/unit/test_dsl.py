"""The DSL: definition-time checks, compiled definitions, durations, conditions, state, ids, patterns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from reactive import (
    DefinitionError,
    Engine,
    ExecutionState,
    InvalidExecutionId,
    MemoryBackend,
    RuleContext,
    Status,
    TimelineEntry,
    Workflow,
    chain,
    definition_of,
    increment_iteration,
    rule,
    set_error,
    transition,
)
from reactive.clock import ManualClock
from reactive.compiled import ActionType, TriggerMode
from reactive.conditions import (
    Condition,
    always,
    has_error,
    has_message,
    has_state,
    is_waiting,
    iteration_eq,
    iteration_lt,
    never,
    no_error,
    not_waiting,
    phase_in,
    phase_is,
    status_is,
)
from reactive.dsl.durations import parse_duration
from reactive.dsl.state import is_terminal_status
from reactive.subjects import PatternIndex, matches_pattern


class Order(msgspec.Struct):
    order_id: str
    amount: int = 0


class OrderState(ExecutionState):
    amount: int = 0


class Request(msgspec.Struct):
    text: str = ""
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class Result(msgspec.Struct):
    task_id: str = ""
    ok: bool = True


class Untagged1(msgspec.Struct):
    a: int


class Untagged2(msgspec.Struct):
    b: int


class PlainClass:
    """Not a struct, dataclass or builtin: JSON cannot be decoded into it."""

    def __init__(self, a: int) -> None:
        self.a = a


def ctx_of(state: Any = None, message: Any = None) -> RuleContext[Any, Any]:
    return RuleContext(state=state, message=message)


# --------------------------------------------------------------------------- definition-time checks


def broken_rule(**rule_options: Any) -> DefinitionError:
    """Define a one-rule workflow class ``Broken`` and return the DefinitionError it raises."""
    with pytest.raises(DefinitionError) as info:

        class Broken(Workflow, id="broken"):
            @rule(**rule_options)
            def the_rule(self, ctx):  # type: ignore[no-untyped-def]  # no annotation: types come from options
                pass

    return info.value


def assert_names(
    err: DefinitionError, reason: str, *, rule_id: str | None = "the_rule", cls: str = "Broken"
) -> None:
    text = str(err)
    assert err.class_name == cls
    assert cls in text, text
    if rule_id is not None:
        assert f"rule {rule_id!r}" in text, text
    assert reason in text, text


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        pytest.param({"mutate": True}, "no trigger", id="no-trigger"),
        pytest.param(
            {"watch_kv": True, "publish": "out.a", "publish_async": "out.b"},
            "two actions",
            id="publish+async",
        ),
        pytest.param(
            {"watch_kv": True, "mutate": True, "complete": True, "publish_async": "x.y"},
            "two actions",
            id="three",
        ),
        pytest.param(
            {"watch_kv": True, "mutate": True, "publish_async": "x.y"},
            "two actions",
            id="mutate+async",
        ),
        pytest.param(
            {"watch_kv": True, "publish": ""}, "publish needs a subject", id="publish-empty"
        ),
        pytest.param(
            {"watch_kv": True, "publish_async": ""},
            "publish_async needs a subject",
            id="async-empty",
        ),
        pytest.param(
            {"on_subject": "orders..new", "message": Order, "publish": "out"},
            "empty token",
            id="subject-empty-token",
        ),
        pytest.param(
            {"on_subject": "orders.>.new", "message": Order, "publish": "out"},
            "'>' may only be the last",
            id="subject-gt",
        ),
        pytest.param(
            {"on_subject": "orders new", "message": Order, "publish": "out"},
            "invalid token",
            id="subject-space",
        ),
        pytest.param(
            {"watch_kv": True, "publish": "out.*"},
            "must not contain wildcards",
            id="publish-wildcard",
        ),
        pytest.param(
            {"watch_kv": True, "publish": "out.>"}, "must not contain wildcards", id="publish-gt"
        ),
        pytest.param(
            {"watch_kv": "broken..x", "mutate": True}, "empty token", id="key-empty-token"
        ),
        pytest.param(
            {"watch_kv": "broken.>.x", "mutate": True}, "'>' may only be the last", id="key-gt"
        ),
        pytest.param({"watch_kv": "broken.a b", "mutate": True}, "invalid token", id="key-space"),
        pytest.param(
            {"watch_kv": True, "mutate": True, "cooldown": -1},
            "negative cooldown",
            id="cooldown-neg",
        ),
        pytest.param(
            {"watch_kv": True, "mutate": True, "cooldown": timedelta(seconds=-5)},
            "negative cooldown",
            id="cooldown-td",
        ),
        pytest.param(
            {"watch_kv": True, "mutate": True, "cooldown": "soon"},
            "cooldown",
            id="cooldown-unreadable",
        ),
        pytest.param(
            {"watch_kv": True, "mutate": True, "cooldown": "1m", "cooldown_scope": "global"},
            "cooldown_scope must be 'execution' or 'workflow', got 'global'",
            id="cooldown-scope-bad",
        ),
        pytest.param(
            {"watch_kv": True, "mutate": True, "cooldown_scope": "workflow"},
            "cooldown_scope='workflow' needs a cooldown",
            id="cooldown-scope-no-cooldown",
        ),
        pytest.param(
            {"watch_kv": True, "mutate": True, "cooldown": 0, "cooldown_scope": "execution"},
            "needs a cooldown",
            id="cooldown-scope-zero-cooldown",
        ),
        pytest.param(
            {"watch_kv": True, "mutate": True, "state_key": lambda m: m.order_id},
            "state_key needs on_subject",
            id="state-key-no-subject",
        ),
        pytest.param(
            {"watch_kv": True, "on_subject": "orders.new", "message": Order, "mutate": True},
            "two triggers",
            id="watch+subject",
        ),
        pytest.param(
            {"on_subject": "orders.new", "message": Order, "mutate": True},
            "message-only",
            id="mutate-no-state",
        ),
        pytest.param(
            {"on_subject": "orders.new", "message": Order, "complete": True},
            "message-only",
            id="complete-no-state",
        ),
        pytest.param(
            {"on_subject": "orders.new", "publish": "out"},
            "cannot tell the message type",
            id="no-message-type",
        ),
        pytest.param(
            {"on_subject": "orders.new", "message": Untagged1 | Untagged2, "publish": "out"},
            "cannot be decoded",
            id="msg-undecodable",
        ),
        pytest.param(
            {"watch_kv": True, "mutate": True, "max_firings": -1},
            "max_firings",
            id="max-firings-neg",
        ),
        pytest.param(
            {"watch_kv": True, "mutate": True, "on_deletes": True}, "deletes", id="deletes-writing"
        ),
    ],
)
def test_invalid_rule_raises_definition_error_naming_class_rule_and_reason(
    options: dict[str, Any], reason: str
) -> None:
    assert_names(broken_rule(**options), reason)


def test_a_concrete_workflow_without_rules_is_refused() -> None:
    with pytest.raises(DefinitionError) as info:

        class Empty(Workflow, id="empty"):
            pass

    assert_names(info.value, "no rules", rule_id=None, cls="Empty")
    assert "abstract=True" in str(info.value)  # the way to say it is a base class


def test_an_abstract_base_without_rules_is_accepted_and_its_subclasses_compile() -> None:
    class Base(Workflow, abstract=True):
        """Shared helpers, no rules yet."""

    class WithRules(Base, id="with-rules"):
        @rule(watch_kv=True, mutate=True)
        def only(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

    with pytest.raises(TypeError):
        definition_of(Base)
    assert [r.id for r in definition_of(WithRules).rules] == ["only"]


def test_definition_error_is_a_reactive_type_error() -> None:
    from reactive import ReactiveError

    err = broken_rule(mutate=True)
    assert isinstance(err, ReactiveError)
    assert isinstance(err, TypeError)
    assert len(err.reasons) == 1


def test_async_rule_without_result_handler_is_refused() -> None:
    assert_names(broken_rule(watch_kv=True, publish_async="work.do"), "result handler")


def test_result_handler_on_a_non_async_rule_is_refused() -> None:
    with pytest.raises(DefinitionError) as info:

        class Broken(Workflow, id="broken"):
            @rule(watch_kv=True, publish="out.x")
            def the_rule(self, ctx: RuleContext[ExecutionState, None]) -> Request:
                return Request()

            @the_rule.on_result
            def handled(self, ctx: RuleContext[ExecutionState, None], result: Result) -> None: ...

    assert_names(info.value, "on_result is only for publish_async")


def test_undecodable_result_type_is_refused() -> None:
    with pytest.raises(DefinitionError) as info:

        class Broken(Workflow, id="broken"):
            @rule(watch_kv=True, publish_async="work.do")
            def the_rule(self, ctx: RuleContext[ExecutionState, None]) -> Request:
                return Request()

            @the_rule.on_result(Untagged1 | Untagged2)
            def handled(self, ctx: RuleContext[ExecutionState, None], result: Any) -> None: ...

    assert_names(info.value, "cannot be decoded")


def test_message_type_of_a_plain_class_is_refused_as_undecodable() -> None:
    # msgspec builds a decoder for any class, but without a dec_hook no JSON ever decodes into it.
    assert_names(
        broken_rule(on_subject="orders.new", message=PlainClass, publish="out"), "cannot be decoded"
    )


def test_state_type_not_subclassing_execution_state_is_refused() -> None:
    class NotAState(msgspec.Struct):
        phase: str = ""

    with pytest.raises(DefinitionError) as info:

        class Broken(Workflow, id="broken", state=NotAState):
            @rule(watch_kv=True, mutate=True)
            def the_rule(self, ctx: RuleContext[Any, None]) -> None: ...

    assert_names(info.value, "does not subclass reactive.ExecutionState", rule_id=None)
    assert "NotAState" in str(info.value)


def test_state_type_with_a_required_field_is_refused() -> None:
    class NeedsField(ExecutionState):
        customer: str

    with pytest.raises(DefinitionError) as info:

        class Broken(Workflow, id="broken", state=NeedsField):
            @rule(watch_kv=True, mutate=True)
            def the_rule(self, ctx: RuleContext[NeedsField, None]) -> None: ...

    assert_names(info.value, "NeedsField cannot be created empty", rule_id=None)
    assert "customer" in str(info.value)


def test_duplicate_rule_id_is_refused() -> None:
    with pytest.raises(DefinitionError) as info:

        class Broken(Workflow, id="broken"):
            @rule(id="step", watch_kv=True, mutate=True)
            def one(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

            @rule(id="step", watch_kv=True, mutate=True)
            def two(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

    assert_names(info.value, "duplicate rule id", rule_id="step")


def test_invalid_workflow_options_are_refused() -> None:
    with pytest.raises(DefinitionError) as info:

        class Broken(
            Workflow,
            id="bad.id",
            timeout="-1s",
            on_complete="done.*",
            max_iterations=-2,
            on_task_timeout="retry",
        ):
            @rule(watch_kv="x.*", mutate=True)
            def the_rule(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

    text = str(info.value)
    for part in (
        "workflow id 'bad.id'",
        "timeout",
        "on_complete",
        "max_iterations",
        "on_task_timeout",
    ):
        assert part in text, text


def test_several_problems_are_reported_in_one_error() -> None:
    class NotAState(msgspec.Struct):
        x: int = 0

    with pytest.raises(DefinitionError) as info:

        class Broken(Workflow, id="broken", state=NotAState):
            @rule(mutate=True)
            def no_trigger(self, ctx: RuleContext[Any, None]) -> None: ...

            @rule(watch_kv=True, publish="a.b", publish_async="c.d")
            def two_actions(self, ctx: RuleContext[Any, None]) -> None: ...

            @rule(watch_kv=True, mutate=True, cooldown=-3)
            def negative(self, ctx: RuleContext[Any, None]) -> None: ...

            @rule(on_subject="orders.new", message=Order, mutate=True)
            def stateless(self, ctx: RuleContext[Any, Order]) -> None: ...

    err = info.value
    assert len(err.reasons) == 5, err.reasons
    text = str(err)
    assert "Broken for 5 reasons" in text
    for part in (
        "does not subclass",
        "rule 'no_trigger': no trigger",
        "rule 'two_actions': two actions",
        "rule 'negative': negative cooldown",
        "rule 'stateless'",
    ):
        assert part in text, text


# --------------------------------------------------------------------------- compiled definitions


class Shop(Workflow, id="shop", state=OrderState, timeout="10m", task_timeout=timedelta(minutes=2)):
    @rule(on_subject="orders.new", state_key=lambda m: m.order_id, mutate=True)
    def zeta_accept(self, ctx: RuleContext[OrderState, Order]) -> None:
        ctx.state.amount = ctx.message.amount

    @rule(id="ask", watch_kv=True, when=phase_is("new"), publish_async="work.do", cooldown="500ms")
    def alpha_ask(self, ctx: RuleContext[OrderState, None]) -> Request:
        return Request(text="x")

    @alpha_ask.on_result
    def alpha_done(self, ctx: RuleContext[OrderState, None], result: Result) -> None: ...

    @rule(watch_kv="shop.>", bucket="OTHER", publish="shop.seen", max_firings=2)
    def mid_notify(self, ctx: RuleContext[OrderState, None]) -> dict[str, str]:
        return {}

    @rule(on_subject="audit.*", message=Order, stream="AUDIT", publish="audit.out")
    def beta_audit(self, ctx: RuleContext[None, Any]) -> Order:
        return ctx.message

    @rule(watch_kv=True, when=phase_is("paid"), complete=True)
    def omega_done(self, ctx: RuleContext[OrderState, None]) -> None: ...


def test_rule_ids_default_to_method_names_and_id_overrides() -> None:
    d = definition_of(Shop)
    assert [r.id for r in d.rules] == [
        "zeta_accept",
        "ask",
        "mid_notify",
        "beta_audit",
        "omega_done",
    ]
    assert d.rules_by_id["ask"].method_name == "alpha_ask"
    assert d.rules_by_id["zeta_accept"].method_name == "zeta_accept"


def test_rules_keep_definition_order() -> None:
    d = definition_of(Shop)
    assert [r.index for r in d.rules] == [0, 1, 2, 3, 4]
    assert [r.method_name for r in d.rules] == [
        "zeta_accept",
        "alpha_ask",
        "mid_notify",
        "beta_audit",
        "omega_done",
    ]


def test_subclass_rules_follow_base_rules_in_definition_order() -> None:
    class Base(Workflow, abstract=True):
        @rule(watch_kv=True, mutate=True)
        def b_first(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

        @rule(watch_kv=True, mutate=True)
        def a_second(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

    class Child(Base, id="child"):
        @rule(watch_kv=True, mutate=True)
        def c_third(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

    assert [r.id for r in definition_of(Child).rules] == ["b_first", "a_second", "c_third"]
    assert definition_of(Child).rules[0].pattern == "child.*"


def test_workflow_options_are_compiled() -> None:
    d = definition_of(Shop)
    assert d.id == "shop"
    assert d.bucket == "SHOP"
    assert d.state_type is OrderState
    assert d.timeout == 600.0
    assert d.task_timeout == 120.0
    assert Shop.key("o-1") == "shop.o-1"


def test_trigger_modes_and_actions_are_derived_from_the_decorator() -> None:
    r = definition_of(Shop).rules_by_id
    assert (r["zeta_accept"].mode, r["zeta_accept"].action, r["zeta_accept"].writes_state) == (
        TriggerMode.MESSAGE_AND_STATE,
        ActionType.MUTATE,
        True,
    )
    assert (r["ask"].mode, r["ask"].action, r["ask"].writes_state) == (
        TriggerMode.STATE,
        ActionType.PUBLISH_ASYNC,
        True,
    )
    assert (r["mid_notify"].mode, r["mid_notify"].action, r["mid_notify"].writes_state) == (
        TriggerMode.STATE,
        ActionType.PUBLISH,
        False,
    )
    assert (r["beta_audit"].mode, r["beta_audit"].stream, r["beta_audit"].bucket) == (
        TriggerMode.MESSAGE,
        "AUDIT",
        "",
    )
    assert (r["omega_done"].action, r["omega_done"].writes_state) == (ActionType.COMPLETE, True)
    assert r["mid_notify"].max_firings == 2
    assert r["ask"].publish_subject == "work.do"


def test_watch_kv_true_means_workflow_id_star() -> None:
    r = definition_of(Shop).rules_by_id
    assert r["ask"].pattern == "shop.*"
    assert r["ask"].bucket == "SHOP"
    assert r["mid_notify"].pattern == "shop.>"
    assert r["mid_notify"].bucket == "OTHER"


def test_message_and_result_types_come_from_annotations() -> None:
    r = definition_of(Shop).rules_by_id
    assert r["zeta_accept"].message_type is Order
    assert r["ask"].result_type is Result
    assert r["ask"].result_handler_name == "alpha_done"
    assert r["beta_audit"].message_type is Order  # message= wins where the annotation says Any
    assert r["ask"].message_type is None


def test_types_defined_inside_a_function_are_resolved_from_annotations() -> None:
    class LocalState(ExecutionState):
        note: str = ""

    class LocalMessage(msgspec.Struct):
        key: str

    class LocalResult(msgspec.Struct):
        task_id: str = ""
        score: int = 0

    class Local(Workflow, id="local", state=LocalState):
        @rule(on_subject="local.in", state_key=lambda m: m.key, mutate=True)
        def accept(self, ctx: RuleContext[LocalState, LocalMessage]) -> None: ...

        @rule(watch_kv=True, publish_async="local.work")
        def ask(self, ctx: RuleContext[LocalState, None]) -> dict[str, Any]:
            return {}

        @ask.on_result
        def answered(self, ctx: RuleContext[LocalState, None], result: LocalResult) -> None: ...

    r = definition_of(Local).rules_by_id
    assert r["accept"].message_type is LocalMessage
    assert r["ask"].result_type is LocalResult
    assert definition_of(Local).state_type is LocalState


def test_message_and_result_types_from_keywords() -> None:
    class LocalResult(msgspec.Struct):
        task_id: str = ""

    class Explicit(Workflow, id="explicit"):
        @rule(on_subject="in.x", message=Order, state_key=lambda m: m.order_id, mutate=True)
        def accept(self, ctx):  # type: ignore[no-untyped-def]
            pass

        @rule(watch_kv=True, publish_async="work.x")
        def ask(self, ctx):  # type: ignore[no-untyped-def]
            return {}

        @ask.on_result(LocalResult)
        def answered(self, ctx, result):  # type: ignore[no-untyped-def]
            pass

    r = definition_of(Explicit).rules_by_id
    assert r["accept"].message_type is Order
    assert r["ask"].result_type is LocalResult


def test_definition_of_refuses_abstract_and_foreign_classes() -> None:
    with pytest.raises(TypeError):
        definition_of(Workflow)
    with pytest.raises(TypeError):
        definition_of(OrderState)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("10m", 600.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        (timedelta(minutes=2, seconds=3), 123.0),
        (5, 5.0),
        (0.25, 0.25),
        ("7", 7.0),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "soon", "10 minutes", "5x", True, None, "m10"])
def test_parse_duration_refuses_unreadable_values(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_durations_on_rules_and_workflows() -> None:
    class Timed(Workflow, id="timed", timeout=timedelta(hours=1), task_timeout="500ms"):
        @rule(watch_kv=True, mutate=True, cooldown="10m")
        def a(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

        @rule(watch_kv=True, mutate=True, cooldown=timedelta(seconds=90))
        def b(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

        @rule(watch_kv=True, mutate=True, cooldown="500ms")
        def c(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

    d = definition_of(Timed)
    assert d.timeout == 3600.0
    assert d.task_timeout == 0.5
    assert [r.cooldown for r in d.rules] == [600.0, 90.0, 0.5]


def test_cooldown_scope_defaults_to_the_execution() -> None:
    class Scoped(Workflow, id="scoped"):
        @rule(watch_kv=True, mutate=True, cooldown="1m")
        def each(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

        @rule(watch_kv=True, mutate=True, cooldown="1m", cooldown_scope="workflow")
        def shared(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

        @rule(watch_kv=True, mutate=True, cooldown="1m", cooldown_scope="execution")
        def said(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

    r = definition_of(Scoped).rules_by_id
    assert [r[i].cooldown_scope for i in ("each", "shared", "said")] == [
        "execution",
        "workflow",
        "execution",
    ]
    assert [r[i].shared_cooldown for i in ("each", "shared", "said")] == [False, True, False]


def test_an_unreadable_cooldown_with_a_scope_is_reported_once() -> None:
    err = broken_rule(watch_kv=True, mutate=True, cooldown="soon", cooldown_scope="workflow")
    assert_names(err, "cooldown")
    assert len(err.reasons) == 1, err.reasons


def test_unreadable_workflow_timeout_is_a_definition_error() -> None:
    with pytest.raises(DefinitionError) as info:

        class Broken(Workflow, id="broken", timeout="ten minutes"):
            @rule(watch_kv=True, mutate=True)
            def the_rule(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

    assert "timeout" in str(info.value)


# --------------------------------------------------------------------------- conditions


def state(**fields: Any) -> ExecutionState:
    return ExecutionState(**fields)


HELPER_CASES = [
    # (condition, state that passes, state that fails, result on None state)
    (phase_is("a"), state(phase="a"), state(phase="b"), False),
    (phase_in("a", "b"), state(phase="b"), state(phase="c"), False),
    (status_is(Status.WAITING), state(status=Status.WAITING), state(status=Status.RUNNING), False),
    (status_is("failed"), state(status=Status.FAILED), state(status=Status.RUNNING), False),
    (iteration_lt(3), state(iteration=2), state(iteration=3), False),
    (iteration_eq(2), state(iteration=2), state(iteration=1), False),
    (has_error, state(error="boom"), state(), False),
    (no_error, state(), state(error="boom"), True),
    (is_waiting, state(status=Status.WAITING), state(status=Status.RUNNING), False),
    (not_waiting, state(status=Status.RUNNING), state(status=Status.WAITING), True),
]


@pytest.mark.parametrize(
    ("cond", "passing", "failing", "on_none"),
    HELPER_CASES,
    ids=lambda v: getattr(v, "description", None),
)
def test_condition_helpers(
    cond: Condition, passing: ExecutionState, failing: ExecutionState, on_none: bool
) -> None:
    assert cond(ctx_of(passing)) is True
    assert cond(ctx_of(failing)) is False
    assert cond(ctx_of(None)) is on_none
    assert cond(ctx_of(None, message=Order(order_id="x"))) is on_none


def test_has_state_has_message_always_never() -> None:
    s, m = state(), Order(order_id="x")
    assert has_state(ctx_of(s)) and not has_state(ctx_of(None, m))
    assert has_message(ctx_of(None, m)) and not has_message(ctx_of(s))
    for ctx in (ctx_of(), ctx_of(s), ctx_of(None, m)):
        assert always(ctx) is True
        assert never(ctx) is False


def test_condition_composition_and_or_not() -> None:
    a, b = phase_is("a"), iteration_lt(2)
    s_both, s_a, s_b, s_none = (
        state(phase="a"),
        state(phase="a", iteration=5),
        state(phase="x"),
        state(phase="x", iteration=9),
    )
    both, either, neither = a & b, a | b, ~a
    assert [both(ctx_of(s)) for s in (s_both, s_a, s_b, s_none)] == [True, False, False, False]
    assert [either(ctx_of(s)) for s in (s_both, s_a, s_b, s_none)] == [True, True, True, False]
    assert [neither(ctx_of(s)) for s in (s_both, s_a, s_b, s_none)] == [False, False, True, True]
    assert (
        isinstance(both, Condition)
        and "phase_is('a')" in both.description
        and "&" in both.description
    )
    assert "|" in either.description and neither.description.startswith("~")


def test_conditions_compose_with_plain_callables() -> None:
    def big(ctx: RuleContext[Any, Any]) -> bool:
        return ctx.state.amount > 10

    rich_a = big & phase_is("a")  # __rand__
    rich_b = phase_is("a") | big
    assert rich_a(ctx_of(OrderState(phase="a", amount=11)))
    assert not rich_a(ctx_of(OrderState(phase="a", amount=1)))
    assert rich_b(ctx_of(OrderState(phase="z", amount=11)))
    assert not rich_b(ctx_of(OrderState(phase="z", amount=1)))


def test_when_list_is_and_when_any_is_or() -> None:
    def big(ctx: RuleContext[Any, Any]) -> bool:
        return ctx.state.amount > 10

    class Conds(Workflow, id="conds", state=OrderState):
        @rule(watch_kv=True, when=[phase_is("a"), big], mutate=True)
        def all_(self, ctx: RuleContext[OrderState, None]) -> None: ...

        @rule(watch_kv=True, when_any=[phase_is("a"), big], mutate=True)
        def any_(self, ctx: RuleContext[OrderState, None]) -> None: ...

        @rule(watch_kv=True, when=phase_is("a"), when_any=[iteration_eq(1), big], mutate=True)
        def both(self, ctx: RuleContext[OrderState, None]) -> None: ...

        @rule(watch_kv=True, mutate=True)
        def unconditional(self, ctx: RuleContext[OrderState, None]) -> None: ...

    r = definition_of(Conds).rules_by_id
    cases = [
        (OrderState(phase="a", amount=11), True, True, True),
        (OrderState(phase="a", amount=1), False, True, False),
        (OrderState(phase="a", amount=1, iteration=1), False, True, True),
        (OrderState(phase="b", amount=11), False, True, False),
        (OrderState(phase="b", amount=1), False, False, False),
    ]
    for s, want_all, want_any, want_both in cases:
        ctx = ctx_of(s)
        assert bool(r["all_"].condition(ctx)) is want_all, s
        assert bool(r["any_"].condition(ctx)) is want_any, s
        assert bool(r["both"].condition(ctx)) is want_both, s
        assert r["unconditional"].condition(ctx)


def test_a_non_callable_condition_is_a_definition_error() -> None:
    assert_names(broken_rule(watch_kv=True, mutate=True, when=["phase"]), "callable")


# --------------------------------------------------------------------------- state helpers

NOW = 1_767_225_600.0


def test_initialize_sets_id_workflow_status_created_and_deadline() -> None:
    s = OrderState()
    assert s.status is Status.PENDING
    s.initialize("e1", "shop", NOW, 60.0)
    assert (s.id, s.workflow_id, s.status) == ("e1", "shop", Status.RUNNING)
    assert s.created_at == s.updated_at == datetime.fromtimestamp(NOW, UTC)
    assert s.deadline == datetime.fromtimestamp(NOW + 60.0, UTC)
    t = OrderState()
    t.initialize("e2", "shop", NOW)
    assert t.deadline is None


def test_complete_fail_escalate_time_out() -> None:
    s = state(status=Status.WAITING, pending_task_id="t", pending_rule_id="r", phase="p")
    s.complete("done")
    assert (s.status, s.phase, s.pending_task_id, s.pending_rule_id) == (
        Status.COMPLETED,
        "done",
        "",
        "",
    )
    s = state(phase="p")
    s.complete()
    assert (s.status, s.phase) == (Status.COMPLETED, "p")
    s = state(status=Status.WAITING, pending_task_id="t", pending_rule_id="r")
    s.fail("boom")
    assert (s.status, s.error, s.pending_task_id) == (Status.FAILED, "boom", "")
    s = state()
    s.escalate("too many")
    assert (s.status, s.error) == (Status.ESCALATED, "too many")
    s = state()
    s.time_out()
    assert s.status is Status.TIMED_OUT and s.error
    s = state(error="earlier")
    s.time_out()
    assert s.error == "earlier"


def test_set_phase_records_a_timeline_entry() -> None:
    s = state(iteration=2)
    s.set_phase(
        "review", rule_id="r1", trigger_mode="kv", trigger_info="wf.e1", action="mutate", now=NOW
    )
    assert s.phase == "review"
    assert len(s.timeline) == 1
    e = s.timeline[0]
    assert (e.rule_id, e.trigger_mode, e.trigger_info, e.action, e.phase, e.iteration) == (
        "r1",
        "kv",
        "wf.e1",
        "mutate",
        "review",
        2,
    )
    assert e.timestamp == datetime.fromtimestamp(NOW, UTC)
    s.set_phase("next")
    assert [t.phase for t in s.timeline] == ["review", "next"]
    # The reference's JSON name for the phase after a firing.
    assert b'"phase_after":"review"' in msgspec.json.encode(e)
    assert msgspec.json.decode(msgspec.json.encode(e), type=TimelineEntry) == e


def test_iteration_error_and_pending_task_helpers() -> None:
    s = state()
    assert s.increment_iteration() == 1
    assert s.increment_iteration() == 2
    s.set_iteration(7)
    assert s.iteration == 7
    s.set_error("e")
    assert s.error == "e"
    s.clear_error()
    assert s.error == ""
    s.status = Status.RUNNING
    s.set_pending_task("task-1", "ask")
    assert (s.status, s.pending_task_id, s.pending_rule_id, s.is_waiting) == (
        Status.WAITING,
        "task-1",
        "ask",
        True,
    )
    s.clear_pending_task()
    assert (s.status, s.pending_task_id, s.pending_rule_id, s.is_waiting) == (
        Status.RUNNING,
        "",
        "",
        False,
    )
    s.set_status(Status.COMPLETED)
    s.clear_pending_task()
    assert s.status is Status.COMPLETED  # clearing never revives a terminal execution


@pytest.mark.parametrize("status", list(Status))
def test_is_terminal_and_can_proceed(status: Status) -> None:
    terminal = status in (
        Status.COMPLETED,
        Status.FAILED,
        Status.ESCALATED,
        Status.TIMED_OUT,
        Status.CANCELLED,
    )
    s = state(status=status)
    assert s.is_terminal is terminal
    assert status.is_terminal is terminal
    assert is_terminal_status(status) is terminal
    assert s.can_proceed() is (not terminal and status is not Status.WAITING)


def test_is_expired() -> None:
    s = state()
    assert not s.is_expired(NOW)
    s.set_deadline(datetime.fromtimestamp(NOW + 10, UTC))
    assert not s.is_expired(NOW)
    assert not s.is_expired(NOW + 9.999)
    assert s.is_expired(NOW + 10)
    assert s.is_expired(NOW + 11)


def test_state_round_trips_through_json() -> None:
    s = OrderState(amount=3)
    s.initialize("e1", "shop", NOW, 5)
    s.set_phase("x", rule_id="r", now=NOW)
    back = msgspec.json.decode(msgspec.json.encode(s), type=OrderState)
    assert back == s


# --------------------------------------------------------------------------- mutators


def test_mutators() -> None:
    s = state(phase="a")
    ctx = ctx_of(s)
    transition("b")(ctx)
    assert s.phase == "b"
    increment_iteration()(ctx)
    increment_iteration()(ctx)
    assert s.iteration == 2
    set_error("bad")(ctx)
    assert s.error == "bad" and s.status is Status.PENDING  # recorded, not failed


def test_chain_runs_mutators_in_order() -> None:
    s = state()
    seen: list[str] = []

    def record(ctx: RuleContext[Any, Any]) -> None:
        seen.append(ctx.state.phase)

    chain(transition("one"), record, transition("two"), record, increment_iteration())(ctx_of(s))
    assert seen == ["one", "two"]
    assert (s.phase, s.iteration) == ("two", 1)


def test_mutator_callable_is_compiled_onto_the_rule() -> None:
    m = chain(transition("x"), increment_iteration())

    class WithMutator(Workflow, id="with-mutator"):
        @rule(watch_kv=True, when=phase_is(""), mutate=m)
        def step(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

    r = definition_of(WithMutator).rules[0]
    assert r.mutator is m
    assert r.action is ActionType.MUTATE and r.writes_state


# --------------------------------------------------------------------------- execution ids

BAD_IDS = ["a.b", "*", ">", "a*", "a>b", "a b", " a", "a\tb", "a\nb", "", "a/b"]


def test_valid_execution_ids_make_keys() -> None:
    for good in ("e1", "A-b_9", "-", "_", "0"):
        assert Shop.key(good) == f"shop.{good}"


@pytest.mark.parametrize("bad", BAD_IDS)
def test_workflow_key_refuses_invalid_execution_ids(bad: str) -> None:
    with pytest.raises(InvalidExecutionId) as info:
        Shop.key(bad)
    assert repr(bad) in str(info.value)


def test_workflow_key_refuses_non_string_ids() -> None:
    with pytest.raises(InvalidExecutionId):
        Shop.key(12)  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("bad", BAD_IDS)
async def test_start_execution_refuses_invalid_execution_ids(bad: str) -> None:
    backend = MemoryBackend(clock=ManualClock())
    engine = Engine(backend, [Shop], clock=backend.clock)
    with pytest.raises(InvalidExecutionId):
        await engine.start_execution(Shop, bad)
    assert backend.peek_keys("SHOP") == []


# --------------------------------------------------------------------------- patterns


def test_matches_pattern() -> None:
    assert matches_pattern("a.b", "a.b")
    assert matches_pattern("a.b", "a.*")
    assert matches_pattern("a.b", "*.b")
    assert matches_pattern("a.b.c", "a.>")
    assert matches_pattern("a.b", ">")
    assert not matches_pattern("a", "a.>")  # '>' needs at least one token
    assert not matches_pattern("a.b.c", "a.*")
    assert not matches_pattern("a", "a.*")
    assert not matches_pattern("a.c", "a.b")
    assert not matches_pattern("x.b", "a.>")


def test_pattern_index_matches_star_and_gt() -> None:
    index: PatternIndex[str] = PatternIndex()
    patterns = ["a.b", "a.*", "*.b", "a.>", ">", "a.b.c", "*.*.c", "b.>"]
    for p in patterns:
        index.add(p, p)
    assert len(index) == len(patterns)
    for key in ("a.b", "a.x", "z.b", "a.b.c", "a.q.c", "b.c.d.e", "a", "q"):
        expected = sorted(p for p in patterns if matches_pattern(key, p))
        assert sorted(index.match(key)) == expected, key
    assert sorted(index.match("a.b")) == sorted(["a.b", "a.*", "*.b", "a.>", ">"])
    assert index.match("a") == [">"]
    assert sorted(index.match("a.b.c")) == sorted(["a.>", ">", "a.b.c", "*.*.c"])


def test_pattern_index_keeps_every_value_of_one_pattern_in_insertion_order() -> None:
    index: PatternIndex[int] = PatternIndex()
    index.extend([("wf.*", 1), ("wf.*", 2), ("wf.*", 3)])
    assert index.match("wf.e1") == [1, 2, 3]
    assert index.match("other.e1") == []
