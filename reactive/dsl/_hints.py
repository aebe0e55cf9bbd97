"""The class pass's reading of annotations: a rule's ``RuleContext[State, Message]``, a
handler's result type, and whether msgspec can decode a type from JSON."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import msgspec

from reactive.dsl.context import RuleContext
from reactive.dsl.rules import _UNSET

__all__ = ["context_args", "decodable", "param_hint", "resolve_hints"]


def resolve_hints(fn: Callable[..., Any], localns: dict[str, Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, globalns=getattr(fn, "__globals__", None), localns=localns)
    except Exception:
        return {}


def param_hint(fn: Callable[..., Any], hints: dict[str, Any], position: int) -> Any:
    """The annotation of the positional parameter at ``position`` (self is 0)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return _UNSET
    if len(params) <= position:
        return _UNSET
    return hints.get(params[position].name, _UNSET)


def context_args(hint: Any) -> tuple[Any, Any]:
    """(state type, message type) from ``RuleContext[S, M]``; _UNSET where unknown."""
    if hint is _UNSET:
        return _UNSET, _UNSET
    if typing.get_origin(hint) is RuleContext:
        args = typing.get_args(hint)
        if len(args) == 2:
            return tuple(None if a is type(None) else a for a in args)  # type: ignore[return-value]
    return _UNSET, _UNSET


def decodable(tp: Any) -> str | None:
    import msgspec.inspect as mi

    try:
        msgspec.json.Decoder(tp)
        info = mi.type_info(tp)
    except Exception as e:
        return str(e)
    # msgspec builds a decoder for any class, but JSON never decodes into a class it
    # does not know (no dec_hook here): refuse those now rather than on every message.
    custom = _custom_class(info, set())
    if custom is not None:
        return f"{getattr(custom, '__qualname__', custom)!s} is not a msgspec.Struct, dataclass or builtin type"
    return None


def _custom_class(info: Any, seen: set[int]) -> Any:
    import msgspec.inspect as mi

    if isinstance(info, mi.CustomType):
        return info.cls
    if id(info) in seen:
        return None
    seen.add(id(info))
    for f in msgspec.structs.fields(info):
        value = getattr(info, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            child = item.type if isinstance(item, mi.Field) else item
            if isinstance(child, mi.Type):
                found = _custom_class(child, seen)
                if found is not None:
                    return found
    return None
