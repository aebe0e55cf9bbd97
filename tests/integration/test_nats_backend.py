"""Contract tests for NatsBackend against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
import nats
import pytest
from nats.js.api import ConsumerInfo

from reactive.backends.base import InboundMessage, KVEntry
from reactive.backends.nats import NatsBackend
from reactive.backends.server import NatsServer, free_port
from reactive.errors import BackendError, ConflictError, NotFoundError, TransientBackendError

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

T = TypeVar("T")


def uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def next_item(it: AsyncIterator[T], timeout: float = 5.0) -> T:
    with anyio.fail_after(timeout):
        return await it.__anext__()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll ``check`` until it returns True."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.02)


async def settled(b: NatsBackend, stream: str, durable: str) -> ConsumerInfo:
    """The consumer's info once the server has nothing left to deliver or to wait an ack for.

    From then on nothing is delivered again: its counts are the final ones.
    """
    js = b.nc.jetstream()
    info = await js.consumer_info(stream, durable)
    with anyio.fail_after(10):
        while info.num_pending or info.num_ack_pending:
            await anyio.sleep(0.02)
            info = await js.consumer_info(stream, durable)
    return info


async def retry(fn: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    """Retry a call through a reconnect (TransientBackendError) until it works."""
    with anyio.fail_after(timeout):
        while True:
            try:
                return await fn()
            except TransientBackendError:
                await anyio.sleep(0.1)


# -- key-value -----------------------------------------------------------------


async def test_create_update_and_conflicts(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        await b.ensure_bucket(bucket)  # idempotent
        r1 = await b.kv_create(bucket, "k", b"one")
        with pytest.raises(ConflictError):
            await b.kv_create(bucket, "k", b"again")
        r2 = await b.kv_update(bucket, "k", b"two", r1)
        assert r2 > r1
        with pytest.raises(ConflictError):
            await b.kv_update(bucket, "k", b"stale", r1)
        entry = await b.kv_get(bucket, "k")
        assert entry == KVEntry(bucket=bucket, key="k", value=b"two", revision=r2)
        r3 = await b.kv_put(bucket, "k", b"three")
        assert r3 > r2


async def test_kv_writes_refuse_invalid_keys_and_missing_buckets(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        for bad in ("", "a..b", ".a", "a.", "a b", "a*", "a>"):
            with pytest.raises(BackendError, match="invalid key"):
                await b.kv_put(bucket, bad, b"v")
        with pytest.raises(NotFoundError):
            await b.kv_update(uid("missing"), "k", b"v", 1)


async def test_an_unacked_put_lands(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        await b.kv_put_unacked(bucket, "marker", b"m1")
        await b.kv_put_unacked(bucket, "marker", b"m2")
        with anyio.fail_after(5):
            while (got := await b.kv_get(bucket, "marker")) is None or got.value != b"m2":
                await anyio.sleep(0.01)
        with pytest.raises(BackendError, match="invalid key"):
            await b.kv_put_unacked(bucket, "a b", b"v")


async def test_a_publish_nobody_acks_times_out_as_transient(nats_url: str) -> None:
    async with NatsBackend(nats_url, ack_timeout=0.3) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        await b.kv_put(bucket, "k", b"v")  # the ack channel works

        # A subscriber on a core subject takes the "request" and never answers. It is on
        # the backend's own connection, so the server has its interest before the
        # publish: subscribed from another connection, it was sometimes not seen yet,
        # and the server answered "no responders" (503) instead (about 1 run in 7).
        async def ignore(msg: nats.aio.msg.Msg) -> None:
            pass

        nc = b.nc
        sub = await nc.subscribe("silent.subject", cb=ignore)
        try:
            await nc.flush()
            acks = await b._reply_inbox()
            started = anyio.current_time()
            with pytest.raises(nats.errors.TimeoutError):
                await acks.publish("silent.subject", b"x", None)
            # Given up at its own ack timeout (0.3 s), not at the default one (5 s).
            assert 0.3 <= anyio.current_time() - started < 5.0
            assert not acks._pending  # nothing left behind
        finally:
            await sub.unsubscribe()


async def test_concurrent_compare_and_set_writes_one_wins(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        rev = await b.kv_create(bucket, "k", b"0")
        results: list[int | str] = []

        async def write(i: int) -> None:
            try:
                results.append(await b.kv_update(bucket, "k", str(i).encode(), rev))
            except ConflictError:
                results.append("conflict")

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(write, i)
        assert results.count("conflict") == 19
        assert len(results) == 20


async def test_get_missing_and_deleted_is_none(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        assert await b.kv_get(bucket, "nope") is None
        await b.kv_put(bucket, "k", b"v")
        await b.kv_delete(bucket, "k")
        assert await b.kv_get(bucket, "k") is None
        # A deleted key can be created again.
        rev = await b.kv_create(bucket, "k", b"back")
        got = await b.kv_get(bucket, "k")
        assert got is not None and got.value == b"back" and got.revision == rev


async def test_reads_by_direct_get_and_on_a_bucket_without_it(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        direct = uid("b")
        await b.ensure_bucket(direct)
        assert (await b._kv(direct))._direct  # made here, one replica: direct gets
        # A bucket someone else made without direct gets is read the other way.
        plain = uid("b")
        await b.nc.jetstream().create_key_value(bucket=plain, history=1)
        assert not (await b._kv(plain))._direct
        for bucket in (direct, plain):
            assert await b.kv_get(bucket, "k") is None
            rev = await b.kv_put(bucket, "k", b"v1")
            got = await b.kv_get(bucket, "k")
            assert got == KVEntry(bucket=bucket, key="k", value=b"v1", revision=rev)
            rev = await b.kv_put(bucket, "k", b"")  # an empty value is a value
            got = await b.kv_get(bucket, "k")
            assert got == KVEntry(bucket=bucket, key="k", value=b"", revision=rev)
            await b.kv_delete(bucket, "k")
            assert await b.kv_get(bucket, "k") is None
            with pytest.raises(BackendError, match=r"(?i)invalid ?key"):
                await b.kv_get(bucket, "a b")


async def test_revisions_increase(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        revs = [await b.kv_put(bucket, f"k{i % 3}", str(i).encode()) for i in range(9)]
        assert revs == sorted(revs) and len(set(revs)) == len(revs)


async def test_missing_bucket_is_not_found(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        with pytest.raises(NotFoundError):
            await b.kv_get(uid("missing"), "k")


async def test_keys(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        assert await b.kv_keys(bucket) == []
        for key in ("a.x", "a.y", "a.y.z", "b.x", "gone"):
            await b.kv_put(bucket, key, b"1")
        await b.kv_delete(bucket, "gone")
        assert await b.kv_keys(bucket) == ["a.x", "a.y", "a.y.z", "b.x"]
        assert await b.kv_keys(bucket, "a.*") == ["a.x", "a.y"]
        assert await b.kv_keys(bucket, "a.>") == ["a.x", "a.y", "a.y.z"]
        assert await b.kv_keys(bucket, "*.x") == ["a.x", "b.x"]
        assert await b.kv_keys(bucket, "c.>") == []
        assert await b.kv_keys(bucket, "gone") == []


# -- watch -----------------------------------------------------------------------


async def test_watch_replays_then_updates_and_deletes(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        r1 = await b.kv_put(bucket, "k1", b"v1")
        r2 = await b.kv_put(bucket, "k2", b"v2")
        async with b.kv_watch(bucket) as watch:
            replay = {e.key: e for e in [await next_item(watch), await next_item(watch)]}
            assert replay["k1"] == KVEntry(bucket, "k1", b"v1", r1, "PUT")
            assert replay["k2"] == KVEntry(bucket, "k2", b"v2", r2, "PUT")

            r3 = await b.kv_put(bucket, "k1", b"v1b")
            assert await next_item(watch) == KVEntry(bucket, "k1", b"v1b", r3, "PUT")
            await b.kv_delete(bucket, "k2")
            deleted = await next_item(watch)
            assert (deleted.key, deleted.operation, deleted.value) == ("k2", "DEL", b"")
            assert deleted.revision > r3


async def test_watch_pattern_filtering(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        async with b.kv_watch(bucket, "wf.*.state") as star, b.kv_watch(bucket, "wf.>") as tail:
            await b.kv_put(bucket, "other.1.state", b"x")
            await b.kv_put(bucket, "wf.1.state", b"a")
            await b.kv_put(bucket, "wf.1.timers.t", b"b")
            await b.kv_put(bucket, "wf.2.state", b"c")
            await b.kv_put(bucket, "other.2.state", b"y")
            await b.kv_put(bucket, "wf.9.state", b"end")
            # A watch yields in revision order: a key that matched by mistake would come
            # before the last one put ("wf.9.state").
            assert [(await next_item(star)).key for _ in range(3)] == [
                "wf.1.state",
                "wf.2.state",
                "wf.9.state",
            ]
            assert [(await next_item(tail)).key for _ in range(4)] == [
                "wf.1.state",
                "wf.1.timers.t",
                "wf.2.state",
                "wf.9.state",
            ]


async def test_watch_on_empty_bucket_then_put(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        async with b.kv_watch(bucket) as watch:
            rev = await b.kv_put(bucket, "k", b"v")
            # The first thing the watch yields is that put: the empty bucket replayed nothing.
            assert await next_item(watch) == KVEntry(bucket, "k", b"v", rev)


async def test_watch_missing_bucket_raises(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        with pytest.raises(NotFoundError):
            async with b.kv_watch(uid("missing")):
                pass


async def test_cancelling_a_watch_leaves_no_tasks(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        # (The put first: the backend's own reply inbox and its task are not the watch's.)
        await b.kv_put(bucket, "k", b"v")
        before = set(asyncio.all_tasks())
        watching = anyio.Event()

        async def consume() -> None:
            async with b.kv_watch(bucket) as watch:
                async for _ in watch:
                    watching.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            # Cancelled while it iterates: it has yielded the entry it replays.
            with anyio.fail_after(5):
                await watching.wait()
            tg.cancel_scope.cancel()

        def leaked() -> set[asyncio.Task[object]]:
            return {t for t in asyncio.all_tasks() - before if not t.done()}

        # Every task it started ends (however long the machine takes to let them).
        with anyio.move_on_after(10):
            while leaked():
                await anyio.sleep(0.02)
        assert not leaked(), leaked()


# -- publishing and subscriptions ---------------------------------------------------


async def test_publish_to_stream_is_deduplicated(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        stream = uid("S")
        subject = f"{stream}.events"
        await b.ensure_stream(stream, [f"{stream}.>"])
        await b.publish(subject, b"1", msg_id="id-1")
        await b.publish(subject, b"1 again", msg_id="id-1")
        await b.publish(subject, b"2", msg_id="id-2", headers={"X-Test": "yes"})
        info = await b.nc.jetstream().stream_info(stream)
        assert info.state.messages == 2


async def test_ensure_stream_adds_subjects(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        stream = uid("S")
        a, c = f"{stream}.a", f"{stream}.c"
        await b.ensure_stream(stream, [a])
        # Not captured yet: a core publish (cached as "no stream").
        await b.publish(c, b"core")
        await b.ensure_stream(stream, [a, c])
        await b.ensure_stream(stream, [c])  # nothing to add
        info = await b.nc.jetstream().stream_info(stream)
        assert sorted(info.config.subjects or []) == [a, c]
        await b.publish(c, b"stored", msg_id="m1")
        await b.publish(c, b"stored", msg_id="m1")
        info = await b.nc.jetstream().stream_info(stream)
        assert info.state.messages == 1


async def test_core_publish_reaches_subscriber(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        subject = uid("core") + ".x"
        async with b.subscribe(subject) as sub:
            await b.publish(subject, b"hello", headers={"A": "1"}, msg_id="m-1")
            msg = await next_item(sub)
            assert (msg.subject, msg.data) == (subject, b"hello")
            assert msg.headers["A"] == "1" and msg.headers["Nats-Msg-Id"] == "m-1"
            assert (msg.num_delivered, msg.stream, msg.sequence) == (1, None, None)
            await msg.ack()
            await msg.nak(1.0)
            await msg.term()
            await msg.in_progress()


async def test_queue_group_delivers_each_message_to_one_member(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        subject = uid("q") + ".work"
        n = 40
        got: tuple[list[bytes], list[bytes]] = ([], [])

        async def collect(sub: AsyncIterator[InboundMessage], into: list[bytes]) -> None:
            async for msg in sub:
                into.append(msg.data)

        async with (
            b.subscribe(subject, queue="workers") as s1,
            b.subscribe(subject, queue="workers") as s2,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(collect, s1, got[0])
            tg.start_soon(collect, s2, got[1])
            for i in range(n):
                await b.publish(subject, str(i).encode())
            # A member gets its messages in the order they were published: once each has
            # had an "end", every numbered message it would ever get has come.
            with anyio.fail_after(10):
                while not all(b"end" in g for g in got):
                    await b.publish(subject, b"end")
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        numbered = [[d for d in g if d != b"end"] for g in got]
        assert sorted(numbered[0] + numbered[1], key=int) == [str(i).encode() for i in range(n)]
        assert numbered[0] and numbered[1]  # spread over both members


# -- durable consumers ---------------------------------------------------------------


async def _stream_with(b: NatsBackend) -> tuple[str, str]:
    stream = uid("S")
    await b.ensure_stream(stream, [f"{stream}.>"])
    return stream, f"{stream}.jobs"


async def test_durable_consumers_share_messages(nats_url: str) -> None:
    async with (
        NatsBackend(nats_url, fetch_batch=1) as b1,
        NatsBackend(nats_url, fetch_batch=1) as b2,
    ):
        stream, subject = await _stream_with(b1)
        n = 30
        for i in range(n):
            await b1.publish(subject, str(i).encode(), msg_id=f"job-{i}")
        seen: dict[str, list[bytes]] = {"one": [], "two": []}
        both = anyio.Event()

        async def worker(b: NatsBackend, name: str) -> None:
            async with b.consume(stream, "workers", f"{stream}.>") as msgs:
                async for msg in msgs:
                    assert msg.stream == stream and msg.sequence is not None
                    seen[name].append(msg.data)
                    await msg.ack()
                    if seen["one"] and seen["two"]:
                        both.set()
                    # Each holds on after its first message until the other has one too
                    # (one at a time: fetch_batch=1), so both take part at any speed.
                    await both.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, b1, "one")
            tg.start_soon(worker, b2, "two")
            with anyio.fail_after(10):
                while len(seen["one"]) + len(seen["two"]) < n:
                    await anyio.sleep(0.05)
            # Every message acknowledged: the server's count of deliveries is final.
            info = await settled(b1, stream, "workers")
            tg.cancel_scope.cancel()
        everything = seen["one"] + seen["two"]
        assert sorted(everything, key=int) == [str(i).encode() for i in range(n)]
        assert seen["one"] and seen["two"]
        assert info.delivered.consumer_seq == n  # one delivery each: none came twice


async def test_nak_with_delay_redelivers(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        stream, subject = await _stream_with(b)
        await b.publish(subject, b"job", msg_id="j1")
        async with b.consume(stream, "naker", subject) as msgs:
            first = await next_item(msgs)
            assert first.num_delivered == 1 and first.data == b"job"
            await first.nak(0.3)
            start = anyio.current_time()
            second = await next_item(msgs)
            assert anyio.current_time() - start >= 0.2
            assert second.num_delivered == 2 and second.sequence == first.sequence
            await second.ack()
            # Acknowledged at the server: two deliveries in all, and no more to come.
            info = await settled(b, stream, "naker")
            assert (info.delivered.consumer_seq, info.delivered.stream_seq) == (2, first.sequence)


async def test_term_never_redelivers(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        stream, subject = await _stream_with(b)
        await b.publish(subject, b"poison", msg_id="p1")
        terminated = await b.nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{stream}.termer"
        )
        await b.nc.flush()
        async with b.consume(stream, "termer", subject, ack_wait=0.5) as msgs:
            msg = await next_item(msgs)
            await msg.term()
            # The server took it as a termination, and waits for no ack: it never comes again.
            advisory = await terminated.next_msg(timeout=5)
            assert json.loads(advisory.data)["stream_seq"] == msg.sequence
            info = await settled(b, stream, "termer")
            assert info.delivered.consumer_seq == 1


async def test_unacked_message_is_redelivered_after_ack_wait(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        stream, subject = await _stream_with(b)
        await b.publish(subject, b"slow", msg_id="s1")
        async with b.consume(stream, "slowpoke", subject, ack_wait=1.0) as msgs:
            first = await next_item(msgs)
            assert first.num_delivered == 1
            again = await next_item(msgs, timeout=5)
            assert again.num_delivered == 2 and again.data == b"slow"
            await again.ack()


# -- server restarts -------------------------------------------------------------------


async def test_watch_and_consumer_survive_server_restart(
    restartable_nats_server: NatsServer,
) -> None:
    server = restartable_nats_server
    async with NatsBackend(server.url, poll_interval=0.2) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        stream, subject = await _stream_with(b)
        await b.kv_put(bucket, "before", b"1")
        await b.publish(subject, b"before", msg_id="m-before")
        async with b.kv_watch(bucket) as watch, b.consume(stream, "survivor", subject) as msgs:
            assert (await next_item(watch)).key == "before"
            m = await next_item(msgs)
            assert m.data == b"before"
            await m.ack()

            await anyio.to_thread.run_sync(server.restart)

            rev = await retry(lambda: b.kv_put(bucket, "after", b"2"))
            await retry(lambda: b.publish(subject, b"after", msg_id="m-after"))

            # The watch is re-created and replays: "before" may come again.
            # nats-py alone takes ~20 s to notice (missed heartbeats); we do not wait for that.
            with anyio.fail_after(8):
                while True:
                    entry = await watch.__anext__()
                    if entry.key == "after":
                        assert entry.revision == rev and entry.value == b"2"
                        break
            got: InboundMessage = await next_item(msgs, timeout=8)
            assert got.data == b"after"
            await got.ack()


async def test_consumer_recreates_a_deleted_durable(nats_url: str) -> None:
    async with NatsBackend(nats_url, health_check_interval=0.5) as b:
        stream, subject = await _stream_with(b)
        async with b.consume(stream, "phoenix", subject) as msgs:
            await b.publish(subject, b"1", msg_id="1")
            m = await next_item(msgs)
            await m.ack()
            await b.nc.jetstream().delete_consumer(stream, "phoenix")
            await b.publish(subject, b"2", msg_id="2")
            # The re-created durable starts from the beginning of the stream again.
            data = {(await next_item(msgs, timeout=8)).data for _ in range(2)}
            assert b"2" in data


async def test_watch_recreates_a_deleted_consumer(nats_url: str) -> None:
    async with NatsBackend(nats_url, poll_interval=0.2, health_check_interval=0.5) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        js = b.nc.jetstream()
        async with b.kv_watch(bucket) as watch:
            consumers = await js.consumers_info(f"KV_{bucket}")
            assert len(consumers) == 1  # the watch's, made before kv_watch returned
            await js.delete_consumer(f"KV_{bucket}", consumers[0].name)
            rev = await b.kv_put(bucket, "k", b"v")
            assert await next_item(watch, timeout=5) == KVEntry(bucket, "k", b"v", rev)


async def test_existing_connection_is_not_closed(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        async with NatsBackend(nc=nc) as b:
            bucket = uid("b")
            await b.ensure_bucket(bucket)
            assert await b.kv_put(bucket, "k", b"v") > 0
        assert nc.is_connected
    finally:
        await nc.close()


async def test_start_fails_fast_without_server() -> None:
    b = NatsBackend(f"nats://127.0.0.1:{free_port()}", initial_connect_attempts=1)
    with anyio.fail_after(10), pytest.raises(TransientBackendError):
        await b.start()
