"""What starts an execution, as engines announce it: the input's JSON Schema and the field
that names the execution, so ``start`` can check an input without the workflow's code.

Both are worked out once per workflow when it is announced (``describe_workflow``), never
on the hot path.
"""

from __future__ import annotations

import dis
import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any

import msgspec

__all__ = ["id_field", "input_schema"]

# A one-argument function that only reads an attribute of its argument:
# ``lambda m: m.plan_id`` (or the same as a def), in the interpreters we know.
_LOADS_ARGUMENT = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW"})
_NO_EFFECT = frozenset({"RESUME", "NOP", "CACHE"})
_VARIADIC = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS


def input_schema(tp: Any) -> dict[str, Any] | None:
    """The JSON Schema of ``tp`` as msgspec writes it, or None where there is nothing to check
    (raw bytes, Any) or msgspec cannot describe the type.

    Worked out once per type (every engine start announces it: a test that starts an engine
    per example would work it out each time); the answer is shared, not to be changed.
    """
    try:
        return _schema(tp)
    except TypeError:  # an unhashable type annotation
        return _schema.__wrapped__(tp)


@functools.lru_cache(maxsize=1024)
def _schema(tp: Any) -> dict[str, Any] | None:
    if tp is bytes or tp is Any:
        return None
    try:
        return msgspec.json.schema(tp, schema_hook=_raw_is_any)
    except (TypeError, ValueError):
        return None


def _raw_is_any(tp: Any) -> dict[str, Any]:
    # An outbox keeps JSON payloads as msgspec.Raw: any JSON value.
    if tp is msgspec.Raw:
        return {}
    raise TypeError(f"no JSON Schema for {tp!r}")  # (input_schema: nothing to check)


def id_field(state_key: Callable[[Any], str] | None, message_type: Any) -> str:
    """The input field (its JSON name) that ``state_key`` returns as the execution id, or "".

    Sound, not clever: a name only when ``state_key`` provably returns one field of the
    message as it is: ``operator.attrgetter("f")``, or a function whose whole body is
    ``return <argument>.f`` (``lambda m: m.f``); and ``f`` a field of the message struct.
    Anything else (``lambda m: f"{m.a}-{m.b}"``, a call, a lookup) gives "": the id is then
    known only to the code.
    """
    try:
        return _id_field(state_key, message_type)
    except TypeError:  # unhashable
        return _id_field.__wrapped__(state_key, message_type)


@functools.lru_cache(maxsize=1024)
def _id_field(state_key: Callable[[Any], str] | None, message_type: Any) -> str:
    # (worked out once per function and type: see input_schema)
    name = _attribute_returned(state_key) if state_key is not None else ""
    if not name or not (
        isinstance(message_type, type) and issubclass(message_type, msgspec.Struct)
    ):
        return ""
    for field in msgspec.structs.fields(message_type):
        if field.name == name:
            return field.encode_name
    return ""


def _attribute_returned(fn: Callable[[Any], Any]) -> str:
    if isinstance(fn, operator.attrgetter):
        names = fn.__reduce__()[1]
        return names[0] if len(names) == 1 and "." not in names[0] else ""
    code = getattr(fn, "__code__", None)
    if (
        code is None
        or getattr(fn, "__self__", None) is not None  # a bound method: not its argument
        or code.co_argcount != 1
        or code.co_kwonlyargcount
        or code.co_flags & _VARIADIC
    ):
        return ""
    ops = [i for i in dis.get_instructions(code) if i.opname not in _NO_EFFECT]
    if (
        len(ops) == 3
        and ops[0].opname in _LOADS_ARGUMENT
        and ops[0].argval == code.co_varnames[0]
        and ops[1].opname == "LOAD_ATTR"
        and isinstance(ops[1].argval, str)
        and ops[2].opname == "RETURN_VALUE"
    ):
        return ops[1].argval
    return ""
