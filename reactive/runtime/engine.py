"""The engine: triggers feed events to per-key workers, which evaluate rules and dispatch actions.

Data flows one way: trigger (KV watch, subject, callback, timer) -> context ->
evaluation -> dispatch -> state write (compare-and-set) -> publish (outbox).

Guarantees, and where each comes from:

* Every transition is one compare-and-set of the execution's state; a loser
  drops its work and evaluates the newer revision that beat it.
* A publish decided by a transition travels in the state's outbox, written in
  the same compare-and-set, and is published after the write. A delivery marker
  in the meta bucket says it went out; another process (or this one after a
  restart) delivers an outbox whose marker is missing once ``outbox_grace`` has
  passed. Every message carries a deterministic ``Nats-Msg-Id``, so a stream
  that captures the subject drops a repeat.
* A rule that fires without writing state claims its firing in the meta bucket
  by compare-and-set, keyed by the revision (or message) that triggered it: it
  fires once per revision, whatever the number of processes.
* Cooldowns and max firings are counted in the state (rules that write it) or
  in the meta bucket (rules that do not): durable and shared.
* Deadlines and task timeouts are in the state; timers are rebuilt from it.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
import secrets
import time
import typing
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskGroup

from reactive.backends.base import Backend, InboundMessage, KVEntry
from reactive.clock import Clock, SystemClock
from reactive.codecs import decode, encode, encode_json, inject_callback_fields
from reactive.dsl.context import RuleContext, new_context
from reactive.dsl.definition import ActionType, RuleDef, TriggerMode, WorkflowDef
from reactive.dsl.state import (
    ExecutionState,
    Firing,
    OutboxMessage,
    Status,
    TimelineEntry,
    WorkflowCompletionEvent,
    WorkflowEscalationEvent,
    WorkflowFailureEvent,
)
from reactive.dsl.workflow import Workflow, definition_of
from reactive.errors import (
    BackendError,
    ConflictError,
    ConnectionLostError,
    DecodeError,
    InvalidExecutionId,
    ReactiveError,
    TransientBackendError,
)
from reactive.meta import (
    CooldownClaim,
    FiringRecord,
    decode_claim,
    decode_record,
    describe_workflow,
    remember,
    too_old,
    workflow_key,
)
from reactive.runtime.inbox import Inbox
from reactive.runtime.metrics import METRICS, EngineMetrics, fast_child
from reactive.runtime.registry import BoundWorkflow, Registry, Subscription
from reactive.runtime.timers import Timers
from reactive.runtime.tracing import Tracing, tracing_configured
from reactive.subjects import (
    MAX_EXECUTION_ID_LENGTH,
    MAX_KEY_LENGTH,
    MAX_STORED_KEY_LENGTH,
    MAX_SUBJECT_LENGTH,
    preview,
    validate_execution_id,
)

__all__ = ["Engine"]

log = logging.getLogger("reactive")
S = TypeVar("S", bound=ExecutionState)

_TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.ESCALATED, Status.TIMED_OUT})
# Enum members read on the hot path, as module constants (a member read through its
# class costs an attribute lookup on the enum type each time).
_PENDING = Status.PENDING
_WAITING = Status.WAITING
_COMPLETED = Status.COMPLETED
_PUBLISH = ActionType.PUBLISH
_PUBLISH_ASYNC = ActionType.PUBLISH_ASYNC
_COMPLETE = ActionType.COMPLETE


class _Envelope(msgspec.Struct):
    """The fields of a callback the engine reads besides the typed result."""

    task_id: str = ""
    error: str = ""


_last_utc: tuple[float, datetime] = (0.0, datetime.fromtimestamp(0.0, UTC))


def _utc(ts: float) -> datetime:
    # One transition stamps the same instant several times (timeline, updated_at,
    # completed_at, its event): datetimes are immutable, so the last one is reused.
    global _last_utc
    if _last_utc[0] == ts:
        return _last_utc[1]
    dt = datetime.fromtimestamp(ts, UTC)
    _last_utc = (ts, dt)
    return dt


# Work items for the per-key workers.
_KV = 0
_MSG = 1
_CALLBACK = 2
_TIMER = 3
_SWEEP = 4

_SWEEP_TARGET = ("", "", "")  # the timer target of the claim sweep


class Engine:
    """Runs workflows against a backend.

    ``async with Engine(backend, [PlanReview]) as engine: ...`` starts the
    triggers; leaving the block stops them, letting in-flight work finish or
    leaving it for redelivery.

    Options: ``workers`` (events of one key go to one worker, in order; 128 by
    default), ``queue_limit`` (events queued for the workers, all together, before
    a trigger waits: a replay is taken in at the pace it is processed, 2048),
    ``conflict_retries``, ``outbox_grace`` (how long another engine's
    unfinished outbox is left to it), ``sweep_interval`` (the claim sweep),
    ``max_deliver``, and ``timer_horizon``: deadlines, task timeouts and cooldown
    ends further ahead than this (30 minutes by default; None: no limit) hold no
    timer in memory; the engine replays the bucket shortly before the earliest
    of them, so memory does not grow with executions that wait.
    """

    def __init__(
        self,
        backend: Backend,
        workflows: Iterable[type[Workflow] | Workflow] = (),
        *,
        clock: Clock | None = None,
        meta_bucket: str = "REACTIVE_META",
        callback_stream: str = "REACTIVE_CALLBACKS",
        callback_prefix: str = "reactive.callback",
        workers: int = 128,
        queue_limit: int = 2048,
        conflict_retries: int = 20,
        outbox_grace: float = 5.0,
        sweep_interval: float = 30.0,
        timer_horizon: float | None = 1800.0,
        max_deliver: int = 20,
        metrics: EngineMetrics | None = None,
        instance_id: str | None = None,
        tracing: bool | None = None,
        tracer_provider: Any = None,
    ) -> None:
        self.backend = backend
        self.clock: Clock = clock or SystemClock()
        self.registry = Registry()
        self.meta_bucket = meta_bucket
        self.callback_stream = callback_stream
        self.callback_prefix = callback_prefix
        self.conflict_retries = conflict_retries
        self.outbox_grace = outbox_grace
        self.sweep_interval = sweep_interval
        self.max_deliver = max_deliver
        self.metrics = metrics or METRICS
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        # Tracing: on with a tracer provider given here or installed globally, or when told.
        self._tracing_choice = True if tracer_provider is not None and tracing is None else tracing
        self._tracer_provider = tracer_provider
        self.tracing = Tracing(bool(self._tracing_choice), tracer_provider)
        self._n_workers = max(1, workers)
        self.queue_limit = queue_limit
        self._inboxes: list[Inbox[tuple[Any, ...]]] = []
        self._tg: TaskGroup | None = None
        self._stack: AsyncExitStack | None = None
        self._inflight = 0
        self._latest: dict[tuple[str, str], int] = {}
        # Per key, the first and last revision of the chain of this engine's own commits
        # evaluated right after committing them (_follow); their echoes are skipped.
        self._chained: dict[tuple[str, str], tuple[int, int]] = {}
        # Per key, (revision, value) of a waiting state this engine committed, until its
        # callback comes: the callback then starts from it instead of reading the key.
        self._parked: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._delivered: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._watch_scopes: dict[str, anyio.CancelScope] = {}
        self._sub_started: set[tuple[str, str, str | None]] = set()
        self._callbacks_started: set[str] = set()
        self._retries: dict[Hashable, int] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._burst = 0  # items processed since the heap was last handed back
        # Set when a trigger found its worker's inbox full: a backlog (a replay, say),
        # the kind of burst whose heap is worth handing back once it has drained.
        self._backlogged = False
        # Metrics and log of a terminal transition, by id() of the state: counted by
        # _commit once the write has won, never by a process whose write lost.
        self._on_commit: dict[int, Callable[[], None]] = {}
        self._ready_count = 0
        self._expected_ready = 0
        # Deadlines further ahead than timer_horizon are not held (see _on_far_timer).
        self.timer_horizon = timer_horizon
        self._far: dict[str, float] = {}
        self.timers = Timers(
            self.clock, self._on_timer, horizon=timer_horizon, on_far=self._on_far_timer
        )
        self._max_state = 1024 * 1024 - _STATE_HEADROOM  # (from the backend, at start)
        self.running = False
        for wf in workflows:
            self._check_names(definition_of(wf))
            self.registry.add(wf)

    def _check_names(self, d: WorkflowDef) -> None:
        """Refuse a workflow whose names make a key or subject the engine builds too long for NATS.

        The engine's longest key is a claim in the meta bucket,
        ``fire.<workflow>.<rule>.<bucket>.<key>`` for a key of MAX_KEY_LENGTH; its
        longest subject, a direct get of that key or a callback subject.
        """
        rule = max((len(r.id) for r in d.rules), default=0)
        buckets = {d.bucket, *(r.bucket for r in d.rules if r.bucket)}
        longest_key = (
            len("fire...") + len(d.id) + rule + max(map(len, buckets)) + 1 + MAX_KEY_LENGTH
        )
        meta = self.meta_bucket
        longest_subject = max(
            len(f"$JS.API.DIRECT.GET.KV_{meta}.$KV.{meta}.") + longest_key,
            len(self.callback_prefix) + len(d.id) + 2 + MAX_EXECUTION_ID_LENGTH,
        )
        if longest_key > MAX_STORED_KEY_LENGTH or longest_subject > MAX_SUBJECT_LENGTH:
            raise ReactiveError(
                f"workflow {d.id!r}: its id, bucket and rule ids are too long: the engine "
                f"would build keys of up to {longest_key} characters (at most "
                f"{MAX_STORED_KEY_LENGTH}) and subjects of up to {longest_subject} (at most "
                f"{MAX_SUBJECT_LENGTH}) from them"
            )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the backend (if needed), the workers, the timers and every trigger."""
        if self.running:
            return
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            if self._tracing_choice is None:
                # Spans cost nothing unless the application installed a tracer provider.
                self.tracing = Tracing(tracing_configured(), self._tracer_provider)
            await self.backend.start()
            self._max_state = self.backend.max_payload - _STATE_HEADROOM
            await self.backend.ensure_bucket(self.meta_bucket)
            tg = await stack.enter_async_context(anyio.create_task_group())
            self._tg = tg
            self._stack = stack
            for _ in range(self._n_workers):
                inbox: Inbox[tuple[Any, ...]] = Inbox(max(16, self.queue_limit // self._n_workers))
                self._inboxes.append(inbox)
                tg.start_soon(self._worker, inbox)
            tg.start_soon(self.timers.run)
            self.timers.schedule(self.clock.now(), _SWEEP_TARGET)
            self.running = True
            for bound in list(self.registry.workflows.values()):
                await self._start_triggers(bound)
        except BaseException:
            # The workers and timers already started run until cancelled: cancel them, or
            # leaving the task group would wait for them forever.
            self.running = False
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
            await stack.__aexit__(None, None, None)
            self._tg = None
            self._stack = None
            self._inboxes.clear()
            self._watch_scopes.clear()
            self._sub_started.clear()
            self._callbacks_started.clear()
            raise

    async def stop(self) -> None:
        """Stop every trigger and worker. Unacknowledged messages are redelivered later."""
        if not self.running:
            return
        self.running = False
        stack, self._stack = self._stack, None
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        if stack is not None:
            await stack.__aexit__(None, None, None)
        self._tg = None
        self._inboxes.clear()
        self._watch_scopes.clear()
        self._sub_started.clear()
        self._callbacks_started.clear()

    @property
    def idle(self) -> bool:
        """No event is queued or being processed."""
        return self._inflight == 0

    @property
    def ready(self) -> bool:
        """Running, and every trigger has been set up."""
        return self.running and self._ready_count >= self._expected_ready

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every trigger is set up (watches replaying, subscriptions and consumers open)."""
        with anyio.fail_after(timeout):
            while not self.ready:
                await anyio.sleep(0.01)

    async def register(self, workflow: type[Workflow] | Workflow) -> WorkflowDef:
        """Register a workflow; if the engine runs, its triggers start now."""
        self._check_names(definition_of(workflow))
        bound = self.registry.add(workflow)
        if self.running:
            await self._start_triggers(bound)
        return bound.definition

    # ------------------------------------------------------------------ public helpers

    async def start_execution(
        self,
        workflow: type[Workflow] | Workflow | str,
        execution_id: str,
        state: ExecutionState | None = None,
    ) -> ExecutionState:
        """Create an execution with ``state`` (or an empty one), started now. Raises ConflictError if it exists."""
        bound = self.registry.get(workflow)
        d = bound.definition
        validate_execution_id(execution_id)
        st = state if state is not None else d.state_type()
        if not isinstance(st, d.state_type):
            raise TypeError(
                f"state for {d.id} must be a {d.state_type.__name__}, not {type(st).__name__}"
            )
        now = self.clock.now()
        st.initialize(execution_id, d.id, now, d.timeout)
        st.owner = self.instance_id
        await self.backend.ensure_bucket(d.bucket)
        await self.backend.kv_create(d.bucket, d.key(execution_id), encode_json(st))
        self._metric(self.metrics.executions_created, d.id).inc()
        log.info("execution started workflow=%s execution=%s", d.id, execution_id)
        return st

    async def get(self, workflow: type[Workflow] | Workflow | str, execution_id: str) -> Any:
        """The current state of an execution, or None."""
        d = self.registry.get(workflow).definition
        entry = await self.backend.kv_get(d.bucket, d.key(validate_execution_id(execution_id)))
        if entry is None:
            return None
        return decode(d.state_type, entry.value)

    async def executions(self, workflow: type[Workflow] | Workflow | str) -> list[Any]:
        """Every execution of a workflow (decodable ones), ordered by key."""
        d = self.registry.get(workflow).definition
        out = []
        for key in await self.backend.kv_keys(d.bucket, f"{d.id}.*"):
            entry = await self.backend.kv_get(d.bucket, key)
            if entry is None:
                continue
            with contextlib.suppress(DecodeError):
                out.append(decode(d.state_type, entry.value))
        return out

    async def wait_for(
        self,
        workflow: type[Workflow] | Workflow | str,
        execution_id: str,
        predicate: Callable[[Any], bool] | None = None,
        *,
        timeout: float = 30.0,
    ) -> Any:
        """Wait until the execution satisfies ``predicate`` (default: terminal) and return its state."""
        d = self.registry.get(workflow).definition
        key = d.key(validate_execution_id(execution_id))
        pred = predicate or (lambda s: s.status in _TERMINAL)
        with anyio.fail_after(timeout):
            async with self.backend.kv_watch(d.bucket, key) as entries:
                async for entry in entries:
                    if entry.operation != "PUT":
                        continue
                    st = decode(d.state_type, entry.value)
                    if pred(st):
                        return st
        raise ReactiveError(f"watch of {key} ended")  # pragma: no cover

    async def publish(self, subject: str, payload: Any, *, msg_id: str | None = None) -> None:
        """Publish a payload (a struct, dict, bytes or str) as the engine does."""
        await self.backend.publish(subject, encode(payload), msg_id=msg_id)

    # ------------------------------------------------------------------ triggers

    async def _start_triggers(self, bound: BoundWorkflow) -> None:
        assert self._tg is not None
        d = bound.definition
        await self.backend.ensure_bucket(d.bucket)
        # Announce the workflow in the meta bucket, so tools can find it without its code.
        await self.backend.kv_put(
            self.meta_bucket,
            workflow_key(d.id),
            encode_json(describe_workflow(d, self.callback_prefix)),
        )
        for r in d.rules:
            if r.bucket:
                await self.backend.ensure_bucket(r.bucket)
        # One watcher per bucket, however many rules watch it.
        for bucket in dict.fromkeys(r.bucket for r in d.rules if r.mode is TriggerMode.STATE):
            self._restart_watch(bucket)
        for key, sub in self.registry.subscriptions.items():
            if sub.bound is bound and key not in self._sub_started:
                self._sub_started.add(key)
                if sub.stream:
                    await self.backend.ensure_stream(sub.stream, [sub.subject])
                self._expected_ready += 1
                self._tg.start_soon(self._run_subscription, sub)
        if d.has_async and d.id not in self._callbacks_started:
            self._callbacks_started.add(d.id)
            await self.backend.ensure_stream(self.callback_stream, [f"{self.callback_prefix}.>"])
            self._expected_ready += 1
            self._tg.start_soon(self._run_callbacks, bound)

    def _restart_watch(self, bucket: str) -> None:
        """One watcher per bucket; re-created (replaying every key) when rules are added."""
        assert self._tg is not None
        old = self._watch_scopes.pop(bucket, None)
        if old is not None:
            old.cancel()
        else:
            self._expected_ready += 1
        scope = anyio.CancelScope()
        self._watch_scopes[bucket] = scope
        self._tg.start_soon(self._run_watch, bucket, scope)

    async def _run_watch(self, bucket: str, scope: anyio.CancelScope) -> None:
        with scope:
            backoff = 0.1
            first = True
            while True:
                try:
                    async with self.backend.kv_watch(bucket, ">") as entries:
                        if first:
                            self._ready_count += 1
                            first = False
                        backoff = 0.1
                        async for entry in entries:
                            if self._chained and self._seen(
                                (entry.bucket, entry.key), entry.revision
                            ):
                                continue  # an echo of this engine's own commit, evaluated already
                            await self._enqueue_kv(entry)
                except ConnectionLostError:
                    raise  # nothing to retry on: the engine stops, with this error
                except BackendError as e:
                    log.warning(
                        "watch of bucket %s failed (%s); retrying in %.1fs", bucket, e, backoff
                    )
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)

    async def _enqueue_kv(self, entry: KVEntry) -> None:
        if len(entry.key) > MAX_KEY_LENGTH:
            # Written by someone else: the keys the engine would build from it are too
            # long for NATS. Skipped (it is left as it is), counted and logged.
            self._metric(self.metrics.invalid_keys, entry.bucket).inc()
            log.warning(
                "skipping key %s of bucket %s rev %d: longer than %d characters",
                preview(entry.key),
                entry.bucket,
                entry.revision,
                MAX_KEY_LENGTH,
            )
            return
        k = (entry.bucket, entry.key)
        matches = self.registry.match_kv(entry.bucket, entry.key)
        if not matches:
            return
        if self._latest.get(k, -1) < entry.revision:
            self._latest[k] = entry.revision
        full = self._enqueue(entry.key, (_KV, entry, matches))
        if full is not None:
            await full

    def _enqueue(self, shard_key: str, item: tuple[Any, ...]) -> Awaitable[None] | None:
        """Queue ``item`` for the worker of ``shard_key``: None if it is queued, else await the result.

        Not a coroutine: with room in the inbox the item is handed over at once (no
        checkpoint, so a burst is handed over in one loop turn; no coroutine per
        event); only when the inbox is full is there something to wait for.
        """
        self._inflight += 1
        inbox = self._inboxes[hash(shard_key) % len(self._inboxes)]
        if inbox.put_nowait(item):
            return None
        return self._wait_for_room(inbox, item)

    async def _wait_for_room(self, inbox: Inbox[tuple[Any, ...]], item: tuple[Any, ...]) -> None:
        """Queue ``item`` (counted in flight already) once ``inbox`` has room."""
        self._backlogged = True
        try:
            await inbox.put(item)
        except BaseException:
            self._inflight -= 1
            raise

    def _on_far_timer(self, when: float, target: Hashable) -> bool:
        """A timer beyond the horizon: drop it, and replay its bucket before it is due.

        The replay evaluates every execution of the bucket again (as a restart
        does), which sets the timers that are then within the horizon. One float
        per bucket is kept: the earliest deadline dropped.
        """
        _, bucket, key = typing.cast(tuple[str, str, str], target)
        if not key or bucket not in self._watch_scopes or self.timer_horizon is None:
            return False  # only what a watch replays can be left to the replay
        earliest = self._far.get(bucket)
        if earliest is None or when < earliest:
            self._far[bucket] = when
            # The replay's own timer is kept however far it is (its target has no key):
            # the bucket is replayed once, half a horizon before the earliest deadline.
            self.timers.schedule(when - self.timer_horizon / 2, ("", bucket, ""))
        return True

    def _on_timer(self, target: Hashable) -> None:
        wf_id, bucket, key = typing.cast(tuple[str, str, str], target)
        if not self._inboxes:
            return
        if not wf_id and bucket:  # a far deadline draws near: replay the bucket
            self._far.pop(bucket, None)
            if bucket in self._watch_scopes:
                log.info("replaying bucket %s for deadlines coming within the horizon", bucket)
                self._restart_watch(bucket)
            return
        item = (_SWEEP,) if target == _SWEEP_TARGET else (_TIMER, wf_id, bucket, key)
        if self._inboxes[hash(key) % len(self._inboxes)].put_nowait(item):
            self._inflight += 1
        else:
            # The worker is saturated: try again shortly rather than block the timer loop.
            self.timers.schedule(self.clock.now() + 0.05, target)

    async def _run_subscription(self, sub: Subscription) -> None:
        first = True
        backoff = 0.1
        while True:
            try:
                if sub.stream:
                    cm = self.backend.consume(sub.stream, sub.durable, sub.subject)
                else:
                    cm = self.backend.subscribe(sub.subject, queue=sub.queue)
                async with cm as messages:
                    if first:
                        self._ready_count += 1
                        first = False
                    backoff = 0.1
                    async for msg in messages:
                        await self._route_message(sub, msg)
            except ConnectionLostError:
                raise  # nothing to retry on: the engine stops, with this error
            except BackendError as e:
                log.warning(
                    "subscription to %s failed (%s); retrying in %.1fs", sub.subject, e, backoff
                )
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _route_message(self, sub: Subscription, msg: InboundMessage) -> None:
        d = sub.bound.definition
        if msg.num_delivered > 1:
            self._metric(self.metrics.redeliveries, d.id).inc()
        decoded: dict[Any, Any] = {}
        try:
            for r in sub.rules:
                if r.message_type not in decoded:
                    decoded[r.message_type] = decode(r.message_type, msg.data)
        except DecodeError as e:
            self._metric(self.metrics.poison_messages, d.id, "message").inc()
            log.warning("terminating undecodable message on %s for %s: %s", msg.subject, d.id, e)
            await self._settle(msg, "term")
            return
        shard = msg.subject
        keyed: dict[str, str] = {}
        for r in sub.rules:
            if r.state_key is not None:
                try:
                    exec_id = validate_execution_id(r.state_key(decoded[r.message_type]))
                except InvalidExecutionId as e:
                    self._metric(self.metrics.invalid_ids, d.id).inc()
                    log.warning("terminating message on %s for %s: %s", msg.subject, d.id, e)
                    await self._settle(msg, "term")
                    return
                except Exception as e:
                    self._metric(self.metrics.poison_messages, d.id, "state_key").inc()
                    log.warning(
                        "terminating message on %s: state_key of %s.%s failed: %r",
                        msg.subject,
                        d.id,
                        r.id,
                        e,
                    )
                    await self._settle(msg, "term")
                    return
                keyed[r.id] = exec_id
                shard = d.key(exec_id)
        full = self._enqueue(shard, (_MSG, sub, msg, decoded, keyed))
        if full is not None:
            await full

    async def _run_callbacks(self, bound: BoundWorkflow) -> None:
        d = bound.definition
        durable = f"reactive_cb_{d.id}".replace("-", "_")
        prefix = f"{self.callback_prefix}.{d.id}."
        first = True
        backoff = 0.1
        while True:
            try:
                async with self.backend.consume(
                    self.callback_stream, durable, prefix + ">"
                ) as messages:
                    if first:
                        self._ready_count += 1
                        first = False
                    backoff = 0.1
                    async for msg in messages:
                        exec_id = msg.subject[len(prefix) :]
                        try:
                            validate_execution_id(exec_id)
                        except InvalidExecutionId as e:
                            self._metric(self.metrics.invalid_ids, d.id).inc()
                            log.warning("terminating callback on %s: %s", msg.subject, e)
                            await self._settle(msg, "term")
                            continue
                        full = self._enqueue(d.key(exec_id), (_CALLBACK, bound, msg, exec_id))
                        if full is not None:
                            await full
            except ConnectionLostError:
                raise  # nothing to retry on: the engine stops, with this error
            except BackendError as e:
                log.warning(
                    "callback consumer for %s failed (%s); retrying in %.1fs", d.id, e, backoff
                )
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _settle(self, msg: InboundMessage, how: str, delay: float = 0.0) -> None:
        try:
            if how == "ack":
                await msg.ack()
            elif how == "term":
                await msg.term()
            else:
                await msg.nak(delay)
        except Exception as e:  # the message will be redelivered; nothing is lost
            log.warning("could not %s message on %s: %s", how, msg.subject, e)

    # ------------------------------------------------------------------ workers

    async def _worker(self, inbox: Inbox[tuple[Any, ...]]) -> None:
        # The states this worker commits, to be evaluated next (see _follow). A context
        # variable: _commit runs in this worker's task, several calls deep.
        fresh: list[tuple[str, str, int, int, bytes]] = []
        _FRESH.set(fresh)
        taken = 0
        while True:
            if inbox:
                taken += 1
                if taken % 64 == 0:
                    # A long queue is worked off without waiting; let timers, triggers
                    # and cancellation in now and then (before an item is in hand).
                    await anyio.lowlevel.checkpoint()
                item = inbox.get_nowait()  # still there: this worker alone takes from it
            else:
                item = await inbox.get()
            try:
                await self._process(item)
                if fresh:
                    await self._follow(fresh)
            except Exception:
                fresh.clear()
                log.exception("unexpected error processing %r", item[0])
            except anyio.get_cancelled_exc_class():
                # Stopping: hand back the message in hand and those queued behind it, so
                # they are redelivered now rather than after the consumer's ack wait.
                with anyio.move_on_after(2.0, shield=True):
                    await self._release(item)
                    while inbox:
                        queued = inbox.get_nowait()
                        self._inflight -= 1
                        await self._release(queued)
                raise
            finally:
                self._inflight -= 1
                self._burst += 1
                if self._inflight == 0 and self._burst >= _TRIM_AFTER:
                    self._burst = 0
                    if self._backlogged:
                        self._backlogged = False
                        self._after_burst()

    async def _follow(self, fresh: list[tuple[str, str, int, int, bytes]]) -> None:
        """Evaluate the revisions this worker just committed, without waiting for the watch.

        The watch brings every committed revision back; evaluating it here instead
        saves the round trip (each transition of a chain starts as soon as the one
        before has committed) and the echo's decoding and queueing: the echo is
        recognized and skipped (_seen). A chain stops after _CHAIN_LIMIT
        transitions; the watch takes it from there.
        """
        hops = 0
        while fresh:
            bucket, key, base, revision, data = fresh.pop(0)
            k = (bucket, key)
            if hops >= _CHAIN_LIMIT or self._latest.get(k, revision) > revision:
                continue  # a newer revision is queued (or the chain is long): the watch goes on
            matches = self.registry.match_kv(bucket, key)
            if not matches:
                continue
            hops += 1
            span = self._chained.get(k)
            self._chained[k] = (
                (span[0], revision) if span and span[1] == base else (revision, revision)
            )
            if not data:
                continue  # terminal: nothing to evaluate, only its echo to skip
            evaluate = self._evaluate_state if self.tracing.enabled else self._evaluate_state_body
            for bound, rules in matches:
                await evaluate(bound, rules, bucket, key, revision, data, "kv")
        if len(self._chained) > _CHAINED_MAX:
            self._chained.clear()  # echoes lost (a watch re-created): evaluating twice is harmless

    def _seen(self, k: tuple[str, str], revision: int) -> bool:
        """Whether this revision of the key was evaluated already, right after this engine committed it."""
        span = self._chained.get(k)
        if span is None:
            return False
        if revision < span[0]:
            return False  # older than the chain: not evaluated there
        if revision >= span[1]:
            del self._chained[k]
        return revision <= span[1]

    def _after_burst(self) -> None:
        """A burst (a replay, say) has drained: drop what it cached and hand the heap back.

        The caches filled during the burst are scattered over the heap it used; kept,
        they would pin most of it (the allocator frees only wholly empty arenas).
        """
        self.registry.forget_matches()
        while len(self._delivered) > _DELIVERED_AFTER_BURST:
            self._delivered.popitem(last=False)
        self._delivered = OrderedDict(self._delivered)  # re-allocated, compact
        gc.collect()
        _release_free_heap()

    async def _release(self, item: tuple[Any, ...]) -> None:
        if item[0] in (_MSG, _CALLBACK):
            await self._settle(item[2], "nak", 0.1)

    async def _process(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == _KV:
            entry: KVEntry = item[1]
            k = (entry.bucket, entry.key)
            latest = self._latest.get(k, entry.revision)
            # A newer revision of this key is queued behind this one: rules that write
            # state would only lose their compare-and-set, so only the rules that just
            # publish are evaluated here (they fire once per revision).
            stale = entry.revision < latest
            if latest == entry.revision:
                self._latest.pop(k, None)
            if self._chained and self._seen(k, entry.revision):
                return  # queued before its evaluation right after the commit; done
            for bound, rules in item[2]:
                if stale:
                    rules = [r for r in rules if not r.writes_state]
                    if not rules:
                        continue
                await self._evaluate_kv(bound, rules, entry, "kv", stale)
        elif kind == _TIMER:
            _, wf_id, bucket, key = item
            found = self.registry.workflows.get(wf_id)
            if found is None:
                return
            bound = found
            try:
                current = await self.backend.kv_get(bucket, key)
            except TransientBackendError as e:
                self._retry_later(bound, bucket, key, e)
                return
            if current is None:
                if self._retries:
                    self._retries.pop((wf_id, bucket, key), None)
                return
            rules = [r for b, rs in self.registry.match_kv(bucket, key) if b is bound for r in rs]
            await self._evaluate_kv(bound, rules, current, "timer")  # (guarded itself)
        elif kind == _MSG:
            await self._handle_message(*item[1:])
        elif kind == _CALLBACK:
            await self._handle_callback(*item[1:])
        elif kind == _SWEEP:
            try:
                await self._sweep_claims()
            except BackendError as e:
                log.warning("claim sweep failed (%s); trying again later", e)
                self.timers.schedule(
                    self.clock.now() + min(self.sweep_interval, 5.0), _SWEEP_TARGET
                )

    def _retry_later(
        self, bound: BoundWorkflow, bucket: str, key: str, e: TransientBackendError
    ) -> None:
        """After a transient failure, evaluate the key again later, backing off while it fails.

        Every evaluation of a key counts its failures here and forgets them when it
        completes: the delay doubles with each failure in a row.
        """
        target = (bound.definition.id, bucket, key)
        n = self._retries.get(target, 0)
        self._retries[target] = n + 1
        delay = min(0.1 * 2**n, 10.0)
        log.warning("transient failure on %s/%s (%s); retrying in %.1fs", bucket, key, e, delay)
        self.timers.schedule(self.clock.now() + delay, target)

    # ------------------------------------------------------------------ evaluation: KV

    async def _evaluate_kv(
        self,
        bound: BoundWorkflow,
        rules: list[RuleDef],
        entry: KVEntry,
        mode: str,
        stale: bool = False,
    ) -> None:
        """Evaluate ``rules`` on a KV entry (a transient failure is retried later: _retry_later)."""
        if entry.operation != "PUT":
            try:
                await self._evaluate_delete(bound, rules, entry, mode)
            except TransientBackendError as e:
                self._retry_later(bound, entry.bucket, entry.key, e)
            else:
                if self._retries:
                    self._retries.pop((bound.definition.id, entry.bucket, entry.key), None)
            return
        # With tracing off, straight to the body: one coroutine less per event.
        evaluate = self._evaluate_state if self.tracing.enabled else self._evaluate_state_body
        await evaluate(
            bound, rules, entry.bucket, entry.key, entry.revision, entry.value, mode, stale
        )

    async def _evaluate_delete(
        self, bound: BoundWorkflow, rules: list[RuleDef], entry: KVEntry, mode: str
    ) -> None:
        d = bound.definition
        for r in rules:
            if r.on_deletes:
                ctx: RuleContext[Any, Any] = RuleContext(
                    state=None,
                    message=None,
                    workflow_id=d.id,
                    execution_id=d.execution_id_for(entry.key),
                    key=entry.key,
                    bucket=entry.bucket,
                    revision=entry.revision,
                    trigger_mode=mode,
                    now=self.clock.now(),
                    rule_id=r.id,
                )
                if self._check(bound, r, ctx):
                    await self._fire_nonwriting(bound, r, ctx, f"r{entry.revision}")

    async def _evaluate_state(
        self,
        bound: BoundWorkflow,
        rules: list[RuleDef],
        bucket: str,
        key: str,
        revision: int,
        raw: bytes,
        mode: str,
        stale: bool = False,
    ) -> None:
        """_evaluate_state_body in the trigger's span (only called with tracing on)."""
        state = self._decode_state(bound.definition, bucket, key, revision, raw)
        if state is None:
            return
        with self.tracing.span(
            f"reactive.{mode}",
            parent=self.tracing.parent_from(None, state.trace_parent),
            workflow=bound.definition.id,
            bucket=bucket,
            key=key,
            revision=revision,
        ):
            await self._evaluate_state_body(
                bound, rules, bucket, key, revision, raw, mode, stale, state
            )

    def _decode_state(
        self, d: WorkflowDef, bucket: str, key: str, revision: int, raw: bytes
    ) -> ExecutionState | None:
        """The state in ``raw``; None (counted and logged, the value left as it is) if it is not one."""
        try:
            state: ExecutionState = decode(d.state_type, raw)
        except DecodeError as e:
            self._metric(self.metrics.state_decode_errors, d.id).inc()
            log.warning("leaving undecodable state %s/%s rev %d: %s", bucket, key, revision, e)
            return None
        return state

    async def _evaluate_state_body(
        self,
        bound: BoundWorkflow,
        rules: list[RuleDef],
        bucket: str,
        key: str,
        revision: int,
        raw: bytes,
        mode: str,
        stale: bool = False,
        state: ExecutionState | None = None,
    ) -> None:
        """Evaluate ``rules`` on one revision of a state (``raw``, decoded unless ``state`` is given).

        A transient failure is retried later (_retry_later); one coroutine does it all,
        as it runs for every event.
        """
        d = bound.definition
        if state is None:
            state = self._decode_state(d, bucket, key, revision, raw)
            if state is None:
                return
        failed = False
        try:
            now = self.clock.now()
            target = (d.id, bucket, key)
            exec_id = state.id or d.execution_id_for(key)
            if stale:
                # Superseded: the newer revision settles outboxes, deadlines and writers.
                if state.status in _TERMINAL:
                    return
                ctx0: RuleContext[Any, Any] = new_context(
                    state, None, d.id, exec_id, key, bucket, revision, mode, now
                )
                for r in rules:
                    if not r.writes_state and not r.on_deletes:
                        ctx0.rule_id = r.id
                        if self._check(bound, r, ctx0):
                            await self._fire_nonwriting(bound, r, ctx0, f"r{revision}")
                return
            if state.outbox and not await self._outbox_settled(
                bucket, key, state, now, target, revision
            ):
                return
            needs_init = False
            if state.status is _PENDING:
                state.initialize(exec_id, d.id, now, d.timeout)
                needs_init = d.timeout is not None
            if state.status in _TERMINAL:
                return
            try:
                if (
                    state.deadline is not None or state.task_deadline is not None
                ) and await self._enforce_deadlines(
                    bound, bucket, key, revision, state, now, target
                ):
                    return
            except ConflictError:
                return  # a newer revision beat us; the watch brings it
            writer: RuleDef | None = None
            others: list[RuleDef] = []
            ctx: RuleContext[Any, Any] = new_context(
                state, None, d.id, exec_id, key, bucket, revision, mode, now
            )
            trigger = f"r{revision}"
            evaluating = (
                self.tracing.start("reactive.evaluate", workflow=d.id, rules=len(rules))
                if self.tracing.enabled
                else None
            )
            for r in rules:
                if r.on_deletes:
                    continue
                if r.writes_state:
                    if writer is not None:
                        continue
                    if r.action is _PUBLISH_ASYNC and state.status is _WAITING:
                        continue
                ctx.rule_id = r.id
                if not self._check(bound, r, ctx):
                    continue
                if r.writes_state:
                    firing = state.firings.get(r.id)
                    if firing is not None and self._limited(r, firing, trigger, now, target):
                        continue
                    if r.shared_cooldown and not await self._claim_cooldown(
                        d, r, f"{bucket}.{key}", firing.count if firing else 0, now, target
                    ):
                        continue
                    writer = r
                else:
                    others.append(r)
            if evaluating is not None:
                evaluating.set_attribute(
                    "reactive.fired", [r.id for r in ([writer] if writer else []) + others]
                )
                evaluating.end()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "evaluated workflow=%s key=%s revision=%d trigger=%s status=%s phase=%s writer=%s publishers=%s",
                    d.id,
                    key,
                    revision,
                    mode,
                    state.status.value,
                    state.phase,
                    writer.id if writer else "-",
                    ",".join(r.id for r in others) or "-",
                )
            # Rules that only publish go first: if this process dies after the state write
            # below, the revision they fired for is gone, and with it their chance to fire.
            for r in others:
                ctx.rule_id = r.id
                await self._fire_nonwriting(bound, r, ctx, trigger)
            try:
                if writer is not None:
                    if others:
                        # Rules that only publish saw ``state``: the writer gets a copy of its own.
                        base = decode(d.state_type, raw)
                        if base.status is _PENDING:
                            base.initialize(exec_id, d.id, now, d.timeout)
                    else:
                        base = state  # conditions only read it (and an initialized PENDING is the same)
                    # With tracing off, straight to the body (as in _evaluate_kv).
                    fire = self._fire_writing if self.tracing.enabled else self._fire_writing_body
                    await fire(
                        bound,
                        writer,
                        bucket,
                        key,
                        revision,
                        base,
                        None,
                        mode,
                        key,
                        trigger,
                        reuse=ctx if base is state else None,
                    )
                elif needs_init:
                    state.updated_at = _utc(now)
                    state.owner = self.instance_id
                    await self._write(d, bucket, key, revision, state)
            except ConflictError:
                pass  # a newer revision beat us; the watch brings it, and it is evaluated then
        except TransientBackendError as e:
            failed = True
            self._retry_later(bound, bucket, key, e)
        except BaseException:
            failed = True  # (not a transient failure: counted by no backoff)
            raise
        finally:
            if self._retries and not failed:
                self._retries.pop((d.id, bucket, key), None)  # it completed: back off from 0 again

    def _metric(self, metric: Any, *labels: str) -> Any:
        """A metric's child for these labels, cached: a label lookup costs a lock and a dict."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = fast_child(metric, metric.labels(*labels))
        return child

    def _check(self, bound: BoundWorkflow, r: RuleDef, ctx: RuleContext[Any, Any]) -> bool:
        try:
            fired = bool(r.condition(ctx))
        except Exception as e:
            self._metric(self.metrics.dispatch_errors, bound.definition.id, r.id).inc()
            log.warning(
                "condition of %s.%s raised %r; treated as false", bound.definition.id, r.id, e
            )
            fired = False
        counts = bound.evaluated[r.index]
        if counts is None:
            wf = bound.definition.id
            counts = bound.evaluated[r.index] = (
                self._metric(self.metrics.rule_evaluations, wf, r.id, "false"),
                self._metric(self.metrics.rule_evaluations, wf, r.id, "true"),
            )
        counts[fired].inc()
        return fired

    def _limited(
        self,
        r: RuleDef,
        firing: Firing | FiringRecord | None,
        trigger: str,
        now: float,
        target: Hashable | None,
    ) -> bool:
        """Whether cooldown, max firings or an earlier firing for this trigger hold the rule back."""
        if firing is None:
            return False
        if firing.last_trigger == trigger or trigger in firing.recent:
            return True
        if r.max_firings and firing.count >= r.max_firings:
            return True
        if r.cooldown and not r.shared_cooldown:  # (a shared one: _claim_cooldown)
            # One expression for the hold and the wake-up: ``now - last_at < cooldown``
            # can hold at ``last_at + cooldown`` itself (float rounding), and the rule
            # would be held at its own wake-up, re-arming it for that instant forever.
            ready_at = firing.last_at + r.cooldown
            if now < ready_at:
                if target is not None:
                    self.timers.schedule(ready_at, target)
                return True
        return False

    async def _claim_cooldown(
        self,
        d: WorkflowDef,
        r: RuleDef,
        exec_key: str,
        count: int,
        now: float,
        target: Hashable | None,
    ) -> bool:
        """Claim the workflow-wide cooldown of ``r`` for its firing number ``count + 1`` for
        ``exec_key``; False while another firing's cooldown runs (a timer is set for its end).

        One compare-and-set of ``cool.<workflow>.<rule>`` in the meta bucket, before the
        firing's own commit: of several processes (or executions) only one claims it.
        """
        meta_key = f"cool.{d.id}.{r.id}"
        for _ in range(self.conflict_retries):
            entry = await self.backend.kv_get(self.meta_bucket, meta_key)
            claim = decode_claim(entry)
            if claim is not None:
                ready_at = claim.at + r.cooldown
                if now < ready_at:
                    if claim.key == exec_key and claim.count == count:
                        return True  # claimed for this very firing, whose commit was not made yet
                    if target is not None:
                        self.timers.schedule(ready_at, target)
                    return False
            value = encode_json(CooldownClaim(at=now, key=exec_key, count=count))
            try:
                if entry is None:
                    await self.backend.kv_create(self.meta_bucket, meta_key, value)
                else:
                    await self.backend.kv_update(self.meta_bucket, meta_key, value, entry.revision)
            except ConflictError:
                self._metric(self.metrics.cas_conflicts, d.id).inc()
                continue
            return True
        raise TransientBackendError(
            f"{meta_key}: lost {self.conflict_retries} compare-and-sets in a row"
        )

    async def _enforce_deadlines(
        self,
        bound: BoundWorkflow,
        bucket: str,
        key: str,
        revision: int,
        state: ExecutionState,
        now: float,
        target: Hashable,
    ) -> bool:
        """Time out or fail an overdue execution (True if it did); schedule the next deadline."""
        d = bound.definition
        if state.deadline is not None:
            deadline = state.deadline.timestamp()
            if now >= deadline:
                state.time_out()
                self._terminal_bookkeeping(d, state, None, now, "timer", "deadline", "timeout")
                await self._write(d, bucket, key, revision, state)
                return True
            self.timers.schedule(deadline, target)
        if state.status is _WAITING and state.task_deadline is not None:
            task_deadline = state.task_deadline.timestamp()
            if now >= task_deadline:
                rule_id, task_id = state.pending_rule_id, state.pending_task_id
                reason = (
                    f"task {task_id} of rule {rule_id} got no callback within {d.task_timeout:g}s"
                )
                if d.on_task_timeout == "escalate":
                    state.escalate(reason)
                else:
                    state.fail(reason)
                self._terminal_bookkeeping(
                    d, state, None, now, "timer", "task_timeout", "task_timeout"
                )
                await self._write(d, bucket, key, revision, state)
                self._metric(self.metrics.pending_callbacks, d.id).dec()
                self._metric(self.metrics.callbacks_received, d.id, rule_id, "timeout").inc()
                return True
            self.timers.schedule(task_deadline, target)
        return False

    # ------------------------------------------------------------------ dispatch

    def _dispatch_span(
        self, bound: BoundWorkflow, r: RuleDef
    ) -> contextlib.AbstractContextManager[Any]:
        if not self.tracing.enabled:
            return contextlib.nullcontext()
        return self.tracing.span(
            "reactive.dispatch", workflow=bound.definition.id, rule=r.id, action=r.action.value
        )

    def _call(self, bound: BoundWorkflow, r: RuleDef, ctx: RuleContext[Any, Any]) -> Any:
        if r.mutator is not None:
            r.mutator(ctx)
        return bound.methods[r.id](ctx)

    async def _fire_writing(
        self, bound: BoundWorkflow, r: RuleDef, *args: Any, reuse: Any = None
    ) -> None:
        if not self.tracing.enabled:
            await self._fire_writing_body(bound, r, *args, reuse=reuse)
            return
        with self._dispatch_span(bound, r):
            await self._fire_writing_body(bound, r, *args, reuse=reuse)

    async def _fire_writing_body(
        self,
        bound: BoundWorkflow,
        r: RuleDef,
        bucket: str,
        key: str,
        revision: int,
        work: ExecutionState,
        message: Any,
        mode: str,
        info: str,
        trigger: str,
        *,
        reuse: RuleContext[Any, Any] | None = None,
    ) -> None:
        """Apply a state-writing rule to ``work`` (a fresh copy) and commit it with one compare-and-set.

        ``reuse``: the context its condition was evaluated with, when it holds ``work``
        and no message: the rule runs with it (and its instant) instead of a new one.
        """
        d = bound.definition
        started = time.perf_counter()
        ctx: RuleContext[Any, Any]
        if reuse is not None:
            ctx = reuse
            now = ctx.now
            exec_id = ctx.execution_id
            ctx.rule_id = r.id
            ctx.subject = info if mode != "kv" else ""
        else:
            now = self.clock.now()
            exec_id = work.id or d.execution_id_for(key)
            ctx = new_context(
                work,
                message,
                d.id,
                exec_id,
                key,
                bucket,
                revision,
                mode,
                now,
                r.id,
                info if mode != "kv" else "",
            )
        was_terminal = work.status in _TERMINAL
        # The state before the rule ran: where an escalation for max iterations starts from.
        before = encode_json(work) if d.max_iterations else b""
        outbox: list[OutboxMessage] = []
        try:
            if r.mutator is not None:  # (as _call, inline)
                r.mutator(ctx)
            payload = bound.methods[r.id](ctx)
        except Exception as e:
            self._metric(self.metrics.dispatch_errors, d.id, r.id).inc()
            log.warning("rule %s.%s raised %r: failing execution %s", d.id, r.id, e, exec_id)
            work.fail(f"rule {r.id} raised {type(e).__name__}: {e}")
            payload = None
            r_action: str = "error"
        else:
            r_action = r.action  # a StrEnum member is its value
            if r.action is _PUBLISH:
                outbox.append(
                    self._outbox_msg(
                        r.publish_subject, payload, d, exec_id, revision, len(outbox), r.id
                    )
                )
            elif r.action is _PUBLISH_ASYNC and work.status not in _TERMINAL:
                # Unguessable: only the worker given the request can answer it (the state
                # and the outbox keep it, so a redelivered request carries the same id).
                task_id = f"{exec_id}-{r.id}-{revision}-{secrets.token_hex(12)}"
                callback_subject = f"{self.callback_prefix}.{d.id}.{exec_id}"
                payload = inject_callback_fields(payload, task_id, callback_subject, exec_id)
                work.set_pending_task(task_id, r.id)
                work.task_deadline = _utc(now + d.task_timeout)
                work.pending_since = _utc(now)
                msg = self._outbox_msg(
                    r.publish_subject, payload, d, exec_id, revision, len(outbox), r.id
                )
                msg.headers = {
                    "Reactive-Task-Id": task_id,
                    "Reactive-Callback-Subject": callback_subject,
                    "Reactive-Execution-Id": exec_id,
                }
                outbox.append(msg)
            elif r.action is _COMPLETE:
                if work.status not in _TERMINAL:
                    work.complete()
                if r.publish_subject:
                    outbox.append(
                        self._outbox_msg(
                            r.publish_subject,
                            payload
                            if payload is not None
                            else self._completion_event(d, work, now),
                            d,
                            exec_id,
                            revision,
                            len(outbox),
                            r.id,
                        )
                    )
        if d.max_iterations and work.iteration > d.max_iterations and work.status not in _TERMINAL:
            limit = d.max_iterations
            # The transition that would pass the limit does not happen: escalate from where it was.
            work = decode(d.state_type, before)
            work.iteration = limit
            work.escalate(f"max iterations ({limit}) exceeded by rule {r.id}")
            outbox = []
            r_action = "escalate"
        firing = work.firings.get(r.id) or Firing()
        firing.count += 1
        firing.last_at = now
        firing.last_trigger = trigger
        if trigger[:1] == "m":
            remember(firing, trigger)  # (a revision is remembered only by claims)
        work.firings[r.id] = firing
        stamp = _utc(now)
        work.timeline.append(
            TimelineEntry(
                timestamp=stamp,
                rule_id=r.id,
                trigger_mode=mode,
                trigger_info=info,
                action=r_action,
                phase=work.phase,
                iteration=work.iteration,
            )
        )
        if not was_terminal and work.status in _TERMINAL:
            reason = (
                "max_iterations"
                if r_action == "escalate"
                else ("rule_error" if r_action == "error" else "rule")
            )
            self._terminal_bookkeeping(d, work, outbox, now, None, None, reason)
        else:
            work.outbox = outbox
        work.outbox_id = f"{d.id}:{exec_id}:{revision}" if work.outbox else ""
        work.updated_at = stamp
        work.owner = self.instance_id
        if d.max_timeline and len(work.timeline) > d.max_timeline:
            del work.timeline[: len(work.timeline) - d.max_timeline]
        await self._commit(d, bucket, key, revision, work)
        handles = bound.dispatched[r.index]
        if handles is None:
            # (StrEnum members are their values: as labels they are the same strings.)
            handles = bound.dispatched[r.index] = (
                self._metric(self.metrics.action_dispatches, d.id, r.id, r.action),
                self._metric(self.metrics.rule_duration, d.id, r.id),
            )
        handles[0].inc()
        if revision == 0:
            self._metric(self.metrics.executions_created, d.id).inc()
        if work.status is _WAITING and r.action is _PUBLISH_ASYNC:
            self._metric(self.metrics.pending_callbacks, d.id).inc()
        handles[1].observe(time.perf_counter() - started)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "transition workflow=%s execution=%s rule=%s action=%s phase=%s status=%s",
                d.id,
                exec_id,
                r.id,
                r_action,
                work.phase,
                work.status.value,
            )

    def _outbox_msg(
        self,
        subject: str,
        payload: Any,
        d: WorkflowDef,
        exec_id: str,
        revision: int,
        index: int,
        tag: str,
    ) -> OutboxMessage:
        return _outbox_message(subject, payload, f"{d.id}:{exec_id}:{revision}:{index}:{tag}")

    def _completion_event(
        self, d: WorkflowDef, st: ExecutionState, now: float
    ) -> WorkflowCompletionEvent:
        return WorkflowCompletionEvent(
            execution_id=st.id,
            workflow_id=d.id,
            status=st.status.value,
            phase=st.phase,
            completed_at=_utc(now),
        )

    def _terminal_bookkeeping(
        self,
        d: WorkflowDef,
        st: ExecutionState,
        outbox: list[OutboxMessage] | None,
        now: float,
        mode: str | None,
        rule_id: str | None,
        reason: str,
    ) -> None:
        """Set the outbox of a write that makes the execution terminal: its lifecycle event; its metrics once committed."""
        out = list(outbox) if outbox else []
        stamp = _utc(now)
        st.completed_at = st.updated_at = stamp
        st.owner = self.instance_id
        duration = now - st.created_at.timestamp() if st.created_at else 0.0
        status = st.status
        event: Any = None
        if status is _COMPLETED:
            subject = d.on_complete
            if subject:
                event = self._completion_event(d, st, now)
            counter = self._metric(self.metrics.executions_completed, d.id)
        elif status is Status.ESCALATED:
            subject = d.on_escalate
            if subject:
                event = WorkflowEscalationEvent(
                    execution_id=st.id,
                    workflow_id=d.id,
                    phase=st.phase,
                    reason=st.error,
                    escalated_at=stamp,
                )
            counter = self._metric(self.metrics.executions_escalated, d.id, reason)
        else:
            subject = d.on_fail
            if subject:
                event = WorkflowFailureEvent(
                    execution_id=st.id,
                    workflow_id=d.id,
                    phase=st.phase,
                    error=st.error,
                    failed_at=stamp,
                )
            if status is Status.TIMED_OUT:
                counter = self._metric(self.metrics.executions_timed_out, d.id)
            else:
                counter = self._metric(self.metrics.executions_failed, d.id, reason)
        histogram = self._metric(self.metrics.execution_duration, d.id, status)
        error = st.error or reason

        def committed() -> None:
            counter.inc()
            histogram.observe(max(duration, 0.0))
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "execution %s workflow=%s execution=%s reason=%s", status, d.id, st.id, error
                )

        self._on_commit[id(st)] = committed
        if event is not None:
            out.append(
                OutboxMessage(
                    subject=subject,
                    json=msgspec.Raw(encode_json(event)),
                    msg_id=f"{d.id}:{st.id}:{status}",
                )
            )
        if rule_id is not None:
            st.timeline.append(
                TimelineEntry(
                    timestamp=_utc(now),
                    rule_id=rule_id,
                    trigger_mode=mode or "",
                    action=st.status,
                    phase=st.phase,
                    iteration=st.iteration,
                )
            )
        st.outbox = out
        st.outbox_id = f"{d.id}:{st.id}:{st.status}" if out else ""

    async def _write(
        self, d: WorkflowDef, bucket: str, key: str, revision: int, st: ExecutionState
    ) -> None:
        """Commit a lifecycle write (timeout, task timeout, start) made by the engine itself."""
        if st.outbox and not st.outbox_id:
            st.outbox_id = f"{d.id}:{st.id}:{revision}"
        with contextlib.suppress(_Replaced):
            await self._commit(d, bucket, key, revision, st)

    async def _commit(
        self, d: WorkflowDef, bucket: str, key: str, revision: int, st: ExecutionState
    ) -> int:
        """Compare-and-set the state, then deliver its outbox. Raises ConflictError if it lost."""
        if self.tracing.enabled:
            carrier = self.tracing.headers()
            if carrier:
                if not st.trace_parent:
                    st.trace_parent = carrier.get("traceparent", "")
                for m in st.outbox:
                    m.headers = {**m.headers, **carrier}
        data = encode_json(st)
        replaced = len(data) > self._max_state
        if replaced:
            st, data = await self._too_large(d, bucket, key, revision, st, len(data))
        on_commit = self._on_commit.pop(id(st), None) if self._on_commit else None
        try:
            if revision == 0:
                new_rev = await self.backend.kv_create(bucket, key, data)
            else:
                new_rev = await self.backend.kv_update(bucket, key, data, revision)
        except ConflictError:
            self._metric(self.metrics.cas_conflicts, d.id).inc()
            raise
        if on_commit is not None:
            on_commit()
        fresh = _FRESH.get()
        if fresh is not None:
            # A terminal state is not evaluated again (no rule fires for it, its outbox has
            # just gone out): an empty value marks it, so that only its echo is skipped.
            fresh.append((bucket, key, revision, new_rev, b"" if st.status in _TERMINAL else data))
        if st.status is _WAITING:
            # Its callback is likely to come here: keep the state to start from then.
            parked = self._parked
            parked[(bucket, key)] = (new_rev, data)
            if len(parked) > _PARKED_MAX:
                del parked[next(iter(parked))]
        elif self._parked:
            self._parked.pop((bucket, key), None)
        if st.outbox:
            await self._flush(bucket, key, st)
        if replaced:
            raise _Replaced(f"{key}: the state was too large; the execution failed instead")
        return new_rev

    async def _too_large(
        self, d: WorkflowDef, bucket: str, key: str, revision: int, st: ExecutionState, size: int
    ) -> tuple[ExecutionState, bytes]:
        """A state too large to store: what to write instead, the execution failed with the reason.

        It starts from the revision the transition started from (which was stored, so
        it fits), or, should that not leave room for the failure, from a new state
        with only the engine's bookkeeping.
        """
        self._on_commit.pop(id(st), None)  # the transition did not happen: nothing to count
        now = self.clock.now()
        entry = await self.backend.kv_get(bucket, key) if revision else None
        if entry is not None and entry.revision != revision:
            raise ConflictError(f"{key}: revision {revision} was superseded")
        reason = (
            f"state of {size} bytes is larger than the {self._max_state} bytes a state may have "
            f"(the server's max payload less {_STATE_HEADROOM})"
        )
        last = st.timeline[-1] if st.timeline else None
        log.error("failing execution workflow=%s key=%s: %s", d.id, key, reason)
        for start_from in (entry, None):
            failed = (
                self._decode_state(d, bucket, key, revision, start_from.value)
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
            rule_id = last.rule_id if last is not None else ""
            mode = last.trigger_mode if last is not None else ""
            self._terminal_bookkeeping(d, failed, None, now, mode, rule_id, "state_too_large")
            data = encode_json(failed)
            if len(data) <= self._max_state:
                return failed, data
            self._on_commit.pop(id(failed), None)
        raise BackendError(
            f"{key}: even the failed state is too large to store"
        )  # pragma: no cover

    # ------------------------------------------------------------------ outbox

    async def _flush(self, bucket: str, key: str, st: ExecutionState) -> None:
        for m in st.outbox:
            await self.backend.publish(
                m.subject, m.payload(), headers=m.headers or None, msg_id=m.msg_id
            )
        # Unacknowledged: a marker lost with the connection costs only a repeated
        # delivery (with the same message ids) after a restart.
        await self.backend.kv_put_unacked(
            self.meta_bucket, f"out.{bucket}.{key}", st.outbox_id.encode()
        )
        self._mark_delivered(bucket, key, st.outbox_id)

    def _mark_delivered(self, bucket: str, key: str, outbox_id: str) -> None:
        k = (bucket, key)
        self._delivered[k] = outbox_id
        self._delivered.move_to_end(k)
        if len(self._delivered) > 10_000:
            self._delivered.popitem(last=False)

    async def _outbox_settled(
        self,
        bucket: str,
        key: str,
        st: ExecutionState,
        now: float,
        target: Hashable,
        revision: int | None = None,
    ) -> bool:
        """Whether the outbox of this revision has gone out (delivering it if its writer is gone).

        ``revision``: the revision ``st`` was read at, when it may be stale (a KV
        watch entry). A superseded revision's outbox is never delivered again:
        every engine write settles the outbox it replaces first.
        """
        if self._delivered.get((bucket, key)) == st.outbox_id:
            return True
        marker = await self.backend.kv_get(self.meta_bucket, f"out.{bucket}.{key}")
        if marker is not None and marker.value.decode() == st.outbox_id:
            self._mark_delivered(bucket, key, st.outbox_id)
            return True
        if revision is not None:
            latest = await self.backend.kv_get(bucket, key)
            if latest is not None and latest.revision != revision:
                return False  # stale: the watch brings the newer revision
        written = st.updated_at.timestamp() if st.updated_at else 0.0
        if st.owner != self.instance_id and now < written + self.outbox_grace:
            # Its writer is probably delivering it now; look again when the grace is over.
            self.timers.schedule(written + self.outbox_grace, target)
            return False
        log.info(
            "delivering outbox %s of %s/%s left by %s", st.outbox_id, bucket, key, st.owner or "?"
        )
        await self._flush(bucket, key, st)
        return True

    # ------------------------------------------------------------------ rules that do not write state

    async def _fire_nonwriting(self, bound: BoundWorkflow, r: RuleDef, *args: Any) -> None:
        if not self.tracing.enabled:
            await self._fire_nonwriting_body(bound, r, *args)
            return
        with self._dispatch_span(bound, r):
            await self._fire_nonwriting_body(bound, r, *args)

    async def _fire_nonwriting_body(
        self, bound: BoundWorkflow, r: RuleDef, ctx: RuleContext[Any, Any], trigger: str
    ) -> None:
        """Fire a rule that publishes without writing state.

        Where it must fire once per revision (or message) whatever the number of
        processes, or has a cooldown or max firings, it first claims the firing in
        the meta bucket by compare-and-set: the claim records the count, the time,
        the trigger and the message, then the message is published and the claim
        cleared. A ``pend.`` key marks a claim not yet cleared, so that the
        sweep delivers it if this process dies in between.
        """
        d = bound.definition
        exec_part = f"{ctx.bucket}.{ctx.key}" if ctx.key else "_"
        msg_id = f"{d.id}:{r.id}:{exec_part}:{trigger}"
        claim = (
            r.mode is TriggerMode.STATE
            or r.has_limits
            or (r.mode is TriggerMode.MESSAGE_AND_STATE and not trigger.startswith("c"))
        )
        if not claim:
            payload = self._safe_build(bound, r, ctx)
            if payload is not _FAILED:
                await self.backend.publish(r.publish_subject, encode(payload), msg_id=msg_id)
                self._metric(self.metrics.action_dispatches, d.id, r.id, r.action.value).inc()
            return
        suffix = f"{d.id}.{r.id}.{exec_part}"
        meta_key = "fire." + suffix
        target = (d.id, ctx.bucket, ctx.key) if ctx.key else None
        trigger_rev = int(trigger[1:]) if trigger.startswith("r") else 0
        waited = 0
        for _ in range(self.conflict_retries + 10):
            entry = await self.backend.kv_get(self.meta_bucket, meta_key)
            rec = decode_record(entry)
            rev = entry.revision if entry is not None else 0
            now = self.clock.now()
            if rec.pending:
                if (
                    rec.pending_owner != self.instance_id
                    and now < rec.pending_at + self.outbox_grace
                ):
                    # Another process is delivering its claim; it normally clears in milliseconds.
                    if waited < 10:
                        waited += 1
                        await anyio.sleep(0.005 * waited)
                        continue
                    if target is not None:
                        self.timers.schedule(rec.pending_at + self.outbox_grace, target)
                    return
                if not await self._deliver_claim(d, meta_key, rec, rev):
                    continue
                entry = await self.backend.kv_get(self.meta_bucket, meta_key)
                rec = decode_record(entry)
                rev = entry.revision if entry is not None else 0
            if trigger_rev and too_old(rec, trigger_rev):
                return  # older than every revision remembered: treated as fired
            if self._limited(r, rec, trigger, now, target):
                return
            if r.shared_cooldown and not await self._claim_cooldown(
                d, r, exec_part, rec.count, now, target
            ):
                return
            payload = self._safe_build(bound, r, ctx)
            if payload is _FAILED:
                return
            m = _outbox_message(r.publish_subject, payload, msg_id)
            rec.count += 1
            rec.last_at = now
            rec.last_trigger = trigger
            remember(rec, trigger)
            rec.pending = [m]
            rec.pending_owner = self.instance_id
            rec.pending_at = now
            # Mark first, claim second: a mark without a pending claim is only swept away.
            await self.backend.kv_put(self.meta_bucket, "pend." + suffix, b"")
            try:
                if rev == 0:
                    claimed = await self.backend.kv_create(
                        self.meta_bucket, meta_key, encode_json(rec)
                    )
                else:
                    claimed = await self.backend.kv_update(
                        self.meta_bucket, meta_key, encode_json(rec), rev
                    )
            except ConflictError:
                self._metric(self.metrics.cas_conflicts, d.id).inc()
                continue
            await self._deliver_claim(d, meta_key, rec, claimed)
            log.info(
                "fired workflow=%s rule=%s key=%s trigger=%s action=publish",
                d.id,
                r.id,
                ctx.key or "-",
                trigger,
            )
            return
        log.warning("gave up claiming %s after %d conflicts", meta_key, self.conflict_retries)

    async def _deliver_claim(
        self, d: WorkflowDef, meta_key: str, rec: FiringRecord, rev: int
    ) -> bool:
        """Publish a claim's pending messages, clear the claim and its mark. False if the clear lost."""
        for m in rec.pending:
            await self.backend.publish(
                m.subject, m.payload(), headers=m.headers or None, msg_id=m.msg_id
            )
            self._metric(
                self.metrics.action_dispatches, d.id, meta_key.split(".")[2], "publish"
            ).inc()
        rec.pending = []
        try:
            await self.backend.kv_update(self.meta_bucket, meta_key, encode_json(rec), rev)
        except ConflictError:
            self._metric(self.metrics.cas_conflicts, d.id).inc()
            return False
        await self.backend.kv_delete(self.meta_bucket, "pend." + meta_key[len("fire.") :])
        return True

    async def _sweep_claims(self) -> None:
        """Deliver claims whose process died between claiming and publishing."""
        now = self.clock.now()
        next_due = now + self.sweep_interval
        for mark in await self.backend.kv_keys(self.meta_bucket, "pend.>"):
            meta_key = "fire." + mark[len("pend.") :]
            entry = await self.backend.kv_get(self.meta_bucket, meta_key)
            rec = decode_record(entry)
            if entry is None or not rec.pending:
                await self.backend.kv_delete(self.meta_bucket, mark)
                continue
            if now < rec.pending_at + self.outbox_grace:
                next_due = min(next_due, rec.pending_at + self.outbox_grace)
                continue
            wf_id = meta_key.split(".")[1]
            bound = self.registry.workflows.get(wf_id)
            if bound is None:
                continue  # not ours to deliver: another engine serves that workflow
            log.info("delivering claim %s left by %s", meta_key, rec.pending_owner or "?")
            await self._deliver_claim(bound.definition, meta_key, rec, entry.revision)
        self.timers.schedule(next_due, _SWEEP_TARGET)

    def _safe_build(self, bound: BoundWorkflow, r: RuleDef, ctx: RuleContext[Any, Any]) -> Any:
        try:
            return self._call(bound, r, ctx)
        except Exception as e:
            self._metric(self.metrics.dispatch_errors, bound.definition.id, r.id).inc()
            log.warning("rule %s.%s raised %r; nothing published", bound.definition.id, r.id, e)
            return _FAILED

    # ------------------------------------------------------------------ messages

    async def _handle_message(
        self, sub: Subscription, msg: InboundMessage, decoded: dict[Any, Any], keyed: dict[str, str]
    ) -> None:
        if not self.tracing.enabled:
            await self._handle_message_body(sub, msg, decoded, keyed)
            return
        with self.tracing.span(
            "reactive.message",
            parent=self.tracing.parent_from(msg.headers),
            workflow=sub.bound.definition.id,
            subject=msg.subject,
        ):
            await self._handle_message_body(sub, msg, decoded, keyed)

    async def _handle_message_body(
        self, sub: Subscription, msg: InboundMessage, decoded: dict[Any, Any], keyed: dict[str, str]
    ) -> None:
        d = sub.bound.definition
        trigger = f"m{msg.stream}:{msg.sequence}" if msg.stream else f"c{uuid.uuid4().hex}"
        try:
            # Message-only rules: every one whose conditions pass fires.
            for r in sub.rules:
                if r.mode is TriggerMode.MESSAGE:
                    ctx: RuleContext[Any, Any] = RuleContext(
                        state=None,
                        message=decoded[r.message_type],
                        workflow_id=d.id,
                        subject=msg.subject,
                        trigger_mode="message",
                        now=self.clock.now(),
                        rule_id=r.id,
                    )
                    if self._check(sub.bound, r, ctx):
                        await self._fire_nonwriting(sub.bound, r, ctx, trigger)
            by_key: dict[str, list[RuleDef]] = {}
            for r in sub.rules:
                if r.mode is TriggerMode.MESSAGE_AND_STATE:
                    by_key.setdefault(keyed[r.id], []).append(r)
            for exec_id, rules in by_key.items():
                await self._message_with_state(sub.bound, rules, exec_id, msg, decoded, trigger)
        except TransientBackendError as e:
            delay = min(0.2 * 2 ** max(msg.num_delivered - 1, 0), 30.0)
            log.warning(
                "transient failure handling %s (%s); redelivery in %.1fs", msg.subject, e, delay
            )
            await self._settle(msg, "nak", delay)
            return
        except DecodeError as e:
            self._metric(self.metrics.state_decode_errors, d.id).inc()
            log.warning(
                "terminating message on %s: the execution's state cannot be decoded: %s",
                msg.subject,
                e,
            )
            await self._settle(msg, "term")
            return
        except Exception:
            log.exception("error handling message on %s", msg.subject)
            if msg.num_delivered >= self.max_deliver:
                await self._settle(msg, "term")
            else:
                await self._settle(msg, "nak", min(0.5 * msg.num_delivered, 30.0))
            return
        await self._settle(msg, "ack")

    async def _message_with_state(
        self,
        bound: BoundWorkflow,
        rules: list[RuleDef],
        exec_id: str,
        msg: InboundMessage,
        decoded: dict[Any, Any],
        trigger: str,
    ) -> None:
        d = bound.definition
        key = d.key(exec_id)
        bucket = d.bucket
        target = (d.id, bucket, key)
        pending = list(rules)  # the rules this message has not fired yet
        for _ in range(self.conflict_retries):
            now = self.clock.now()
            entry = await self.backend.kv_get(bucket, key)
            if entry is None:
                revision, raw = 0, b""
                state = d.state_type()
                state.initialize(exec_id, d.id, now, d.timeout)
            else:
                revision, raw = entry.revision, entry.value
                state = decode(d.state_type, raw)
                if state.outbox and not await self._outbox_settled(bucket, key, state, now, target):
                    raise TransientBackendError(
                        f"{key}: an earlier outbox is still being delivered"
                    )
                if state.status is _PENDING:
                    state.initialize(state.id or exec_id, d.id, now, d.timeout)
            if state.status in _TERMINAL:
                return
            try:
                if entry is not None and await self._enforce_deadlines(
                    bound, bucket, key, revision, state, now, target
                ):
                    return
                writer: RuleDef | None = None
                others: list[RuleDef] = []
                deferred = False

                def message_ctx(
                    r: RuleDef,
                    state: ExecutionState = state,
                    revision: int = revision,
                    now: float = now,
                ) -> RuleContext[Any, Any]:
                    return RuleContext(
                        state=state,
                        message=decoded[r.message_type],
                        workflow_id=d.id,
                        execution_id=exec_id,
                        key=key,
                        bucket=bucket,
                        revision=revision,
                        subject=msg.subject,
                        trigger_mode="message+state",
                        now=now,
                        rule_id=r.id,
                    )

                for r in pending:
                    if r.writes_state and writer is not None:
                        deferred = True
                        continue
                    if r.action is _PUBLISH_ASYNC and state.status is _WAITING:
                        continue
                    if not self._check(bound, r, message_ctx(r)):
                        continue
                    if r.writes_state:
                        firing = state.firings.get(r.id)
                        if self._limited(r, firing, trigger, now, None):
                            continue
                        if r.shared_cooldown and not await self._claim_cooldown(
                            d, r, f"{bucket}.{key}", firing.count if firing else 0, now, None
                        ):
                            continue
                        writer = r
                    else:
                        others.append(r)
                for r in others:
                    await self._fire_nonwriting(bound, r, message_ctx(r), trigger)
                if others:
                    pending = [r for r in pending if r not in others]
                if writer is not None:
                    if entry is None:
                        work = d.state_type()
                        work.initialize(exec_id, d.id, now, d.timeout)
                    else:
                        work = decode(d.state_type, raw)
                        if work.status is _PENDING:
                            work.initialize(work.id or exec_id, d.id, now, d.timeout)
                    await self._fire_writing(
                        bound,
                        writer,
                        bucket,
                        key,
                        revision,
                        work,
                        decoded[writer.message_type],
                        "message+state",
                        msg.subject,
                        trigger,
                    )
                if writer is not None and deferred:
                    # The later writers are evaluated again, on the revision this one wrote.
                    pending = [r for r in pending if r is not writer]
                    continue
                return
            except ConflictError:
                continue
        raise TransientBackendError(
            f"{key}: lost {self.conflict_retries} compare-and-sets in a row"
        )

    # ------------------------------------------------------------------ callbacks

    async def _handle_callback(
        self, bound: BoundWorkflow, msg: InboundMessage, exec_id: str
    ) -> None:
        d = bound.definition
        key = d.key(exec_id)
        bucket = d.bucket
        try:
            env = decode(_Envelope, msg.data)
        except DecodeError as e:
            self._metric(self.metrics.poison_messages, d.id, "callback").inc()
            log.warning("terminating undecodable callback on %s: %s", msg.subject, e)
            await self._settle(msg, "term")
            return
        if not env.task_id:
            env.task_id = msg.headers.get("Reactive-Task-Id", "")
        try:
            outcome = await self._apply_callback(bound, bucket, key, exec_id, env, msg)
        except TransientBackendError as e:
            delay = min(0.2 * 2 ** max(msg.num_delivered - 1, 0), 30.0)
            log.warning(
                "transient failure handling callback %s (%s); redelivery in %.1fs",
                msg.subject,
                e,
                delay,
            )
            await self._settle(msg, "nak", delay)
            return
        except Exception:
            log.exception("error handling callback on %s", msg.subject)
            await self._settle(msg, "term" if msg.num_delivered >= self.max_deliver else "nak", 1.0)
            return
        await self._settle(msg, "term" if outcome == "poison" else "ack")

    async def _apply_callback(
        self,
        bound: BoundWorkflow,
        bucket: str,
        key: str,
        exec_id: str,
        env: _Envelope,
        msg: InboundMessage,
    ) -> str:
        with contextlib.ExitStack() as spans:
            return await self._apply_callback_body(bound, bucket, key, exec_id, env, msg, spans)

    async def _apply_callback_body(
        self,
        bound: BoundWorkflow,
        bucket: str,
        key: str,
        exec_id: str,
        env: _Envelope,
        msg: InboundMessage,
        spans: contextlib.ExitStack,
    ) -> str:
        d = bound.definition
        target = (d.id, bucket, key)
        traced = not self.tracing.enabled
        parked = self._parked.pop((bucket, key), None)
        for _ in range(self.conflict_retries):
            now = self.clock.now()
            # The waiting state this engine committed, if it still has it: a write based on
            # it is checked by the compare-and-set; anything else is decided on a fresh read.
            cached, parked = parked, None
            entry = (
                KVEntry(bucket, key, cached[1], cached[0])
                if cached is not None
                else await self.backend.kv_get(bucket, key)
            )
            if entry is None:
                self._metric(self.metrics.callbacks_received, d.id, "", "unknown").inc()
                log.info("ignoring callback for unknown execution %s", key)
                return "stale"
            state = decode(d.state_type, entry.value)
            if not traced:
                # The worker's trace context if it passed one on, else the execution's.
                traced = True
                spans.enter_context(
                    self.tracing.span(
                        "reactive.callback",
                        parent=self.tracing.parent_from(msg.headers, state.trace_parent),
                        workflow=d.id,
                        key=key,
                        task_id=env.task_id,
                    )
                )
            if state.outbox and not await self._outbox_settled(
                bucket, key, state, now, target, entry.revision if cached else None
            ):
                if cached is not None:
                    continue  # superseded: read it again
                raise TransientBackendError(f"{key}: an earlier outbox is still being delivered")
            if state.status is _WAITING and (
                state.is_expired(now)
                or (state.task_deadline is not None and state.task_deadline.timestamp() <= now)
            ):
                # Too late: the deadline or the task timeout came first.
                try:
                    await self._enforce_deadlines(
                        bound, bucket, key, entry.revision, state, now, target
                    )
                except ConflictError:
                    continue
                self._metric(
                    self.metrics.callbacks_received, d.id, state.pending_rule_id, "late"
                ).inc()
                return "stale"
            if (
                state.status is not _WAITING
                or not env.task_id
                or state.pending_task_id != env.task_id
            ):
                if cached is not None:
                    continue  # read it again before calling the callback stale
                self._metric(
                    self.metrics.callbacks_received, d.id, state.pending_rule_id, "stale"
                ).inc()
                log.info("ignoring stale or duplicate callback task=%s for %s", env.task_id, key)
                return "stale"
            rule_id = state.pending_rule_id
            r = d.rules_by_id.get(rule_id)
            if r is None:
                state.fail(f"callback for unknown rule {rule_id!r}")
                self._terminal_bookkeeping(
                    d, state, None, now, "callback", rule_id, "callback_error"
                )
                try:
                    await self._write(d, bucket, key, entry.revision, state)
                except ConflictError:
                    continue
                return "done"
            latency = now - state.pending_since.timestamp() if state.pending_since else 0.0
            work = state
            was_terminal = False
            action = "callback"
            outbox: list[OutboxMessage] = []
            result: Any = None
            failure = env.error
            if not failure:
                try:
                    result = decode(r.result_type, msg.data)
                except DecodeError as e:
                    # A result of the wrong shape: the task failed, now (not at its timeout).
                    failure = f"its result does not decode: {e}"
                    action = "invalid_result"
            if failure:
                work.fail(f"task {env.task_id} of rule {rule_id} failed: {failure}")
                if action == "invalid_result":
                    status = "invalid"
                else:
                    action, status = "callback_error", "error"
            else:
                work.clear_pending_task()
                ctx: RuleContext[Any, Any] = RuleContext(
                    state=work,
                    message=None,
                    workflow_id=d.id,
                    execution_id=exec_id,
                    key=key,
                    bucket=bucket,
                    revision=entry.revision,
                    subject=msg.subject,
                    trigger_mode="callback",
                    now=now,
                    rule_id=r.id,
                )
                try:
                    bound.handlers[r.id](ctx, result)
                except Exception as e:
                    self._metric(self.metrics.dispatch_errors, d.id, r.id).inc()
                    work = decode(d.state_type, entry.value)
                    work.fail(f"result handler of {r.id} raised {type(e).__name__}: {e}")
                    action = "error"
                status = "ok"
                if (
                    d.max_iterations
                    and work.iteration > d.max_iterations
                    and work.status not in _TERMINAL
                ):
                    work = decode(d.state_type, entry.value)
                    work.iteration = d.max_iterations
                    work.escalate(
                        f"max iterations ({d.max_iterations}) exceeded by result of {r.id}"
                    )
                    action = "escalate"
            work.timeline.append(
                TimelineEntry(
                    timestamp=_utc(now),
                    rule_id=r.id,
                    trigger_mode="callback",
                    trigger_info=msg.subject,
                    action=action,
                    phase=work.phase,
                    iteration=work.iteration,
                    error=work.error if action != "callback" else "",
                )
            )
            if not was_terminal and work.status in _TERMINAL:
                reason = {
                    "escalate": "max_iterations",
                    "error": "rule_error",
                    "callback_error": "callback_error",
                    "invalid_result": "invalid_result",
                }.get(action, "rule")
                self._terminal_bookkeeping(d, work, outbox, now, None, None, reason)
            else:
                work.outbox = outbox
                work.updated_at = _utc(now)
                work.owner = self.instance_id
            work.outbox_id = f"{d.id}:{exec_id}:{entry.revision}" if work.outbox else ""
            if d.max_timeline and len(work.timeline) > d.max_timeline:
                del work.timeline[: len(work.timeline) - d.max_timeline]
            try:
                await self._commit(d, bucket, key, entry.revision, work)
            except _Replaced:
                status = "too_large"  # the execution failed instead: no longer waiting either
            except ConflictError:
                continue
            self._metric(self.metrics.callbacks_received, d.id, r.id, status).inc()
            self._metric(self.metrics.callback_latency, d.id, r.id).observe(max(latency, 0.0))
            self._metric(self.metrics.pending_callbacks, d.id).dec()
            log.info(
                "transition workflow=%s execution=%s rule=%s action=%s phase=%s status=%s",
                d.id,
                exec_id,
                r.id,
                action,
                work.phase,
                work.status.value,
            )
            if status == "invalid":
                self._metric(self.metrics.poison_messages, d.id, "callback").inc()
                log.warning("terminating callback on %s: %s", msg.subject, work.error)
                return "poison"  # (terminated: its effect is committed, it must not come back)
            return "done"
        raise TransientBackendError(
            f"{key}: lost {self.conflict_retries} compare-and-sets in a row"
        )


_FAILED: Any = object()

# A state may be as large as the server's max payload less this: room for the headers
# of its write, and of each message of its outbox when that is published.
_STATE_HEADROOM = 8192


class _Replaced(ConflictError):
    """A transition's write that was replaced by the execution's failure (its state was too large).

    A ConflictError: whoever made the transition treats it as lost to a newer revision.
    """


def _outbox_message(subject: str, payload: Any, msg_id: str) -> OutboxMessage:
    """A message for an outbox: a JSON payload kept as JSON (see OutboxMessage)."""
    if payload is None or isinstance(payload, bytes | str):
        return OutboxMessage(subject=subject, data=encode(payload), msg_id=msg_id)
    return OutboxMessage(subject=subject, json=msgspec.Raw(encode_json(payload)), msg_id=msg_id)


# _follow: at most this many transitions in a row are evaluated right after their
# commit; a longer chain (a loop) goes on through the watch, so one busy key does
# not hold its worker's other keys back.
_CHAIN_LIMIT = 8
_CHAINED_MAX = 100_000
_PARKED_MAX = 10_000
_FRESH: contextvars.ContextVar[list[tuple[str, str, int, int, bytes]] | None] = (
    contextvars.ContextVar("reactive_fresh", default=None)
)

# After a burst this large (the replay of a big bucket, say) has drained, hand the
# freed heap back to the operating system: the state lives in NATS, so the engine's
# memory at rest should not keep the high-water mark of the replay.
_TRIM_AFTER = 10_000
_DELIVERED_AFTER_BURST = 1_000


def _release_free_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
