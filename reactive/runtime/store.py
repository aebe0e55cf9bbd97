"""Storing: the compare-and-set of a state, then its outbox, and the markers that say it went out.

Guarantees kept here:

* Every transition is one compare-and-set of the execution's state; a loser gets
  ConflictError and drops its work (the newer revision is evaluated instead).
* A publish decided by a transition travels in the state's outbox, written in the
  same compare-and-set, and is published after the write. A delivery marker in the
  meta bucket (``out.<bucket>.<key>``) says it went out; another process (or this
  one after a restart) delivers an outbox whose marker is missing once
  ``outbox_grace`` has passed. Every message carries a deterministic
  ``Nats-Msg-Id``, so a stream that captures the subject drops a repeat.
* A state larger than the server takes is never written: the execution fails
  instead (``Replaced``).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict

from reactive.backends.base import KVEntry
from reactive.codecs import encode_json
from reactive.dsl.definition import TriggerMode, WorkflowDef
from reactive.dsl.state import ExecutionState, Status
from reactive.errors import BackendError, ConflictError
from reactive.meta import firing_key, outbox_marker_key
from reactive.runtime.core import Runtime, log
from reactive.runtime.decide import FOREVER
from reactive.runtime.events import Committed
from reactive.runtime.schedules import DEADLINE, timer_id, timer_message
from reactive.runtime.transition import TERMINAL, Ended, end

__all__ = ["STATE_HEADROOM", "Replaced", "Store"]

# A state may be as large as the server's max payload less this: room for the headers
# of its write, and of each message of its outbox when that is published.
STATE_HEADROOM = 8192
_PARKED_MAX = 10_000
_DELIVERED_MAX = 10_000
_DELIVERED_AFTER_BURST = 1_000
_WAITING = Status.WAITING
_PENDING = Status.PENDING
_MESSAGE = TriggerMode.MESSAGE


class Replaced(ConflictError):
    """A transition's write that was replaced by the execution's failure (its state was too large).

    A ConflictError: whoever made the transition treats it as lost to a newer revision.
    """


class Store:
    """Commits states and delivers their outboxes; remembers what it delivered and parked."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.backend = rt.backend
        self.tracing = rt.tracing
        self.instance_id = rt.options.instance_id
        self.meta_bucket = rt.options.meta_bucket
        self.max_state = 1024 * 1024 - STATE_HEADROOM  # (from the server's max payload, at start)
        # Per key, (revision, value) of a waiting state this engine committed, until its
        # callback comes: the callback then starts from it instead of reading the key.
        self.parked: dict[tuple[str, str], tuple[int, bytes]] = {}
        # Per key, the id of the last outbox known to have gone out.
        self.delivered: OrderedDict[tuple[str, str], str] = OrderedDict()

    def size_states_for(self, max_payload: int) -> None:
        self.max_state = max_payload - STATE_HEADROOM

    async def commit(
        self,
        d: WorkflowDef,
        bucket: str,
        key: str,
        revision: int,
        st: ExecutionState,
        ended: Ended | None = None,
        fresh: list[Committed] | None = None,
    ) -> int:
        """Compare-and-set the state, then deliver its outbox; count ``ended`` once it won.

        Raises ConflictError if it lost, Replaced if the state was too large and the
        execution's failure was committed instead. The new revision goes to ``fresh``
        (the worker's list of states to evaluate next).
        """
        if self.tracing.enabled:
            carrier = self.tracing.headers()
            if carrier:
                if not st.trace_parent:
                    st.trace_parent = carrier.get("traceparent", "")
                for m in st.outbox:
                    m.headers = {**m.headers, **carrier}
        data = encode_json(st)
        replaced = len(data) > self.max_state
        if replaced:
            st, data, ended = await self._too_large(d, bucket, key, revision, st, len(data))
        # A terminal state leaves the bucket after the workflow's retention (a per-key TTL).
        ttl = d.retention if d.retention is not None and st.status in TERMINAL else None
        try:
            if ttl is not None:
                new_rev = await (
                    self.backend.kv_create(bucket, key, data, ttl=ttl)
                    if revision == 0
                    else self.backend.kv_update(bucket, key, data, revision, ttl=ttl)
                )
            elif revision == 0:
                new_rev = await self.backend.kv_create(bucket, key, data)
            else:
                new_rev = await self.backend.kv_update(bucket, key, data, revision)
        except ConflictError:
            self.rt.metric(self.rt.metrics.cas_conflicts, d.id).inc()
            raise
        if ended is not None:
            self.count_end(ended)
        if fresh is not None:
            # A terminal state is not evaluated again (no rule fires for it, its outbox has
            # just gone out): an empty value marks it, so that only its echo is skipped.
            fresh.append(
                Committed(bucket, key, revision, new_rev, b"" if st.status in TERMINAL else data)
            )
        if st.status is _WAITING:
            # Its callback is likely to come here: keep the state to start from then.
            parked = self.parked
            parked[(bucket, key)] = (new_rev, data)
            if len(parked) > _PARKED_MAX:
                del parked[next(iter(parked))]
        elif self.parked:
            self.parked.pop((bucket, key), None)
        if st.outbox:
            await self.flush(bucket, key, st, ttl)
        if ttl is not None:
            await self._retire_claims(d, bucket, key, ttl)
        if replaced:
            raise Replaced(f"{key}: the state was too large; the execution failed instead")
        return new_rev

    async def _retire_claims(self, d: WorkflowDef, bucket: str, key: str, ttl: float) -> None:
        """An execution has ended: the claims of its rules that only publish (which say what
        fired for which revision) go with it, after the same retention."""
        for r in d.rules:
            if r.writes_state or r.mode is _MESSAGE:
                continue
            claim = firing_key(f"{d.id}.{r.id}.{bucket}.{key}")
            entry = await self.backend.kv_get(self.meta_bucket, claim)
            if entry is None:
                continue
            # (Claimed again meanwhile, by a late evaluation of an earlier revision: it stays.)
            with contextlib.suppress(ConflictError):
                await self.backend.kv_update(
                    self.meta_bucket, claim, entry.value, entry.revision, ttl=ttl
                )

    async def write(
        self,
        d: WorkflowDef,
        bucket: str,
        key: str,
        revision: int,
        st: ExecutionState,
        ended: Ended | None,
        fresh: list[Committed] | None,
    ) -> None:
        """Commit a lifecycle write (timeout, task timeout, start) made by the engine itself."""
        if st.outbox and not st.outbox_id:
            st.outbox_id = f"{d.id}:{st.id}:{revision}"
        try:
            await self.commit(d, bucket, key, revision, st, ended, fresh)
        except Replaced:
            pass

    def count_end(self, ended: Ended) -> None:
        """Count (and log) an execution that ended, once the write that ended it has won."""
        rt, m = self.rt, self.rt.metrics
        status, wf = ended.status, ended.workflow_id
        if status is Status.COMPLETED:
            counter = rt.metric(m.executions_completed, wf)
        elif status is Status.ESCALATED:
            counter = rt.metric(m.executions_escalated, wf, ended.reason)
        elif status is Status.TIMED_OUT:
            counter = rt.metric(m.executions_timed_out, wf)
        elif status is Status.CANCELLED:
            counter = rt.metric(m.executions_cancelled, wf)
        else:
            counter = rt.metric(m.executions_failed, wf, ended.reason)
        counter.inc()
        rt.metric(m.execution_duration, wf, status).observe(max(ended.duration, 0.0))
        if log.isEnabledFor(logging.INFO):
            log.info(
                "execution %s workflow=%s execution=%s reason=%s",
                status,
                wf,
                ended.execution_id,
                ended.error,
            )

    async def _too_large(
        self, d: WorkflowDef, bucket: str, key: str, revision: int, st: ExecutionState, size: int
    ) -> tuple[ExecutionState, bytes, Ended]:
        """A state too large to store: what to write instead, the execution failed with the reason.

        It starts from the revision the transition started from (which was stored, so
        it fits), or, should that not leave room for the failure, from a new state
        with only the engine's bookkeeping.
        """
        now = self.rt.clock.now()
        entry = await self.backend.kv_get(bucket, key) if revision else None
        if entry is not None and entry.revision != revision:
            raise ConflictError(f"{key}: revision {revision} was superseded")
        reason = (
            f"state of {size} bytes is larger than the {self.max_state} bytes a state may have "
            f"(the server's max payload less {STATE_HEADROOM})"
        )
        last = st.timeline[-1] if st.timeline else None
        log.error("failing execution workflow=%s key=%s: %s", d.id, key, reason)
        for start_from in (entry, None):
            failed = (
                self.rt.decode_state(d, bucket, key, revision, start_from.value)
                if start_from is not None
                else None
            )
            if failed is None:
                failed = d.state_type()
                failed.initialize(st.id or d.execution_id_for(key), d.id, now, None)
                failed.created_at = st.created_at or failed.created_at
                failed.phase, failed.iteration = st.phase, st.iteration
            elif failed.status is _PENDING:
                failed.initialize(failed.id or st.id, d.id, now, None)
            failed.fail(reason)
            ended = end(
                d,
                failed,
                None,
                now,
                self.instance_id,
                "state_too_large",
                mode=last.trigger_mode if last is not None else "",
                rule_id=last.rule_id if last is not None else "",
            )
            data = encode_json(failed)
            if len(data) <= self.max_state:
                return failed, data, ended
        raise BackendError(
            f"{key}: even the failed state is too large to store"
        )  # pragma: no cover

    # ------------------------------------------------------------------ outboxes

    async def create(
        self, d: WorkflowDef, execution_id: str, st: ExecutionState, now: float
    ) -> None:
        """Write a new execution ``st`` (of ``d``), started ``now`` by this engine, with the
        timer of its deadline; ConflictError if it exists."""
        st.initialize(execution_id, d.id, now, d.timeout)
        st.owner = self.rt.options.instance_id
        key = d.key(execution_id)
        if st.deadline is not None:
            # Its deadline is a timer in NATS, in its outbox: published once it is written.
            at = st.deadline.timestamp()
            st.outbox = [
                timer_message(
                    d.id, DEADLINE, d.bucket, key, at, timer_id(d.id, execution_id, 0, DEADLINE, at)
                )
            ]
            st.outbox_id = f"{d.id}:{execution_id}:0"
        await self.backend.kv_create(d.bucket, key, encode_json(st))
        if st.outbox:
            await self.flush(d.bucket, key, st)
        self.rt.metric(self.rt.metrics.executions_created, d.id).inc()
        log.info("execution started workflow=%s execution=%s", d.id, execution_id)

    async def flush(
        self, bucket: str, key: str, st: ExecutionState, ttl: float | None = None
    ) -> None:
        """Publish the state's outbox, then mark it delivered (the marker goes with the state
        after ``ttl``: the retention of a terminal state)."""
        for m in st.outbox:
            await self.backend.publish(
                m.subject, m.payload(), headers=m.headers or None, msg_id=m.msg_id
            )
        # Unacknowledged: a marker lost with the connection costs only a repeated
        # delivery (with the same message ids) after a restart.
        marker = outbox_marker_key(bucket, key)
        if ttl is None:
            await self.backend.kv_put_unacked(self.meta_bucket, marker, st.outbox_id.encode())
        else:
            await self.backend.kv_put_unacked(
                self.meta_bucket, marker, st.outbox_id.encode(), ttl=ttl
            )
        self.mark_delivered(bucket, key, st.outbox_id)

    def mark_delivered(self, bucket: str, key: str, outbox_id: str) -> None:
        k = (bucket, key)
        self.delivered[k] = outbox_id
        self.delivered.move_to_end(k)
        if len(self.delivered) > _DELIVERED_MAX:
            self.delivered.popitem(last=False)

    async def outbox_pending(
        self, bucket: str, key: str, st: ExecutionState, now: float, revision: int | None = None
    ) -> float | None:
        """None once the outbox of this revision has gone out (delivering it if its writer is
        gone); else when to look again (FOREVER: never, the revision is stale).

        ``revision``: the revision ``st`` was read at, when it may be stale (a change
        from a partition). A superseded revision's outbox is never delivered again:
        every engine write settles the outbox it replaces first.
        """
        if self.delivered.get((bucket, key)) == st.outbox_id:
            return None
        marker = await self.backend.kv_get(self.meta_bucket, outbox_marker_key(bucket, key))
        if marker is not None and marker.value.decode() == st.outbox_id:
            self.mark_delivered(bucket, key, st.outbox_id)
            return None
        if revision is not None:
            latest = await self.backend.kv_get(bucket, key)
            if latest is not None and latest.revision != revision:
                return FOREVER  # stale: the newer revision comes next
        written = st.updated_at.timestamp() if st.updated_at else 0.0
        grace_ends = written + self.rt.options.outbox_grace
        if st.owner != self.instance_id and now < grace_ends:
            return grace_ends  # its writer is probably delivering it now
        log.info(
            "delivering outbox %s of %s/%s left by %s", st.outbox_id, bucket, key, st.owner or "?"
        )
        await self.flush(bucket, key, st)
        return None

    def take_parked(self, bucket: str, key: str) -> KVEntry | None:
        """The waiting state this engine committed for the key, if it still has it."""
        found = self.parked.pop((bucket, key), None)
        return KVEntry(bucket, key, found[1], found[0]) if found is not None else None

    def after_burst(self) -> None:
        """Drop most of what a burst remembered, re-allocated compact (see Shards)."""
        while len(self.delivered) > _DELIVERED_AFTER_BURST:
            self.delivered.popitem(last=False)
        self.delivered = OrderedDict(self.delivered)
