"""The contract every backend keeps: one suite, run on ``MemoryBackend`` and on ``NatsBackend``.

As FastStream's ``tests/brokers/base/``: :class:`BackendContract` holds the tests,
and each backend's test module subclasses it once (``TestMemoryBackend`` in
tests/unit/test_memory_backend.py, ``TestNatsBackend`` in
tests/integration/test_nats_backend.py, marked ``integration``). A subclass
provides the ``backend`` fixture (a started backend) and the few hooks below that
say how its time passes and how its state is seen; the tests are written once.

No test here bets on the machine's speed. "Nothing else came" is shown by a
marker published last (a watch yields in revision order, a subscription in
publish order, a durable in stream order: whatever came before the marker is
all there was), or by the backend's own count once it has nothing left to
deliver (:meth:`BackendContract.assert_done`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, TypeVar

import anyio
import anyio.abc
import pytest
from partition_contract import PartitionContract

from reactive.backends.base import (
    SCHEDULER_HEADER,
    Backend,
    InboundMessage,
    KVEntry,
    schedule_headers,
)
from reactive.errors import BackendError, ConflictError, NotFoundError

T = TypeVar("T")


def uid(prefix: str) -> str:
    """A name no other test uses (tests against one server share it)."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def recv(it: AsyncIterator[T], timeout: float = 10.0) -> T:
    """The next item, failing the test if none comes within ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        return await it.__anext__()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll ``check`` until it returns True."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.01)


def summary(entries: Sequence[KVEntry]) -> list[tuple[str, bytes, int, str]]:
    return [(e.key, e.value, e.revision, e.operation) for e in entries]


class _Members:
    """Subscriptions, each read by a task into a list of what it got."""

    def __init__(self, *subs: AsyncIterator[InboundMessage]) -> None:
        self.subs = subs
        self.got: list[list[bytes]] = [[] for _ in subs]
        self.arrival = anyio.Event()

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        for i in range(len(self.subs)):
            tg.start_soon(self._read, i)

    async def _read(self, i: int) -> None:
        async for msg in self.subs[i]:
            self.got[i].append(msg.data)
            self.arrival.set()

    async def until_each_has(self, backend: Backend, subject: str, marker: bytes) -> None:
        """Publish ``marker`` on ``subject`` until every member has got one.

        A member gets its messages in the order they were published: once it has a
        marker, every message published before it that it will ever get has come.
        """
        with anyio.fail_after(10):
            while not all(marker in got for got in self.got):
                self.arrival = anyio.Event()
                await backend.publish(subject, marker)
                await self.arrival.wait()

    def before(self, marker: bytes) -> list[list[bytes]]:
        return [[d for d in got if d != marker] for got in self.got]


class BackendContract(PartitionContract):
    """The behaviour every backend shares (partitioned buckets: ``PartitionContract``).
    Subclasses provide:

    * a ``backend`` fixture: a started backend, closed after the test;
    * the hooks below.
    """

    # -- hooks ------------------------------------------------------------------

    def invalid_key(self) -> AbstractContextManager[Any]:
        """``pytest.raises`` for what the backend raises for an invalid key."""
        raise NotImplementedError

    def another_process(self, backend: Backend) -> AbstractAsyncContextManager[Backend]:
        """A backend for another process on the same server (its state, streams and durables).

        It takes one message at a time where the backend fetches in batches, so two
        processes share a durable's messages at any speed.
        """
        raise NotImplementedError

    async def advance(self, backend: Backend, seconds: float) -> None:
        """Let ``seconds`` pass for the backend: a manual clock jumps; a real server's
        time runs on by itself while the test waits for what it brings."""
        raise NotImplementedError

    def now(self, backend: Backend) -> float:
        """The time the backend's redeliveries are measured on."""
        raise NotImplementedError

    async def assert_done(
        self, backend: Backend, stream: str, durable: str, deliveries: int
    ) -> None:
        """With a consume context of ``durable`` open: nothing is left to deliver, now or
        later (no redelivery is pending), and the durable made ``deliveries`` in all."""
        raise NotImplementedError

    def wall(self, backend: Backend) -> float:
        """The time message schedules are measured on (seconds since the epoch)."""
        raise NotImplementedError

    async def stored(self, backend: Backend, stream: str) -> int:
        """How many messages the stream holds (pending schedules included)."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------

    async def new_bucket(self, backend: Backend) -> str:
        bucket = uid("b")
        await backend.ensure_bucket(bucket)
        return bucket

    async def new_stream(self, backend: Backend) -> tuple[str, str]:
        """A new stream capturing ``<stream>.>``, and a subject it captures."""
        stream = uid("S")
        await backend.ensure_stream(stream, [f"{stream}.>"])
        return stream, f"{stream}.jobs"

    # -- key-value ------------------------------------------------------------------

    async def test_a_missing_bucket_is_not_found(self, backend: Backend) -> None:
        missing = uid("missing")
        with pytest.raises(NotFoundError):
            await backend.kv_get(missing, "k")
        with pytest.raises(NotFoundError):
            await backend.kv_put(missing, "k", b"v")
        with pytest.raises(NotFoundError):
            await backend.kv_create(missing, "k", b"v")
        with pytest.raises(NotFoundError):
            await backend.kv_update(missing, "k", b"v", 1)
        with pytest.raises(NotFoundError):
            await backend.kv_put_unacked(missing, "k", b"v")
        with pytest.raises(NotFoundError):
            await backend.kv_delete(missing, "k")
        with pytest.raises(NotFoundError):
            await backend.kv_keys(missing)
        with pytest.raises(NotFoundError):
            async with backend.kv_watch(missing):
                pass
        bucket = uid("b")
        await backend.ensure_bucket(bucket)
        await backend.ensure_bucket(bucket)  # idempotent
        assert await backend.kv_get(bucket, "k") is None

    async def test_a_read_from_the_leader_sees_what_a_read_sees(self, backend: Backend) -> None:
        bucket = await self.new_bucket(backend)
        assert await backend.kv_get(bucket, "a", leader=True) is None
        r1 = await backend.kv_create(bucket, "a", b"1")
        entry = await backend.kv_get(bucket, "a", leader=True)
        assert entry == KVEntry(bucket=bucket, key="a", value=b"1", revision=r1, operation="PUT")
        assert entry == await backend.kv_get(bucket, "a")
        await backend.kv_put(bucket, "b", b"")
        empty = await backend.kv_get(bucket, "b", leader=True)
        assert empty is not None and empty.value == b""
        await backend.kv_delete(bucket, "a")  # a delete marker is no entry
        assert await backend.kv_get(bucket, "a", leader=True) is None
        with self.invalid_key():
            await backend.kv_get(bucket, "bad key", leader=True)
        with pytest.raises(NotFoundError):
            await backend.kv_get(uid("missing"), "a", leader=True)

    async def test_create_update_and_conflicts(self, backend: Backend) -> None:
        bucket = await self.new_bucket(backend)
        r1 = await backend.kv_create(bucket, "a", b"1")
        with pytest.raises(ConflictError):
            await backend.kv_create(bucket, "a", b"again")
        r2 = await backend.kv_update(bucket, "a", b"2", r1)
        assert r2 > r1
        with pytest.raises(ConflictError):
            await backend.kv_update(bucket, "a", b"stale", r1)  # a lost compare-and-set
        entry = await backend.kv_get(bucket, "a")
        assert entry == KVEntry(bucket=bucket, key="a", value=b"2", revision=r2, operation="PUT")
        # Revision 0 means "no entry at all" (Nats-Expected-Last-Subject-Sequence: 0).
        with pytest.raises(ConflictError):
            await backend.kv_update(bucket, "a", b"x", 0)
        r3 = await backend.kv_update(bucket, "fresh", b"x", 0)
        assert r3 > r2
        with pytest.raises(ConflictError):
            await backend.kv_update(bucket, "never", b"x", 5)
        assert await backend.kv_put(bucket, "a", b"3") > r3

    async def test_revisions_count_per_bucket(self, backend: Backend) -> None:
        one = await self.new_bucket(backend)
        two = await self.new_bucket(backend)
        revs = [
            await backend.kv_put(one, "a", b"1"),
            await backend.kv_put(one, "b", b"1"),
            await backend.kv_create(one, "c", b"1"),
            await backend.kv_update(one, "a", b"2", 1),
        ]
        assert revs == [1, 2, 3, 4]
        await backend.kv_delete(one, "b")  # a delete takes a revision too
        assert await backend.kv_put(one, "b", b"back") == 6
        # Another bucket is another stream with its own sequence.
        assert await backend.kv_put(two, "a", b"1") == 1

    async def test_a_deleted_key_reads_as_none_and_can_be_created_again(
        self, backend: Backend
    ) -> None:
        bucket = await self.new_bucket(backend)
        assert await backend.kv_get(bucket, "missing") is None
        r1 = await backend.kv_put(bucket, "k", b"v")
        await backend.kv_delete(bucket, "k")
        assert await backend.kv_get(bucket, "k") is None
        assert await backend.kv_keys(bucket) == []
        # An update against the revision before the delete loses.
        with pytest.raises(ConflictError):
            await backend.kv_update(bucket, "k", b"x", r1)
        r3 = await backend.kv_create(bucket, "k", b"again")
        assert r3 == r1 + 2
        got = await backend.kv_get(bucket, "k")
        assert got is not None and got.value == b"again" and got.revision == r3

    async def test_an_update_over_a_delete_marker_uses_its_revision(self, backend: Backend) -> None:
        bucket = await self.new_bucket(backend)
        await backend.kv_put(bucket, "k", b"v")
        await backend.kv_delete(bucket, "k")
        marker_revision = 2
        assert await backend.kv_update(bucket, "k", b"w", marker_revision) == 3

    async def test_an_empty_value_is_a_value(self, backend: Backend) -> None:
        bucket = await self.new_bucket(backend)
        rev = await backend.kv_put(bucket, "k", b"")
        assert await backend.kv_get(bucket, "k") == KVEntry(bucket, "k", b"", rev)
        assert await backend.kv_keys(bucket) == ["k"]

    async def test_keys_match_a_pattern_sorted_without_the_deleted(self, backend: Backend) -> None:
        bucket = await self.new_bucket(backend)
        assert await backend.kv_keys(bucket) == []
        for key in ["wf.b.x", "wf.a.x", "wf.a.y", "other.a.x", "wf.c.x.deep", "gone"]:
            await backend.kv_put(bucket, key, b"1")
        await backend.kv_delete(bucket, "wf.a.y")
        await backend.kv_delete(bucket, "gone")
        assert await backend.kv_keys(bucket) == ["other.a.x", "wf.a.x", "wf.b.x", "wf.c.x.deep"]
        assert await backend.kv_keys(bucket, "wf.*.x") == ["wf.a.x", "wf.b.x"]
        assert await backend.kv_keys(bucket, "wf.>") == ["wf.a.x", "wf.b.x", "wf.c.x.deep"]
        assert await backend.kv_keys(bucket, "*.a.*") == ["other.a.x", "wf.a.x"]
        assert await backend.kv_keys(bucket, "none.>") == []
        assert await backend.kv_keys(bucket, "gone") == []

    async def test_invalid_keys_are_refused(self, backend: Backend) -> None:
        bucket = await self.new_bucket(backend)
        for bad in ["", "a..b", ".a", "a.", "a b", "a:b", "a*", "a>", "a.*", "a.>"]:
            with self.invalid_key():
                await backend.kv_put(bucket, bad, b"v")
        with self.invalid_key():
            await backend.kv_put_unacked(bucket, "a b", b"v")
        with self.invalid_key():
            await backend.kv_get(bucket, "a b")
        assert await backend.kv_keys(bucket) == []

    async def test_an_unacked_put_lands(self, backend: Backend) -> None:
        bucket = await self.new_bucket(backend)
        await backend.kv_put_unacked(bucket, "marker", b"m1")
        await backend.kv_put_unacked(bucket, "marker", b"m2")

        async def landed() -> bool:
            got = await backend.kv_get(bucket, "marker")
            return got is not None and got.value == b"m2"

        await eventually(landed)

    async def test_concurrent_compare_and_set_writes_one_wins(self, backend: Backend) -> None:
        bucket = await self.new_bucket(backend)
        rev = await backend.kv_create(bucket, "k", b"0")
        results: list[int | str] = []

        async def write(i: int) -> None:
            try:
                results.append(await backend.kv_update(bucket, "k", str(i).encode(), rev))
            except ConflictError:
                results.append("conflict")

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(write, i)
        assert results.count("conflict") == 19
        assert len(results) == 20

    # -- watches ----------------------------------------------------------------------

    async def test_a_watch_replays_the_latest_by_revision_then_follows_changes(
        self, backend: Backend
    ) -> None:
        bucket = await self.new_bucket(backend)
        await backend.kv_put(bucket, "wf.a", b"a1")
        await backend.kv_put(bucket, "wf.b", b"b1")
        await backend.kv_put(bucket, "other", b"o")
        await backend.kv_put(bucket, "wf.a", b"a2")  # rev 4: wf.a now replays after wf.b
        await backend.kv_put(bucket, "wf.c", b"c1")
        await backend.kv_delete(bucket, "wf.c")  # rev 6: the marker replays too
        async with backend.kv_watch(bucket, "wf.*") as watch:
            replay = [await recv(watch) for _ in range(3)]
            assert summary(replay) == [
                ("wf.b", b"b1", 2, "PUT"),
                ("wf.a", b"a2", 4, "PUT"),
                ("wf.c", b"", 6, "DEL"),
            ]
            assert all(e.bucket == bucket for e in replay)
            await backend.kv_put(bucket, "other", b"ignored")
            await backend.kv_put(bucket, "wf.b", b"b2")
            await backend.kv_put(bucket, "wf.deep.no", b"not one token")
            await backend.kv_delete(bucket, "wf.a")
            await backend.kv_create(bucket, "wf.c", b"c2")
            await backend.kv_put(bucket, "wf.last", b"")
            # In revision order, up to the last put: nothing else matched, nothing came twice.
            live = [await recv(watch) for _ in range(4)]
            assert summary(live) == [
                ("wf.b", b"b2", 8, "PUT"),
                ("wf.a", b"", 10, "DEL"),
                ("wf.c", b"c2", 11, "PUT"),
                ("wf.last", b"", 12, "PUT"),
            ]
        # Closing the context ends the iterator.
        with pytest.raises(StopAsyncIteration):
            await watch.__anext__()

    async def test_a_watch_on_an_empty_bucket_yields_the_first_put_first(
        self, backend: Backend
    ) -> None:
        bucket = await self.new_bucket(backend)
        async with backend.kv_watch(bucket) as watch:
            rev = await backend.kv_put(bucket, "k", b"v")
            assert await recv(watch) == KVEntry(bucket, "k", b"v", rev)

    async def test_watches_follow_their_patterns(self, backend: Backend) -> None:
        bucket = await self.new_bucket(backend)
        async with (
            backend.kv_watch(bucket, "wf.*.state") as star,
            backend.kv_watch(bucket, "wf.>") as tail,
            backend.kv_watch(bucket, ">") as everything,
        ):
            keys = [
                "other.1.state",
                "wf.1.state",
                "wf.1.timers.t",
                "wf.2.state",
                "other.2.state",
                "wf.9.state",
            ]
            for key in keys:
                await backend.kv_put(bucket, key, b"x")
            # In revision order: a key that matched by mistake would come before the last.
            assert [(await recv(star)).key for _ in range(3)] == [
                "wf.1.state",
                "wf.2.state",
                "wf.9.state",
            ]
            assert [(await recv(tail)).key for _ in range(4)] == [
                "wf.1.state",
                "wf.1.timers.t",
                "wf.2.state",
                "wf.9.state",
            ]
            assert [(await recv(everything)).key for _ in range(6)] == keys

    async def test_a_cancelled_wait_on_a_watch_spoils_nothing(self, backend: Backend) -> None:
        bucket = await self.new_bucket(backend)
        async with backend.kv_watch(bucket) as watch:
            async with anyio.create_task_group() as tg:
                tg.start_soon(recv, watch)  # an empty bucket: it waits...
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()  # ...and is given up
            got: list[str] = []

            async def reader() -> None:
                got.append((await recv(watch)).key)

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.wait_all_tasks_blocked()  # the next reader waits
                await backend.kv_put(bucket, "k", b"1")
            assert got == ["k"]

    async def test_cancelling_a_watch_leaves_no_tasks(self, backend: Backend) -> None:
        bucket = await self.new_bucket(backend)
        # (The put first: a backend's own tasks for writing are not the watch's.)
        await backend.kv_put(bucket, "k", b"v")
        before = set(asyncio.all_tasks())
        watching = anyio.Event()

        async def consume() -> None:
            async with backend.kv_watch(bucket) as watch:
                async for _ in watch:
                    watching.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            # Cancelled while it iterates: it has yielded the entry it replays.
            with anyio.fail_after(10):
                await watching.wait()
            tg.cancel_scope.cancel()

        def leaked() -> set[asyncio.Task[object]]:
            return {t for t in asyncio.all_tasks() - before if not t.done()}

        # Every task it started ends (however long the machine takes to let them).
        with anyio.move_on_after(10):
            while leaked():
                await anyio.sleep(0.02)
        assert not leaked(), leaked()

    # -- streams and publishing ------------------------------------------------------

    async def test_a_stream_stores_a_message_once_per_msg_id(self, backend: Backend) -> None:
        stream, subject = await self.new_stream(backend)
        await backend.publish(subject, b"1", msg_id="id-1")
        await backend.publish(subject, b"1 again", msg_id="id-1")  # within the window: dropped
        await backend.publish(subject, b"2", msg_id="id-2", headers={"X-Test": "yes"})
        await backend.publish(subject, b"no id")
        await backend.publish(subject, b"no id")  # no msg_id: never deduplicated
        async with backend.consume(stream, "reader", f"{stream}.>") as msgs:
            got = [await recv(msgs) for _ in range(4)]
            assert [(m.data, m.sequence) for m in got] == [
                (b"1", 1),
                (b"2", 2),
                (b"no id", 3),
                (b"no id", 4),
            ]
            # The id travels as the Nats-Msg-Id header, next to the publisher's own.
            assert got[1].headers["X-Test"] == "yes"
            assert got[1].headers["Nats-Msg-Id"] == "id-2"
            for m in got:
                await m.ack()
            await self.assert_done(backend, stream, "reader", deliveries=4)

    async def test_ensure_stream_adds_subjects(self, backend: Backend) -> None:
        stream = uid("S")
        a, c = f"{stream}.a", f"{stream}.c"
        await backend.ensure_stream(stream, [a])
        await backend.publish(c, b"core")  # not captured yet: not stored
        await backend.ensure_stream(stream, [c, a])
        await backend.ensure_stream(stream, [c])  # nothing to add
        await backend.publish(c, b"stored", msg_id="m1")
        await backend.publish(c, b"stored", msg_id="m1")
        await backend.publish(a, b"a")
        async with backend.consume(stream, "reader", f"{stream}.>") as msgs:
            got = [await recv(msgs) for _ in range(2)]
            assert [(m.subject, m.data) for m in got] == [(c, b"stored"), (a, b"a")]
            for m in got:
                await m.ack()
            await self.assert_done(backend, stream, "reader", deliveries=2)

    # -- work queues and message schedules ------------------------------------------

    async def new_timer_stream(self, backend: Backend) -> str:
        """A work-queue stream that allows schedules: ``<stream>.at.>`` and ``<stream>.due.>``."""
        stream = uid("T")
        await backend.ensure_stream(
            stream, [f"{stream}.at.>", f"{stream}.due.>"], work_queue=True, schedules=True
        )
        return stream

    async def holds(self, backend: Backend, stream: str, n: int) -> None:
        async def check() -> bool:
            return await self.stored(backend, stream) == n

        await eventually(check)

    async def test_a_schedule_stores_its_target_message_when_its_time_comes(
        self, backend: Backend
    ) -> None:
        stream = await self.new_timer_stream(backend)
        at = self.wall(backend) + 0.5
        await backend.publish(
            f"{stream}.at.k1",
            b"wake",
            headers={**schedule_headers(at, f"{stream}.due.k1"), "X-Kind": "deadline"},
            msg_id="s1",
        )
        assert await self.stored(backend, stream) == 1  # the schedule itself
        async with backend.consume(stream, "timers", f"{stream}.due.>") as msgs:
            await self.advance(backend, 0.5)
            msg = await recv(msgs)
            assert self.wall(backend) >= at
            assert (msg.subject, msg.data) == (f"{stream}.due.k1", b"wake")
            # The schedule's own headers go along (not its id); the scheduler is named.
            assert msg.headers["X-Kind"] == "deadline"
            assert msg.headers[SCHEDULER_HEADER] == f"{stream}.at.k1"
            assert "Nats-Msg-Id" not in msg.headers
            await msg.ack()
            await self.assert_done(backend, stream, "timers", deliveries=1)
        # A work queue: the fired schedule and its acknowledged message are gone.
        await self.holds(backend, stream, 0)

    async def test_a_later_schedule_on_the_same_subject_replaces_the_earlier(
        self, backend: Backend
    ) -> None:
        stream = await self.new_timer_stream(backend)
        now = self.wall(backend)
        target = f"{stream}.due.k1"
        # (The second is published before the first's time: unless this process stalls.)
        async with self.paced(0.4, "a schedule replaced before its time"):
            await backend.publish(
                f"{stream}.at.k1", b"first", headers=schedule_headers(now + 0.5, target)
            )
            await backend.publish(
                f"{stream}.at.k1", b"second", headers=schedule_headers(now + 0.7, target)
            )
            assert await self.stored(backend, stream) == 1  # one pending per schedule subject
            async with backend.consume(stream, "timers", f"{stream}.due.>") as msgs:
                await self.advance(backend, 0.7)
                msg = await recv(msgs)
                assert msg.data == b"second"  # the first never fires
                await msg.ack()
                await self.assert_done(backend, stream, "timers", deliveries=1)

    async def test_a_schedule_whose_time_has_passed_fires_at_once(self, backend: Backend) -> None:
        stream = await self.new_timer_stream(backend)
        past = self.wall(backend) - 3600
        await backend.publish(
            f"{stream}.at.k.with.dots",
            b"late",
            headers=schedule_headers(past, f"{stream}.due.k.with.dots"),
        )
        async with backend.consume(stream, "timers", f"{stream}.due.>") as msgs:
            msg = await recv(msgs)
            assert (msg.subject, msg.data) == (f"{stream}.due.k.with.dots", b"late")
            await msg.ack()
        await self.holds(backend, stream, 0)

    async def test_a_work_queue_keeps_what_is_not_acknowledged(self, backend: Backend) -> None:
        stream = await self.new_timer_stream(backend)
        for i in range(3):
            await backend.publish(f"{stream}.due.k{i}", str(i).encode())
        async with backend.consume(stream, "timers", f"{stream}.due.>", ack_wait=1.0) as msgs:
            first, second = await recv(msgs), await recv(msgs)
            await first.ack()
            await second.term()
            await self.holds(backend, stream, 1)  # the third, never taken
            third = await recv(msgs)
            await third.ack()
        await self.holds(backend, stream, 0)

    async def test_a_work_queue_refuses_overlapping_durables(self, backend: Backend) -> None:
        stream = await self.new_timer_stream(backend)
        async with backend.consume(stream, "wf1", f"{stream}.due.wf1.>"):
            pass
        async with backend.consume(stream, "wf2", f"{stream}.due.wf2.>"):  # apart: fine
            pass
        with pytest.raises(BackendError, match="not unique"):
            async with backend.consume(stream, "all", f"{stream}.due.>"):
                pass

    async def test_schedules_are_refused_where_they_cannot_fire(self, backend: Backend) -> None:
        plain, subject = await self.new_stream(backend)
        soon = self.wall(backend) + 60
        with pytest.raises(BackendError, match="schedules is disabled"):
            await backend.publish(subject, b"x", headers=schedule_headers(soon, f"{plain}.due"))
        stream = await self.new_timer_stream(backend)
        for target in (f"{plain}.due", f"{stream}.due.*"):  # another stream's; a wildcard
            with pytest.raises(BackendError, match="target is invalid"):
                await backend.publish(
                    f"{stream}.at.k", b"x", headers=schedule_headers(soon, target)
                )
        with pytest.raises(BackendError, match="pattern is invalid"):
            await backend.publish(
                f"{stream}.at.k",
                b"x",
                headers={
                    "Nats-Schedule": "@at tomorrow",
                    "Nats-Schedule-Target": f"{stream}.due.k",
                },
            )
        assert await self.stored(backend, stream) == 0

    async def test_ensure_stream_gives_schedules_but_never_changes_retention(
        self, backend: Backend
    ) -> None:
        stream, subject = await self.new_stream(backend)
        with pytest.raises(BackendError, match="work queue"):
            await backend.ensure_stream(stream, [f"{stream}.>"], work_queue=True)
        await backend.ensure_stream(stream, [f"{stream}.>"], schedules=True)
        past = self.wall(backend) - 1
        await backend.publish(subject, b"x", headers=schedule_headers(past, f"{stream}.fired"))
        async with backend.consume(stream, "reader", f"{stream}.fired") as msgs:
            assert (await recv(msgs)).data == b"x"

    async def test_core_publish_reaches_the_subscribers_there_are(self, backend: Backend) -> None:
        base = uid("news")
        subject, elsewhere = f"{base}.x", f"{base}.y"
        await backend.publish(subject, b"before")  # nobody listening: lost (at-most-once)
        async with (
            backend.subscribe(f"{base}.*") as s1,
            backend.subscribe(subject) as s2,
            backend.subscribe(elsewhere) as s3,
        ):
            await backend.publish(subject, b"1", headers={"k": "v"}, msg_id="m-1")
            for s in (s1, s2):
                msg = await recv(s)
                assert (msg.subject, msg.data) == (subject, b"1")
                assert msg.headers["k"] == "v" and msg.headers["Nats-Msg-Id"] == "m-1"
                assert (msg.num_delivered, msg.stream, msg.sequence) == (1, None, None)
                # Acknowledgements of a core message do nothing.
                await msg.ack()
                await msg.nak(1.0)
                await msg.term()
                await msg.in_progress()
            await backend.publish(elsewhere, b"end")
            assert (await recv(s3)).data == b"end"  # the first it got
            await backend.publish(subject, b"end")
            assert (await recv(s1)).data == b"end"  # "1" came once
        await backend.publish(subject, b"after")
        async with backend.subscribe(subject) as s4:
            await backend.publish(subject, b"end")
            assert (await recv(s4)).data == b"end"  # neither "before" nor "after"

    async def test_a_stream_message_reaches_core_subscribers_too(self, backend: Backend) -> None:
        stream, subject = await self.new_stream(backend)
        async with backend.subscribe(f"{stream}.>") as sub:
            await backend.publish(subject, b"x", msg_id="id")
            msg = await recv(sub)
            assert msg.data == b"x"
            assert msg.headers["Nats-Msg-Id"] == "id"

    async def test_a_queue_group_delivers_each_message_to_one_member(
        self, backend: Backend
    ) -> None:
        subject = uid("jobs") + ".x"
        n = 40
        everything = [str(i).encode() for i in range(n)]
        async with (
            backend.subscribe(subject, queue="workers") as w1,
            backend.subscribe(subject, queue="workers") as w2,
            backend.subscribe(subject, queue="auditors") as auditor,
            backend.subscribe(subject) as plain,
            anyio.create_task_group() as tg,
        ):
            workers = _Members(w1, w2)
            workers.start(tg)
            for data in everything:
                await backend.publish(subject, data)
            await workers.until_each_has(backend, subject, b"end")
            one, two = workers.before(b"end")
            assert sorted(one + two, key=int) == everything  # each once, to one member
            assert one and two  # spread over both members
            # Another group, and a plain subscriber, each get every message.
            assert [(await recv(auditor)).data for _ in range(n)] == everything
            assert [(await recv(plain)).data for _ in range(n)] == everything
            tg.cancel_scope.cancel()

    async def test_a_queue_group_is_its_name_whatever_the_subjects(self, backend: Backend) -> None:
        base = uid("jobs")
        async with (
            backend.subscribe(f"{base}.*", queue="workers") as star,
            backend.subscribe(f"{base}.>", queue="workers") as tail,
            anyio.create_task_group() as tg,
        ):
            members = _Members(star, tail)
            members.start(tg)
            numbered = [str(i).encode() for i in range(6)]
            for data in numbered:
                await backend.publish(f"{base}.x", data)
            await backend.publish(f"{base}.x.y", b"deep")
            await members.until_each_has(backend, f"{base}.x", b"end")
            # One group by name: a message both subjects match reaches one of them;
            # one that only the wider subject matches goes to it.
            got_star, got_tail = members.before(b"end")
            assert sorted(got_star + got_tail) == sorted([*numbered, b"deep"])
            assert b"deep" in got_tail
            tg.cancel_scope.cancel()

    # -- durable consumers -----------------------------------------------------------------

    async def test_consuming_a_missing_stream_is_not_found(self, backend: Backend) -> None:
        with pytest.raises(NotFoundError):
            async with backend.consume(uid("NOPE"), "d", ">"):
                pass

    async def test_a_durable_delivers_from_the_start_through_its_filter(
        self, backend: Backend
    ) -> None:
        stream, _ = await self.new_stream(backend)
        await backend.publish(f"{stream}.a", b"1")
        await backend.publish(f"{stream}.b", b"skip")
        await backend.publish(f"{stream}.a", b"2")
        async with backend.consume(stream, "d", f"{stream}.a") as c:
            m1 = await recv(c)
            m2 = await recv(c)
            assert [(m.data, m.sequence, m.stream, m.num_delivered) for m in (m1, m2)] == [
                (b"1", 1, stream, 1),
                (b"2", 3, stream, 1),
            ]
            await m1.ack()
            await m2.ack()
            await backend.publish(f"{stream}.a", b"3")
            m3 = await recv(c)
            assert (m3.data, m3.sequence) == (b"3", 4)
            await m3.ack()
            await self.assert_done(backend, stream, "d", deliveries=3)

    async def test_processes_share_a_durable_each_message_once(self, backend: Backend) -> None:
        stream, subject = await self.new_stream(backend)
        n = 30
        for i in range(n):
            await backend.publish(subject, str(i).encode(), msg_id=f"job-{i}")
        seen: dict[str, list[bytes]] = {"one": [], "two": []}
        both = anyio.Event()
        all_seen = anyio.Event()

        async def worker(b: Backend, name: str) -> None:
            async with b.consume(stream, "workers", f"{stream}.>") as msgs:
                async for msg in msgs:
                    assert msg.stream == stream and msg.sequence is not None
                    assert msg.num_delivered == 1
                    seen[name].append(msg.data)
                    await msg.ack()
                    if seen["one"] and seen["two"]:
                        both.set()
                    if len(seen["one"]) + len(seen["two"]) == n:
                        all_seen.set()
                    # Each holds on after its first message until the other has one too,
                    # so both take part at any speed.
                    await both.wait()

        async with (
            self.another_process(backend) as one,
            self.another_process(backend) as two,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(worker, one, "one")
            tg.start_soon(worker, two, "two")
            with anyio.fail_after(10):
                await all_seen.wait()
            await self.assert_done(backend, stream, "workers", deliveries=n)
            tg.cancel_scope.cancel()
        assert sorted(seen["one"] + seen["two"], key=int) == [str(i).encode() for i in range(n)]
        assert seen["one"] and seen["two"]

    async def test_nak_with_a_delay_redelivers_after_it(self, backend: Backend) -> None:
        stream, subject = await self.new_stream(backend)
        await backend.publish(subject, b"job", msg_id="j1")
        async with backend.consume(stream, "naker", subject) as msgs:
            first = await recv(msgs)
            assert (first.num_delivered, first.data) == (1, b"job")
            await first.nak(0.3)
            start = self.now(backend)
            await self.advance(backend, 0.3)
            second = await recv(msgs)
            assert self.now(backend) - start >= 0.2
            assert (second.num_delivered, second.sequence) == (2, first.sequence)
            await second.ack()
            await self.assert_done(backend, stream, "naker", deliveries=2)

    async def test_term_never_redelivers(self, backend: Backend) -> None:
        stream, subject = await self.new_stream(backend)
        await backend.publish(subject, b"poison")
        await backend.publish(subject, b"fine")
        async with backend.consume(stream, "termer", subject, ack_wait=30.0) as msgs:
            poison = await recv(msgs)
            await poison.term()
            fine = await recv(msgs)
            assert fine.data == b"fine"
            await fine.ack()
            await self.assert_done(backend, stream, "termer", deliveries=2)

    async def test_an_unacked_message_comes_again_after_ack_wait(self, backend: Backend) -> None:
        stream, subject = await self.new_stream(backend)
        await backend.publish(subject, b"slow", msg_id="s1")
        async with (
            self.paced(0.8, "a redelivery acknowledged within a 1 s ack wait"),
            backend.consume(stream, "slowpoke", subject, ack_wait=1.0) as msgs,
        ):
            first = await recv(msgs)
            assert first.num_delivered == 1
            await self.advance(backend, 1.0)
            again = await recv(msgs)
            assert (again.num_delivered, again.data) == (2, b"slow")
            await again.ack()
            await self.assert_done(backend, stream, "slowpoke", deliveries=2)

    async def test_a_durable_persists_across_consume_contexts(self, backend: Backend) -> None:
        async with self.paced(0.8, "messages acknowledged within a 1 s ack wait"):
            await self._a_durable_persists_across_consume_contexts(backend)

    async def _a_durable_persists_across_consume_contexts(self, backend: Backend) -> None:
        stream, subject = await self.new_stream(backend)
        for i in range(3):
            await backend.publish(subject, str(i).encode())
        async with backend.consume(stream, "d", f"{stream}.>", ack_wait=1.0) as c:
            first = await recv(c)
            await first.ack()
            unacked = await recv(c)
            assert unacked.data == b"1"
        with pytest.raises(StopAsyncIteration):
            await c.__anext__()
        await backend.publish(subject, b"3")
        async with backend.consume(stream, "d", f"{stream}.>", ack_wait=1.0) as c:
            # It goes on where it left off; the unacked message comes after its ack_wait.
            await self.advance(backend, 1.0)
            got: dict[bytes, int] = {}
            for _ in range(3):
                msg = await recv(c)
                got[msg.data] = msg.num_delivered
                await msg.ack()
            assert sorted(got) == [b"1", b"2", b"3"]
            assert got[b"1"] == 2
        # Another durable name starts from the beginning.
        async with backend.consume(stream, "other", f"{stream}.>") as c2:
            assert (await recv(c2)).data == b"0"

    async def test_close_ends_open_iterators(self, backend: Backend) -> None:
        bucket = await self.new_bucket(backend)
        stream, _ = await self.new_stream(backend)
        ended: list[str] = []

        async def drain(name: str, it: AsyncIterator[object]) -> None:
            async for _ in it:
                pass
            ended.append(name)

        async with (
            backend.kv_watch(bucket) as w,
            backend.subscribe(uid("x")) as s,
            backend.consume(stream, "d", f"{stream}.>") as c,
        ):
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(drain, "watch", w)
                    tg.start_soon(drain, "sub", s)
                    tg.start_soon(drain, "consume", c)
                    await anyio.wait_all_tasks_blocked()
                    await backend.close()
            assert sorted(ended) == ["consume", "sub", "watch"]
        with pytest.raises(BackendError):
            async with backend.subscribe("x"):
                pass
        await backend.start()
        async with backend.subscribe("x"):
            pass
