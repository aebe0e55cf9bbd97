"""The NATS JetStream backend, on nats-py.

Everything nats-py raises is translated at this boundary (``_mapped``):

* a lost compare-and-set (``KeyWrongLastSequenceError``, API codes 10071 and
  10164, creating a key that exists) becomes :class:`~reactive.errors.ConflictError`;
* timeouts, no responders, a closed / reconnecting / draining connection and a
  503 from JetStream become :class:`~reactive.errors.TransientBackendError`;
* a missing bucket or stream becomes :class:`~reactive.errors.NotFoundError`;
* any other nats-py error becomes :class:`~reactive.errors.BackendError`.

Watches and durable consumers are supervised: nats-py does not recover them by
itself in every case (nats-py issues 504, 510, 842, 898), so they are
re-created with backoff after a reconnect, after an error, or when a periodic
health check finds their consumer gone. A re-created watch replays every key
again, so watch delivery is at-least-once.

Core NATS subjects (no stream captures them) are at-most-once: a subscriber
that is not connected when a message is published never sees it. Use a stream
where that matters.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue, StopIterSentinel

from reactive.backends.base import InboundMessage, KVEntry, Operation
from reactive.subjects import MAX_STORED_KEY_LENGTH, MAX_SUBJECT_LENGTH, preview

if TYPE_CHECKING:
    from reactive.backends.base import Backend
from reactive.errors import (
    BackendError,
    ConflictError,
    ConnectionLostError,
    NotFoundError,
    PayloadTooLargeError,
    TransientBackendError,
)

__all__ = ["NatsBackend"]

log = logging.getLogger(__name__)

_CONFLICT_CODES: Final = frozenset({10071, 10164})
_STREAM_NAME_IN_USE: Final = 10058
_NO_MESSAGE_FOUND: Final = 10037
_MIN_NAK_DELAY: Final = 0.1
_MSG_ID_HEADER: Final = "Nats-Msg-Id"
_STREAM_CACHE_MAX: Final = 10_000
_KV_OPERATIONS: Final[dict[str | None, Operation]] = {
    None: "PUT",
    "DEL": "DEL",
    "PURGE": "PURGE",
}

# Errors that say "try again later": the server is unreachable, busy or restarting.
_TRANSIENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    TimeoutError,  # asyncio.TimeoutError and nats.errors.TimeoutError (a subclass)
    ConnectionError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.NoServersError,
    nats.errors.SlowConsumerError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


# ---------------------------------------------------------------------------
# Error mapping
# ---------------------------------------------------------------------------


def _translate(exc: BaseException, what: str) -> BackendError | None:
    """The reactive error for a nats-py error, or None to let ``exc`` through unchanged."""
    if isinstance(exc, BackendError) or not isinstance(exc, Exception):
        return None
    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError):
        return ConflictError(f"{what}: revision conflict ({exc})")
    if isinstance(exc, nats.js.errors.APIError):
        if exc.err_code in _CONFLICT_CODES:
            return ConflictError(f"{what}: revision conflict ({exc})")
        if isinstance(exc, nats.js.errors.ServiceUnavailableError):
            return TransientBackendError(f"{what}: JetStream unavailable ({exc})")
        if isinstance(exc, nats.js.errors.NotFoundError):
            return NotFoundError(f"{what}: not found ({exc})")
        return BackendError(f"{what}: {exc}")
    if isinstance(exc, _TRANSIENT_ERRORS):
        return TransientBackendError(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, nats.errors.Error):
        return BackendError(f"{what}: {type(exc).__name__}: {exc}")
    return None


class _mapped:
    """Translate nats-py exceptions raised in the block into the reactive error tree.

    A class, not a generator-based context manager: it wraps every KV write and
    read on the hot path.
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> Literal[False]:
        if exc is None:
            return False
        err = _translate(exc, self.what)
        if err is None:
            return False
        raise err from exc


def _check_key(op: str, bucket: str, key: str) -> None:
    if len(key) > MAX_STORED_KEY_LENGTH:
        # Refused here: on the wire it would make the server close the connection.
        raise BackendError(
            f"{op} {bucket}: key {preview(key)} is longer than {MAX_STORED_KEY_LENGTH} characters"
        )
    if not _KEY_RE.match(key):
        raise BackendError(f"{op} {bucket}/{key}: invalid key {key!r}")


def _headers_size(headers: Mapping[str, str] | None) -> int:
    """The size of ``headers`` on the wire (NATS/1.0 and a line each)."""
    if not headers:
        return 0
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())


