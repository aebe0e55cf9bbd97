"""NatsBackend against a real nats-server: the backend contract, and what only NATS has.

``TestNatsBackend`` runs the shared suite (tests/backend_contract.py) on a
``NatsBackend`` connected to the session's server. The tests after it pin what
is NATS's own: the reply inbox's timeout, direct gets, the server's view of a
stream and of a termination, and recovery (server restarts, deleted consumers,
a connection given by the caller, failing fast without a server).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from typing import Any, TypeVar, cast

import anyio
import nats
import pytest
from backend_contract import BackendContract, recv, uid
from nats.js.api import ConsumerInfo
from pace import stall_excused

from reactive.backends.base import Backend, InboundMessage, KVEntry
from reactive.backends.nats import NatsBackend
from reactive.backends.partitions import partitioned_stream
from reactive.backends.server import NatsServer, free_port
from reactive.errors import BackendError, TimedOutError, TransientBackendError

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

T = TypeVar("T")


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


async def eventually_empty(b: NatsBackend, stream: str) -> None:
    """Wait until ``stream`` holds no message."""
    js = b.nc.jetstream()
    with anyio.fail_after(10):
        while (await js.stream_info(stream)).state.messages:
            await anyio.sleep(0.02)


async def retry(fn: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    """Retry a call through a reconnect (TransientBackendError) until it works."""
    with anyio.fail_after(timeout):
        while True:
            try:
                return await fn()
            except TransientBackendError:
                await anyio.sleep(0.1)


@pytest.mark.integration
class TestNatsBackend(BackendContract):
    """The backend contract on NatsBackend and a real nats-server."""

    url: str

    @pytest.fixture
    async def backend(self, nats_url: str) -> AsyncIterator[NatsBackend]:
        self.url = nats_url
        async with NatsBackend(nats_url) as b:
            yield b

    def invalid_key(self) -> AbstractContextManager[Any]:
        return pytest.raises(BackendError, match=r"(?i)invalid ?key")

    @asynccontextmanager
    async def _other(self) -> AsyncIterator[Backend]:
        async with NatsBackend(self.url, fetch_batch=1) as other:
            yield other

    def another_process(self, backend: Backend) -> AbstractAsyncContextManager[Backend]:
        return self._other()

    async def advance(self, backend: Backend, seconds: float) -> None:
        pass  # the server's time runs on while the test waits

    def now(self, backend: Backend) -> float:
        return anyio.current_time()

    async def assert_done(
        self, backend: Backend, stream: str, durable: str, deliveries: int
    ) -> None:
        info = await settled(cast(NatsBackend, backend), stream, durable)
        assert info.delivered.consumer_seq == deliveries

    def paced(self, budget: float, what: str) -> AbstractAsyncContextManager[object]:
        return stall_excused(budget, what)

    def wall(self, backend: Backend) -> float:
        return time.time()

    async def stored(self, backend: Backend, stream: str) -> int:
        info = await cast(NatsBackend, backend).nc.jetstream().stream_info(stream)
        return info.state.messages

    async def assert_partitions_done(self, backend: Backend, bucket: str) -> None:
        # A work queue deletes what is acknowledged: an empty stream has nothing to give.
        await eventually_empty(cast(NatsBackend, backend), partitioned_stream(bucket))


async def _stream_with(b: NatsBackend) -> tuple[str, str]:
    stream = uid("S")
    await b.ensure_stream(stream, [f"{stream}.>"])
    return stream, f"{stream}.jobs"


# -- the reply inbox and direct gets ----------------------------------------------------


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


async def test_a_jetstream_api_request_nobody_answers_fails_at_the_api_timeout(
    nats_url: str,
) -> None:
    """A request lost (with a node that died, say) fails as transient at ``api_timeout``,
    to be tried again, instead of waiting out nats-py's default 5 s."""
    from reactive.backends.nats._jsapi import _api

    async with NatsBackend(nats_url, api_timeout=0.3) as b:
        assert b._conn.jetstream()._timeout == 0.3  # (nats-py's own API calls: the same)

        async def ignore(msg: nats.aio.msg.Msg) -> None:
            pass

        nc = b.nc
        sub = await nc.subscribe("$JS.API.SILENT.>", cb=ignore)
        try:
            await nc.flush()
            started = anyio.current_time()
            with pytest.raises(TimedOutError):  # (a TransientBackendError)
                await _api(b, "SILENT.X", None, "a silent request")
            assert 0.3 <= anyio.current_time() - started < 5.0
        finally:
            await sub.unsubscribe()


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


# -- the server's view ------------------------------------------------------------------


