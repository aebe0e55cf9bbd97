"""What every part of the runtime shares: the backend, the clock, the registry, metrics, timers,
tracing and the engine's options, with the few helpers they all use."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Generator, Hashable
from contextlib import AbstractContextManager
from typing import Any, Final

from reactive.backends.base import Backend, InboundMessage
from reactive.clock import Clock
from reactive.codecs import decode
from reactive.dsl.context import RuleContext
from reactive.dsl.definition import RuleDef, WorkflowDef
from reactive.dsl.state import ExecutionState
from reactive.errors import DecodeError, TimedOutError, TransientBackendError
from reactive.runtime.metrics import EngineMetrics, fast_child
from reactive.runtime.registry import BoundWorkflow, Registry
from reactive.runtime.schedules import timer_message
from reactive.runtime.timers import Timers
from reactive.runtime.tracing import Tracing

__all__ = ["DONE", "RETRY_CAP", "Options", "Runtime", "backoff", "log", "within"]

log = logging.getLogger("reactive")


async def within(cm: AbstractContextManager[Any], aw: Awaitable[None]) -> None:
    """Await ``aw`` inside ``cm`` (a span).

    The parts that open a span when tracing is on return ``aw`` itself when it is
    off: no context manager, and no coroutine, per event on the hot path.
    """
    with cm:
        await aw


class _Done:
    """An awaitable that is done at once (for a step that found nothing to do)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return iter(())  # type: ignore[return-value]


DONE: Awaitable[None] = _Done()


class Options:
    """The engine's settings the runtime's parts read (see ``Engine``)."""

    __slots__ = (
        "ack_wait",
        "callback_prefix",
        "callback_stream",
        "conflict_retries",
        "instance_id",
        "max_deliver",
        "meta_bucket",
        "outbox_grace",
        "partitions",
        "pin_timeout",
        "sweep_interval",
        "timer_stream",
    )

    def __init__(
        self,
        *,
        instance_id: str,
        meta_bucket: str,
        callback_stream: str,
        callback_prefix: str,
        conflict_retries: int,
        outbox_grace: float,
        sweep_interval: float,
        timer_stream: str,
        max_deliver: int,
        partitions: int = 8,
        ack_wait: float = 3.0,
        pin_timeout: float = 4.0,
    ) -> None:
        self.instance_id = instance_id
        self.meta_bucket = meta_bucket
        self.callback_stream = callback_stream
        self.callback_prefix = callback_prefix
        self.conflict_retries = conflict_retries
        self.outbox_grace = outbox_grace
        self.sweep_interval = sweep_interval
        self.timer_stream = timer_stream
        self.max_deliver = max_deliver
        self.partitions = partitions
        self.ack_wait = ack_wait
        self.pin_timeout = pin_timeout


def backoff(e: TransientBackendError, failures: int, first: float) -> float:
    """How long to wait before trying again after ``failures`` transient failures in a row,
    the last one ``e``: ``first``, doubled with each failure up to RETRY_CAP; but only
    ``first`` after a request the server did not answer: that try waited its whole
    timeout already, and the answer is due as soon as the server (a cluster's new leader,
    elected 4-9 s after a node died) is back."""
    if isinstance(e, TimedOutError):
        return first
    return min(first * 2.0**failures, RETRY_CAP)


# The longest wait between two tries after transient failures. A cluster that lost a node
# answers "no responders" for a group until it has elected the group's new leader, 4-9 s
# later: a wait doubled up to 30 s (as it was) made a message wait 25 s more after that,
# where a try every 2 s at most finds the leader within 2 s of its election.
RETRY_CAP: Final = 2.0


