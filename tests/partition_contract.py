"""The contract of partitioned buckets, part of the backend contract (``BackendContract``
inherits it, so ``TestMemoryBackend`` and ``TestNatsBackend`` run it).

A process is a ``consume_partitions`` context (``another_process`` gives each its own
connection on NATS). No test bets on the machine's speed: a member reads in a task
of its own, and the tests wait for the state they want (``eventually``), writing
changes while they wait where the server only moves a partition when it has
something to deliver. "Nothing else came" is the backend's own word that nothing is
left to deliver, now or later (``assert_partitions_done``).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, nullcontext
from typing import Any

import anyio
import anyio.abc
import pytest

from reactive.backends.base import Backend, PartitionedConsumer, PartitionedMessage
from reactive.backends.partitions import partition_of
from reactive.errors import NotFoundError, PartitionCountError

N = 4  # partitions in these tests
# How soon the server moves the partitions of a member that stopped pulling: long here,
# so a partition that moves in these tests moves because its member gave it up.
PIN_TIMEOUT = 60.0


def uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def keys_per_partition(partitions: int, prefix: str, per: int = 1) -> dict[int, list[str]]:
    """``per`` keys ``<prefix>.<n>`` in each partition."""
    found: dict[int, list[str]] = {p: [] for p in range(partitions)}
    n = 0
    while any(len(keys) < per for keys in found.values()):
        key = f"{prefix}.k{n}"
        n += 1
        if len(found[partition_of(key, partitions)]) < per:
            found[partition_of(key, partitions)].append(key)
    return found


class Member:
    """One process's ``consume_partitions``, read by a task: what it got, acked unless held."""

    def __init__(self, backend: Backend, bucket: str, *, ack: bool = True) -> None:
        self.backend = backend
        self.bucket = bucket
        self.ack = ack
        self.got: list[PartitionedMessage] = []
        self.consumer: PartitionedConsumer | None = None
        self.arrival = anyio.Event()
        self.opened = anyio.Event()
        self.scope = anyio.CancelScope()

    @property
    def held(self) -> frozenset[int]:
        return self.consumer.held if self.consumer is not None else frozenset()

    def keys(self) -> list[str]:
        return [m.entry.key for m in self.got]

    async def run(self) -> None:
        with self.scope:
            async with self.backend.consume_partitions(self.bucket, N) as consumer:
                self.consumer = consumer
                self.opened.set()
                async for msg in consumer:
                    # Delivered only for what this member holds (it was pinned to get it).
                    assert msg.partition in consumer.held
                    self.got.append(msg)
                    if self.ack:
                        await msg.ack()
                    self.arrival.set()
                    self.arrival = anyio.Event()


async def wait_for(check: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0) -> None:
    """Poll ``check`` until it is true (it may write changes meanwhile)."""
    with anyio.fail_after(timeout):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await anyio.sleep(0.02)


