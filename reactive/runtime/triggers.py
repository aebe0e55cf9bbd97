"""Triggers: what turns NATS into events for the shards.

One set of partitions per workflow and watched bucket (the engines that run the
workflow share them: see ``_run_partitions``), one subscription (core or durable) per workflow and
subject, one durable callback consumer per workflow with async rules, one durable
timer consumer per workflow (the schedules in NATS that have fired: deadlines,
task timeouts, cooldown ends, grace periods; see ``schedules``), and the
process's own timers (the claim sweep, retries). Each is supervised: a failure is
retried with backoff. Each makes what it consumes (its stream; the workflow's
announcement has a task of its own too), so one whose group of servers has no leader
yet (a node that died) holds up no other. Messages go to their workers by ``routing``.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import anyio
from anyio.abc import TaskGroup

from reactive.backends.base import (
    KVEntry,
    PartitionedConsumer,
    PartitionedMessage,
)
from reactive.backends.partitions import key_depths, partition_of
from reactive.codecs import encode_json
from reactive.dsl.definition import TriggerMode
from reactive.dsl.schedule import (
    RUN_PREFIX,
    SCHEDULE_PREFIX,
    schedule_headers_of,
    schedule_subject,
)
from reactive.errors import (
    BackendError,
    ConnectionLostError,
    InvalidExecutionId,
    PartitionCountError,
    TransientBackendError,
)
from reactive.meta import describe_workflow, workflow_key
from reactive.meta.streams import ensure_shared_stream
from reactive.runtime.core import Runtime, backoff, log
from reactive.runtime.events import (
    SWEEP_TARGET,
    CallbackArrival,
    KVChange,
    SweepDue,
    TimerDue,
)
from reactive.runtime.registry import BoundWorkflow, Subscription
from reactive.runtime.routing import route_message
from reactive.runtime.schedules import TIMER_PREFIX, due_at, due_filter, parse_due
from reactive.runtime.shards import KeyOrder, Shards
from reactive.subjects import MAX_KEY_LENGTH, preview, validate_execution_id

__all__ = ["Triggers"]


class Triggers:
    """Starts and supervises every trigger of the registered workflows."""

    def __init__(self, rt: Runtime, shards: Shards, order: KeyOrder) -> None:
        self.rt = rt
        self.shards = shards
        self.order = order
        self.backend = rt.backend
        self.tg: TaskGroup | None = None
        # Per workflow and bucket: the partitions this engine consumes, and how many there are.
        self.partitions: dict[tuple[str, str], tuple[PartitionedConsumer, int]] = {}
        self._partitions_started: set[tuple[str, str]] = set()
        self._told: dict[tuple[str, str], int] = {}
        self._sub_started: set[tuple[str, str, str | None]] = set()
        self._callbacks_started: set[str] = set()
        self._timers_started: set[str] = set()
        self._timer_stream_ready = False
        self._announced: set[str] = set()
        self.ready_count = 0
        self.expected_ready = 0
        # The failure of each trigger that has not run yet (by its name), while it retries.
        self.failures: dict[str, BackendError] = {}
        self.failed_tries: dict[str, int] = {}  # (of those: how many tries in a row failed)
        self._changed = anyio.Event()

    def stop(self) -> None:
        self.tg = None
        # (A start that failed half-way left triggers begun and never set up: the next
        # start counts its own, or the engine would never be ready.)
        self.ready_count = self.expected_ready = 0
        self.failures.clear()
        self.failed_tries.clear()
        self._announced.clear()
        self.partitions.clear()
        self._partitions_started.clear()
        self._sub_started.clear()
        self._callbacks_started.clear()
        self._timers_started.clear()
        self._timer_stream_ready = False

    async def ensure_timer_stream(self) -> None:
        """The timer stream: a work queue (a fired timer is removed once evaluated) that
        keeps message schedules."""
        if not self._timer_stream_ready:
            await self.backend.ensure_stream(
                self.rt.options.timer_stream,
                [
                    f"{TIMER_PREFIX}.at.>",
                    f"{TIMER_PREFIX}.due.>",
                    f"{SCHEDULE_PREFIX}.>",
                    f"{RUN_PREFIX}.>",
                ],
                work_queue=True,
                schedules=True,
            )
            self._timer_stream_ready = True

    async def start_for(self, bound: BoundWorkflow) -> None:
        """Make a workflow's buckets, and start its triggers (each makes its own stream)."""
        assert self.tg is not None
        rt = self.rt
        d = bound.definition
        await self.backend.ensure_bucket(d.bucket)
        for r in d.rules:
            if r.bucket:
                await self.backend.ensure_bucket(r.bucket)
        if d.id not in self._announced:
            self._announced.add(d.id)
            self._start(f"announcement of {d.id}", functools.partial(self._run_announce, bound))
        # One set of partitions per workflow and bucket, however many of its rules watch it.
        for bucket in dict.fromkeys(r.bucket for r in d.rules if r.mode is TriggerMode.STATE):
            if (d.id, bucket) not in self._partitions_started:
                self._partitions_started.add((d.id, bucket))
                self._start(
                    f"partitions of {bucket} for {d.id}",
                    functools.partial(self._run_partitions, bound, bucket),
                )
        for key, sub in rt.registry.subscriptions.items():
            if sub.bound is bound and key not in self._sub_started:
                self._sub_started.add(key)
                self._start(
                    f"subscription to {sub.subject}",
                    functools.partial(self._run_subscription, sub),
                )
        # (Every workflow's: its cancellations come there too, as any callback does.)
        if d.id not in self._callbacks_started:
            self._callbacks_started.add(d.id)
            self._start(
                f"callback consumer for {d.id}", functools.partial(self._run_callbacks, bound)
            )
        if d.id not in self._timers_started:
            self._timers_started.add(d.id)
            self._start(f"timer consumer for {d.id}", functools.partial(self._run_timers, bound))

    async def _run_announce(self, bound: BoundWorkflow, opened: Callable[[], None]) -> None:
        """Announce the workflow in the meta bucket, so tools can find it without its code."""
        opts = self.rt.options
        d = bound.definition
        await self.backend.kv_put(
            opts.meta_bucket,
            workflow_key(d.id),
            encode_json(describe_workflow(d, opts.callback_prefix)),
        )
        opened()
        await anyio.sleep_forever()

    async def wait_ready(self) -> None:
        """Until every trigger started is running; raise the failure of one that has not
        run yet (the start fails with it: ``Engine.start``)."""
        while self.ready_count < self.expected_ready:
            if self.failures:
                raise next(iter(self.failures.values()))
            await self._changed.wait()

    def _changes(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # ------------------------------------------------------------------ supervision

    async def _supervise(
        self, what: str, run: Callable[[Callable[[], None]], Awaitable[None]]
    ) -> None:
        """Run one trigger for good: a backend failure is retried with backoff.

        ``run`` calls the function it is given once its subscription is open: the
        first time, the trigger counts as ready (``Engine.ready``); each time, the
        backoff starts over. A failure before the first time is kept in ``failures``
        until then (``wait_ready``, serve's start).
        """
        first = True
        failed = 0

        def opened() -> None:
            nonlocal first, failed
            if first:
                self.ready_count += 1
                self.failures.pop(what, None)
                self.failed_tries.pop(what, None)
                first = False
                self._changes()
            failed = 0

        while True:
            try:
                await run(opened)
            except ConnectionLostError:
                raise  # nothing to retry on: the engine stops, with this error
            except BackendError as e:
                if first:
                    self.failures[what] = e
                    self.failed_tries[what] = failed + 1
                    self._changes()
                delay = (
                    backoff(e, failed, 0.1)
                    if isinstance(e, TransientBackendError)
                    else min(0.1 * 2.0**failed, 5.0)
                )
                failed += 1
                log.warning("%s failed (%s); retrying in %.1fs", what, e, delay)
                await anyio.sleep(delay)

    def _start(self, what: str, run: Callable[[Callable[[], None]], Awaitable[None]]) -> None:
        assert self.tg is not None
        self.expected_ready += 1
        self.tg.start_soon(self._supervise, what, run)

    # ------------------------------------------------------------------ partitioned buckets

    def owns(self, bound: BoundWorkflow, bucket: str, key: str) -> bool:
        """Whether this engine holds the partition of ``key`` in ``bound``'s set of ``bucket``:
        its revisions come here, so this engine evaluates them."""
        held = self.partitions.get((bound.definition.id, bucket))
        return held is not None and held[0].holds(partition_of(key, held[1]))

    async def _partitioned(self, bound: BoundWorkflow, bucket: str) -> int:
        """Partition ``bucket`` for ``bound``; the number of partitions (the first engine's
        choice, if it is partitioned already)."""
        opts = self.rt.options
        n = opts.partitions
        d = bound.definition
        # Only the keys its rules can match are taken in (one transform per depth).
        depths = key_depths(
            r.pattern for r in d.rules if r.mode is TriggerMode.STATE and r.bucket == bucket
        )
        try:
            await self.backend.ensure_partitioned(
                bucket,
                n,
                group=d.id,
                depths=depths,
                ack_wait=opts.ack_wait,
                pin_timeout=opts.pin_timeout,
            )
        except PartitionCountError as e:
            if e.found is None:
                raise
            if e.found != self._told.get((bound.definition.id, bucket)):
                self._told[(bound.definition.id, bucket)] = e.found
                log.info(
                    "%s: bucket %s is partitioned into %d partitions already (not %d): using them",
                    bound.definition.id,
                    bucket,
                    e.found,
                    n,
                )
            n = e.found
            await self.backend.ensure_partitioned(
                bucket,
                n,
                group=d.id,
                depths=depths,
                ack_wait=opts.ack_wait,
                pin_timeout=opts.pin_timeout,
            )
        return n

    async def _run_partitions(
        self, bound: BoundWorkflow, bucket: str, opened: Callable[[], None]
    ) -> None:
        """The changes of the partitions of ``bucket`` this engine holds, each to its key's worker.

        Every workflow that watches a bucket has its own set of partitions (each gets
        every change); the engines that run the workflow share them. A change is
        acknowledged by the key's worker once it has been evaluated and what that decided
        is committed (an echo of this engine's own commit once its evaluation right after
        the commit has completed): an engine that dies leaves the changes it had not
        finished to the engine that takes its partitions, and one that starts resumes
        from them, not from every key.
        """
        wf = bound.definition.id
        n = await self._partitioned(bound, bucket)
        metrics = self.rt.metrics
        held = metrics.partitions_held.labels(wf, bucket)
        members = metrics.partition_members.labels(wf, bucket)
        async with self.backend.consume_partitions(
            bucket, n, group=wf, keep_alive=True
        ) as consumer:
            self.partitions[(wf, bucket)] = (consumer, n)
            held.set_function(lambda: len(consumer.held))
            members.set_function(lambda: consumer.members)
            opened()
            try:
                async for msg in consumer:
                    entry = msg.entry
                    # (An echo of this engine's own commit goes to the key's worker too: it
                    # is acknowledged there, after the worker's evaluation of that revision
                    # right after committing it has completed. Acknowledged here, it could be
                    # lost with an engine stopped or killed in the middle of that evaluation.)
                    await self._enqueue_kv(bound, entry, msg)
            finally:
                if self.partitions.get((wf, bucket), (None,))[0] is consumer:
                    del self.partitions[(wf, bucket)]
                    held.set(0)  # (a value instead of the function: it holds nothing now)
                    members.set(0)

    async def _enqueue_kv(
        self, bound: BoundWorkflow, entry: KVEntry, msg: PartitionedMessage
    ) -> None:
        if len(entry.key) > MAX_KEY_LENGTH:
            # Written by someone else: the keys the engine would build from it are too
            # long for NATS. Skipped (it is left as it is), counted and logged.
            self.rt.metric(self.rt.metrics.invalid_keys, entry.bucket).inc()
            log.warning(
                "skipping key %s of bucket %s rev %d: longer than %d characters",
                preview(entry.key),
                entry.bucket,
                entry.revision,
                MAX_KEY_LENGTH,
            )
            await self.rt.settle(msg, "ack")
            return
        matches = self.rt.registry.match_kv(entry.bucket, entry.key)
        if len(matches) == 1 and matches[0][0] is bound:
            rules: list[Any] | None = matches[0][1]  # (the common case: no search)
        else:
            # (Other workflows' rules on this bucket: their own partitions bring it to them.)
            rules = next((rs for b, rs in matches if b is bound), None)
        if rules is None:
            await self.rt.settle(msg, "ack")  # a key none of its rules watch
            return
        k = (entry.bucket, entry.key)
        latest = self.order.latest
        if latest.get(k, -1) < entry.revision:
            latest[k] = entry.revision
        full = self.shards.enqueue(entry.key, KVChange(entry, bound, rules, msg))
        if full is not None:
            await full

    # ------------------------------------------------------------------ timers

    def on_timer(self, target: Hashable) -> None:
        """One of this process's timers is due: its key's retry (or the sweep) goes to the shards."""
        wf_id, bucket, key = typing.cast(tuple[str, str, str], target)
        if not self.shards.inboxes:
            return
        event = SweepDue() if target == SWEEP_TARGET else TimerDue(wf_id, bucket, key)
        if not self.shards.offer(key, event):
            # The worker is saturated: try again shortly rather than block the timer loop.
            self.rt.timers.schedule(self.rt.clock.now() + 0.05, target)

    async def _run_timers(self, bound: BoundWorkflow, opened: Callable[[], None]) -> None:
        """The workflow's timers that have fired in NATS, each to the worker of its key.

        One durable per workflow, shared by every engine (the stream is a work queue:
        a timer is evaluated by one of them, and removed once it has been). The key's
        worker acknowledges it after evaluating the key's latest revision.
        """
        rt = self.rt
        d = bound.definition
        durable = f"reactive_timer_{d.id}".replace("-", "_")
        buckets = {d.bucket, *(r.bucket for r in d.rules if r.bucket)}
        clock = rt.clock
        await self.ensure_timer_stream()
        # Its scheduled rules' schedules (those of rules it no longer has are removed).
        await self.backend.sync_schedules(
            rt.options.timer_stream,
            f"{SCHEDULE_PREFIX}.{d.id}.",
            {
                schedule_subject(d.id, r.id): schedule_headers_of(
                    d.id, r.id, r.schedule, r.schedule_tz
                )
                for r in d.rules
                if r.schedule
            },
        )
        async with self.backend.consume(
            rt.options.timer_stream,
            durable,
            due_filter(d.id),
            ack_wait=rt.options.ack_wait,
            keep_alive=True,
        ) as messages:
            opened()
            async for msg in messages:
                where = parse_due(msg.subject, d.id)
                at = due_at(msg.data)
                if where is None or at is None or where[0] not in buckets:
                    log.warning("terminating unreadable timer on %s", msg.subject)
                    await rt.settle(msg, "term")
                    continue
                early = at - clock.now()
                if early > 0:
                    # The server's clock is ahead of this engine's: hand it back
                    # until the engine's clock has come to its time too.
                    await rt.settle(msg, "nak", early)
                    continue
                full = self.shards.enqueue(where[1], TimerDue(d.id, *where, msg))
                if full is not None:
                    await full

    # ------------------------------------------------------------------ messages

    async def _run_subscription(self, sub: Subscription, opened: Callable[[], None]) -> None:
        stream = sub.stream
        if sub.scheduled:
            await self.ensure_timer_stream()  # (its runs are stored there)
            stream = self.rt.options.timer_stream
        elif stream:
            await ensure_shared_stream(
                self.backend, self.rt.options.meta_bucket, stream, [sub.subject]
            )
        if stream:
            cm = self.backend.consume(
                stream, sub.durable, sub.subject, ack_wait=self.rt.options.ack_wait, keep_alive=True
            )
        else:
            cm = self.backend.subscribe(sub.subject, queue=sub.queue)
        async with cm as messages:
            opened()
            async for msg in messages:
                await route_message(self.rt, self.shards, sub, msg)

    async def _run_callbacks(self, bound: BoundWorkflow, opened: Callable[[], None]) -> None:
        rt = self.rt
        d = bound.definition
        durable = f"reactive_cb_{d.id}".replace("-", "_")
        prefix = f"{rt.options.callback_prefix}.{d.id}."
        opts = rt.options
        await self.backend.ensure_stream(opts.callback_stream, [f"{opts.callback_prefix}.>"])
        async with self.backend.consume(
            rt.options.callback_stream,
            durable,
            prefix + ">",
            ack_wait=rt.options.ack_wait,
            keep_alive=True,
        ) as messages:
            opened()
            async for msg in messages:
                exec_id = msg.subject[len(prefix) :]
                try:
                    validate_execution_id(exec_id)
                except InvalidExecutionId as e:
                    rt.metric(rt.metrics.invalid_ids, d.id).inc()
                    log.warning("terminating callback on %s: %s", msg.subject, e)
                    await rt.settle(msg, "term")
                    continue
                full = self.shards.enqueue(d.key(exec_id), CallbackArrival(bound, msg, exec_id))
                if full is not None:
                    await full
