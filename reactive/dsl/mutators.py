"""Small mutators for ``@rule(mutate=...)``: each is a callable ``ctx -> None`` run before the method."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reactive.dsl.context import RuleContext

__all__ = ["Mutator", "chain", "increment_iteration", "set_error", "transition"]

Mutator = Callable[[RuleContext[Any, Any]], None]


def transition(phase: str) -> Mutator:
    """Move the execution to ``phase``."""

    def _transition(ctx: RuleContext[Any, Any]) -> None:
        ctx.state.phase = phase

    return _transition


def increment_iteration() -> Mutator:
    """Add one to the execution's iteration."""

    def _increment(ctx: RuleContext[Any, Any]) -> None:
        ctx.state.iteration += 1

    return _increment


def set_error(error: str) -> Mutator:
    """Record ``error`` on the execution (without failing it)."""

    def _set_error(ctx: RuleContext[Any, Any]) -> None:
        ctx.state.error = error

    return _set_error


def chain(*mutators: Mutator) -> Mutator:
    """Run ``mutators`` in order."""

    def _chain(ctx: RuleContext[Any, Any]) -> None:
        for m in mutators:
            m(ctx)

    return _chain
