"""Conditions for ``@rule(when=...)``: pure callables ``ctx -> bool``, composable with ``&``, ``|``, ``~``."""

from __future__ import annotations

from reactive.dsl.conditions import (
    Condition,
    ConditionFunc,
    all_of,
    always,
    any_of,
    as_condition,
    condition,
    has_error,
    has_message,
    has_state,
    is_waiting,
    iteration_eq,
    iteration_lt,
    never,
    no_error,
    not_,
    not_waiting,
    phase_in,
    phase_is,
    status_is,
)

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