def _check_size(op: str, nc: Client, data: bytes, headers: Mapping[str, str] | None) -> None:
    # nats-py checks the payload alone; the server counts the headers too, and closes
    # the connection of a client that sends it more than its max payload.
    limit = nc.max_payload
    if len(data) + 4096 > limit and len(data) + _headers_size(headers) > limit:
        raise PayloadTooLargeError(
            f"{op}: {len(data)} bytes (and {_headers_size(headers)} of headers) are more "
            f"than the server's max payload of {limit} bytes"
        )


def _check_subject(op: str, subject: str) -> None:
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise BackendError(
            f"{op}: subject {preview(subject)} is longer than {MAX_SUBJECT_LENGTH} characters"
        )


class _Backoff:
    """Exponential backoff: 0.1 s doubling up to 5 s."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())


def _subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a final ``>`` one or more."""
    p_tokens = pattern.split(".")
    s_tokens = subject.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens):
            return False
        if p != "*" and p != s_tokens[i]:
            return False
    return len(p_tokens) == len(s_tokens)


def _subjects_overlap(a: str, b: str) -> bool:
    return _subject_matches(a, b) or _subject_matches(b, a)


def _to_entry(bucket: str, entry: KeyValue.Entry) -> KVEntry:
    return KVEntry(
        bucket=bucket,
        key=entry.key,
        value=entry.value or b"",
        revision=int(entry.revision or 0),
        operation=_KV_OPERATIONS.get(entry.operation, "PUT"),
    )


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


