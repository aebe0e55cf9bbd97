"""``Checks``: the engine's invariants on every execution, kept up to date step by step.

A machine checks every execution after every step. Doing that from scratch
(decoding every state, reading every message published so far) makes a run
quadratic in its steps; here a state is decoded once per revision and each
published message is read once, when it is new: counts and each execution's
messages are kept as the run goes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgspec

from reactive.backends.memory import PublishedMessage
from reactive.codecs import decode, encode_json
from reactive.compiled import ActionType, RuleDef, TriggerMode, WorkflowDef
from reactive.dsl.context import RuleContext
from reactive.dsl.state import ExecutionState, Status
from reactive.runtime.children import request_subject
from reactive.subjects import matches_pattern
from reactive.testing._engine import TestEngine
from reactive.testing._invariants import (
    Execution,
    Terminal,
    check_fields,
    event_subject,
    iso_time,
    lifecycle_subjects,
)
from reactive.testing._states import _TERMINAL

__all__ = ["Checks", "Invariant"]

Invariant = Callable[[Execution], None]
_STATUSES = frozenset(s.value for s in Status)


class _Published:
    """What one workflow's executions published, per execution, read once per message."""

    def __init__(self, d: WorkflowDef) -> None:
        self.d = d
        self.prefix = d.id + ":"
        self.lifecycle = lifecycle_subjects(d)
        # Rules that only publish name the key in their message ids: <wf>:<rule>:<bucket>.<key>:<trigger>.
        self.claim_prefixes = [
            (f"{r.id}:", tuple({f"{d.bucket}.", f"{r.bucket}."}))
            for r in d.rules
            if not r.writes_state
        ]
        self.by_execution: dict[str, list[PublishedMessage]] = {}
        self.events: dict[str, int] = {}  # lifecycle events per execution id
        self.nonwriting: dict[str, int] = {}  # publishes by rules that do not write state, per key
        # Rules that fired without writing state: per execution id, and all of them.
        self.fired: dict[str, set[str]] = {}
        self.fired_without_state: set[str] = set()

    def add(self, m: PublishedMessage) -> None:
        mid = m.msg_id
        if mid is None or not mid.startswith(self.prefix):
            return
        rest = mid[len(self.prefix) :]
        exec_id = self._claim(rest)
        if exec_id is None:
            parts = rest.rsplit(":", 3)
            if len(parts) == 4 and parts[1].isdigit() and parts[3] in self.d.rules_by_id:
                exec_id = parts[0]  # <wf>:<exec>:<revision>:<index>:<rule>
            else:
                exec_id, _, status = rest.rpartition(":")
                if status not in _STATUSES:
                    return
                if m.subject in self.lifecycle:  # <wf>:<exec>:<status>
                    self.events[exec_id] = self.events.get(exec_id, 0) + 1
        self.by_execution.setdefault(exec_id, []).append(m)

    def _claim(self, rest: str) -> str | None:
        for rule_prefix, buckets in self.claim_prefixes:
            if not rest.startswith(rule_prefix):
                continue
            where = rest[len(rule_prefix) :].rpartition(":")[0]
            if where == "_":  # a message rule with no execution
                self.fired_without_state.add(rule_prefix[:-1])
                return ""
            for bucket in buckets:
                if where.startswith(bucket):
                    key = where[len(bucket) :]
                    self.nonwriting[key] = self.nonwriting.get(key, 0) + 1
                    exec_id = self.d.execution_id_for(key)
                    self.fired.setdefault(exec_id, set()).add(rule_prefix[:-1])
                    self.fired_without_state.add(rule_prefix[:-1])
                    return exec_id
        return None