async def test_ensure_stream_adds_only_the_missing_subjects(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        stream = uid("S")
        a, c = f"{stream}.a", f"{stream}.c"
        await b.ensure_stream(stream, [a])
        await b.ensure_stream(stream, [a, c])
        await b.ensure_stream(stream, [c])  # nothing to add
        info = await b.nc.jetstream().stream_info(stream)
        assert sorted(info.config.subjects or []) == [a, c]


async def test_term_is_a_termination_at_the_server(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        stream, subject = await _stream_with(b)
        await b.publish(subject, b"poison", msg_id="p1")
        terminated = await b.nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{stream}.termer"
        )
        await b.nc.flush()
        async with b.consume(stream, "termer", subject, ack_wait=30.0) as msgs:
            msg = await recv(msgs)
            await msg.term()
            # The server took it as a termination, and waits for no ack: it never comes again.
            advisory = await terminated.next_msg(timeout=5)
            assert json.loads(advisory.data)["stream_seq"] == msg.sequence
            info = await settled(b, stream, "termer")
            assert info.delivered.consumer_seq == 1


# -- recovery -------------------------------------------------------------------------------


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
            assert (await recv(watch)).key == "before"
            m = await recv(msgs)
            assert m.data == b"before"
            await m.ack()

            await anyio.to_thread.run_sync(server.restart)

            rev = await retry(lambda: b.kv_put(bucket, "after", b"2"))
            await retry(lambda: b.publish(subject, b"after", msg_id="m-after"))

            # The watch is re-created and replays: "before" may come again.
            # nats-py alone takes ~20 s to notice (missed heartbeats); we do not wait for that.
            with anyio.fail_after(30):
                while True:
                    entry = await watch.__anext__()
                    if entry.key == "after":
                        assert entry.revision == rev and entry.value == b"2"
                        break
            got: InboundMessage = await recv(msgs, timeout=30)
            assert got.data == b"after"
            await got.ack()


async def test_consumer_recreates_a_deleted_durable(nats_url: str) -> None:
    async with NatsBackend(nats_url, health_check_interval=0.5) as b:
        stream, subject = await _stream_with(b)
        async with b.consume(stream, "phoenix", subject) as msgs:
            await b.publish(subject, b"1", msg_id="1")
            m = await recv(msgs)
            await m.ack()
            await b.nc.jetstream().delete_consumer(stream, "phoenix")
            await b.publish(subject, b"2", msg_id="2")
            # The re-created durable starts from the beginning of the stream again.
            data = {(await recv(msgs, timeout=30)).data for _ in range(2)}
            assert b"2" in data


async def test_consume_gives_a_durable_that_exists_its_ack_wait(nats_url: str) -> None:
    # A durable made with another ack wait (by an older engine, say) takes this one's.
    async with NatsBackend(nats_url) as b:
        stream, subject = await _stream_with(b)
        async with b.consume(stream, "older", subject, ack_wait=30.0):
            pass
        async with b.consume(stream, "older", subject, ack_wait=6.0):
            info = await b.nc.jetstream().consumer_info(stream, "older")
            assert info.config.ack_wait == 6.0


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
            assert await recv(watch, timeout=5) == KVEntry(bucket, "k", b"v", rev)


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


# -- keep_alive: what a live process holds is not sent again -------------------------------


class _Progress:
    """The ``+WPI`` a consumer's messages get, seen on the wire (``$JS.ACK.<stream>.<durable>``)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen: list[str] = []
        self.enough = anyio.Event()

    async def on_ack(self, msg: nats.aio.msg.Msg) -> None:
        if msg.data == b"+WPI":
            self.seen.append(msg.subject)
            if len(self.seen) >= self.count:
                self.enough.set()


async def test_keep_alive_holds_a_message_past_its_ack_wait_until_the_context_ends(
    nats_url: str,
) -> None:
    async with NatsBackend(nats_url) as b:
        stream, subject = await _stream_with(b)
        await b.publish(subject, b"slow", msg_id="s1")
        # Four +WPI a third of the ack wait apart: held past the ack wait (6 s) and more.
        progress = _Progress(4)
        sub = await b.nc.subscribe(f"$JS.ACK.{stream}.slow.>", cb=progress.on_ack)
        try:
            async with (
                stall_excused(1.5, "a message kept past its ack wait"),
                b.consume(stream, "slow", subject, ack_wait=6.0, keep_alive=True) as msgs,
            ):
                first = await recv(msgs)
                with anyio.fail_after(60):
                    await progress.enough.wait()
                info = await b.nc.jetstream().consumer_info(stream, "slow")
                assert (info.num_redelivered, info.num_ack_pending) == (0, 1)
                assert first.num_delivered == 1
            # The context ended without settling it (as a process that dies): it comes
            # again, an ack wait after the last +WPI.
            async with b.consume(stream, "slow", subject, ack_wait=6.0) as msgs:
                again = await recv(msgs, timeout=20)
                assert (again.num_delivered, again.data) == (2, b"slow")
                await again.ack()
        finally:
            await sub.unsubscribe()


async def test_keep_alive_sends_nothing_for_what_is_settled_at_once(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        stream, subject = await _stream_with(b)
        for i in range(20):
            await b.publish(subject, str(i).encode())
        async with b.consume(stream, "quick", subject, ack_wait=3.0, keep_alive=True) as msgs:
            consumer = cast(Any, msgs)
            for _ in range(20):
                await (await recv(msgs)).ack()
            keeper = consumer._keeper
            assert len(keeper) == 0  # settled: no longer held
            assert await keeper.tick() == 0 and await keeper.tick() == 0


async def test_a_read_from_the_leader_asks_the_api_only_the_leader_answers(nats_url: str) -> None:
    # A direct get goes to a queue group of every replica; the message get API is
    # answered by the stream's leader alone.
    async with NatsBackend(nats_url) as b:
        bucket = uid("b")
        await b.ensure_bucket(bucket)
        rev = await b.kv_put(bucket, "k", b"v")
        asked: list[str] = []

        async def seen(msg: nats.aio.msg.Msg) -> None:
            asked.append(msg.subject)

        sub = await b.nc.subscribe(f"$JS.API.*.*.KV_{bucket}.>", cb=seen)
        api = await b.nc.subscribe(f"$JS.API.STREAM.MSG.GET.KV_{bucket}", cb=seen)
        try:
            await b.nc.flush()
            entry = await b.kv_get(bucket, "k", leader=True)
            assert entry is not None and (entry.value, entry.revision) == (b"v", rev)
            assert await b.kv_get(bucket, "k") == entry
            with anyio.fail_after(10):
                while len(asked) < 2:
                    await anyio.sleep(0.01)
            assert asked == [
                f"$JS.API.STREAM.MSG.GET.KV_{bucket}",
                f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.k",
            ]
        finally:
            await sub.unsubscribe()
            await api.unsubscribe()
