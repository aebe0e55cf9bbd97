"""Shards: events of one key go to one worker, in order; each worker sends an event to the
handler of its kind, then evaluates the states it has just committed (``follow``).

Guarantees kept here:

* Events of one key are handled one at a time, in the order they came.
* Each revision is evaluated once, as soon as it exists: a state a worker has just
  committed is evaluated right away (where this engine holds the key's partition), and
  its echo from the partition is skipped (``KeyOrder``); revisions written by anyone
  else come through the partitions.
* At most ``queue_limit`` events wait for the workers, so a replay is taken in at
  the pace it is processed; the heap a large burst used is handed back after it.
"""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel

from reactive.runtime.core import Runtime, log
from reactive.runtime.events import (
    CallbackArrival,
    Committed,
    Event,
    KVChange,
    MessageArrival,
    TimerDue,
)
from reactive.runtime.inbox import Inbox
from reactive.runtime.registry import BoundWorkflow

__all__ = ["CHAIN_LIMIT", "KeyOrder", "Shards"]

# follow: at most this many transitions in a row are evaluated right after their
# commit; a longer chain (a loop) goes on through the partition, so one busy key does
# not hold its worker's other keys back.
CHAIN_LIMIT = 8
_CHAINED_MAX = 100_000
# After a burst this large (the replay of a big bucket, say) has drained, hand the
# freed heap back to the operating system: the state lives in NATS, so the engine's
# memory at rest should not keep the high-water mark of the replay.
_TRIM_AFTER = 10_000

Handler = Callable[[Any, list[Committed]], Awaitable[None]]
Evaluate = Callable[
    [BoundWorkflow, list[Any], str, str, int, bytes, str, list[Committed]], Awaitable[None]
]