class _CoreMessage:
    """A core NATS message: acknowledgements do nothing."""

    __slots__ = ("_headers", "_msg")

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self._headers: dict[str, str] = dict(msg.headers) if msg.headers else {}

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def num_delivered(self) -> int:
        return 1

    @property
    def stream(self) -> str | None:
        return None

    @property
    def sequence(self) -> int | None:
        return None

    async def ack(self) -> None:
        return None

    async def nak(self, delay: float) -> None:
        return None

    async def term(self) -> None:
        return None

    async def in_progress(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<core message {self.subject} {len(self.data)}B>"


class _JetStreamMessage:
    """A message from a durable consumer. A second ack / nak / term is a no-op."""

    __slots__ = ("_headers", "_meta", "_msg")

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self._meta = msg.metadata
        self._headers: dict[str, str] = dict(msg.headers) if msg.headers else {}

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def num_delivered(self) -> int:
        return self._meta.num_delivered

    @property
    def stream(self) -> str | None:
        return self._meta.stream

    @property
    def sequence(self) -> int | None:
        return self._meta.sequence.stream

    async def ack(self) -> None:
        with _mapped(f"ack {self.subject}"), contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            await self._msg.ack()

    async def nak(self, delay: float) -> None:
        delay = max(float(delay), _MIN_NAK_DELAY)
        with _mapped(f"nak {self.subject}"), contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            await self._msg.nak(delay=delay)

    async def term(self) -> None:
        with _mapped(f"term {self.subject}"), contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            await self._msg.term()

    async def in_progress(self) -> None:
        with _mapped(f"in_progress {self.subject}"):
            await self._msg.in_progress()

    def __repr__(self) -> str:
        return (
            f"<stream message {self.stream}#{self.sequence} {self.subject} "
            f"delivered={self.num_delivered}>"
        )


# ---------------------------------------------------------------------------
# JetStream requests and their replies
# ---------------------------------------------------------------------------

_EXPECTED_LAST: Final = "Nats-Expected-Last-Subject-Sequence"
_KEY_RE: Final = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_ack_decoder: Final = msgspec.json.Decoder(_PubAck)


async def _connect_or_fail_fast(
    servers: list[str], attempts: int, options: dict[str, Any]
) -> Client:
    """``nats.connect``, but a failure that retrying cannot heal ends it at once, named.

    An untrusted certificate or refused credentials: nats-py reports them to
    ``error_cb``, retries, and in the end raises "no servers available", which says
    nothing of why. Worse, after a failed TLS handshake it waits forever for the
    half-open transport to close, so the first connection would hang. Those errors
    are raised as they come; any other failure names the last error reported.
    """
    fatal: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    reported: list[Exception] = []
    error_cb = options.get("error_cb")

    async def on_error(exc: Exception) -> None:
        reported.append(exc)
        if _refused(exc) and not fatal.done():
            fatal.set_result(exc)
        if error_cb is not None:
            await error_cb(exc)

    connecting = asyncio.ensure_future(
        nats.connect(servers, max_reconnect_attempts=attempts, **{**options, "error_cb": on_error})
    )
    waiting: set[asyncio.Future[Any]] = {connecting, fatal}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        connecting.cancel()
        raise
    where = f"connect to {', '.join(servers)}"
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        exc = fatal.result()
        raise BackendError(f"{where}: {type(exc).__name__}: {exc}") from exc
    try:
        return connecting.result()  # (on_error stays its error_cb, passing errors on)
    except nats.errors.NoServersError as e:
        if not reported:
            raise
        # The server's own word (an -ERR) says more than the connection resets after it.
        last = next((x for x in reversed(reported) if not isinstance(x, OSError)), reported[-1])
        raise TransientBackendError(
            f"{where}: {e}; the last error: {type(last).__name__}: {last}"
        ) from last


def _refused(exc: Exception) -> bool:
    """Whether connecting failed for a reason that retrying with the same settings cannot heal."""
    if isinstance(exc, ssl.SSLError | nats.errors.AuthorizationError):
        return True
    # The server's "-ERR 'Authorization Violation'" reaches error_cb as a plain nats error.
    # (Not "Authentication Timeout": a slow client may well get in on the next try.)
    text = str(exc).lower()
    return isinstance(exc, nats.errors.Error) and (
        "authorization violation" in text
        or "authentication expired" in text
        or "authentication revoked" in text
    )


class _Replies:
    """JetStream requests (publishes awaiting their acks, direct gets) on one wildcard inbox.

    What ``JetStreamContext.publish`` does, without what it costs per call on
    the engine's hot path (a NUID and random token, ``asyncio.wait_for``, the
    ack parsed by ``json`` into a dataclass): a counter names the reply, one
    sweep every 0.25 s times out the overdue, msgspec reads the ack.
    """

    def __init__(self, nc: Client, timeout: float) -> None:
        self._nc = nc
        self._timeout = timeout
        self._prefix = nc.new_inbox() + "."
        self._cut = len(self._prefix)
        self._pending: dict[str, tuple[asyncio.Future[Msg], float]] = {}
        self._next = 0
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(nats.errors.ConnectionClosedError())
        self._pending.clear()

    async def _on_reply(self, msg: Msg) -> None:
        found = self._pending.pop(msg.subject[self._cut :], None)
        if found is not None and not found[0].done():
            found[0].set_result(msg)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.25)
            now = loop.time()
            late = [t for t, (_, deadline) in self._pending.items() if deadline <= now]
            for token in late:
                fut, _ = self._pending.pop(token)
                if not fut.done():
                    fut.set_exception(nats.errors.TimeoutError())

    async def request(self, subject: str, data: bytes, headers: dict[str, str] | None) -> Msg:
        """Publish with a reply subject of this inbox and return the reply."""
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Msg] = loop.create_future()
        self._pending[token] = (fut, loop.time() + self._timeout)
        try:
            await self._nc.publish(subject, data, reply=self._prefix + token, headers=headers)
            return await fut
        finally:
            self._pending.pop(token, None)

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None) -> _PubAck:
        """Publish to a stream's subject and return its ack; APIError if JetStream refused it."""
        msg = await self.request(subject, data, headers)
        if not msg.data:
            if msg.headers and msg.headers.get("Status") == "503":
                raise nats.js.errors.NoStreamResponseError
            raise nats.js.errors.APIError(description=f"empty reply to a publish on {subject}")
        try:
            ack = _ack_decoder.decode(msg.data)
        except msgspec.DecodeError:
            raise nats.js.errors.APIError(
                description=f"unreadable ack: {msg.data[:200]!r}"
            ) from None
        if ack.error is not None:
            raise nats.js.errors.APIError.from_error(msgspec.structs.asdict(ack.error))
        return ack


# ---------------------------------------------------------------------------
# Supervised iterators
# ---------------------------------------------------------------------------


class _CoreIterator:
    def __init__(self, sub: Subscription) -> None:
        self._messages = sub.messages

    def __aiter__(self) -> _CoreIterator:
        return self

    async def __anext__(self) -> InboundMessage:
        msg = await self._messages.__anext__()
        return _CoreMessage(msg)


