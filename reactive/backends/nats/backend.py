"""``NatsBackend``: the ``Backend`` protocol on NATS JetStream, over nats-py.

Key-value reads and writes, streams and publishing are here; the connection
(``_connection``), the reply inbox of JetStream requests (``_replies``), the
error mapping (``_errors``) and each kind of subscription (``_kv_watch``,
``_pull_consumer``, ``_core_subscriber``) have modules of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import nats.js.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from reactive.backends.base import InboundMessage, KVEntry
from reactive.backends.nats._connection import _Backoff, _Connection
from reactive.backends.nats._core_subscriber import _CoreIterator
from reactive.backends.nats._errors import _check_key, _check_size, _check_subject, _mapped
from reactive.backends.nats._features import check_server
from reactive.backends.nats._gets import _direct_get, _leader_get
from reactive.backends.nats._kv_watch import _KVWatch, _list_keys, _to_entry
from reactive.backends.nats._partition_puller import _PartitionPuller
from reactive.backends.nats._partitioned import _PartitionedBuckets
from reactive.backends.nats._pull_consumer import _PullConsumer
from reactive.backends.nats._replies import _Replies
from reactive.backends.nats._streams import _ensure_stream, _StreamCache, _sync_schedules
from reactive.errors import ConflictError, TransientBackendError

if TYPE_CHECKING:
    from reactive.backends.base import Backend

__all__ = ["NatsBackend"]

log = logging.getLogger("reactive.backends.nats")  # one logger for the whole backend

_STREAM_NAME_IN_USE: Final = 10058
_MSG_ID_HEADER: Final = "Nats-Msg-Id"
_EXPECTED_LAST: Final = "Nats-Expected-Last-Subject-Sequence"
_TTL: Final = "Nats-TTL"


def _ttl_header(ttl: float) -> str:
    """A per-message TTL as the server reads it: whole seconds, at least one."""
    return f"{max(1, math.ceil(ttl))}s"


async def _allow_ttl(js: JetStreamContext, stream: str) -> None:
    """Let the bucket's stream take per-message TTLs (buckets made before nats-py 2.16 do not)."""
    info = await js.stream_info(stream)
    if not info.config.allow_msg_ttl:
        info.config.allow_msg_ttl = True
        await js.update_stream(info.config)