class KeyOrder:
    """Per key: the latest revision queued, and the chains of this engine's own commits
    evaluated right after committing them (whose echoes from the partition are skipped)."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str], int] = {}
        # Per workflow, bucket and key: the spans [first, last] of revisions evaluated
        # right after their commit, oldest first. A span stays until its last revision's
        # echo is handled: echoes are handled in order, but may come after a later chain
        # has begun (another workflow's partitions, read by a task of their own).
        self.chained: dict[tuple[str, str, str], list[list[int]]] = {}

    def seen(self, k: tuple[str, str, str], revision: int) -> bool:
        """Whether this revision of the key was evaluated already, right after this engine
        committed it. (``k``: the workflow, the bucket and the key.)"""
        spans = self.chained.get(k)
        if spans is None:
            return False
        for i, span in enumerate(spans):
            if span[0] <= revision <= span[1]:
                if revision == span[1]:
                    del spans[i]
                    if not spans:
                        del self.chained[k]
                return True
        return False

    def chain(self, k: tuple[str, str, str], base: int, revision: int) -> None:
        """``revision`` (written on ``base``) is evaluated right after its commit."""
        spans = self.chained.get(k)
        if spans is None:
            self.chained[k] = [[revision, revision]]
        elif spans[-1][1] == base:
            spans[-1][1] = revision  # the chain goes on
        else:
            spans.append([revision, revision])

    def unchain(self, k: tuple[str, str, str], base: int, revision: int) -> None:
        """``revision``'s evaluation right after its commit did not complete: its echo is
        to be evaluated, not skipped (``chain`` undone)."""
        spans = self.chained.get(k)
        if not spans or spans[-1][1] != revision:
            return
        if spans[-1][0] == revision:
            spans.pop()
            if not spans:
                del self.chained[k]
        else:
            spans[-1][1] = base


class Shards:
    """The workers and their inboxes."""

    def __init__(self, rt: Runtime, order: KeyOrder, workers: int, queue_limit: int) -> None:
        self.rt = rt
        self.order = order
        self.n_workers = max(1, workers)
        self.queue_limit = queue_limit
        self.inboxes: list[Inbox[Event]] = []
        self.handlers: dict[type, Handler] = {}
        self.evaluate: Evaluate  # the KV handler's evaluation of one revision (for follow)
        # Whether this engine holds the partition of a workflow's key (the triggers know).
        self.owns: Callable[[BoundWorkflow, str, str], bool] = lambda bound, bucket, key: True
        self.after_burst: Callable[[], None] = lambda: None
        self.inflight = 0
        self._burst = 0  # items processed since the heap was last handed back
        # Set when a trigger found its worker's inbox full: a backlog (a replay, say),
        # the kind of burst whose heap is worth handing back once it has drained.
        self.backlogged = False

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        for _ in range(self.n_workers):
            inbox: Inbox[Event] = Inbox(max(16, self.queue_limit // self.n_workers))
            self.inboxes.append(inbox)
            tg.start_soon(self._worker, inbox)

    def stop(self) -> None:
        self.inboxes.clear()

    def enqueue(self, shard_key: str, event: Event) -> Awaitable[None] | None:
        """Queue ``event`` for the worker of ``shard_key``: None if it is queued, else await the result.

        Not a coroutine: with room in the inbox the event is handed over at once (no
        checkpoint, so a burst is handed over in one loop turn; no coroutine per
        event); only when the inbox is full is there something to wait for.
        """
        self.inflight += 1
        inbox = self.inboxes[hash(shard_key) % len(self.inboxes)]
        if inbox.put_nowait(event):
            return None
        return self._wait_for_room(inbox, event)

    def offer(self, shard_key: str, event: Event) -> bool:
        """Queue ``event`` only if its worker has room now (for the timers, which must not wait)."""
        if not self.inboxes:
            return True  # stopped: nothing to do
        if self.inboxes[hash(shard_key) % len(self.inboxes)].put_nowait(event):
            self.inflight += 1
            return True
        return False

    async def _wait_for_room(self, inbox: Inbox[Event], event: Event) -> None:
        """Queue ``event`` (counted in flight already) once ``inbox`` has room."""
        self.backlogged = True
        try:
            await inbox.put(event)
        except BaseException:
            self.inflight -= 1
            raise

    async def _worker(self, inbox: Inbox[Event]) -> None:
        # The states this worker commits, to be evaluated next (see follow).
        fresh: list[Committed] = []
        handlers = self.handlers
        taken = 0
        while True:
            if inbox:
                taken += 1
                if taken % 64 == 0:
                    # A long queue is worked off without waiting; let timers, triggers
                    # and cancellation in now and then (before an event is in hand).
                    await anyio.lowlevel.checkpoint()
                event = inbox.get_nowait()  # still there: this worker alone takes from it
            else:
                event = await inbox.get()
            try:
                await handlers[type(event)](event, fresh)
                if fresh:
                    await self.follow(fresh)
            except Exception:
                fresh.clear()
                log.exception("unexpected error processing %s", type(event).__name__)
                if isinstance(event, KVChange) and event.msg is not None:
                    # Dropped, as a revision is whose evaluation fails for good: it would
                    # fail again every time it came.
                    await self.rt.settle(event.msg, "ack")
            except anyio.get_cancelled_exc_class():
                # Stopping: hand back the message in hand and those queued behind it, so
                # they are redelivered now rather than after the consumer's ack wait.
                with anyio.move_on_after(2.0, shield=True):
                    await self._release(event)
                    while inbox:
                        queued = inbox.get_nowait()
                        self.inflight -= 1
                        await self._release(queued)
                raise
            finally:
                self.inflight -= 1
                self._burst += 1
                if self.inflight == 0 and self._burst >= _TRIM_AFTER:
                    self._burst = 0
                    if self.backlogged:
                        self.backlogged = False
                        self.after_burst()
                        gc.collect()
                        _release_free_heap()

    async def follow(self, fresh: list[Committed]) -> None:
        """Evaluate the revisions this worker just committed, without waiting for their partition.

        The key's partition brings every committed revision back; evaluating it here instead
        saves the round trip (each transition of a chain starts as soon as the one
        before has committed) and the echo's evaluation: the echo still comes to the
        worker, behind this evaluation, and is recognized (KeyOrder.seen) and only
        acknowledged. A chain stops after CHAIN_LIMIT
        transitions; the partition takes it from there. A key whose partition another
        engine holds is left to it.
        """
        order = self.order
        chained = order.chained
        match_kv = self.rt.registry.match_kv
        evaluate = self.evaluate
        owns = self.owns
        retries = self.rt.retries
        conflicted = self.rt.conflicted
        hops = 0
        while fresh:
            c = fresh.pop(0)
            k = (c.bucket, c.key)
            if hops >= CHAIN_LIMIT or order.latest.get(k, c.revision) > c.revision:
                continue  # a newer revision is queued (or the chain is long): the partition goes on
            matches = match_kv(c.bucket, c.key)
            if len(matches) != 1 or not owns(matches[0][0], c.bucket, c.key):
                # (Another engine holds the key's partition in a workflow's set: the
                # revision goes to that engine.)
                matches = [m for m in matches if owns(m[0], c.bucket, c.key)]
                if not matches:
                    continue
            hops += 1
            for bound, _ in matches:
                order.chain((bound.definition.id, c.bucket, c.key), c.base, c.revision)
            if not c.value:
                continue  # terminal: nothing to evaluate, only its echo to skip
            for bound, rules in matches:
                target = (bound.definition.id, c.bucket, c.key)
                if conflicted:
                    conflicted.discard(target)
                await evaluate(bound, rules, c.bucket, c.key, c.revision, c.value, "kv", fresh)
                if (retries and target in retries) or (conflicted and target in conflicted):
                    conflicted.discard(target)
                    # It failed (this process retries it) or lost its compare-and-set: its
                    # echo is evaluated when it comes. Skipped as seen, it could be
                    # acknowledged after a retry that "completed" on a stale read (a new
                    # leader's) had cleared the retry, and the revision would never be
                    # evaluated (the cluster soak's stuck executions).
                    order.unchain(target, c.base, c.revision)
        if len(chained) > _CHAINED_MAX:
            chained.clear()  # echoes forgotten: evaluating twice is harmless

    async def _release(self, event: Event) -> None:
        if isinstance(event, MessageArrival | CallbackArrival):
            await self.rt.settle(event.msg, "nak", 0.1)
        elif isinstance(event, TimerDue | KVChange) and event.msg is not None:
            await self.rt.settle(event.msg, "nak", 0.1)


def _release_free_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
