"""A few representative values of a type, and the constants a workflow's code compares fields with.

``samples(tp, hints)`` returns a short list of values of ``tp`` (any type
msgspec can decode) that survive a JSON round trip: for a struct, one base
value and variants that each change one field. ``hints`` name, per field, the
constants the workflow's code compares that field with (``result.verdict ==
"approved"``): those come first, so a strategy that samples from the list
answers with what the handlers look for. Drawing an index into such a list
costs one choice, where drawing a struct field by field costs dozens.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import msgspec.inspect as mi

from reactive.compiled import WorkflowDef

__all__ = ["hints_of", "samples"]

_MAX_SAMPLES = 24
_MAX_DEPTH = 3
_OMIT: Any = object()

Hints = Mapping[str, Sequence[Any]]


def samples(
    tp: Any,
    hints: Hints | None = None,
    *,
    only: Iterable[str] | None = None,
    edge: bool = False,
) -> list[Any]:
    """Representative values of ``tp`` (first the simplest), each checked to round-trip as JSON.

    ``only`` limits a struct's variants to those fields (the others keep the base value).
    With ``edge``, the values are edge cases instead: empty, long and non-ASCII text, the
    ends of the integer range, tiny and huge floats, old and far-future times.
    """
    sampler = _Sampler(hints or {}, frozenset(only) if only is not None else None, edge)
    found = sampler.of(mi.type_info(tp), "", 0)
    out: list[Any] = []
    seen: set[bytes] = set()
    for value in found:
        try:
            data = msgspec.json.encode(value)
            msgspec.json.decode(data, type=tp)
        except (msgspec.ValidationError, msgspec.EncodeError, TypeError, ValueError):
            continue
        if data not in seen:
            seen.add(data)
            out.append(value)
    return out


_INTS = (0, 1, 2, 10, 1000, 1_000_000, -1)
_EDGE_INTS = (-1, 2**53 + 1, -(2**63), 2**63 - 1, 0)
_FLOATS = (0.0, 1.0, 2.5, 1000.0, -1.0)
_EDGE_FLOATS = (-0.0, 1e-300, 1.7e308, -1.7e308, 0.1)
_EDGE_STRS = ("", " ", "é\u00e8\u4e2d", "\x00", "\U0001f600" * 3, "x" * 300, "null")


class _Sampler:
    def __init__(self, hints: Hints, only: frozenset[str] | None, edge: bool = False) -> None:
        self.hints = {} if edge else hints
        self.only = only
        self.edge = edge

    def of(self, t: mi.Type, name: str, depth: int) -> list[Any]:
        hinted = [h for h in self.hints.get(name, ()) if _fits(h, t)]
        return _dedupe(hinted + self._plain(t, name, depth))[:_MAX_SAMPLES]

    def _plain(self, t: mi.Type, name: str, depth: int) -> list[Any]:
        if isinstance(t, mi.Metadata):
            return self.of(t.type, name, depth)
        if isinstance(t, mi.AnyType | mi.CustomType):
            return [None, 0, "x"] if isinstance(t, mi.AnyType) or t.cls is object else []
        if isinstance(t, mi.NoneType):
            return [None]
        if isinstance(t, mi.BoolType):
            return [False, True]
        if isinstance(t, mi.IntType):
            ints = _EDGE_INTS if self.edge else _INTS
            return [v for v in ints if _in_bounds(v, t)] + [
                b for b in (t.ge, t.le, t.gt and t.gt + 1, t.lt and t.lt - 1) if b is not None
            ]
        if isinstance(t, mi.FloatType):
            floats = _EDGE_FLOATS if self.edge else _FLOATS
            return [float(v) for v in floats if _in_bounds(v, t)] + [
                float(b) for b in (t.ge, t.le) if b is not None
            ]
        if isinstance(t, mi.StrType):
            size = t.min_length or 0
            if self.edge:
                return [x for x in _EDGE_STRS if len(x) >= size] + ["\u00e9" * max(1, size)]
            return ["x" * max(1, size), ""] if not size else ["x" * size]
        if isinstance(t, mi.BytesType | mi.ByteArrayType | mi.MemoryViewType):
            return [b"\x00\xff", b""] if self.edge else [b"", b"x"]
        if isinstance(t, mi.DateTimeType):
            moments = (
                [datetime(1970, 1, 1, tzinfo=UTC), datetime(2999, 12, 31, 23, 59, tzinfo=UTC)]
                if self.edge
                else [datetime(2026, 1, 1, tzinfo=UTC)]
            )
            return [m.replace(tzinfo=None) if t.tz is False else m for m in moments]
        if isinstance(t, mi.DateType):
            return [date(2026, 1, 1)]
        if isinstance(t, mi.TimeType):
            return [time(12, 0, tzinfo=UTC) if t.tz else time(12, 0)]
        if isinstance(t, mi.TimeDeltaType):
            return [timedelta(0), timedelta(seconds=90)]
        if isinstance(t, mi.UUIDType):
            return [uuid.UUID(int=1)]
        if isinstance(t, mi.DecimalType):
            return [Decimal(0), Decimal("1.5")]
        if isinstance(t, mi.EnumType):
            return list(t.cls)
        if isinstance(t, mi.LiteralType):
            return list(t.values)
        if isinstance(t, mi.UnionType):
            parts = [self.of(u, name, depth) for u in t.types]
            parts.sort(key=lambda p: p != [None])  # None (the simplest) first
            return _interleave(parts)
        if depth >= _MAX_DEPTH:
            return []
        if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
            items = self.of(t.item_type, name, depth + 1)
            kind = {mi.ListType: list, mi.VarTupleType: tuple, mi.SetType: set}.get(
                type(t), frozenset
            )
            lo = t.min_length or 0
            out: list[Any] = [kind()] if lo == 0 else []
            if items:
                out.append(kind(items[:1] * max(1, lo)))
            return out
        if isinstance(t, mi.DictType | mi.FrozenDictType):
            keys, vals = self.of(t.key_type, name, depth + 1), self.of(t.value_type, "", depth + 1)
            out2: list[Any] = [] if t.min_length else [{}]
            if keys and vals:
                out2.append({keys[0]: vals[0]})
            return out2
        if isinstance(t, mi.TupleType):
            options = [self.of(i, name, depth + 1) for i in t.item_types]
            if not all(options):
                return []
            base = [o[0] for o in options]
            return [tuple(base)] + [
                (*base[:i], v, *base[i + 1 :]) for i, o in enumerate(options) for v in o[1:3]
            ]
        if isinstance(t, mi.StructType | mi.DataclassType | mi.NamedTupleType | mi.TypedDictType):
            return self._record(t, depth)
        return []

    def _record(
        self, t: mi.StructType | mi.DataclassType | mi.NamedTupleType | mi.TypedDictType, depth: int
    ) -> list[Any]:
        base: dict[str, Any] = {}
        variants: list[tuple[str, list[Any]]] = []
        for f in t.fields:
            options = self.of(f.type, f.name, depth + 1)
            if f.required:
                if not options:
                    return []
                base[f.name] = options[0]
                rest = options[1:]
            else:
                rest = options  # the base leaves it at its default
            if self.only is None or f.name in self.only:
                variants.append((f.name, rest))

        def make(values: dict[str, Any]) -> Any:
            given = {k: v for k, v in values.items() if v is not _OMIT}
            return dict(given) if isinstance(t, mi.TypedDictType) else t.cls(**given)

        out = [make(base)]
        # Round robin over the fields, so that a long list of one field does not crowd out the others.
        for i in range(_MAX_SAMPLES):
            more = [(n, vs[i]) for n, vs in variants if i < len(vs)]
            if not more:
                break
            for n, v in more:
                try:
                    out.append(make({**base, n: v}))
                except (TypeError, ValueError):
                    continue
        return out


def _fits(value: Any, t: mi.Type) -> bool:
    while isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.UnionType):
        return any(_fits(value, u) for u in t.types)
    if isinstance(t, mi.StrType):
        return isinstance(value, str)
    if isinstance(t, mi.BoolType):
        return isinstance(value, bool)
    if isinstance(t, mi.IntType):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(t, mi.FloatType):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(t, mi.LiteralType):
        return value in t.values
    return False


def _in_bounds(v: float, t: mi.IntType | mi.FloatType) -> bool:
    return (
        (t.ge is None or v >= t.ge)
        and (t.gt is None or v > t.gt)
        and (t.le is None or v <= t.le)
        and (t.lt is None or v < t.lt)
        and (not t.multiple_of or v % t.multiple_of == 0)
    )


def _dedupe(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if not any(type(v) is type(o) and v == o for o in out):
            out.append(v)
    return out


def _interleave(parts: list[list[Any]]) -> list[Any]:
    out: list[Any] = []
    for i in range(max((len(p) for p in parts), default=0)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


# --------------------------------------------------------------------------- hints


def hints_of(d: WorkflowDef) -> dict[str, list[Any]]:
    """Per field name, the constants the workflow's code compares it with (and, for numbers, +-1)."""
    found: dict[str, list[Any]] = {}
    for fn in _functions(d):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            names = [n for n in map(_field_name, sides) if n]
            consts = [c for s in sides for c in _constants(s)]
            for name in names:
                for c in consts:
                    extra = (
                        [c - 1, c, c + 1]
                        if isinstance(c, int | float) and not isinstance(c, bool)
                        else [c]
                    )
                    bucket = found.setdefault(name, [])
                    bucket.extend(v for v in extra if v not in bucket)
    return found


def _field_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        key = node.slice.value
        return key if isinstance(key, str) else None
    return None


def _constants(node: ast.expr) -> list[Any]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str | int | float):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [c for e in node.elts for c in _constants(e)]
    return []


def _functions(d: WorkflowDef) -> list[Callable[..., Any]]:
    """The code of a workflow: its rule methods, result handlers, mutators and conditions."""
    out: list[Callable[..., Any]] = []
    seen: set[int] = set()

    def add(obj: Any, depth: int = 0) -> None:
        if obj is None or id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, list | tuple):
            for o in obj:
                add(o, depth + 1)
            return
        fn = getattr(obj, "fn", None)  # a Condition, a RuleMethod
        if fn is not None and callable(fn):
            add(fn, depth + 1)
            return
        if inspect.isfunction(obj) or inspect.ismethod(obj):
            out.append(obj)
            for cell in getattr(obj, "__closure__", None) or ():
                try:
                    add(cell.cell_contents, depth + 1)
                except ValueError:
                    continue

    for r in d.rules:
        add(getattr(d.cls, r.method_name, None))
        add(getattr(d.cls, r.result_handler_name or "", None))
        add(r.mutator)
        add(r.condition)
    return out
