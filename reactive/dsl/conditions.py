"""Conditions: pure callables ``ctx -> bool``, composable with ``&``, ``|`` and ``~``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from reactive.dsl.context import RuleContext
from reactive.dsl.state import ExecutionState, Status

__all__ = [
    "Condition",
    "ConditionFunc",
    "all_of",
    "always",
    "any_of",
    "as_condition",
    "condition",
    "has_error",
    "has_message",
    "has_state",
    "is_waiting",
    "iteration_eq",
    "iteration_lt",
    "never",
    "no_error",
    "not_",
    "not_waiting",
    "phase_in",
    "phase_is",
    "status_is",
]

ConditionFunc = Callable[[RuleContext[Any, Any]], bool]


class Condition:
    """A named condition. Call it with a RuleContext; combine with ``&``, ``|``, ``~``."""

    __slots__ = ("description", "fn", "phases")

    def __init__(
        self,
        fn: ConditionFunc,
        description: str | None = None,
        phases: frozenset[str] | None = None,
    ) -> None:
        self.fn = fn
        # The phases in which this condition can hold, when known (for drawing graphs).
        self.phases = phases
        self.description: str = description or str(getattr(fn, "__name__", repr(fn)))

    def __call__(self, ctx: RuleContext[Any, Any]) -> bool:
        return bool(self.fn(ctx))

    def __and__(self, other: ConditionFunc) -> Condition:
        return all_of(self, other)

    def __rand__(self, other: ConditionFunc) -> Condition:
        return all_of(other, self)

    def __or__(self, other: ConditionFunc) -> Condition:
        return any_of(self, other)

    def __ror__(self, other: ConditionFunc) -> Condition:
        return any_of(other, self)

    def __invert__(self) -> Condition:
        return not_(self)

    def __repr__(self) -> str:
        return f"Condition({self.description})"


def _describe(c: ConditionFunc) -> str:
    if isinstance(c, Condition):
        return c.description
    return str(getattr(c, "__name__", repr(c)))


def as_condition(c: ConditionFunc) -> Condition:
    """Wrap a plain callable as a Condition (a Condition is returned as is)."""
    if isinstance(c, Condition):
        return c
    if not callable(c):
        raise TypeError(f"a condition must be callable, got {c!r}")
    return Condition(c)


def condition(fn: ConditionFunc) -> Condition:
    """Decorator: turn a function ``ctx -> bool`` into a composable Condition."""
    return Condition(fn)


def all_of(*conditions: ConditionFunc) -> Condition:
    """True when every condition is true (an empty list is true)."""
    fns = tuple(_flatten(conditions))
    if len(fns) == 1:
        return as_condition(fns[0])

    def _all(ctx: RuleContext[Any, Any]) -> bool:
        for f in fns:
            if not f(ctx):
                return False
        return True

    known = [c.phases for c in fns if isinstance(c, Condition) and c.phases is not None]
    phases = frozenset.intersection(*known) if known else None
    return Condition(
        _all, "(" + " & ".join(_describe(f) for f in fns) + ")" if fns else "always", phases
    )


def any_of(*conditions: ConditionFunc) -> Condition:
    """True when at least one condition is true (an empty list is false)."""
    fns = tuple(_flatten(conditions))
    if len(fns) == 1:
        return as_condition(fns[0])

    def _any(ctx: RuleContext[Any, Any]) -> bool:
        for f in fns:
            if f(ctx):
                return True
        return False

    known = [c.phases if isinstance(c, Condition) else None for c in fns]
    phases = None if not known or None in known else frozenset().union(*known)  # type: ignore[arg-type]
    return Condition(
        _any, "(" + " | ".join(_describe(f) for f in fns) + ")" if fns else "never", phases
    )


def not_(c: ConditionFunc) -> Condition:
    """True when ``c`` is false."""
    return Condition(lambda ctx: not c(ctx), f"~{_describe(c)}")


def _flatten(
    conditions: Iterable[ConditionFunc | Sequence[ConditionFunc]],
) -> Iterable[ConditionFunc]:
    for c in conditions:
        if isinstance(c, list | tuple):
            yield from _flatten(c)
        else:
            if not callable(c):
                raise TypeError(f"a condition must be callable, got {c!r}")
            yield c


def _base(ctx: RuleContext[Any, Any]) -> ExecutionState | None:
    state = ctx.state
    return state if isinstance(state, ExecutionState) else None


def phase_is(phase: str) -> Condition:
    """The execution's phase is ``phase``."""

    def _phase_is(ctx: RuleContext[Any, Any]) -> bool:
        s = ctx.state  # (as _base, inline: this is the most common condition)
        return isinstance(s, ExecutionState) and s.phase == phase

    return Condition(_phase_is, f"phase_is({phase!r})", frozenset({phase}))


def phase_in(*phases: str) -> Condition:
    """The execution's phase is one of ``phases``."""
    wanted = frozenset(phases)

    def _phase_in(ctx: RuleContext[Any, Any]) -> bool:
        s = ctx.state
        return isinstance(s, ExecutionState) and s.phase in wanted

    return Condition(_phase_in, f"phase_in({', '.join(map(repr, phases))})", wanted)


def status_is(status: Status | str) -> Condition:
    """The execution's status is ``status``."""
    st = Status(status)

    def _status_is(ctx: RuleContext[Any, Any]) -> bool:
        s = _base(ctx)
        return s is not None and s.status is st

    return Condition(_status_is, f"status_is({st.value!r})")


def iteration_lt(limit: int) -> Condition:
    """The iteration is below ``limit``."""

    def _iteration_lt(ctx: RuleContext[Any, Any]) -> bool:
        s = _base(ctx)
        return s is not None and s.iteration < limit

    return Condition(_iteration_lt, f"iteration_lt({limit})")


def iteration_eq(n: int) -> Condition:
    """The iteration equals ``n``."""

    def _iteration_eq(ctx: RuleContext[Any, Any]) -> bool:
        s = _base(ctx)
        return s is not None and s.iteration == n

    return Condition(_iteration_eq, f"iteration_eq({n})")


def _has_error(ctx: RuleContext[Any, Any]) -> bool:
    s = _base(ctx)
    return s is not None and s.error != ""


def _no_error(ctx: RuleContext[Any, Any]) -> bool:
    s = _base(ctx)
    return s is None or s.error == ""


def _is_waiting(ctx: RuleContext[Any, Any]) -> bool:
    s = _base(ctx)
    return s is not None and s.status is Status.WAITING


def _not_waiting(ctx: RuleContext[Any, Any]) -> bool:
    s = _base(ctx)
    return s is None or s.status is not Status.WAITING


has_error = Condition(_has_error, "has_error")
"""The execution has an error."""
no_error = Condition(_no_error, "no_error")
"""The execution has no error (true when there is no state)."""
is_waiting = Condition(_is_waiting, "is_waiting")
"""The execution waits for an async callback."""
not_waiting = Condition(_not_waiting, "not_waiting")
"""The execution does not wait for a callback (true when there is no state)."""
has_state = Condition(lambda ctx: ctx.state is not None, "has_state")
"""The context carries state."""
has_message = Condition(lambda ctx: ctx.message is not None, "has_message")
"""The context carries a message."""
always = Condition(lambda ctx: True, "always")
"""Always true."""
never = Condition(lambda ctx: False, "never")
"""Always false."""
