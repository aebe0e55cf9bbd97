"""Compiled definitions, for tools: graph renderers, linters, the command line.

A workflow class compiles, once, into a frozen :class:`WorkflowDef` holding one
:class:`RuleDef` per rule (its :class:`TriggerMode` and :class:`ActionType`,
subjects, bucket, limits, the condition as text). ``reactive.definition_of(W)``
returns it. Workflows are written with ``reactive``; these are what a tool reads::

    from reactive import definition_of
    from reactive.compiled import ActionType

    async_rules = [r.id for r in definition_of(PlanReview).rules if r.action is ActionType.PUBLISH_ASYNC]
"""

from __future__ import annotations

from reactive.dsl.definition import ActionType, RuleDef, TriggerMode, WorkflowDef

__all__ = ["ActionType", "RuleDef", "TriggerMode", "WorkflowDef"]

# Shown as reactive.compiled.X in tracebacks and docs, as reactive/__init__.py does.
for _cls in (ActionType, RuleDef, TriggerMode, WorkflowDef):
    _cls.__module__ = __name__
del _cls
