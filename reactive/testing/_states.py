"""Strategies for execution states whose base fields are consistent (``states``, ``execution_ids``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec.inspect as mi
from hypothesis import strategies as st

from reactive.compiled import ActionType
from reactive.dsl.state import ExecutionState, Status, TimelineEntry
from reactive.testing._values import (
    _EPOCH_MAX,
    _EPOCH_MIN,
    _OMIT,
    SearchStrategy,
    _as_strategy,
    _Translator,
)

__all__ = ["execution_ids", "states"]

S = TypeVar("S", bound=ExecutionState)

_TERMINAL = frozenset(
    {Status.COMPLETED, Status.FAILED, Status.ESCALATED, Status.TIMED_OUT, Status.CANCELLED}
)

_BASE_FIELDS = frozenset(ExecutionState.__struct_fields__)


def execution_ids() -> SearchStrategy[str]:
    """Token-safe execution ids (letters, digits, '-' and '_')."""
    return st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)


def _phase_strategy(phases: Sequence[str] | None) -> SearchStrategy[str]:
    if phases:
        return st.sampled_from(list(phases))
    return st.text("abcdefghijklmnopqrstuvwxyz_", max_size=10)


def _utc_times() -> SearchStrategy[datetime]:
    return st.datetimes(_EPOCH_MIN, _EPOCH_MAX, timezones=st.just(UTC))


def states(
    state_type: type[S],
    *,
    phases: Sequence[str] | None = None,
    statuses: Sequence[Status | str] | None = None,
    ids: SearchStrategy[str] | Sequence[str] | None = None,
    workflow_id: str | None = None,
    max_iteration: int = 10,
    pending_rules: Sequence[str] | None = None,
    timeline: bool = True,
    **overrides: Any,
) -> SearchStrategy[S]:
    """Instances of ``state_type`` (an ``ExecutionState`` subclass) with consistent base fields.

    * ``status`` from ``statuses`` (default: every ``Status``); ``phase`` from
      ``phases`` (default: short lowercase words); ``0 <= iteration <= max_iteration``.
    * ``pending_task_id`` / ``pending_rule_id`` (from ``pending_rules``) and
      ``task_deadline`` are set exactly when the status is waiting; ``completed_at``
      exactly when it is terminal; ``error`` only when failed, escalated or timed
      out; ``created_at`` whenever it is not pending. Times are UTC.
    * ``id`` from ``ids`` (a strategy or a list; default token-safe ids),
      ``workflow_id`` as given (default: drawn).
    * The engine's bookkeeping (firings, outbox, owner) is left empty.
    * The subclass's own fields are drawn from their types (see ``values``).

    ``overrides`` map any field name to a value or a strategy and win over all of the above.
    """
    if not (isinstance(state_type, type) and issubclass(state_type, ExecutionState)):
        raise TypeError(f"{state_type!r} does not subclass ExecutionState")
    info = mi.type_info(state_type)
    assert isinstance(info, mi.StructType)
    unknown = set(overrides) - set(state_type.__struct_fields__)
    if unknown:
        raise TypeError(f"{state_type.__name__} has no field(s) {', '.join(sorted(unknown))}")
    translator = _Translator()
    own: dict[str, SearchStrategy[Any]] = {}
    for f in info.fields:
        if f.name in _BASE_FIELDS or f.name in overrides:
            continue
        strat = translator.strategy(f.type)
        own[f.name] = strat if f.required else st.one_of(st.just(_OMIT), strat)
    status_pool = [Status(s) for s in statuses] if statuses else list(Status)
    id_strategy: SearchStrategy[str] = (
        execution_ids()
        if ids is None
        else ids
        if isinstance(ids, st.SearchStrategy)
        else st.sampled_from(list(ids))
    )
    token = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
    rule_ids = st.sampled_from(list(pending_rules)) if pending_rules else token
    fixed = {k: _as_strategy(v) for k, v in overrides.items()}

    @st.composite
    def draw_state(draw: st.DrawFn) -> S:
        status: Status = (
            draw(fixed["status"]) if "status" in fixed else draw(st.sampled_from(status_pool))
        )
        kw: dict[str, Any] = {
            "id": draw(id_strategy),
            "workflow_id": workflow_id if workflow_id is not None else draw(token),
            "phase": draw(_phase_strategy(phases)),
            "iteration": draw(st.integers(0, max(0, max_iteration))),
            "status": status,
        }
        if status in (Status.FAILED, Status.ESCALATED, Status.TIMED_OUT):
            kw["error"] = draw(st.text(min_size=1, max_size=20))
        if status is not Status.PENDING:
            created = draw(_utc_times())
            kw["created_at"] = created
            kw["updated_at"] = created + timedelta(seconds=draw(st.integers(0, 3600)))
            if draw(st.booleans()):
                kw["deadline"] = created + timedelta(seconds=draw(st.integers(1, 7200)))
            if status in _TERMINAL:
                kw["completed_at"] = kw["updated_at"]
            if status is Status.WAITING:
                kw["pending_rule_id"] = draw(rule_ids)
                kw["pending_task_id"] = (
                    f"{kw['id']}-{kw['pending_rule_id']}-{draw(st.integers(1, 99))}"
                )
                kw["pending_since"] = kw["updated_at"]
                kw["task_deadline"] = kw["updated_at"] + timedelta(
                    seconds=draw(st.integers(1, 600))
                )
            if timeline:
                kw["timeline"] = draw(
                    st.lists(
                        st.builds(
                            TimelineEntry,
                            timestamp=st.just(created),
                            rule_id=token,
                            trigger_mode=st.sampled_from(
                                ["kv", "message", "message+state", "callback", "timer"]
                            ),
                            action=st.sampled_from([a.value for a in ActionType]),
                            phase=_phase_strategy(phases),
                            iteration=st.integers(0, max(0, max_iteration)),
                        ),
                        max_size=2,
                    )
                )
        for name, strat in own.items():
            value = draw(strat)
            if value is not _OMIT:
                kw[name] = value
        for name, strat in fixed.items():
            kw[name] = draw(strat) if name != "status" else status
        return state_type(**kw)

    return draw_state()
