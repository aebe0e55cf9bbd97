"""Partitioned buckets in memory: what the shared contract (tests/partition_contract.py)
leaves to the twin, on the manual clock: ``idle()``, redelivery timed by the clock,
a joining member taking the excess at once, ``close()``; and ``partition_of`` against
placements a real nats-server 2.15.1 made.
"""

from __future__ import annotations

from typing import cast

import anyio
import pytest
from test_memory_backend import nothing, recv

from reactive.backends.base import PartitionedConsumer
from reactive.backends.memory import MemoryBackend
from reactive.backends.partitions import check_partitions, partition_of
from reactive.clock import ManualClock

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("key", "partitions", "placed"),
    [
        # Seen on nats-server 2.15.1 with {{partition(n, every token)}} transforms.
        ("a", 4, 0),
        ("wf.ttl", 4, 0),
        ("x.y.z.w.v", 4, 1),
        ("wf.e1", 4, 2),
        ("wf.e2", 4, 3),
        (".".join(f"t{i}" for i in range(16)), 4, 3),
        ("wf.e1", 16, 10),
        (".".join(f"t{i}" for i in range(20)), 16, 7),  # hashed on its first 16 tokens
    ],
)
def test_partition_of_places_keys_as_the_server_does(
    key: str, partitions: int, placed: int
) -> None:
    assert partition_of(key, partitions) == placed


def test_a_partition_count_is_an_int_within_bounds() -> None:
    check_partitions(1)
    check_partitions(1024)
    for bad in (0, 1025, 2.0, True, "4"):
        with pytest.raises(ValueError, match="partitions"):
            check_partitions(bad)  # type: ignore[arg-type]


async def made(partitions: int = 4, ack_wait: float = 10.0) -> tuple[MemoryBackend, ManualClock]:
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    await b.ensure_bucket("b")
    await b.ensure_partitioned("b", partitions, ack_wait=ack_wait)
    return b, clock


async def test_idle_counts_what_a_member_would_take() -> None:
    b, _ = await made()
    await b.kv_put("b", "wf.e1", b"v")
    assert b.idle()  # nobody consumes: nothing is deliverable to anyone
    async with b.consume_partitions("b", 4) as c:
        assert not b.idle()
        msg = await recv(c)
        assert b.idle()  # taken (an ack is awaited, not a delivery)
        await msg.ack()
        assert b.idle()


async def test_what_a_closed_member_took_comes_again_at_ack_wait_on_the_clock() -> None:
    b, clock = await made(ack_wait=10.0)
    await b.kv_put("b", "wf.e1", b"v")
    async with b.consume_partitions("b", 4) as c:
        first = await recv(c)
    async with b.consume_partitions("b", 4) as c:
        clock.advance(9.9)
        await nothing(c)
        clock.advance(0.1)
        again = await recv(c)
        assert (again.sequence, again.num_delivered) == (first.sequence, 2)
        assert again.entry == first.entry
        await again.ack()
        clock.advance(3600)
        await nothing(c)


async def test_a_joining_member_takes_the_excess_at_once() -> None:
    b, _ = await made()
    keys = {partition_of(f"wf.e{i}", 4): f"wf.e{i}" for i in range(40)}
    assert len(keys) == 4
    async with b.consume_partitions("b", 4) as one:
        for key in keys.values():
            await b.kv_put("b", key, b"1")
        for _ in range(4):
            await (await recv(one)).ack()
        assert one.held == {0, 1, 2, 3} and one.members == 1
        async with b.consume_partitions("b", 4) as two:
            assert len(one.held) == 2 and two.members == 2  # given up as it joined
            for key in keys.values():
                await b.kv_put("b", key, b"2")
            got = {(await recv(two)).partition for _ in range(2)}
            assert got == two.held == {0, 1, 2, 3} - one.held
            for _ in range(2):
                assert (await recv(one)).partition in one.held
        assert len(one.held) == 2  # the partitions the other left go when they deliver
        for key in keys.values():
            await b.kv_put("b", key, b"3")
        assert {(await recv(one)).partition for _ in range(4)} == {0, 1, 2, 3} == one.held


async def test_close_ends_the_members_iterators() -> None:
    b, _ = await made()
    ended: list[int] = []

    async def drain(i: int, c: PartitionedConsumer) -> None:
        async for _ in c:
            pass
        ended.append(i)

    async with b.consume_partitions("b", 4) as one, b.consume_partitions("b", 4) as two:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, 1, one)
                tg.start_soon(drain, 2, two)
                await anyio.wait_all_tasks_blocked()
                await b.close()
    assert sorted(ended) == [1, 2]
    assert cast(MemoryBackend, b)._partition_sets["KVPART_b"].members == []


async def test_keep_alive_holds_what_a_member_took_until_it_leaves() -> None:
    b, clock = await made(ack_wait=10.0)
    await b.kv_put("b", "wf.e1", b"v")
    async with b.consume_partitions("b", 4, keep_alive=True) as c:
        first = await recv(c)
        clock.advance(100)  # held, as the NATS backend's +WPI keeps it
        assert b.idle()
        await nothing(c)
        assert first.num_delivered == 1
    async with b.consume_partitions("b", 4) as c:
        clock.advance(9.9)
        await nothing(c)
        clock.advance(0.1)
        again = await recv(c)
        assert (again.entry.key, again.num_delivered) == ("wf.e1", 2)
