"""The engine: the facade that wires the runtime's parts, starts and stops them, and offers the
public methods. The path of an event, and which part keeps which guarantee:

* ``triggers`` turn NATS (partitioned consumers of the watched buckets, subscriptions,
  callback and timer consumers)
  into typed events (``events``) for the ``shards``: events of one key go to one
  worker, in order;
* a worker sends each event to the handler of its kind: ``handle_kv`` (a revision,
  a timer), ``handle_message``, ``handle_callback``, or the claim sweep (``claims``);
* deciding which rules fire and what holds them back is ``decide``; what a rule or a
  result makes of a state is ``transition`` (both without I/O);
* ``writer`` fires a rule that writes state, ``claims`` one that only publishes;
* ``store`` commits a state by compare-and-set and delivers its outbox.

docs/architecture.md draws it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from reactive.backends.base import Backend
from reactive.backends.partitions import check_partitions
from reactive.clock import Clock, SystemClock
from reactive.codecs import decode, encode, encode_json
from reactive.dsl.definition import WorkflowDef
from reactive.dsl.state import ExecutionState
from reactive.dsl.workflow import Workflow, definition_of
from reactive.errors import BackendError, DecodeError, ReactiveError
from reactive.runtime.claims import Claims
from reactive.runtime.core import Options, Runtime
from reactive.runtime.events import (
    SWEEP_TARGET,
    CallbackArrival,
    KVChange,
    MessageArrival,
    SweepDue,
    TimerDue,
)
from reactive.runtime.handle_callback import CallbackHandler
from reactive.runtime.handle_kv import KVHandler
from reactive.runtime.handle_message import MessageHandler
from reactive.runtime.metrics import METRICS, EngineMetrics
from reactive.runtime.registry import Registry
from reactive.runtime.schedules import (
    grace_kind,
    timer_subject_length,
)
from reactive.runtime.shards import KeyOrder, Shards
from reactive.runtime.store import Store
from reactive.runtime.timers import Timers
from reactive.runtime.tracing import Tracing, tracing_configured
from reactive.runtime.transition import TERMINAL
from reactive.runtime.triggers import Triggers
from reactive.runtime.writer import Writer
from reactive.subjects import (
    MAX_EXECUTION_ID_LENGTH,
    MAX_KEY_LENGTH,
    MAX_STORED_KEY_LENGTH,
    MAX_SUBJECT_LENGTH,
    validate_execution_id,
)

__all__ = ["Engine"]

S = TypeVar("S", bound=ExecutionState)


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
    ``max_deliver``, and ``timer_stream``: the work-queue stream of the timers
    (``reactive.timer.>``). Deadlines, task timeouts, cooldown ends and grace
    periods are message schedules there (nats-server 2.12+), not timers in the
    engine: they fire once, whichever engine is alive, and memory does not grow
    with executions that wait.

    Engines share the work: the changes of each bucket a workflow watches are split
    into ``partitions`` (8; the first engine's number stays), each processed by one
    of the engines that run the workflow at a time. An engine that stops pulling for
    ``pin_timeout`` seconds (4: it died) loses its partitions to the others, and a
    message it took and did not acknowledge comes again ``ack_wait`` seconds (3; also
    for the callback, timer and subject consumers the engine creates) after it died:
    while it lives, it keeps what it holds in progress (``+WPI`` every third of
    ``ack_wait``), however long the message waits in its queues.
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
        timer_stream: str = "REACTIVE_TIMERS",
        workers: int = 128,
        queue_limit: int = 2048,
        conflict_retries: int = 20,
        outbox_grace: float = 5.0,
        sweep_interval: float = 30.0,
        max_deliver: int = 20,
        partitions: int = 8,
        ack_wait: float = 3.0,
        pin_timeout: float = 4.0,
        metrics: EngineMetrics | None = None,
        instance_id: str | None = None,
        tracing: bool | None = None,
        tracer_provider: Any = None,
    ) -> None:
        check_partitions(partitions)
        if not (ack_wait > 0 and pin_timeout > 0):
            raise ValueError("ack_wait and pin_timeout must be positive")
        self.backend = backend
        self.clock: Clock = clock or SystemClock()
        self.registry = Registry()
        self.metrics = metrics or METRICS
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.meta_bucket = meta_bucket
        self.callback_stream = callback_stream
        self.callback_prefix = callback_prefix
        self.timer_stream = timer_stream
        # Tracing: on with a tracer provider given here or installed globally, or when told.
        self._tracing_choice = True if tracer_provider is not None and tracing is None else tracing
        self._tracer_provider = tracer_provider
        self.tracing = Tracing(bool(self._tracing_choice), tracer_provider)
        options = Options(
            instance_id=self.instance_id,
            meta_bucket=meta_bucket,
            callback_stream=callback_stream,
            callback_prefix=callback_prefix,
            conflict_retries=conflict_retries,
            outbox_grace=outbox_grace,
            sweep_interval=sweep_interval,
            timer_stream=timer_stream,
            max_deliver=max_deliver,
            partitions=partitions,
            ack_wait=ack_wait,
            pin_timeout=pin_timeout,
        )
        self.rt = rt = Runtime(
            backend, self.clock, self.registry, self.metrics, self.tracing, options
        )
        # The parts, in the order an event meets them.
        order = KeyOrder()
        self.shards = Shards(rt, order, workers, queue_limit)
        self.triggers = Triggers(rt, self.shards, order)
        self.timers = rt.timers = Timers(self.clock, self.triggers.on_timer)
        self.store = Store(rt)
        self.claims = Claims(rt)
        writer = Writer(rt, self.store)
        kv = KVHandler(rt, order, self.store, self.claims, writer)
        self.shards.handlers.update(
            {
                KVChange: kv.on_change,
                TimerDue: kv.on_timer,
                MessageArrival: MessageHandler(rt, self.store, self.claims, writer).on_message,
                CallbackArrival: CallbackHandler(rt, self.store, writer).on_callback,
                SweepDue: self.claims.on_sweep,
            }
        )
        self.shards.evaluate = kv.evaluate
        self.shards.owns = self.triggers.owns
        self.shards.after_burst = self._after_burst
        self._tg: TaskGroup | None = None
        self._stack: AsyncExitStack | None = None
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
            timer_subject_length(
                d.id, grace_kind("r" * rule), max(buckets, key=len), MAX_KEY_LENGTH
            ),
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

    async def start(self, *, wait: bool = True) -> None:
        """Start the backend (if needed), the workers, the timers and every trigger.

        With ``wait`` (the default) it returns once every trigger runs (``ready``), and
        fails (stopping what it started) with the first failure of one that could not
        start. Without, it returns once the meta bucket and the workflows' buckets are
        there and the triggers are started: each makes its own stream and retries on its
        own (``ready`` says when all run; ``startup_failures`` what keeps one from it).
        """
        if self.running:
            return
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            if self._tracing_choice is None:
                # Spans cost nothing unless the application installed a tracer provider.
                self.tracing.configure(tracing_configured(), self._tracer_provider)
            await self.backend.start()
            self.store.size_states_for(self.backend.max_payload)
            await self.backend.ensure_bucket(self.meta_bucket)
            tg = await stack.enter_async_context(anyio.create_task_group())
            self._tg = self.triggers.tg = tg
            self._stack = stack
            self.shards.start(tg)
            tg.start_soon(self.timers.run)
            self.timers.schedule(self.clock.now(), SWEEP_TARGET)
            self.running = True
            for bound in list(self.registry.workflows.values()):
                await self.triggers.start_for(bound)
            if wait:
                await self.triggers.wait_ready()
        except BaseException:
            # The workers and timers already started run until cancelled: cancel them, or
            # leaving the task group would wait for them forever.
            self.running = False
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
            await stack.__aexit__(None, None, None)
            self._stopped()
            raise

    async def stop(self) -> None:
        """Stop every trigger and worker. What is in hand, queued or held while a retry goes
        on is handed back (redelivered now); what else is unacknowledged comes again later."""
        if not self.running:
            return
        self.running = False
        with anyio.move_on_after(2.0, shield=True):  # (as the workers hand theirs back)
            await self.rt.hand_back_held()
        stack, self._stack = self._stack, None
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        if stack is not None:
            await stack.__aexit__(None, None, None)
        self._stopped()

    def _stopped(self) -> None:
        self._tg = None
        self._stack = None
        self.shards.stop()
        self.triggers.stop()
        self.rt.held.clear()  # (a start that failed: they come again after the ack wait)

    def _after_burst(self) -> None:
        """A burst (a replay, say) has drained: drop what it cached (see Shards)."""
        self.registry.forget_matches()
        self.store.after_burst()

    @property
    def startup_failures(self) -> dict[str, tuple[BackendError, int]]:
        """What keeps each trigger that has not run yet from running, and how many of its
        tries in a row failed (by the trigger's name: ``subscription to orders.new``)."""
        t = self.triggers
        return {what: (e, t.failed_tries.get(what, 1)) for what, e in t.failures.items()}

    @property
    def idle(self) -> bool:
        """No event is queued or being processed."""
        return self.shards.inflight == 0

    @property
    def ready(self) -> bool:
        """Running, and every trigger has been set up."""
        return self.running and self.triggers.ready_count >= self.triggers.expected_ready

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every trigger is set up (partitioned consumers, subscriptions and consumers open)."""
        with anyio.fail_after(timeout):
            while not self.ready:
                await anyio.sleep(0.01)

    async def register(self, workflow: type[Workflow] | Workflow) -> WorkflowDef:
        """Register a workflow; if the engine runs, its triggers start now."""
        self._check_names(definition_of(workflow))
        bound = self.registry.add(workflow)
        if self.running:
            await self.triggers.start_for(bound)
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
        if d.timeout:
            await self.triggers.ensure_timer_stream()  # (its deadline's timer goes there)
            await self.backend.ensure_bucket(self.meta_bucket)  # (its delivery marker's)
        await self.backend.ensure_bucket(d.bucket)
        await self.store.create(d, execution_id, st, self.clock.now())
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
        pred = predicate or (lambda s: s.status in TERMINAL)
        with anyio.fail_after(timeout):
            async with self.backend.kv_watch(d.bucket, key) as entries:
                async for entry in entries:
                    if entry.operation != "PUT":
                        continue
                    st = decode(d.state_type, entry.value)
                    if pred(st):
                        return st
        raise ReactiveError(f"watch of {key} ended")  # pragma: no cover

    async def cancel(
        self,
        workflow: type[Workflow] | Workflow | str,
        execution_id: str,
        reason: str = "cancelled",
    ) -> None:
        """Cancel an execution: its ``@when_cancelled`` handler runs (a compensation), or it
        ends as ``cancelled`` (the ``on_cancel`` event goes out); an answer to its pending
        task that comes afterwards is ignored. Durable: the request goes through the
        callback stream to whichever engine serves the workflow. An execution that has
        ended, or does not exist, is left as it is."""
        d = self.registry.get(workflow).definition
        validate_execution_id(execution_id)
        await self.backend.ensure_stream(self.callback_stream, [f"{self.callback_prefix}.>"])
        await self.backend.publish(
            f"{self.callback_prefix}.{d.id}.{execution_id}",
            encode_json({"cancel": reason or "cancelled"}),
        )

    async def publish(self, subject: str, payload: Any, *, msg_id: str | None = None) -> None:
        """Publish a payload (a struct, dict, bytes or str) as the engine does."""
        await self.backend.publish(subject, encode(payload), msg_id=msg_id)
