"""Strategies for values of any type msgspec can decode (``values``, ``messages``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import msgspec
import msgspec.inspect as mi
from hypothesis import strategies as st

__all__ = ["messages", "values"]

T = TypeVar("T")
SearchStrategy = st.SearchStrategy

_INT64 = (-(2**63), 2**63 - 1)
_MAX_COLLECTION = 3
_EPOCH_MIN = datetime(2020, 1, 1)
_EPOCH_MAX = datetime(2035, 1, 1)


def values(tp: Any) -> SearchStrategy[Any]:
    """Values of ``tp`` (any type msgspec can decode) that survive a JSON round trip.

    Honours ``Annotated[..., msgspec.Meta(...)]`` bounds, lengths and patterns;
    floats are finite; ints fit in 64 bits; datetimes are in UTC; collections
    hold at most three items. Recursive structs are supported.
    """
    return _Translator().strategy(mi.type_info(tp))


_OMIT: Any = object()  # "leave this field at its default"


class _Translator:
    """Turns msgspec.inspect type trees into strategies, memoising shared (recursive) nodes."""

    def __init__(self) -> None:
        self._memo: dict[int, SearchStrategy[Any]] = {}

    def strategy(self, t: mi.Type) -> SearchStrategy[Any]:
        if isinstance(t, mi.Metadata):
            return self.strategy(t.type)
        if isinstance(t, mi.AnyType):
            return _json_values()
        if isinstance(t, mi.NoneType):
            return st.none()
        if isinstance(t, mi.BoolType):
            return st.booleans()
        if isinstance(t, mi.IntType):
            return _ints(t)
        if isinstance(t, mi.FloatType):
            return _floats(t)
        if isinstance(t, mi.StrType):
            return _strs(t)
        if isinstance(t, mi.BytesType | mi.ByteArrayType | mi.MemoryViewType):
            out: SearchStrategy[Any] = st.binary(
                min_size=t.min_length or 0, max_size=_cap(t.min_length, t.max_length, 16)
            )
            if isinstance(t, mi.ByteArrayType):
                out = out.map(bytearray)
            return out
        if isinstance(t, mi.DateTimeType):
            aware = st.datetimes(_EPOCH_MIN, _EPOCH_MAX, timezones=st.just(UTC))
            return st.datetimes(_EPOCH_MIN, _EPOCH_MAX) if t.tz is False else aware
        if isinstance(t, mi.TimeType):
            return st.times(timezones=st.just(UTC)) if t.tz else st.times()
        if isinstance(t, mi.DateType):
            return st.dates(_EPOCH_MIN.date(), _EPOCH_MAX.date())
        if isinstance(t, mi.TimeDeltaType):
            return st.timedeltas(timedelta(days=-1000), timedelta(days=1000))
        if isinstance(t, mi.UUIDType):
            return st.uuids()
        if isinstance(t, mi.DecimalType):
            return st.decimals(
                allow_nan=False,
                allow_infinity=False,
                places=6,
                min_value=-(10**12),
                max_value=10**12,
            )
        if isinstance(t, mi.RawType):
            return st.just(msgspec.Raw(b"null"))
        if isinstance(t, mi.EnumType):
            return st.sampled_from(list(t.cls))
        if isinstance(t, mi.LiteralType):
            return st.sampled_from(t.values)
        if isinstance(t, mi.UnionType):
            return st.one_of(*(self.strategy(u) for u in t.types))
        if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
            items = self.strategy(t.item_type)
            lo, hi = t.min_length or 0, _cap(t.min_length, t.max_length, _MAX_COLLECTION)
            if isinstance(t, mi.SetType | mi.FrozenSetType):
                kind = set if isinstance(t, mi.SetType) else frozenset
                return st.sets(items, min_size=lo, max_size=hi).map(kind)
            lists = st.lists(items, min_size=lo, max_size=hi)
            return lists.map(tuple) if isinstance(t, mi.VarTupleType) else lists
        if isinstance(t, mi.TupleType):
            return st.tuples(*(self.strategy(i) for i in t.item_types))
        if isinstance(t, mi.DictType | mi.FrozenDictType):
            return st.dictionaries(
                self.strategy(t.key_type),
                self.strategy(t.value_type),
                min_size=t.min_length or 0,
                max_size=_cap(t.min_length, t.max_length, _MAX_COLLECTION),
            )
        if isinstance(t, mi.StructType | mi.DataclassType | mi.NamedTupleType | mi.TypedDictType):
            return self.record(t, {})
        if isinstance(t, mi.CustomType):
            return _json_values() if t.cls is object else st.from_type(t.cls)
        raise TypeError(f"no strategy for {t!r}")  # pragma: no cover - ExtType is msgpack-only

    def record(
        self,
        t: mi.StructType | mi.DataclassType | mi.NamedTupleType | mi.TypedDictType,
        overrides: Mapping[str, Any],
    ) -> SearchStrategy[Any]:
        """A struct (dataclass, named tuple, typed dict); ``overrides`` fix or draw fields."""
        key = id(t)
        if not overrides and key in self._memo:
            return self._memo[key]

        def build() -> SearchStrategy[Any]:
            fields: dict[str, SearchStrategy[Any]] = {}
            for f in t.fields:
                if f.name in overrides:
                    fields[f.name] = _as_strategy(overrides[f.name])
                elif f.required:
                    fields[f.name] = self.strategy(f.type)
                else:
                    fields[f.name] = st.one_of(st.just(_OMIT), self.strategy(f.type))
            cls = t.cls

            def make(kwargs: dict[str, Any]) -> Any:
                given = {k: v for k, v in kwargs.items() if v is not _OMIT}
                return dict(given) if isinstance(t, mi.TypedDictType) else cls(**given)

            return st.fixed_dictionaries(fields).map(make)

        out: SearchStrategy[Any] = st.deferred(build)
        if not overrides:
            self._memo[key] = out
        return out


def _as_strategy(value: Any) -> SearchStrategy[Any]:
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


def _cap(lo: int | None, hi: int | None, default: int) -> int:
    """A max size: ``default`` (or the minimum, if larger), within the type's own maximum."""
    cap = max(lo or 0, default)
    return min(hi, cap) if hi is not None else cap