class NatsBackend(_PartitionedBuckets):
    """The :class:`~reactive.backends.base.Backend` on NATS JetStream.

    ``connect_options`` go to :func:`nats.connect` (``user``, ``password``,
    ``token``, ``user_credentials``, ``tls``, callbacks, ...). Pass ``nc`` to
    use an existing connection; it is then not closed by :meth:`close`.

    By default the connection reconnects forever (with a short wait); the
    first connection gives up after ``initial_connect_attempts`` tries. A write
    waits ``ack_timeout`` seconds for the server's answer, a JetStream API request
    (streams, consumers, pins) ``api_timeout``: then it fails as transient, and is
    retried (a request lost with a node that died is not waited out for long).
    """

    def __init__(
        self,
        url: str | list[str] = "nats://127.0.0.1:4222",
        *,
        connect_options: dict[str, Any] | None = None,
        replicas: int = 1,
        nc: Client | None = None,
        publish_stream_cache_ttl: float = 30.0,
        fetch_batch: int = 64,
        fetch_timeout: float = 1.0,
        poll_interval: float = 1.0,
        health_check_interval: float = 10.0,
        publish_attempts: int = 4,
        initial_connect_attempts: int = 10,
        ack_timeout: float = 5.0,
        api_timeout: float = 5.0,
    ) -> None:
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        if fetch_batch < 1:
            raise ValueError("fetch_batch must be at least 1")
        self._conn = _Connection(
            url,
            connect_options=dict(connect_options or {}),
            nc=nc,
            initial_connect_attempts=initial_connect_attempts,
            on_renewed=self._forget_connection,
            api_timeout=api_timeout,
        )
        self._replicas = replicas
        self._fetch_batch = fetch_batch
        self._fetch_timeout = fetch_timeout
        self._poll_interval = poll_interval
        self._health_check_interval = health_check_interval
        self._publish_attempts = max(1, publish_attempts)
        self._ack_timeout = ack_timeout
        self._api_timeout = api_timeout
        self._kvs: dict[str, KeyValue] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # (per bucket; "stream <name>" per stream)
        self._streams = _StreamCache(publish_stream_cache_ttl)
        self._open: set[_KVWatch | _PullConsumer | _PartitionPuller | Subscription] = set()
        self._replies: _Replies | None = None
        self._replies_lock = asyncio.Lock()

    # -- connection -----------------------------------------------------------

    async def check_server(self) -> None:
        """Refuse a server that lacks what the engine uses (see ``_features``)."""
        check_server(self._conn.client())

    @property
    def max_payload(self) -> int:
        """The server's max payload (from its INFO)."""
        return self._conn.client().max_payload

    @property
    def nc(self) -> Client:
        """The underlying nats-py connection (after :meth:`start`)."""
        return self._conn.client()

    async def start(self) -> None:
        await self._conn.start()

    async def _forget_connection(self) -> None:
        """The connection was renewed: drop what was bound to the old one.

        (Watches and consumers see the new generation and re-create themselves.)
        """
        replies, self._replies = self._replies, None
        self._kvs.clear()
        self._streams.clear()
        if replies is not None:
            await replies.close()

    async def close(self) -> None:
        await self._conn.stop_renewing()
        for item in list(self._open):
            with contextlib.suppress(Exception):
                if isinstance(item, Subscription):
                    await item.unsubscribe()
                else:
                    await item.aclose()
        self._open.clear()
        self._kvs.clear()
        self._streams.clear()
        replies, self._replies = self._replies, None
        if replies is not None:
            await replies.close()
        await self._conn.close()

    async def __aenter__(self) -> NatsBackend:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- key-value --------------------------------------------------------------

    async def _kv(self, bucket: str) -> KeyValue:
        kv = self._kvs.get(bucket)
        if kv is not None:
            return kv
        js = self._conn.jetstream()
        with _mapped(f"bind bucket {bucket}"):
            kv = await js.key_value(bucket)
        self._kvs[bucket] = kv
        return kv

    async def ensure_bucket(self, bucket: str) -> None:
        if bucket in self._kvs:
            return
        lock = self._locks.setdefault(bucket, asyncio.Lock())
        async with lock:
            if bucket in self._kvs:
                return
            js = self._conn.jetstream()
            with _mapped(f"ensure bucket {bucket}"):
                try:
                    kv = await js.key_value(bucket)
                    await _allow_ttl(js, kv._stream)
                except nats.js.errors.BucketNotFoundError:
                    try:
                        # Direct gets (any replica may answer) only where there is one
                        # replica, so a read never comes from a follower that lags.
                        # (nats-py makes it with per-message TTLs allowed: retention needs them.)
                        kv = await js.create_key_value(
                            bucket=bucket,
                            history=1,
                            replicas=self._replicas,
                            direct=self._replicas == 1,
                        )
                    except nats.js.errors.APIError as exc:
                        if exc.err_code != _STREAM_NAME_IN_USE:
                            raise
                        kv = await js.key_value(bucket)  # created meanwhile by someone else
            self._kvs[bucket] = kv

    async def kv_get(self, bucket: str, key: str, *, leader: bool = False) -> KVEntry | None:
        kv = self._kvs.get(bucket) or await self._kv(bucket)
        if leader:
            return await _leader_get(self, kv, bucket, key)
        if kv._direct:
            return await _direct_get(self, kv, bucket, key)
        with _mapped(f"get {bucket}/{key}"):
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return None
        if entry.operation in ("DEL", "PURGE"):
            return None
        return _to_entry(bucket, entry)

    async def _reply_inbox(self) -> _Replies:
        replies = self._replies
        if replies is None or replies._nc is not self._conn.nc:
            async with self._replies_lock:
                replies = self._replies
                if replies is None or replies._nc is not self._conn.nc:
                    if replies is not None:
                        await replies.close()
                    replies = _Replies(self._conn.client(), self._ack_timeout)
                    with _mapped("subscribe to the reply inbox"):
                        await replies.open()
                    self._replies = replies
        return replies

    async def _kv_publish(
        self,
        op: str,
        bucket: str,
        key: str,
        value: bytes,
        last: int | None,
        ttl: float | None = None,
    ) -> int:
        """A KV write as JetStream sees it: a publish on the key's subject, compare-and-set on
        ``last``; with ``ttl`` the server removes the value that many seconds after it is written."""
        _check_key(op, bucket, key)
        kv = self._kvs.get(bucket) or await self._kv(bucket)
        replies = self._replies or await self._reply_inbox()
        if last is None:
            headers, what = None, f"{op} {bucket}/{key}"
        else:
            headers, what = {_EXPECTED_LAST: str(last)}, f"{op} {bucket}/{key}@{last}"
        if ttl is not None:
            headers = {**(headers or {}), _TTL: _ttl_header(ttl)}
        _check_size(what, replies._nc, value, headers)
        with _mapped(what):
            ack = await replies.publish(kv._pre + key, value, headers)
        return ack.seq

    async def kv_create(
        self, bucket: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> int:
        try:
            return await self._kv_publish("create", bucket, key, value, 0, ttl)
        except ConflictError:
            pass
        # The key exists, or only its delete marker does: nats-py tells them apart.
        kv = await self._kv(bucket)
        with _mapped(f"create {bucket}/{key}"):
            return int(await kv.create(key, value, msg_ttl=ttl))

    async def kv_update(
        self, bucket: str, key: str, value: bytes, revision: int, *, ttl: float | None = None
    ) -> int:
        return await self._kv_publish("update", bucket, key, value, revision, ttl)

    async def kv_put(self, bucket: str, key: str, value: bytes, *, ttl: float | None = None) -> int:
        return await self._kv_publish("put", bucket, key, value, None, ttl)

    async def kv_put_unacked(
        self, bucket: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> None:
        _check_key("put", bucket, key)
        kv = self._kvs.get(bucket) or await self._kv(bucket)
        nc = self._conn.client()
        headers = {_TTL: _ttl_header(ttl)} if ttl is not None else None
        _check_size(f"put {bucket}/{key}", nc, value, headers)
        with _mapped(f"put {bucket}/{key}"):
            await nc.publish(kv._pre + key, value, headers=headers)

    async def kv_delete(self, bucket: str, key: str) -> None:
        kv = await self._kv(bucket)
        with _mapped(f"delete {bucket}/{key}"):
            await kv.delete(key)

    async def kv_keys(self, bucket: str, pattern: str = ">") -> list[str]:
        kv = await self._kv(bucket)
        return await _list_keys(kv, self._conn.jetstream(), bucket, pattern)

    def kv_watch(
        self, bucket: str, pattern: str = ">"
    ) -> AbstractAsyncContextManager[AsyncIterator[KVEntry]]:
        return self._kv_watch(bucket, pattern)

    @asynccontextmanager
    async def _kv_watch(self, bucket: str, pattern: str) -> AsyncIterator[AsyncIterator[KVEntry]]:
        watch = _KVWatch(self, bucket, pattern)
        await watch.open()
        self._open.add(watch)
        try:
            yield watch
        finally:
            self._open.discard(watch)
            await watch.aclose()

    # -- streams and publishing -------------------------------------------------

    async def ensure_stream(
        self,
        name: str,
        subjects: list[str],
        *,
        work_queue: bool = False,
        schedules: bool = False,
    ) -> None:
        js = self._conn.jetstream()
        # (One at a time per stream: each adds its subjects to those it read; two at once,
        # a subscription's and another's of the same stream, would keep only one's.)
        async with self._locks.setdefault(f"stream {name}", asyncio.Lock()):
            await _ensure_stream(js, name, subjects, self._replicas, work_queue, schedules)
        self._streams.forget(subjects)

    async def sync_schedules(
        self, stream: str, prefix: str, wanted: Mapping[str, Mapping[str, str]]
    ) -> None:
        await _sync_schedules(self._conn.jetstream(), stream, prefix, wanted)

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> None:
        _check_subject("publish", subject)
        hdrs: dict[str, str] = dict(headers or {})
        if msg_id is not None:
            hdrs[_MSG_ID_HEADER] = msg_id
        nc = self._conn.nc
        if nc is not None:
            _check_size(f"publish {subject}", nc, data, hdrs)
        backoff = _Backoff()
        for attempt in range(1, self._publish_attempts + 1):
            try:
                stream = await self._streams.stream_for(self._conn.jetstream(), subject)
                if stream is not None:
                    replies = self._replies or await self._reply_inbox()
                    with _mapped(f"publish {subject} to stream {stream}"):
                        # A duplicate (same msg id within the window) is acked with
                        # duplicate=True: the message is stored once, which is the point.
                        await replies.publish(subject, data, dict(hdrs) or None)
                else:
                    nc = self._conn.client()
                    with _mapped(f"publish {subject}"):
                        await nc.publish(subject, data, headers=dict(hdrs) or None)
                return
            except TransientBackendError as exc:
                self._streams.drop(subject)
                if attempt >= self._publish_attempts or self._conn.closing:
                    raise
                delay = backoff.next_delay()
                log.debug("publish %s failed (%s); retry %d in %.1fs", subject, exc, attempt, delay)
                await asyncio.sleep(delay)

    # -- subscriptions and consumers ---------------------------------------------

    def subscribe(
        self, subject: str, *, queue: str | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[InboundMessage]]:
        return self._subscribe(subject, queue)

    @asynccontextmanager
    async def _subscribe(
        self, subject: str, queue: str | None
    ) -> AsyncIterator[AsyncIterator[InboundMessage]]:
        _check_subject("subscribe", subject)
        nc = self._conn.client()
        with _mapped(f"subscribe {subject}"):
            sub = await nc.subscribe(subject, queue=queue or "")
            # Make sure the server has registered interest before we return.
            await nc.flush()
        self._open.add(sub)
        try:
            yield _CoreIterator(sub)
        finally:
            self._open.discard(sub)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def consume(
        self,
        stream: str,
        durable: str,
        filter_subject: str,
        *,
        ack_wait: float = 30.0,
        keep_alive: bool = False,
    ) -> AbstractAsyncContextManager[AsyncIterator[InboundMessage]]:
        return self._consume(stream, durable, filter_subject, ack_wait, keep_alive)

    @asynccontextmanager
    async def _consume(
        self, stream: str, durable: str, filter_subject: str, ack_wait: float, keep_alive: bool
    ) -> AsyncIterator[AsyncIterator[InboundMessage]]:
        consumer = _PullConsumer(self, stream, durable, filter_subject, ack_wait, keep_alive)
        await consumer.open()
        self._open.add(consumer)
        try:
            yield consumer
        finally:
            self._open.discard(consumer)
            await consumer.aclose()


if TYPE_CHECKING:

    def _conforms(backend: NatsBackend) -> Backend:
        return backend  # mypy checks that NatsBackend implements the Backend protocol