class _Supervised(abc.ABC):
    """What a KV watch and a pull consumer share: what they read from is re-created when lost.

    After a reconnect (nats-py recovers neither a pull subscription nor, reliably, a
    watcher's push consumer), or when creating it failed (with backoff), or when the
    server no longer has its consumer (a subclass's health check).
    """

    _what: str  # "watch BUCKET/PATTERN", "consumer STREAM/DURABLE": for errors and logs

    def __init__(self, backend: NatsBackend) -> None:
        self._backend = backend
        self._reconnects = 0
        self._generation = backend._generation  # the connection it reads from (see _renew)
        self._last_check = 0.0
        self._backoff = _Backoff()
        self._closed = False

    @abc.abstractmethod
    def _subscribed(self) -> bool:
        """Whether there is a subscription (watcher, pull subscription) to read from."""

    @abc.abstractmethod
    async def _subscribe(self) -> None:
        """Create it (and call _subscribed_now)."""

    @abc.abstractmethod
    async def _unsubscribe(self) -> None:
        """Drop it, quietly."""

    def _subscribed_now(self, reconnects: int) -> None:
        self._reconnects = reconnects
        self._generation = self._backend._generation
        self._last_check = time.monotonic()

    async def _ready(self) -> bool:
        """Whether there is a subscription to read from; False after waiting or re-creating it.

        Raises StopAsyncIteration once closed, TransientBackendError once the
        connection is closed for good.
        """
        backend = self._backend
        if self._closed or backend._closing:
            raise StopAsyncIteration
        nc = backend._connection()  # (raises while the connection is closed)
        if self._generation != backend._generation:
            # The connection was renewed: what it read from went with the old one.
            log.info("NATS connection renewed: re-creating %s", self._what)
            await self._unsubscribe()
            self._generation = backend._generation
            return False
        if not self._subscribed():
            if not nc.is_connected:
                await asyncio.sleep(0.1)
                return False
            try:
                await self._subscribe()
            except BackendError as exc:
                delay = self._backoff.next_delay()
                log.warning("re-creating %s failed (%s); retrying in %.1fs", self._what, exc, delay)
                await asyncio.sleep(delay)
                return False
            log.info("%s re-created", self._what)
        elif nc.stats["reconnects"] != self._reconnects:
            log.info("NATS reconnected: re-creating %s", self._what)
            await self._unsubscribe()
            return False
        return True