def _ints(t: mi.IntType) -> SearchStrategy[int]:
    lo, hi = _INT64
    if t.ge is not None:
        lo = max(lo, t.ge)
    if t.gt is not None:
        lo = max(lo, t.gt + 1)
    if t.le is not None:
        hi = min(hi, t.le)
    if t.lt is not None:
        hi = min(hi, t.lt - 1)
    m = t.multiple_of
    if m:
        return st.integers(-(-lo // m), hi // m).map(lambda n: n * m)
    return st.integers(lo, hi)


def _floats(t: mi.FloatType) -> SearchStrategy[float]:
    lo = t.ge if t.ge is not None else t.gt
    hi = t.le if t.le is not None else t.lt
    if t.multiple_of:
        m = t.multiple_of
        ilo = math.ceil(lo / m) if lo is not None else -(10**6)
        ihi = math.floor(hi / m) if hi is not None else 10**6
        return st.integers(ilo, ihi).map(lambda n: n * m).filter(lambda x: _in_float_bounds(x, t))
    return st.floats(
        min_value=lo,
        max_value=hi,
        exclude_min=t.gt is not None and t.ge is None,
        exclude_max=t.lt is not None and t.le is None,
        allow_nan=False,
        allow_infinity=False,
    )


def _in_float_bounds(x: float, t: mi.FloatType) -> bool:
    return (
        (t.ge is None or x >= t.ge)
        and (t.gt is None or x > t.gt)
        and (t.le is None or x <= t.le)
        and (t.lt is None or x < t.lt)
    )


def _strs(t: mi.StrType) -> SearchStrategy[str]:
    lo, hi = t.min_length or 0, _cap(t.min_length, t.max_length, 16)
    if t.pattern is not None:
        top = t.max_length
        return st.from_regex(t.pattern).filter(
            lambda s: lo <= len(s) and (top is None or len(s) <= top)
        )
    return st.text(min_size=lo, max_size=hi)


def _json_values() -> SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(*_INT64)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=8)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=5,
    )


def messages(msg_type: type[T], **overrides: Any) -> SearchStrategy[T]:
    """Instances of a message type (a struct, dataclass, ...); ``overrides`` map field names to values or strategies."""
    info = mi.type_info(msg_type)
    if overrides:
        if not isinstance(
            info, mi.StructType | mi.DataclassType | mi.NamedTupleType | mi.TypedDictType
        ):
            raise TypeError(f"field overrides need a struct-like type, not {msg_type!r}")
        unknown = set(overrides) - {f.name for f in info.fields}
        if unknown:
            raise TypeError(f"{msg_type.__name__} has no field(s) {', '.join(sorted(unknown))}")
        return cast(SearchStrategy[T], _Translator().record(info, overrides))
    return cast(SearchStrategy[T], _Translator().strategy(info))