class Runtime:
    """The services and settings of one engine, handed to each of its parts."""

    def __init__(
        self,
        backend: Backend,
        clock: Clock,
        registry: Registry,
        metrics: EngineMetrics,
        tracing: Tracing,
        options: Options,
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.registry = registry
        self.metrics = metrics
        self.tracing = tracing
        self.options = options
        # This process's own retries and the claim sweep (an execution's time is a schedule
        # in NATS: ``set_timer``); set by the engine, which wires the timers to the shards.
        self.timers: Timers
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Failures in a row per timer target, for the backoff of _retry_later.
        self.retries: dict[Hashable, int] = {}
        # The changes and timers whose evaluation failed, kept in progress (the consumer's
        # keep_alive) while this process retries their key; handed back once it succeeds.
        self.held: dict[Hashable, list[InboundMessage]] = {}
        # Keys (workflow, bucket, key) whose evaluation lost its compare-and-set, until the
        # caller of that evaluation looks (Shards.follow, KVHandler.on_change).
        self.conflicted: set[Hashable] = set()

    def metric(self, metric: Any, *labels: str) -> Any:
        """A metric's child for these labels, cached: a label lookup costs a lock and a dict."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = fast_child(metric, metric.labels(*labels))
        return child

    def check(self, bound: BoundWorkflow, r: RuleDef, ctx: RuleContext[Any, Any]) -> bool:
        """Evaluate a rule's conditions (a condition that raises is false), counted."""
        try:
            fired = bool(r.condition(ctx))
        except Exception as e:
            self.metric(self.metrics.dispatch_errors, bound.definition.id, r.id).inc()
            log.warning(
                "condition of %s.%s raised %r; treated as false", bound.definition.id, r.id, e
            )
            fired = False
        counts = bound.evaluated[r.index]
        if counts is None:
            wf = bound.definition.id
            counts = bound.evaluated[r.index] = (
                self.metric(self.metrics.rule_evaluations, wf, r.id, "false"),
                self.metric(self.metrics.rule_evaluations, wf, r.id, "true"),
            )
        counts[fired].inc()
        return fired

    def decode_state(
        self, d: WorkflowDef, bucket: str, key: str, revision: int, raw: bytes
    ) -> ExecutionState | None:
        """The state in ``raw``; None (counted and logged, the value left as it is) if it is not one."""
        try:
            state: ExecutionState = decode(d.state_type, raw)
        except DecodeError as e:
            self.metric(self.metrics.state_decode_errors, d.id).inc()
            log.warning("leaving undecodable state %s/%s rev %d: %s", bucket, key, revision, e)
            return None
        return state

    def retry_later(
        self, bound: BoundWorkflow, bucket: str, key: str, e: TransientBackendError
    ) -> None:
        """After a transient failure, evaluate the key again later, backing off while it fails.

        Every evaluation of a key counts its failures here and forgets them when it
        completes: the delay doubles with each failure in a row.
        """
        target = (bound.definition.id, bucket, key)
        n = self.retries.get(target, 0)
        self.retries[target] = n + 1
        delay = backoff(e, n, 0.1)
        # (Warned once per failure in a row; the tries after it, every RETRY_CAP at most,
        # are debug: a cluster electing a leader fails every in-flight key for seconds.)
        log.log(
            logging.WARNING if n == 0 else logging.DEBUG,
            "transient failure on %s/%s (%s); retrying in %.1fs",
            bucket,
            key,
            e,
            delay,
        )
        self.timers.schedule(self.clock.now() + delay, target)

    async def set_timer(
        self, workflow_id: str, kind: str, bucket: str, key: str, at: float
    ) -> None:
        """Schedule a timer of a key in NATS, decided while evaluating (not by a commit:
        those travel in the outbox). It replaces the key's pending timer of ``kind``."""
        m = timer_message(workflow_id, kind, bucket, key, at)
        await self.backend.publish(m.subject, m.data, headers=m.headers)

    def hold(self, workflow_id: str, bucket: str, key: str, msg: InboundMessage) -> None:
        """Keep ``msg`` (a change or a timer of the key, whose evaluation failed) unsettled
        while this process retries the key: in progress while it lives, so it comes to
        another engine only once the ack wait has passed after this one's death."""
        self.held.setdefault((workflow_id, bucket, key), []).append(msg)

    async def succeeded(self, workflow_id: str, bucket: str, key: str) -> None:
        """An evaluation of the key completed: its next failure backs off from the start,
        and what was held while it failed comes again now, to be evaluated as it is."""
        target = (workflow_id, bucket, key)
        if self.retries:
            self.retries.pop(target, None)
        if self.held:
            for msg in self.held.pop(target, ()):
                await self.settle(msg, "nak")

    async def hand_back_held(self) -> None:
        """The engine stops: what it holds while retrying goes to the next owner now."""
        held, self.held = self.held, {}
        for msgs in held.values():
            for msg in msgs:
                await self.settle(msg, "nak")

    async def redeliver_later(
        self, msg: InboundMessage, e: TransientBackendError, what: str
    ) -> None:
        """Hand a message back after a transient failure handling it, backing off with its
        deliveries (``backoff``); the first failure in a row is a warning."""
        delay = backoff(e, max(msg.num_delivered - 1, 0), 0.2)
        log.log(
            logging.WARNING if msg.num_delivered <= 1 else logging.DEBUG,
            "transient failure handling %s%s (%s); redelivery in %.1fs",
            what,
            msg.subject,
            e,
            delay,
        )
        await self.settle(msg, "nak", delay)

    async def settle(self, msg: InboundMessage, how: str, delay: float = 0.0) -> None:
        """Acknowledge, terminate or hand back (after ``delay``) a message; never raises."""
        try:
            if how == "ack":
                await msg.ack()
            elif how == "term":
                await msg.term()
            else:
                await msg.nak(delay)
        except Exception as e:  # the message will be redelivered; nothing is lost
            log.warning("could not %s message on %s: %s", how, msg.subject, e)