class _KVWatch(_Supervised):
    """A supervised KV watch: an async iterator of KVEntry that survives a lost watcher.

    A re-created watcher replays the bucket: a key's latest revision may come again.
    """

    def __init__(self, backend: NatsBackend, bucket: str, pattern: str) -> None:
        super().__init__(backend)
        self._bucket = bucket
        self._pattern = pattern
        self._what = f"watch {bucket}/{pattern}"
        self._watcher: KeyValue.KeyWatcher | None = None

    async def open(self) -> None:
        """Start the first watcher; errors here (e.g. a missing bucket) reach the caller."""
        await self._subscribe()

    def _subscribed(self) -> bool:
        return self._watcher is not None

    async def _subscribe(self) -> None:
        kv = await self._backend._kv(self._bucket)
        reconnects = self._backend._connection().stats["reconnects"]
        with _mapped(self._what):
            self._watcher = await kv.watch(self._pattern)
        self._subscribed_now(reconnects)

    async def _unsubscribe(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        self._closed = True
        await self._unsubscribe()

    def __aiter__(self) -> _KVWatch:
        return self

    async def __anext__(self) -> KVEntry:
        backend = self._backend
        while True:
            watcher = self._watcher
            nc = backend._nc
            if (
                watcher is None
                or self._closed
                or backend._closing
                or nc is None
                or nc.is_closed
                or nc.stats["reconnects"] != self._reconnects
                or self._generation != backend._generation
            ):  # (the common case is decided here, without a coroutine per entry)
                if not await self._ready():
                    continue
                watcher = self._watcher
            assert watcher is not None
            queue = cast("asyncio.Queue[Any]", watcher._updates)
            try:
                # Entries already queued are taken at once: updates() is asyncio.wait_for,
                # a task and a timer per entry, which splits a burst over many loop turns.
                item = (
                    queue.get_nowait()
                    if queue.qsize()
                    else await watcher.updates(timeout=backend._poll_interval)  # type: ignore[no-untyped-call]
                )
            except TimeoutError:
                if await self._unhealthy(watcher):
                    log.warning(
                        "watch %s/%s lost its consumer; re-creating", self._bucket, self._pattern
                    )
                    await self._unsubscribe()
                    await self._backoff.sleep()
                continue
            if item is None:  # the end-of-replay marker: not reliable, so only a marker
                self._backoff.reset()
                continue
            if isinstance(item, StopIterSentinel):
                if watcher is self._watcher:
                    await self._unsubscribe()
                continue
            self._backoff.reset()
            return _to_entry(self._bucket, cast(KeyValue.Entry, item))

    async def _unhealthy(self, watcher: KeyValue.KeyWatcher) -> bool:
        """Periodically ask the server whether the watcher's consumer still delivers to us."""
        now = time.monotonic()
        if now - self._last_check < self._backend._health_check_interval:
            return False
        nc = self._backend._nc
        if nc is None or not nc.is_connected:
            return False  # a reconnect re-creates the watcher anyway
        self._last_check = now
        sub = cast("JetStreamContext.PushSubscription | None", watcher._sub)
        if sub is None:
            return True
        try:
            info = await sub.consumer_info()
        except nats.js.errors.NotFoundError:
            return True
        except Exception:  # transient; look again next time
            return False
        return info.push_bound is False


class _PullConsumer(_Supervised):
    """A supervised fetch loop on a durable pull consumer."""

    def __init__(
        self,
        backend: NatsBackend,
        stream: str,
        durable: str,
        filter_subject: str,
        ack_wait: float,
    ) -> None:
        super().__init__(backend)
        self._stream = stream
        self._durable = durable
        self._what = f"consumer {stream}/{durable}"
        self._filter = filter_subject
        self._ack_wait = ack_wait
        self._sub: JetStreamContext.PullSubscription | None = None
        self._buffer: deque[Msg] = deque()

    def _config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=self._durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self._ack_wait,
            max_deliver=-1,
            filter_subject=self._filter,
            deliver_policy=api.DeliverPolicy.ALL,
        )

    async def open(self) -> None:
        await self._subscribe()

    def _subscribed(self) -> bool:
        return self._sub is not None

    async def _subscribe(self) -> None:
        reconnects = self._backend._connection().stats["reconnects"]
        js = self._backend._jetstream()
        with _mapped(f"consume {self._stream}/{self._durable}"):
            self._sub = await js.pull_subscribe(
                self._filter,
                durable=self._durable,
                stream=self._stream,
                config=self._config(),
            )
        self._subscribed_now(reconnects)

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def aclose(self) -> None:
        self._closed = True
        # Hand fetched-but-unseen messages back at once so other members can take them.
        buffered, self._buffer = list(self._buffer), deque()
        for msg in buffered:
            with contextlib.suppress(Exception):
                await msg.nak()
        await self._unsubscribe()

    def __aiter__(self) -> _PullConsumer:
        return self

    async def __anext__(self) -> InboundMessage:
        backend = self._backend
        while True:
            if self._buffer:
                return _JetStreamMessage(self._buffer.popleft())
            # (After a reconnect it is re-created: nats-py issue 504, pull subscriptions
            # do not recover by themselves.)
            if not await self._ready():
                continue
            nc = backend._connection()
            sub = self._sub
            assert sub is not None
            try:
                msgs = await sub.fetch(backend._fetch_batch, timeout=backend._fetch_timeout)
            except TimeoutError:  # no messages (FetchTimeoutError) or no answer at all
                if await self._unhealthy(sub):
                    log.warning("consumer %s/%s is gone; re-creating", self._stream, self._durable)
                    await self._unsubscribe()
                continue
            except Exception as exc:
                if self._closed or backend._closing or nc.is_closed:
                    continue
                delay = self._backoff.next_delay()
                log.warning(
                    "fetch from %s/%s failed (%s: %s); re-subscribing in %.1fs",
                    self._stream,
                    self._durable,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await self._unsubscribe()
                await asyncio.sleep(delay)
                continue
            self._backoff.reset()
            self._buffer.extend(msgs)

    async def _unhealthy(self, sub: JetStreamContext.PullSubscription) -> bool:
        now = time.monotonic()
        if now - self._last_check < self._backend._health_check_interval:
            return False
        nc = self._backend._nc
        if nc is None or not nc.is_connected:
            return False  # a reconnect re-subscribes anyway
        self._last_check = now
        try:
            await sub.consumer_info()
        except nats.js.errors.NotFoundError:
            return True
        except Exception:
            return False
        return False


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------


class NatsBackend:
    """The :class:`~reactive.backends.base.Backend` on NATS JetStream.

    ``connect_options`` go to :func:`nats.connect` (``user``, ``password``,
    ``token``, ``user_credentials``, ``tls``, callbacks, ...). Pass ``nc`` to
    use an existing connection; it is then not closed by :meth:`close`.

    By default the connection reconnects forever (with a short wait); the
    first connection gives up after ``initial_connect_attempts`` tries.
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
    ) -> None:
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        if fetch_batch < 1:
            raise ValueError("fetch_batch must be at least 1")
        self._url = url
        self._connect_options = dict(connect_options or {})
        self._replicas = replicas
        self._nc: Client | None = nc
        self._owns_nc = nc is None
        self._js: JetStreamContext | None = nc.jetstream() if nc is not None else None
        self._publish_stream_cache_ttl = publish_stream_cache_ttl
        self._fetch_batch = fetch_batch
        self._fetch_timeout = fetch_timeout
        self._poll_interval = poll_interval
        self._health_check_interval = health_check_interval
        self._publish_attempts = max(1, publish_attempts)
        self._initial_connect_attempts = initial_connect_attempts
        self._ack_timeout = ack_timeout
        self._kvs: dict[str, KeyValue] = {}
        self._kv_locks: dict[str, asyncio.Lock] = {}
        # subject -> (stream name or None, expiry on the monotonic clock)
        self._stream_cache: dict[str, tuple[str | None, float]] = {}
        self._open: set[_KVWatch | _PullConsumer | Subscription] = set()
        self._closing = False
        self._replies: _Replies | None = None
        self._replies_lock = asyncio.Lock()
        # Counts the connections this backend has made: one closed for good (nats-py gives a
        # connection up after a protocol error, or when its reconnects run out) is renewed.
        self._generation = 0
        self._renewing: asyncio.Task[None] | None = None

    # -- connection -----------------------------------------------------------

    @property
    def max_payload(self) -> int:
        """The server's max payload (from its INFO)."""
        return self._connection().max_payload

    @property
    def nc(self) -> Client:
        """The underlying nats-py connection (after :meth:`start`)."""
        return self._connection()

    def _connection(self) -> Client:
        if self._nc is None:
            raise BackendError("NatsBackend is not started: call start() first")
        if self._nc.is_closed:
            if not self._owns_nc:
                raise ConnectionLostError(
                    "the NATS connection given to NatsBackend(nc=...) is closed; "
                    "only a connection the backend made itself is renewed"
                )
            raise TransientBackendError("the NATS connection is closed; renewing it")
        return self._nc

    def _jetstream(self) -> JetStreamContext:
        self._connection()
        assert self._js is not None
        return self._js

    async def start(self) -> None:
        self._closing = False
        if self._nc is not None and not self._nc.is_closed:
            if self._js is None:
                self._js = self._nc.jetstream()
            return
        nc = await self._connect(max(1, self._initial_connect_attempts))
        self._nc = nc
        self._owns_nc = True
        self._js = nc.jetstream()

    async def _connect(self, first_attempts: int) -> Client:
        """A new connection: ``first_attempts`` tries, then reconnects as configured."""
        options: dict[str, Any] = {
            "reconnect_time_wait": 0.5,
            "ping_interval": 10,
            "max_outstanding_pings": 3,
            "drain_timeout": 5,
            "name": "reactive",
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        options.update(self._connect_options)
        user_closed_cb = options.get("closed_cb")

        async def on_closed() -> None:
            self._on_closed()
            if user_closed_cb is not None:
                await user_closed_cb()

        options["closed_cb"] = on_closed
        wanted_attempts = options.pop("max_reconnect_attempts", -1)
        # With max_reconnect_attempts=-1 nats-py retries the *first* connection
        # forever too; bound the first one, then switch to the wanted policy.
        if wanted_attempts >= 0:
            first_attempts = wanted_attempts
        servers = self._url if isinstance(self._url, list) else [self._url]
        with _mapped(f"connect to {', '.join(servers)}"):
            nc = await _connect_or_fail_fast(servers, first_attempts, options)
        nc.options["max_reconnect_attempts"] = wanted_attempts
        return nc

    def _on_closed(self) -> None:
        """nats-py gave the connection up for good: make a new one (unless closing)."""
        if self._closing or not self._owns_nc or self._nc is None or not self._nc.is_closed:
            return
        if self._renewing is None or self._renewing.done():
            log.warning("nats: the connection is closed for good; making a new one")
            self._renewing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """Connect again, with backoff, until connected or closing; then drop what the old one held.

        Watches and consumers see the new generation and re-create themselves on it;
        core subscriptions end with the old connection and are opened again.
        """
        backoff = _Backoff(0.1, 5.0)
        while not self._closing:
            try:
                nc = await self._connect(1)
            except BackendError as exc:
                delay = backoff.next_delay()
                log.warning("nats: renewing the connection failed (%s); again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            if self._closing:
                await nc.close()
                return
            replies, self._replies = self._replies, None
            self._kvs.clear()
            self._stream_cache.clear()
            self._nc = nc
            self._js = nc.jetstream()
            self._generation += 1
            if replies is not None:
                await replies.close()
            log.info("nats: connected again (connection %d)", self._generation + 1)
            return

    async def _on_error(self, exc: Exception) -> None:
        if not self._closing:
            log.warning("nats: %s: %s", type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("nats: disconnected from the server; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("nats: reconnected")

    async def close(self) -> None:
        self._closing = True
        renewing, self._renewing = self._renewing, None
        if renewing is not None and not renewing.done():
            renewing.cancel()
            with contextlib.suppress(BaseException):
                await renewing
        for item in list(self._open):
            with contextlib.suppress(Exception):
                if isinstance(item, Subscription):
                    await item.unsubscribe()
                else:
                    await item.aclose()
        self._open.clear()
        self._kvs.clear()
        self._stream_cache.clear()
        replies, self._replies = self._replies, None
        if replies is not None:
            await replies.close()
        nc = self._nc
        if nc is None or not self._owns_nc:
            return
        self._nc = None
        self._js = None
        if nc.is_closed:
            return
        try:
            await nc.drain()
        except Exception:
            with contextlib.suppress(Exception):
                await nc.close()

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
        js = self._jetstream()
        with _mapped(f"bind bucket {bucket}"):
            kv = await js.key_value(bucket)
        self._kvs[bucket] = kv
        return kv

    async def ensure_bucket(self, bucket: str) -> None:
        if bucket in self._kvs:
            return
        lock = self._kv_locks.setdefault(bucket, asyncio.Lock())
        async with lock:
            if bucket in self._kvs:
                return
            js = self._jetstream()
            with _mapped(f"ensure bucket {bucket}"):
                try:
                    kv = await js.key_value(bucket)
                except nats.js.errors.BucketNotFoundError:
                    try:
                        # Direct gets (any replica may answer) only where there is one
                        # replica, so a read never comes from a follower that lags.
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

    async def kv_get(self, bucket: str, key: str) -> KVEntry | None:
        kv = self._kvs.get(bucket) or await self._kv(bucket)
        if kv._direct:
            return await self._direct_get(kv, bucket, key)
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
        if replies is None or replies._nc is not self._nc:
            async with self._replies_lock:
                replies = self._replies
                if replies is None or replies._nc is not self._nc:
                    if replies is not None:
                        await replies.close()
                    replies = _Replies(self._connection(), self._ack_timeout)
                    with _mapped("subscribe to the reply inbox"):
                        await replies.open()
                    self._replies = replies
        return replies

    async def _kv_publish(
        self, op: str, bucket: str, key: str, value: bytes, last: int | None
    ) -> int:
        """A KV write as JetStream sees it: a publish on the key's subject, compare-and-set on ``last``."""
        _check_key(op, bucket, key)
        kv = self._kvs.get(bucket) or await self._kv(bucket)
        replies = self._replies or await self._reply_inbox()
        if last is None:
            headers, what = None, f"{op} {bucket}/{key}"
        else:
            headers, what = {_EXPECTED_LAST: str(last)}, f"{op} {bucket}/{key}@{last}"
        _check_size(what, replies._nc, value, headers)
        with _mapped(what):
            ack = await replies.publish(kv._pre + key, value, headers)
        return ack.seq

    async def _direct_get(self, kv: KeyValue, bucket: str, key: str) -> KVEntry | None:
        """The key's last message by JetStream's direct get: the raw message, no JSON."""
        _check_key("get", bucket, key)
        replies = self._replies or await self._reply_inbox()
        subject = f"{self._jetstream()._prefix}.DIRECT.GET.{kv._stream}.{kv._pre}{key}"
        with _mapped(f"get {bucket}/{key}"):
            msg = await replies.request(subject, b"", None)
        headers = msg.headers or {}
        if not msg.data:
            status = headers.get("Status")
            if status == "404":
                return None
            if status == "503":
                raise TransientBackendError(f"get {bucket}/{key}: no responders (503)")
            if status:
                raise BackendError(
                    f"get {bucket}/{key}: {status} {headers.get('Description', '')}".rstrip()
                )
        if headers.get("KV-Operation") in ("DEL", "PURGE"):
            return None
        try:
            revision = int(headers["Nats-Sequence"])
        except (KeyError, ValueError):
            raise BackendError(f"get {bucket}/{key}: a reply without Nats-Sequence") from None
        return KVEntry(bucket=bucket, key=key, value=msg.data, revision=revision)

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int:
        try:
            return await self._kv_publish("create", bucket, key, value, 0)
        except ConflictError:
            pass
        # The key exists, or only its delete marker does: nats-py tells them apart.
        kv = await self._kv(bucket)
        with _mapped(f"create {bucket}/{key}"):
            return int(await kv.create(key, value))

    async def kv_update(self, bucket: str, key: str, value: bytes, revision: int) -> int:
        return await self._kv_publish("update", bucket, key, value, revision)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        return await self._kv_publish("put", bucket, key, value, None)

    async def kv_put_unacked(self, bucket: str, key: str, value: bytes) -> None:
        _check_key("put", bucket, key)
        kv = self._kvs.get(bucket) or await self._kv(bucket)
        nc = self._connection()
        _check_size(f"put {bucket}/{key}", nc, value, None)
        with _mapped(f"put {bucket}/{key}"):
            await nc.publish(kv._pre + key, value)

    async def kv_delete(self, bucket: str, key: str) -> None:
        kv = await self._kv(bucket)
        with _mapped(f"delete {bucket}/{key}"):
            await kv.delete(key)

    async def kv_keys(self, bucket: str, pattern: str = ">") -> list[str]:
        # Not kv.keys(filters=...): in nats-py 2.16 its filters are substring
        # matches done client-side (issue 768), and it stops at the
        # end-of-replay marker, which can come early (issue 842).
        kv = await self._kv(bucket)
        js = self._jetstream()
        stream = f"KV_{bucket}"
        subject = f"$KV.{bucket}.{pattern}"
        what = f"keys {bucket}/{pattern}"
        with _mapped(what):
            try:
                await js.get_msg(stream, seq=1, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return []  # no message at all on a matching subject
            watcher = await kv.watch(pattern, meta_only=True)
        alive: dict[str, bool] = {}
        marker_seen = False
        try:
            while True:
                try:
                    with _mapped(what):
                        item = await watcher.updates(timeout=2.0)  # type: ignore[no-untyped-call]
                except TransientBackendError:
                    if marker_seen:
                        break  # nothing more is coming (entries expired meanwhile)
                    raise
                if item is None:
                    marker_seen = True
                    continue
                if isinstance(item, StopIterSentinel):
                    raise TransientBackendError(f"{what}: watcher stopped")
                entry = cast(KeyValue.Entry, item)
                alive[entry.key] = entry.operation not in ("DEL", "PURGE")
                if entry.delta == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
        return sorted(key for key, is_alive in alive.items() if is_alive)

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

    async def ensure_stream(self, name: str, subjects: list[str]) -> None:
        js = self._jetstream()
        with _mapped(f"ensure stream {name}"):
            try:
                info = await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                try:
                    await js.add_stream(
                        name=name, subjects=list(subjects), num_replicas=self._replicas
                    )
                    info = None
                except nats.js.errors.APIError as exc:
                    if exc.err_code != _STREAM_NAME_IN_USE:
                        raise
                    info = await js.stream_info(name)  # created meanwhile by someone else
            if info is not None:
                existing = list(info.config.subjects or [])
                missing = [s for s in subjects if s not in existing]
                if missing:
                    config = info.config
                    config.subjects = existing + missing
                    await js.update_stream(config)
        self._invalidate_stream_cache(subjects)

    def _invalidate_stream_cache(self, patterns: list[str]) -> None:
        for subject in list(self._stream_cache):
            if any(_subjects_overlap(p, subject) for p in patterns):
                del self._stream_cache[subject]

    async def _stream_for(self, subject: str) -> str | None:
        now = time.monotonic()
        cached = self._stream_cache.get(subject)
        if cached is not None and cached[1] > now:
            return cached[0]
        js = self._jetstream()
        with _mapped(f"find the stream for {subject}"):
            try:
                stream: str | None = await js.find_stream_name_by_subject(subject)
            except nats.js.errors.NotFoundError:
                stream = None
        if len(self._stream_cache) >= _STREAM_CACHE_MAX:
            self._stream_cache = {k: v for k, v in self._stream_cache.items() if v[1] > now}
            if len(self._stream_cache) >= _STREAM_CACHE_MAX:
                self._stream_cache.clear()
        self._stream_cache[subject] = (stream, now + self._publish_stream_cache_ttl)
        return stream

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
        if self._nc is not None:
            _check_size(f"publish {subject}", self._nc, data, hdrs)
        backoff = _Backoff()
        for attempt in range(1, self._publish_attempts + 1):
            try:
                stream = await self._stream_for(subject)
                if stream is not None:
                    replies = self._replies or await self._reply_inbox()
                    with _mapped(f"publish {subject} to stream {stream}"):
                        # A duplicate (same msg id within the window) is acked with
                        # duplicate=True: the message is stored once, which is the point.
                        await replies.publish(subject, data, dict(hdrs) or None)
                else:
                    nc = self._connection()
                    with _mapped(f"publish {subject}"):
                        await nc.publish(subject, data, headers=dict(hdrs) or None)
                return
            except TransientBackendError as exc:
                self._stream_cache.pop(subject, None)
                if attempt >= self._publish_attempts or self._closing:
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
        nc = self._connection()
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
        self, stream: str, durable: str, filter_subject: str, *, ack_wait: float = 30.0
    ) -> AbstractAsyncContextManager[AsyncIterator[InboundMessage]]:
        return self._consume(stream, durable, filter_subject, ack_wait)

    @asynccontextmanager
    async def _consume(
        self, stream: str, durable: str, filter_subject: str, ack_wait: float
    ) -> AsyncIterator[AsyncIterator[InboundMessage]]:
        consumer = _PullConsumer(self, stream, durable, filter_subject, ack_wait)
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
