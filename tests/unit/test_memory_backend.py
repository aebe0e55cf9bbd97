"""MemoryBackend: the backend contract in process, and what only the in-memory twin has.

``TestMemoryBackend`` runs the shared suite (tests/backend_contract.py) on a
``MemoryBackend`` with a manual clock. The tests after it pin what only the twin
has: ``idle()``, the ``published`` record, redelivery timed exactly by the clock,
and "nothing else is coming" proved without waiting (every task blocked).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, nullcontext
from typing import Any, TypeVar, cast

import anyio
import anyio.lowlevel
import pytest
from backend_contract import BackendContract
from hypothesis import given, settings
from hypothesis import strategies as st

from reactive.backends.base import Backend, KVEntry, schedule_headers
from reactive.backends.memory import MemoryBackend, PublishedMessage
from reactive.backends.memory._streams import schedule_time
from reactive.backends.partitions import partitioned_stream
from reactive.clock import ManualClock
from reactive.errors import ConflictError

T = TypeVar("T")

pytestmark = pytest.mark.anyio


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


class TestMemoryBackend(BackendContract):
    """The backend contract on MemoryBackend, with a manual clock."""

    @pytest.fixture
    async def backend(self) -> AsyncIterator[MemoryBackend]:
        b = MemoryBackend(clock=ManualClock())
        await b.start()
        try:
            yield b
        finally:
            await b.close()

    def invalid_key(self) -> AbstractContextManager[Any]:
        return pytest.raises(ValueError)

    def another_process(self, backend: Backend) -> AbstractAsyncContextManager[Backend]:
        return nullcontext(backend)  # in process, everything shares one backend

    async def advance(self, backend: Backend, seconds: float) -> None:
        cast(ManualClock, cast(MemoryBackend, backend).clock).advance(seconds)

    def now(self, backend: Backend) -> float:
        return cast(MemoryBackend, backend).clock.now()

    async def assert_done(
        self, backend: Backend, stream: str, durable: str, deliveries: int
    ) -> None:
        # Past every ack wait and nak delay: a message still pending would be due now.
        # (Every delivery went to the test's readers, which counted them.)
        memory = cast(MemoryBackend, backend)
        cast(ManualClock, memory.clock).advance(3600)
        assert memory.idle()

    def wall(self, backend: Backend) -> float:
        return cast(MemoryBackend, backend).clock.now()

    async def stored(self, backend: Backend, stream: str) -> int:
        return len(cast(MemoryBackend, backend).peek_stream(stream))

    async def assert_partitions_done(self, backend: Backend, bucket: str) -> None:
        # Every change taken in was delivered and acknowledged: none is pending, none new.
        # (The members' tasks may still be acknowledging: they are let run.)
        target = cast(MemoryBackend, backend)._partition_sets[partitioned_stream(bucket)]
        with anyio.fail_after(5):
            while any(c.pending or c._peek_new() is not None for c in target.consumers):
                await anyio.sleep(0.01)


# ---------------------------------------------------------------------------
# KV
# ---------------------------------------------------------------------------


async def test_a_closed_watch_is_forgotten() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("s")
    async with b.kv_watch("s") as watch:
        await b.kv_put("s", "k", b"v")
        assert (await recv(watch)).key == "k"
    assert not b._buckets["s"].watchers  # (a leak nothing public shows)


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
    clock.advance(0.2)  # 120.1 s after "m" was stored: the window has passed
    await b.publish("ev.a", b"1 again", msg_id="m")
    assert b.published[-1].duplicate is False
    # ...and the re-stored "m" opens a new window.
    clock.advance(60)
    await b.publish("ev.a", b"1", msg_id="m")
    assert b.published[-1].duplicate is True
    async with b.consume("EV", "d", ">") as c:
        stored = [(await recv(c)).data for _ in range(5)]
        assert stored == [b"1", b"other", b"no id", b"no id", b"1 again"]
        await nothing(c)


async def test_queue_groups_deliver_round_robin() -> None:
    b = MemoryBackend()
    async with (
        b.subscribe("jobs.*", queue="workers") as w1,
        b.subscribe("jobs.*", queue="workers") as w2,
    ):
        for i in range(6):
            await b.publish("jobs.x", str(i).encode())
        # Round-robin: each of the two workers gets exactly half (random on a real server).
        got1 = [(await recv(w1)).data for _ in range(3)]
        got2 = [(await recv(w2)).data for _ in range(3)]
        await nothing(w1)
        await nothing(w2)
        assert sorted(got1 + got2) == [str(i).encode() for i in range(6)]
        assert b.idle()


# ---------------------------------------------------------------------------
# Durable consumers: redelivery on the manual clock
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Message schedules on the manual clock
# ---------------------------------------------------------------------------


async def timer_stream(b: MemoryBackend) -> None:
    await b.ensure_stream("T", ["t.at.>", "t.due.>"], work_queue=True, schedules=True)


async def test_a_schedule_fires_exactly_when_the_clock_reaches_it() -> None:
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    await timer_stream(b)
    at = clock.now() + 10
    await b.publish("t.at.k", b"wake", headers=schedule_headers(at, "t.due.k"))
    assert b.next_schedule() == at
    async with b.consume("T", "timers", "t.due.>") as c, anyio.create_task_group() as tg:
        got: list[bytes] = []

        async def wait_one() -> None:
            m = await c.__anext__()
            got.append(m.data)
            await m.ack()

        tg.start_soon(wait_one)
        await anyio.wait_all_tasks_blocked()
        clock.advance(9.999)
        await anyio.wait_all_tasks_blocked()
        assert got == [] and b.idle()  # not yet: nothing is deliverable
        clock.advance(0.001)
        await anyio.wait_all_tasks_blocked()
        assert got == [b"wake"]  # the waiting reader woke at the schedule's time
    assert b.next_schedule() is None
    assert b.peek_stream("T") == []


async def test_next_schedule_follows_replacements_and_idle_sees_a_due_one() -> None:
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    await timer_stream(b)
    now = clock.now()
    await b.publish("t.at.a", b"a", headers=schedule_headers(now + 30, "t.due.a"))
    await b.publish("t.at.b", b"b", headers=schedule_headers(now + 20, "t.due.b"))
    assert b.next_schedule() == now + 20
    await b.publish("t.at.b", b"b2", headers=schedule_headers(now + 40, "t.due.b"))  # replaces
    assert b.next_schedule() == now + 30
    async with b.consume("T", "timers", "t.due.>") as c:
        assert b.idle()
        clock.advance(30)
        assert not b.idle()  # due: it fires for the reader to take
        assert (await recv(c)).data == b"a"
        await nothing(c)
        assert b.next_schedule() == now + 40
        clock.advance(10)
        m = await recv(c)
        assert (m.subject, m.data) == ("t.due.b", b"b2")
        assert dict(m.headers) == {"Nats-Scheduler": "t.at.b", "Nats-Schedule-Next": "purge"}


@settings(deadline=None)  # (a loaded machine: no bet on how long an example takes)
@given(st.floats(min_value=1.0e9, max_value=4.0e9, allow_nan=False))
def test_a_schedule_time_is_never_before_the_time_asked(at: float) -> None:
    written = schedule_time(schedule_headers(at, "t.due.k")["Nats-Schedule"])
    assert written is not None
    assert at <= written < at + 2e-6


def test_schedule_times_are_read_as_rfc_3339() -> None:
    assert schedule_time("@at 2026-01-01T00:00:01Z") == 1_767_225_601.0
    assert schedule_time("@at 2026-01-01T01:00:01.5+01:00") == 1_767_225_601.5
    for bad in ("@at 2026-13-01T00:00:00Z", "@every 5s", "2026-01-01T00:00:01Z", ""):
        assert schedule_time(bad) is None


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
            # A delete marker takes the bucket's next revision.
            model[key] = (b"", max((r for _, r, _ in model.values()), default=0) + 1, True)

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


async def test_keep_alive_holds_what_an_open_context_took_until_it_ends() -> None:
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    await b.ensure_stream("EV", ["ev.>"])
    await b.publish("ev.a", b"slow")
    await b.publish("ev.b", b"quick")
    async with b.consume("EV", "d", ">", ack_wait=10, keep_alive=True) as c:
        slow = await recv(c)
        quick = await recv(c)
        await quick.nak(0)  # handed back: no longer held, so it comes again
        again = await recv(c)
        assert (again.data, again.num_delivered) == (b"quick", 2)
        await again.ack()
        clock.advance(100)  # ten ack waits: held, as the NATS backend's +WPI keeps it
        assert b.idle()
        await nothing(c)
        assert slow.num_delivered == 1
    # The context ended with it unsettled (as a process that dies): it comes again an
    # ack wait after it was last kept.
    async with b.consume("EV", "d", ">", ack_wait=10) as c:
        clock.advance(9.9)
        await nothing(c)
        clock.advance(0.1)
        later = await recv(c)
        assert (later.data, later.num_delivered) == (b"slow", 2)
        await later.ack()
