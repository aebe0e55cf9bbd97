"""MemoryBackend: the in-process twin must behave like NATS JetStream where the runtime cares."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reactive.backends.base import InboundMessage, KVEntry
from reactive.backends.memory import MemoryBackend, PublishedMessage
from reactive.clock import ManualClock
from reactive.errors import BackendError, ConflictError, NotFoundError

T = TypeVar("T")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def recv(it: AsyncIterator[T], timeout: float = 1.0) -> T:
    """The next item, failing the test if none comes within ``timeout`` real seconds."""
    with anyio.fail_after(timeout):
        return await it.__anext__()


async def nothing(it: AsyncIterator[T]) -> None:
    """Assert that no item is there to take, nor coming from anything already under way.

    A reader waits for the next item while every other task runs until it blocks:
    in memory, with a manual clock, nothing else can bring one (no timing involved).
    The waiting read is then cancelled (a cancelled wait must spoil nothing).
    """
    got: list[T] = []

    async def take() -> None:
        got.append(await it.__anext__())

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    if got:
        pytest.fail(f"unexpected item {got[0]!r}")


async def settle() -> None:
    """Let woken tasks run until each is blocked again."""
    await anyio.wait_all_tasks_blocked()


# ---------------------------------------------------------------------------
# KV
# ---------------------------------------------------------------------------


async def test_missing_bucket_raises_not_found() -> None:
    b = MemoryBackend()
    with pytest.raises(NotFoundError):
        await b.kv_get("nope", "k")
    with pytest.raises(NotFoundError):
        await b.kv_put("nope", "k", b"v")
    with pytest.raises(NotFoundError):
        await b.kv_keys("nope")
    with pytest.raises(NotFoundError):
        async with b.kv_watch("nope"):
            pass
    await b.ensure_bucket("yes")
    await b.ensure_bucket("yes")  # idempotent
    assert await b.kv_get("yes", "k") is None


async def test_create_update_and_conflicts() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("s")
    r1 = await b.kv_create("s", "a", b"1")
    with pytest.raises(ConflictError):
        await b.kv_create("s", "a", b"again")
    r2 = await b.kv_update("s", "a", b"2", r1)
    assert r2 > r1
    with pytest.raises(ConflictError):
        await b.kv_update("s", "a", b"stale", r1)  # lost compare-and-set
    entry = await b.kv_get("s", "a")
    assert entry == KVEntry(bucket="s", key="a", value=b"2", revision=r2, operation="PUT")
    # Revision 0 means "no entry at all" (Nats-Expected-Last-Subject-Sequence: 0).
    with pytest.raises(ConflictError):
        await b.kv_update("s", "a", b"x", 0)
    r3 = await b.kv_update("s", "fresh", b"x", 0)
    assert r3 > r2
    with pytest.raises(ConflictError):
        await b.kv_update("s", "never", b"x", 5)


async def test_revisions_are_shared_per_bucket_and_increase() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("one")
    await b.ensure_bucket("two")
    revs = [
        await b.kv_put("one", "a", b"1"),
        await b.kv_put("one", "b", b"1"),
        await b.kv_create("one", "c", b"1"),
        await b.kv_update("one", "a", b"2", 1),
    ]
    assert revs == [1, 2, 3, 4]
    await b.kv_delete("one", "b")  # a delete takes a revision too
    assert await b.kv_put("one", "b", b"back") == 6
    # Another bucket is another stream with its own sequence.
    assert await b.kv_put("two", "a", b"1") == 1


async def test_get_missing_or_deleted_is_none_and_create_over_deleted() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("s")
    assert await b.kv_get("s", "missing") is None
    r1 = await b.kv_put("s", "k", b"v")
    await b.kv_delete("s", "k")
    assert await b.kv_get("s", "k") is None
    assert await b.kv_keys("s") == []
    # Update against the pre-delete revision loses; against the marker's it wins.
    with pytest.raises(ConflictError):
        await b.kv_update("s", "k", b"x", r1)
    r3 = await b.kv_create("s", "k", b"again")
    assert r3 == r1 + 2
    got = await b.kv_get("s", "k")
    assert got is not None and got.value == b"again" and got.revision == r3


async def test_update_over_delete_marker_uses_marker_revision() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("s")
    await b.kv_put("s", "k", b"v")
    await b.kv_delete("s", "k")
    marker_revision = 2
    assert await b.kv_update("s", "k", b"w", marker_revision) == 3


async def test_keys_filters_by_pattern_sorted_without_deleted() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("s")
    for key in ["wf.b.x", "wf.a.x", "wf.a.y", "other.a.x", "wf.c.x.deep"]:
        await b.kv_put("s", key, b"")
    await b.kv_delete("s", "wf.a.y")
    assert await b.kv_keys("s") == ["other.a.x", "wf.a.x", "wf.b.x", "wf.c.x.deep"]
    assert await b.kv_keys("s", "wf.*.x") == ["wf.a.x", "wf.b.x"]
    assert await b.kv_keys("s", "wf.>") == ["wf.a.x", "wf.b.x", "wf.c.x.deep"]
    assert await b.kv_keys("s", "*.a.*") == ["other.a.x", "wf.a.x"]


async def test_invalid_keys_are_rejected() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("s")
    for bad in ["", "a..b", "a.*", "a.>", "has space", "a:b"]:
        with pytest.raises(ValueError):
            await b.kv_put("s", bad, b"")


async def test_watch_replays_latest_by_revision_then_follows_changes() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("s")
    await b.kv_put("s", "wf.a", b"a1")
    await b.kv_put("s", "wf.b", b"b1")
    await b.kv_put("s", "other", b"o")
    await b.kv_put("s", "wf.a", b"a2")  # rev 4: wf.a now replays after wf.b
    await b.kv_put("s", "wf.c", b"c1")
    await b.kv_delete("s", "wf.c")  # rev 6: the marker replays too
    async with b.kv_watch("s", "wf.*") as watch:
        replay = [await recv(watch) for _ in range(3)]
        assert [(e.key, e.value, e.revision, e.operation) for e in replay] == [
            ("wf.b", b"b1", 2, "PUT"),
            ("wf.a", b"a2", 4, "PUT"),
            ("wf.c", b"", 6, "DEL"),
        ]
        await nothing(watch)
        await b.kv_put("s", "other", b"ignored")
        await b.kv_put("s", "wf.b", b"b2")
        await b.kv_put("s", "wf.deep.no", b"not one token")
        await b.kv_delete("s", "wf.a")
        await b.kv_create("s", "wf.c", b"c2")
        live = [await recv(watch) for _ in range(3)]
        assert [(e.key, e.value, e.revision, e.operation) for e in live] == [
            ("wf.b", b"b2", 8, "PUT"),
            ("wf.a", b"", 10, "DEL"),
            ("wf.c", b"c2", 11, "PUT"),
        ]
        await nothing(watch)
    # Closing the context ends the iterator.
    with pytest.raises(StopAsyncIteration):
        await watch.__anext__()
    assert not b._buckets["s"].watchers


async def test_watch_never_blocks_writers() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("s")
    async with b.kv_watch("s") as watch:
        with anyio.fail_after(5):
            for i in range(5000):
                await b.kv_put("s", f"k{i % 7}", str(i).encode())
        assert not b.idle()
        revisions = [(await recv(watch)).revision for _ in range(5000)]
        assert revisions == list(range(1, 5001))
        assert b.idle()


async def test_watch_wakes_after_a_cancelled_wait() -> None:
    # A wait given up (cancelled) must not spoil the next one.
    b = MemoryBackend()
    await b.ensure_bucket("s")
    async with b.kv_watch("s") as watch:
        await nothing(watch)
        got: list[str] = []

        async def reader() -> None:
            got.append((await recv(watch)).key)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()  # the reader waits
            await b.kv_put("s", "k", b"1")
        assert got == ["k"]


async def test_watch_pattern_and_multiple_watchers() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("s")
    async with b.kv_watch("s", "a.>") as wa, b.kv_watch("s", ">") as wall:
        await b.kv_put("s", "a.x", b"1")
        await b.kv_put("s", "b.x", b"2")
        assert (await recv(wa)).key == "a.x"
        assert [(await recv(wall)).key for _ in range(2)] == ["a.x", "b.x"]
        await nothing(wa)


# ---------------------------------------------------------------------------
# Streams and publishing
# ---------------------------------------------------------------------------


async def test_publish_is_recorded() -> None:
    b = MemoryBackend()
    await b.ensure_stream("EV", ["ev.>"])
    await b.publish("ev.x", b"1", headers={"h": "v"}, msg_id="id1")
    await b.publish("core.x", b"2")
    assert b.published == [
        PublishedMessage(
            subject="ev.x",
            data=b"1",
            headers={"h": "v"},
            msg_id="id1",
            duplicate=False,
            stream="EV",
        ),
        PublishedMessage(
            subject="core.x", data=b"2", headers={}, msg_id=None, duplicate=False, stream=None
        ),
    ]


async def test_dedupe_within_window_and_not_after() -> None:
    clock = ManualClock()
    b = MemoryBackend(clock=clock, duplicate_window=120.0)
    await b.ensure_stream("EV", ["ev.*"])
    await b.publish("ev.a", b"1", msg_id="m")
    clock.advance(119.9)
    await b.publish("ev.a", b"1", msg_id="m")  # within the window: dropped
    await b.publish("ev.a", b"other", msg_id="n")
    await b.publish("ev.a", b"no id")
    await b.publish("ev.a", b"no id")  # no msg_id: never deduplicated
    assert [p.duplicate for p in b.published] == [False, True, False, False, False]
    assert [m.data for m in b._streams["EV"].messages] == [b"1", b"other", b"no id", b"no id"]
    clock.advance(0.2)  # 120.1 s after "m" was stored: the window has passed
    await b.publish("ev.a", b"1", msg_id="m")
    assert b.published[-1].duplicate is False
    assert len(b._streams["EV"].messages) == 5
    # ...and the re-stored "m" opens a new window.
    clock.advance(60)
    await b.publish("ev.a", b"1", msg_id="m")
    assert b.published[-1].duplicate is True


async def test_ensure_stream_adds_subjects() -> None:
    b = MemoryBackend()
    await b.ensure_stream("EV", ["a.>"])
    await b.publish("b.x", b"")
    assert b.published[-1].stream is None
    await b.ensure_stream("EV", ["b.>", "a.>"])
    assert b._streams["EV"].subjects == ["a.>", "b.>"]
    await b.publish("b.x", b"")
    assert b.published[-1].stream == "EV"


async def test_subscribe_plain_subscribers_each_get_it_and_only_while_subscribed() -> None:
    b = MemoryBackend()
    await b.publish("news.x", b"before")  # nobody listening: lost (at-most-once)
    async with b.subscribe("news.*") as s1, b.subscribe("news.x") as s2, b.subscribe("z") as s3:
        await b.publish("news.x", b"1", headers={"k": "v"})
        for s in (s1, s2):
            msg = await recv(s)
            assert (msg.subject, msg.data, dict(msg.headers)) == ("news.x", b"1", {"k": "v"})
            assert msg.num_delivered == 1 and msg.stream is None and msg.sequence is None
            await msg.ack()
            await msg.nak(1)
            await msg.term()
            await msg.in_progress()
        await nothing(s3)
        await nothing(s1)
    await b.publish("news.x", b"after")
    async with b.subscribe("news.x") as s4:
        await nothing(s4)
    assert b.idle()


async def test_queue_groups_deliver_to_one_member_round_robin() -> None:
    b = MemoryBackend()
    async with (
        b.subscribe("jobs.*", queue="workers") as w1,
        b.subscribe("jobs.*", queue="workers") as w2,
        b.subscribe("jobs.*", queue="auditors") as a1,
        b.subscribe("jobs.*") as plain,
    ):
        for i in range(6):
            await b.publish("jobs.x", str(i).encode())
        everything = [str(i).encode() for i in range(6)]
        # Round-robin: each of the two workers gets exactly half, and nothing twice.
        got1 = [(await recv(w1)).data for _ in range(3)]
        got2 = [(await recv(w2)).data for _ in range(3)]
        await nothing(w1)
        await nothing(w2)
        assert sorted(got1 + got2) == everything
        # Another group, and a plain subscriber, each get every message.
        assert [(await recv(a1)).data for _ in range(6)] == everything
        assert [(await recv(plain)).data for _ in range(6)] == everything
        assert b.idle()


async def test_a_queue_group_spans_subjects_as_on_nats() -> None:
    b = MemoryBackend()
    async with (
        b.subscribe("jobs.*", queue="workers") as star,
        b.subscribe("jobs.>", queue="workers") as tail,
    ):
        for i in range(6):
            await b.publish("jobs.x", str(i).encode())
        await b.publish("jobs.x.y", b"deep")
        # One group by name: a message matching both subjects reaches one of them;
        # one that only the wider subject matches goes to it.
        # (Delivery is synchronous here: what each holds is what it got.)
        got = [(await recv(sub)).data for sub in (star, tail) for _ in range(len(sub))]
        assert sorted(got) == sorted([str(i).encode() for i in range(6)] + [b"deep"])
        assert b.idle()


async def test_stream_message_reaches_core_subscribers_too() -> None:
    b = MemoryBackend()
    await b.ensure_stream("EV", ["ev.>"])
    async with b.subscribe("ev.>") as sub:
        await b.publish("ev.a", b"x", msg_id="id")
        msg = await recv(sub)
        assert msg.data == b"x"
        assert msg.headers["Nats-Msg-Id"] == "id"  # the id travels as a header


# ---------------------------------------------------------------------------
# Durable consumers
# ---------------------------------------------------------------------------


async def test_consume_missing_stream_raises() -> None:
    b = MemoryBackend()
    with pytest.raises(NotFoundError):
        async with b.consume("NOPE", "d", ">"):
            pass


async def test_consumer_delivers_all_from_start_with_filter() -> None:
    b = MemoryBackend(clock=ManualClock())
    await b.ensure_stream("EV", ["ev.>"])
    await b.publish("ev.a", b"1")
    await b.publish("ev.b", b"skip")
    await b.publish("ev.a", b"2")
    async with b.consume("EV", "d", "ev.a") as c:
        m1 = await recv(c)
        m2 = await recv(c)
        assert [(m.data, m.sequence, m.stream, m.num_delivered) for m in (m1, m2)] == [
            (b"1", 1, "EV", 1),
            (b"2", 3, "EV", 1),
        ]
        await m1.ack()
        await m2.ack()
        await nothing(c)
        await b.publish("ev.a", b"3")
        m3 = await recv(c)
        assert (m3.data, m3.sequence) == (b"3", 4)
        await m3.ack()
        assert b.idle()


async def test_durable_shared_by_two_readers_each_message_once() -> None:
    b = MemoryBackend(clock=ManualClock())
    await b.ensure_stream("EV", ["ev.>"])
    n = 50
    seen: dict[str, list[int]] = {"r1": [], "r2": []}
    done = anyio.Event()

    async def reader(name: str, it: AsyncIterator[InboundMessage]) -> None:
        async for msg in it:
            assert msg.num_delivered == 1
            assert msg.sequence is not None
            seen[name].append(msg.sequence)
            await msg.ack()
            await anyio.lowlevel.checkpoint()  # let the other reader have a turn
            if len(seen["r1"]) + len(seen["r2"]) == n:
                done.set()

    async with (
        b.consume("EV", "shared", "ev.>") as c1,
        b.consume("EV", "shared", "ev.>") as c2,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(reader, "r1", c1)
        tg.start_soon(reader, "r2", c2)
        for i in range(n):
            await b.publish(f"ev.{i}", b"")
            if i % 5 == 0:
                await settle()
        with anyio.fail_after(2):
            await done.wait()
        await settle()
        assert b.idle()
        tg.cancel_scope.cancel()
    assert sorted(seen["r1"] + seen["r2"]) == list(range(1, n + 1))
    assert seen["r1"] and seen["r2"]  # both readers got work


async def test_nak_with_delay_follows_the_clock() -> None:
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    await b.ensure_stream("EV", ["ev.>"])
    await b.publish("ev.a", b"x")
    async with b.consume("EV", "d", ">") as c:
        msg = await recv(c)
        await msg.nak(5)
        assert b.idle()  # a future redelivery does not count
        await nothing(c)
        clock.advance(4.9)
        assert b.idle()
        await nothing(c)
        clock.advance(0.1)
        assert not b.idle()
        again = await recv(c)
        assert (again.sequence, again.num_delivered) == (1, 2)
        assert b.idle()
        await again.ack()
        clock.advance(1000)
        await nothing(c)


async def test_waiting_reader_wakes_when_clock_reaches_nak_deadline() -> None:
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    await b.ensure_stream("EV", ["ev.>"])
    await b.publish("ev.a", b"x")
    got: list[int] = []
    async with b.consume("EV", "d", ">") as c, anyio.create_task_group() as tg:
        msg = await recv(c)
        await msg.nak(3)

        async def wait_one() -> None:
            m = await c.__anext__()
            got.append(m.num_delivered)
            await m.ack()

        tg.start_soon(wait_one)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        clock.advance(3)
        await anyio.wait_all_tasks_blocked()
        assert got == [2]


async def test_term_never_redelivers() -> None:
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    await b.ensure_stream("EV", ["ev.>"])
    await b.publish("ev.a", b"x")
    await b.publish("ev.a", b"y")
    async with b.consume("EV", "d", ">") as c:
        m = await recv(c)
        await m.term()
        m2 = await recv(c)
        assert m2.data == b"y"
        await m2.ack()
        clock.advance(3600)
        assert b.idle()
        await nothing(c)


async def test_ack_wait_expiry_redelivers_and_in_progress_extends() -> None:
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    await b.ensure_stream("EV", ["ev.>"])
    await b.publish("ev.a", b"x")
    async with b.consume("EV", "d", ">", ack_wait=10) as c:
        m = await recv(c)
        clock.advance(8)
        await m.in_progress()  # deadline is now t=18
        clock.advance(8)
        assert b.idle()
        await nothing(c)
        clock.advance(2)
        again = await recv(c)
        assert (again.sequence, again.num_delivered) == (1, 2)
        # Like nats-server, acknowledgements apply by stream sequence, even from a stale
        # delivery: its in_progress extends the live one, its nak reschedules it...
        clock.advance(9)
        await m.in_progress()  # the live delivery is now due at t=37, not t=28
        clock.advance(9)
        assert b.idle()
        await m.nak(0)
        third = await recv(c)
        assert third.num_delivered == 3
        # ...and its ack acks it.
        await m.ack()
        clock.advance(100)
        assert b.idle()
        await nothing(c)


async def test_durable_persists_across_reopen() -> None:
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    await b.ensure_stream("EV", ["ev.>"])
    for i in range(3):
        await b.publish("ev.a", str(i).encode())
    async with b.consume("EV", "d", ">", ack_wait=30) as c:
        first = await recv(c)
        await first.ack()
        unacked = await recv(c)
        assert unacked.data == b"1"
    with pytest.raises(StopAsyncIteration):
        await c.__anext__()
    await b.publish("ev.a", b"3")
    # Nobody reads the durable now: pending work does not make the backend busy.
    assert b.idle()
    async with b.consume("EV", "d", ">", ack_wait=30) as c:
        # Continues where it left off; the unacked message waits for its ack_wait.
        nxt = await recv(c)
        assert nxt.data == b"2"
        await nxt.ack()
        assert (await recv(c)).data == b"3"
        clock.advance(30)
        back = await recv(c)
        assert (back.data, back.num_delivered) == (b"1", 2)
        await back.ack()
    # A different durable name starts from the beginning.
    async with b.consume("EV", "other", ">") as c2:
        assert (await recv(c2)).data == b"0"


async def test_consumer_waits_with_system_clock() -> None:
    b = MemoryBackend()  # SystemClock: real time, short delays
    await b.ensure_stream("EV", ["ev.>"])
    async with b.consume("EV", "d", ">", ack_wait=0.05) as c:
        await b.publish("ev.a", b"x")
        m = await recv(c)
        await m.nak(0.05)
        assert (await recv(c)).num_delivered == 2  # naked
        assert (await recv(c)).num_delivered == 3  # ack_wait expired


async def test_idle_tracks_undelivered_work() -> None:
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    await b.ensure_bucket("s")
    await b.ensure_stream("EV", ["ev.>"])
    assert b.idle()
    async with b.kv_watch("s") as w:
        await b.kv_put("s", "k", b"")
        assert not b.idle()
        await recv(w)
        assert b.idle()
    async with b.subscribe("x") as s:
        await b.publish("x", b"")
        assert not b.idle()
        await recv(s)
        assert b.idle()
    async with b.consume("EV", "d", ">", ack_wait=5) as c:
        await b.publish("ev.a", b"")
        assert not b.idle()
        m = await recv(c)
        assert b.idle()  # taken by its reader, even if not acked yet
        clock.advance(5)
        assert not b.idle()  # ack_wait expired: due again
        m = await recv(c)
        await m.ack()
        assert b.idle()


async def test_close_ends_open_iterators() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("s")
    await b.ensure_stream("EV", ["ev.>"])
    ended: list[str] = []

    async def drain(name: str, it: AsyncIterator[object]) -> None:
        async for _ in it:
            pass
        ended.append(name)

    async with (
        b.kv_watch("s") as w,
        b.subscribe("x") as s,
        b.consume("EV", "d", ">") as c,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(drain, "watch", w)
        tg.start_soon(drain, "sub", s)
        tg.start_soon(drain, "consume", c)
        await anyio.wait_all_tasks_blocked()
        await b.close()
        await anyio.wait_all_tasks_blocked()
        assert sorted(ended) == ["consume", "sub", "watch"]
    with pytest.raises(BackendError):
        async with b.subscribe("x"):
            pass
    await b.start()
    async with b.subscribe("x"):
        pass


# ---------------------------------------------------------------------------
# A model check: random KV operations against a dict, watched all along.
# ---------------------------------------------------------------------------

_keys = st.sampled_from(["a", "b", "c.x", "c.y"])
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _keys, st.binary(max_size=3)),
        st.tuples(st.just("create"), _keys, st.binary(max_size=3)),
        st.tuples(st.just("update"), _keys, st.binary(max_size=3)),
        st.tuples(st.just("stale_update"), _keys, st.binary(max_size=3)),
        st.tuples(st.just("delete"), _keys, st.just(b"")),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(before=_ops, after=_ops)
def test_kv_matches_a_model_and_a_watch_sees_every_change(
    before: list[tuple[str, str, bytes]], after: list[tuple[str, str, bytes]]
) -> None:
    async def apply(
        b: MemoryBackend, model: dict[str, tuple[bytes, int, bool]], op: str, key: str, value: bytes
    ) -> None:
        # model: key -> (value, latest revision, deleted)
        current = model.get(key)
        live = current is not None and not current[2]
        latest = current[1] if current is not None else 0
        if op == "put":
            model[key] = (value, await b.kv_put("s", key, value), False)
        elif op == "create":
            if live:
                with pytest.raises(ConflictError):
                    await b.kv_create("s", key, value)
            else:
                model[key] = (value, await b.kv_create("s", key, value), False)
        elif op == "update":
            model[key] = (value, await b.kv_update("s", key, value, latest), False)
        elif op == "stale_update":
            with pytest.raises(ConflictError):
                await b.kv_update("s", key, value, latest + 1)
        else:
            await b.kv_delete("s", key)
            model[key] = (b"", b._buckets["s"].revision, True)

    async def main() -> None:
        b = MemoryBackend()
        await b.ensure_bucket("s")
        model: dict[str, tuple[bytes, int, bool]] = {}
        for op, key, value in before:
            await apply(b, model, op, key, value)
        async with b.kv_watch("s", "c.*") as watch:
            for op, key, value in after:
                await apply(b, model, op, key, value)
            seen: dict[str, KVEntry] = {}
            last_revision = 0
            while not b.idle():
                entry = await recv(watch)
                # Replay is in revision order and every live change is newer than the
                # snapshot, so revisions strictly increase across the seam.
                assert entry.revision > last_revision
                last_revision = entry.revision
                seen[entry.key] = entry
        for key, (value, revision, deleted) in model.items():
            got = await b.kv_get("s", key)
            assert got == (None if deleted else KVEntry("s", key, value, revision))
            if key.startswith("c."):
                assert seen[key].revision == revision
                assert seen[key].operation == ("DEL" if deleted else "PUT")
        assert set(seen) == {k for k in model if k.startswith("c.")}
        assert await b.kv_keys("s") == sorted(k for k, v in model.items() if not v[2])

    anyio.run(main)