class Checks:
    """The invariants ``WorkflowMachine`` documents, on every execution of ``definitions``."""

    def __init__(
        self,
        definitions: Sequence[WorkflowDef],
        *,
        rules_at_rest: bool,
        invariants: Sequence[Invariant] = (),
        hook: Callable[[WorkflowDef, str, ExecutionState], None] | None = None,
    ) -> None:
        self.definitions = list(definitions)
        self.rules_at_rest = rules_at_rest
        self.invariants = list(invariants)
        self.hook = hook
        self.terminal: dict[tuple[str, str], Terminal] = {}
        self.seen: dict[str, set[str]] = {d.id: set() for d in definitions}
        self.published = {d.id: _Published(d) for d in definitions}
        self.requests: dict[tuple[str, str], int] = {}  # (subject, task id) -> publishes
        self._cursor = 0
        # Per (workflow, key): the revision last decoded, and its state.
        self._decoded: dict[tuple[str, str], tuple[int, bytes, Any]] = {}
        # Per (workflow, key): the (revision, clock) at which no rule was left undone, and the
        # (revision, clock, messages) at which every invariant last held.
        self._at_rest: dict[tuple[str, str], tuple[int, float]] = {}
        self._checked: dict[tuple[str, str], tuple[int, float, int]] = {}
        # Per workflow id: the executions as of the last refresh, by execution id; stale
        # (set by whoever changes them) until the next refresh.
        self.live: dict[str, dict[str, Any]] = {d.id: {} for d in definitions}
        self.stale = False

    # ------------------------------------------------------------------ reading

    def catch_up(self, te: TestEngine) -> None:
        """Read the messages published since the last call."""
        published = te.backend.published
        for m in published[self._cursor :]:
            if m.duplicate:
                continue
            task_id = m.headers.get("Reactive-Task-Id") if m.headers else None
            if task_id:
                k = (m.subject, task_id)
                self.requests[k] = self.requests.get(k, 0) + 1
            for p in self.published.values():
                p.add(m)
        self._cursor = len(published)

    def refresh(self, te: TestEngine) -> None:
        """Read the executions there are now (``live``), decoding only what changed."""
        for d in self.definitions:
            self.live[d.id] = {
                d.execution_id_for(key): state for key, _rev, _raw, state in self.entries(te, d)
            }
        self.stale = False

    def entries(self, te: TestEngine, d: WorkflowDef) -> Iterator[tuple[str, int, bytes, Any]]:
        """Every execution of ``d``: key, revision, value, state (decoded once per revision)."""
        backend = te.backend
        decoded = self._decoded
        for key in backend.peek_keys(d.bucket, f"{d.id}.*"):
            entry = backend.peek(d.bucket, key)
            if entry is None:
                continue
            k = (d.id, key)
            cached = decoded.get(k)
            if cached is not None and cached[0] == entry.revision and cached[1] is entry.value:
                yield key, entry.revision, entry.value, cached[2]
                continue
            try:
                state = decode(d.state_type, entry.value)
            except Exception as e:
                raise AssertionError(f"{d.id}: the state at {key} does not decode: {e}") from e
            decoded[k] = (entry.revision, entry.value, state)
            yield key, entry.revision, entry.value, state

    def execution(self, te: TestEngine, d: WorkflowDef, key: str) -> Execution | None:
        """What the invariants see of one execution (None if it does not exist)."""
        self.catch_up(te)
        for k, revision, _raw, state in self.entries(te, d):
            if k == key:
                return self._execution(d, key, revision, state, te.clock.now())
        return None

    def _execution(
        self, d: WorkflowDef, key: str, revision: int, state: Any, now: float
    ) -> Execution:
        exec_id = d.execution_id_for(key)
        messages = self.published[d.id].by_execution.get(exec_id, [])
        return Execution(d, key, exec_id, revision, state, tuple(messages), now)

    # ------------------------------------------------------------------ checking

    def check_all(self, te: TestEngine) -> None:
        """Every invariant on every execution; AssertionError names the first that fails."""
        self.catch_up(te)
        now = te.clock.now()
        for d in self.definitions:
            present = set()
            published = self.published[d.id]
            seen = self.seen[d.id]
            live = self.live[d.id] = {}
            for key, revision, raw, state in self.entries(te, d):
                exec_id = d.execution_id_for(key)
                live[exec_id] = state
                present.add(key)
                seen.add(key)
                # The engine's invariants of an execution depend on its revision, the clock
                # and what it published: unchanged since it was last checked, they still hold.
                mark = (revision, now, len(published.by_execution.get(exec_id, ())))
                if self._checked.get((d.id, key)) == mark:
                    self._hooks(d, key, revision, state, now)
                    continue
                where = f"{d.id}/{exec_id} (status {state.status.value}, phase {state.phase!r})"
                check_fields(d, exec_id, state, where)
                terminal = state.status in _TERMINAL
                if not terminal:
                    _check_times(state, now, where)
                self._check_absorbed(d, key, revision, raw, state, where)
                if state.status is Status.WAITING:
                    r = d.rules_by_id[state.pending_rule_id]
                    task = state.pending_task_id
                    subject = (
                        request_subject(r, task, te.engine.callback_prefix)
                        if r.child
                        else r.publish_subject
                    )
                    n = self.requests.get((subject, task), 0)
                    assert n == 1, (
                        f"{where}: {n} request(s) for its pending task {task} "
                        f"on {subject!r}, expected 1"
                    )
                expected = 1 if terminal and event_subject(d, state.status) else 0
                got = published.events.get(state.id or exec_id, 0)
                assert got == expected, (
                    f"{where}: {got} lifecycle event(s) on {sorted(lifecycle_subjects(d))}, "
                    f"expected {expected}"
                )
                if self.rules_at_rest and not terminal:
                    self._check_nothing_left(te, d, key, revision, state, now, where)
                self._checked[(d.id, key)] = mark
                self._hooks(d, key, revision, state, now)
            lost = seen - present
            assert not lost, f"{d.id}: executions vanished: {sorted(lost)}"
        self.stale = False

    def _hooks(self, d: WorkflowDef, key: str, revision: int, state: Any, now: float) -> None:
        """The user's checks: ``check_execution`` and the invariants (after every step)."""
        if self.hook is not None:
            self.hook(d, key, state)
        if self.invariants:
            execution = self._execution(d, key, revision, state, now)
            for invariant in self.invariants:
                invariant(execution)

    def _check_absorbed(
        self, d: WorkflowDef, key: str, revision: int, raw: bytes, state: Any, where: str
    ) -> None:
        """Terminal states absorb, and nothing fires after them."""
        fired = self.published[d.id].nonwriting.get(key, 0)
        seen = self.terminal.get((d.id, key))
        if seen is not None:
            assert len(state.timeline) == seen.timeline, (
                f"{where}: {len(state.timeline) - seen.timeline} timeline entries after it became "
                f"terminal: {state.timeline[seen.timeline :]!r}"
            )
            assert (revision, raw) == (seen.revision, seen.value), (
                f"{where}: terminal state changed (revision {seen.revision} -> {revision}):\n"
                f"  was {seen.value!r}\n  now {raw!r}"
            )
            assert fired == seen.fired, (
                f"{where}: {fired - seen.fired} publish(es) by rules that do not write state "
                "after it became terminal"
            )
        elif state.status in _TERMINAL:
            self.terminal[(d.id, key)] = Terminal(revision, raw, len(state.timeline), fired)

    def _check_nothing_left(
        self,
        te: TestEngine,
        d: WorkflowDef,
        key: str,
        revision: int,
        state: ExecutionState,
        now: float,
        where: str,
    ) -> None:
        """No state-writing KV rule holds on a live execution at rest unless its limits hold it back."""
        shared = any(r.shared_cooldown for r in d.rules)
        k = (d.id, key)
        if not shared and self._at_rest.get(k) == (revision, now):
            return  # checked on this revision at this time already
        probe: Any = None
        for r in d.rules:
            if r.mode is not TriggerMode.STATE or not r.writes_state or r.on_deletes:
                continue
            if r.action is ActionType.PUBLISH_ASYNC and state.status is Status.WAITING:
                continue
            if r.bucket != d.bucket or not matches_pattern(key, r.pattern):
                continue
            if probe is None:
                # A copy for the conditions; as the engine sees a state an outside writer put.
                probe = decode(d.state_type, encode_json(state))
                if probe.status is Status.PENDING:
                    probe.status = Status.RUNNING
            ctx: RuleContext[Any, Any] = RuleContext(
                state=probe,
                message=None,
                workflow_id=d.id,
                execution_id=state.id or d.execution_id_for(key),
                key=key,
                bucket=d.bucket,
                revision=revision,
                trigger_mode="kv",
                now=now,
                rule_id=r.id,
            )
            try:
                passes = bool(r.condition(ctx))
            except Exception:
                passes = False
            if not passes:
                continue
            firing = state.firings.get(r.id)
            held = firing is not None and (
                (r.max_firings and firing.count >= r.max_firings)
                or (r.cooldown and not r.shared_cooldown and now < firing.last_at + r.cooldown)
            )
            if not held and r.shared_cooldown:
                end = shared_cooldown_end(te, d, r)
                held = end is not None and now < end
            assert held, (
                f"{where}: at rest, but rule {r.id!r} ({r.condition_description}) holds on "
                f"revision {revision} and did not fire (firings: {firing!r})"
            )
        self._at_rest[k] = (revision, now)


def _check_times(state: ExecutionState, now: float, where: str) -> None:
    """A live execution's deadline and task deadline are later than the clock."""
    if state.deadline is not None:
        assert state.deadline.timestamp() > now, (
            f"{where}: deadline {state.deadline.isoformat()} has passed "
            f"(clock {iso_time(now)}) but the execution is not timed out"
        )
    if state.status is Status.WAITING and state.task_deadline is not None:
        assert state.task_deadline.timestamp() > now, (
            f"{where}: task {state.pending_task_id} timed out at "
            f"{state.task_deadline.isoformat()} (clock {iso_time(now)}) but is still awaited"
        )


def shared_cooldown_end(te: TestEngine, d: WorkflowDef, r: RuleDef) -> float | None:
    """When the workflow-wide cooldown of ``r`` last claimed ends (None: none claimed)."""
    if not r.shared_cooldown:
        return None
    entry = te.backend.peek(te.engine.meta_bucket, f"cool.{d.id}.{r.id}")
    if entry is None:
        return None
    claim = msgspec.json.decode(entry.value)
    return float(claim.get("at", 0.0)) + r.cooldown