class PartitionContract:
    """Partitioned buckets: the part of the backend contract about them."""

    # (BackendContract's hooks, used here.)
    def another_process(self, backend: Backend) -> AbstractAsyncContextManager[Backend]:
        raise NotImplementedError

    async def advance(self, backend: Backend, seconds: float) -> None:
        raise NotImplementedError

    async def assert_partitions_done(self, backend: Backend, bucket: str) -> None:
        """Nothing of ``bucket``'s partitions is left to deliver, now or later: every
        change taken in has been acknowledged (or terminated)."""
        raise NotImplementedError

    def paced(self, budget: float, what: str) -> AbstractAsyncContextManager[object]:
        """Around a part whose outcome a stall of the test's process over ``budget`` s
        could change (a message not acknowledged within a short ack wait): on a real
        server a failure after such a stall skips the test (``pace.stall_excused``);
        on the manual clock nothing can stall."""
        return nullcontext()

    # -- helpers --------------------------------------------------------------------------

    async def partitioned(self, backend: Backend, *, ack_wait: float = 30.0) -> str:
        bucket = uid("pb")
        await backend.ensure_bucket(bucket)
        await backend.ensure_partitioned(bucket, N, ack_wait=ack_wait, pin_timeout=PIN_TIMEOUT)
        return bucket

    @asynccontextmanager
    async def members(
        self, backend: Backend, bucket: str, count: int, **options: Any
    ) -> AsyncIterator[list[Member]]:
        """``count`` processes, each consuming the partitions in a task of its own.

        At the end the members stop (their contexts close) before their processes do.
        """
        async with _processes(self, backend, count) as backends:
            async with anyio.create_task_group() as tg:
                made: list[Member] = []
                for b in backends:
                    member = Member(b, bucket, **options)
                    made.append(member)
                    tg.start_soon(member.run)
                    with anyio.fail_after(10):
                        await member.opened.wait()
                try:
                    yield made
                finally:
                    tg.cancel_scope.cancel()

    async def _take(self, member: Member, count: int) -> list[PartitionedMessage]:
        with anyio.fail_after(10):
            while len(member.got) < count:
                await member.arrival.wait()
        return member.got[:count]

    # -- the set ----------------------------------------------------------------------------

    async def test_ensure_partitioned_is_idempotent_and_keeps_its_count(
        self, backend: Backend
    ) -> None:
        bucket = await self.partitioned(backend)
        await backend.ensure_partitioned(bucket, N, pin_timeout=PIN_TIMEOUT)  # again: fine
        with pytest.raises(PartitionCountError, match=f"{N} partitions, not {N + 1}"):
            await backend.ensure_partitioned(bucket, N + 1)
        with pytest.raises(PartitionCountError):
            async with backend.consume_partitions(bucket, N + 1):
                pass
        for bad in (0, -1, 100_000):
            with pytest.raises(ValueError, match="partitions"):
                await backend.ensure_partitioned(bucket, bad)
        for timeouts in ({"ack_wait": 0.0}, {"pin_timeout": -1.0}):
            with pytest.raises(ValueError, match="positive"):
                await backend.ensure_partitioned(bucket, N, **timeouts)
        with pytest.raises(NotFoundError):
            await backend.ensure_partitioned(uid("missing"), N)
        other = uid("b")
        await backend.ensure_bucket(other)
        with pytest.raises(NotFoundError, match="not partitioned"):
            async with backend.consume_partitions(other, N):
                pass

    async def test_every_key_lands_in_its_partition_with_its_change(self, backend: Backend) -> None:
        bucket = uid("pb")
        await backend.ensure_bucket(bucket)
        # Written before the set is made: the latest revision of each key is taken in.
        before = await backend.kv_put(bucket, "early.bird", b"e1")
        await backend.ensure_partitioned(bucket, N, pin_timeout=PIN_TIMEOUT)
        # Keys of every depth; one deeper than 16 tokens is placed by its first 16.
        revisions = {"early.bird": before}
        for depth in (*range(1, 17), 17, 20):
            key = ".".join(f"d{depth}x{i}" for i in range(depth))
            revisions[key] = await backend.kv_put(bucket, key, str(depth).encode())
        deep = ".".join(f"d20x{i}" for i in range(16)) + ".other"
        revisions[deep] = await backend.kv_put(bucket, deep, b"deep")
        # The engine's writes: compare-and-set, and with a TTL (retention).
        revisions["wf.created"] = await backend.kv_create(bucket, "wf.created", b"c")
        revisions["wf.ttl"] = await backend.kv_put(bucket, "wf.ttl", b"t", ttl=3600)
        async with self.members(backend, bucket, 1) as (member,):
            await wait_for(lambda: len(member.got) == len(revisions))
            got = {m.entry.key: m for m in member.got}
            for key, revision in revisions.items():
                m = got[key]
                assert m.partition == partition_of(key, N)
                assert (m.entry.bucket, m.entry.revision, m.entry.operation) == (
                    bucket,
                    revision,
                    "PUT",
                )
                assert m.entry.value == m.data == (await backend.kv_get(bucket, key)).value
            assert got[deep].partition == got[".".join(f"d20x{i}" for i in range(20))].partition
            assert member.held == {m.partition for m in member.got}
            assert member.consumer is not None and member.consumer.members == 1
            await self.assert_partitions_done(backend, bucket)

    async def test_only_keys_of_the_depths_given_are_taken_in(self, backend: Backend) -> None:
        bucket = uid("pb")
        await backend.ensure_bucket(bucket)
        await backend.ensure_partitioned(bucket, N, depths={2}, pin_timeout=PIN_TIMEOUT)
        with pytest.raises(ValueError, match="depths"):
            await backend.ensure_partitioned(bucket, N, depths={0})
        with pytest.raises(ValueError, match="depths"):
            await backend.ensure_partitioned(bucket, N, depths=set())
        async with self.members(backend, bucket, 1) as (member,):
            for key in ("a", "a.b.c", "a.b"):  # (the last is taken in: after the others)
                await backend.kv_put(bucket, key, key.encode())
            await wait_for(lambda: member.keys() == ["a.b"])
            # Other depths from now on (the workflow's patterns changed): a key of depth
            # 3 is taken in too.
            await backend.ensure_partitioned(bucket, N, depths={2, 3}, pin_timeout=PIN_TIMEOUT)
            for key in ("x", "x.y.z", "x.y"):
                await backend.kv_put(bucket, key, key.encode())
            await wait_for(lambda: sorted(member.keys()) == ["a.b", "x.y", "x.y.z"])
            await self.assert_partitions_done(backend, bucket)

    async def test_each_change_of_a_key_comes_in_order_once_per_ack(self, backend: Backend) -> None:
        bucket = await self.partitioned(backend)
        async with self.members(backend, bucket, 1) as (member,):
            # One at a time (each one taken in before the next), by compare-and-set.
            revisions = [await backend.kv_create(bucket, "wf.one", b"0")]
            await self._take(member, 1)
            for i in range(1, 5):
                revisions.append(
                    await backend.kv_update(bucket, "wf.one", str(i).encode(), revisions[-1])
                )
                await self._take(member, i + 1)
            await backend.kv_delete(bucket, "wf.one")
            (*_, gone) = await self._take(member, 6)
            assert (gone.entry.operation, gone.entry.value) == ("DEL", b"")
            revisions.append(gone.entry.revision)
            assert [m.entry.revision for m in member.got] == sorted(revisions)
            assert [m.data for m in member.got] == [str(i).encode() for i in range(5)] + [b""]
            assert all(m.num_delivered == 1 for m in member.got)
            # A burst: the last revision always comes; what comes, comes in order (the
            # server may take in only the newer of two quick revisions of a key).
            burst = [await backend.kv_put(bucket, "wf.one", b"b%d" % i) for i in range(20)]
            await wait_for(lambda: member.got[-1].entry.revision == burst[-1])
            seen = [m.entry.revision for m in member.got[6:]]
            assert seen == sorted(set(seen)) and set(seen) <= set(burst)
            await self.assert_partitions_done(backend, bucket)

    async def test_a_nak_redelivers_after_its_delay(self, backend: Backend) -> None:
        bucket = await self.partitioned(backend)
        async with self.members(backend, bucket, 1, ack=False) as (member,):
            rev = await backend.kv_put(bucket, "wf.nak", b"v")
            (first,) = await self._take(member, 1)
            await first.nak(0.3)
            await self.advance(backend, 0.3)
            second = (await self._take(member, 2))[1]
            assert (second.entry.revision, second.sequence) == (rev, first.sequence)
            assert second.num_delivered == 2
            await second.ack()
            await self.assert_partitions_done(backend, bucket)

    # -- members ----------------------------------------------------------------------------

    async def test_two_members_split_the_partitions_and_each_key_goes_to_one(
        self, backend: Backend
    ) -> None:
        bucket = await self.partitioned(backend)
        warm = keys_per_partition(N, "warm")
        async with self.members(backend, bucket, 2) as (one, two):

            async def split() -> bool:
                # (A partition is pinned when it has something to deliver: keep it busy.)
                for keys in warm.values():
                    await backend.kv_put(bucket, keys[0], b"w")
                return len(one.held) == len(two.held) == N // 2

            await wait_for(split)
            assert one.held.isdisjoint(two.held) and one.held | two.held == set(range(N))
            assert one.consumer is not None and one.consumer.members == 2
            start = (len(one.got), len(two.got))
            keys = [key for ks in keys_per_partition(N, "wf", per=3).values() for key in ks]
            for round_ in range(3):
                for key in keys:
                    await backend.kv_put(bucket, key, b"%d" % round_)
            last = {key: (await backend.kv_get(bucket, key)) for key in keys}
            await wait_for(
                lambda: all(
                    any(
                        m.entry.key == k and m.entry.revision == e.revision
                        for m in one.got + two.got
                    )
                    for k, e in last.items()
                    if e is not None
                )
            )
            mine = {m.entry.key for m in one.got[start[0] :] if m.entry.key in last}
            theirs = {m.entry.key for m in two.got[start[1] :] if m.entry.key in last}
            assert mine.isdisjoint(theirs) and mine | theirs == set(keys)
            assert {partition_of(k, N) for k in mine} <= one.held
            assert {partition_of(k, N) for k in theirs} <= two.held
            await self.assert_partitions_done(backend, bucket)

    async def test_closing_a_member_hands_its_partitions_to_the_other(
        self, backend: Backend
    ) -> None:
        bucket = await self.partitioned(backend)
        warm = keys_per_partition(N, "warm")

        async def write_all() -> None:
            for keys in warm.values():
                await backend.kv_put(bucket, keys[0], b"w")

        async with self.members(backend, bucket, 2) as (one, two):

            async def split() -> bool:
                await write_all()
                return len(one.held) == len(two.held) == N // 2

            await wait_for(split)
            theirs = two.held
            two.scope.cancel()  # its context closes: it gives its partitions up

            async def all_mine() -> bool:
                await write_all()
                return one.held == set(range(N))

            await wait_for(all_mine)
            count = len(one.got)
            key = warm[min(theirs)][0]
            rev = await backend.kv_put(bucket, key, b"after")
            await wait_for(lambda: any(m.entry.revision == rev for m in one.got[count:]))
            # (Not "everything acknowledged" here: what the closed member had taken and not
            # acknowledged comes back after the ack wait, however long the machine takes.)

    async def test_a_second_member_gets_its_share(self, backend: Backend) -> None:
        bucket = await self.partitioned(backend, ack_wait=1.0)
        warm = keys_per_partition(N, "warm")

        async def write_all() -> None:
            for keys in warm.values():
                await backend.kv_put(bucket, keys[0], b"w")

        async with self.members(backend, bucket, 1) as (one,):

            async def all_mine() -> bool:
                await write_all()
                return one.held == set(range(N))

            await wait_for(all_mine)
            async with self.members(backend, bucket, 1) as (two,):

                async def balanced() -> bool:
                    await write_all()
                    share = math.ceil(N / 2)
                    return len(one.held) == len(two.held) == share

                await wait_for(balanced)
                assert one.held.isdisjoint(two.held)
            # The second has left: what it had taken and not acknowledged (it may leave in
            # the middle of one) comes to the first, after ack_wait at the latest.
            await self.advance(backend, 1.0)
            await self.assert_partitions_done(backend, bucket)

    async def test_a_restart_gets_only_what_was_not_acknowledged(self, backend: Backend) -> None:
        bucket = await self.partitioned(backend, ack_wait=1.0)
        keys = [f"wf.r{i}" for i in range(6)]
        for key in keys:
            await backend.kv_put(bucket, key, b"v1")
        async with self.paced(0.8, "what a restart gets, with a 1 s ack wait"):
            async with self.members(backend, bucket, 1, ack=False) as (member,):
                taken = await self._take(member, 6)
                acked = {m.entry.key for m in taken[:3]}
                for m in taken[:3]:
                    await m.ack()
            # Closed with three taken and not acknowledged; one more change meanwhile.
            await backend.kv_put(bucket, "wf.late", b"v1")
            async with self.members(backend, bucket, 1) as (again,):
                await self.advance(backend, 1.0)  # the unacknowledged come again after ack_wait
                await wait_for(lambda: len(again.got) >= 4)
                await self.assert_partitions_done(backend, bucket)
                assert sorted(again.keys()) == sorted({*keys} - acked | {"wf.late"})
                assert all(m.num_delivered == 2 for m in again.got if m.entry.key != "wf.late")


@asynccontextmanager
async def _processes(
    contract: PartitionContract, backend: Backend, count: int
) -> AsyncIterator[list[Backend]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(contract.another_process(backend)) for _ in range(count)
        ]
