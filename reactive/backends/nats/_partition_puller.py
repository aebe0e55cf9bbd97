"""One process's pulls on a partitioned set: a pull waiting on every partition it may take,
the pins the server gives it, and the excess it gives up.

One task keeps, per partition, one pull request waiting (``$JS.API.CONSUMER.MSG.NEXT``,
JSON, with the priority group, and the pin id once the server gave one); their
statuses come on one wildcard inbox, ``<inbox>.<partition>.<pull number>``, messages
there too under their own subjects, ``<partition>.$KV.<bucket>.<key>``:

* a message with ``Nats-Pin-Id``: the server pinned the partition to this process;
  the next pulls carry that id (which renews the pin: a pull expires after a third of
  ``priority_timeout``, and the next one follows at once);
* ``408``: the pull expired; the next one follows;
* ``423``: the pin went to another process (this one was too slow, or gave it up):
  what this process fetched of that partition and has not handed out is nak'ed, so
  it goes to the new holder now;
* no answer by the pull's expiry and a grace: the pull is taken as lost and renewed.

Balance: every second (or pull expiry, if sooner) the task reads how many processes keep
a pull waiting on the ``members`` durable (the server's count; a process that
disconnects or unsubscribes drops out of it at once), and gives up (UNPIN) what it holds beyond
``ceil(partitions / members)``. A process at its share pulls on its own partitions
only, so what it gave up goes to those below their share; one below it stands by on
every partition it does not hold. Flow control: a partition is pulled again once
half of what it fetched has been handed out.

Lost pulls, reconnects and a renewed connection are handled as for the other
subscriptions (``_Supervised``): a new inbox, and every pull again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Final

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from reactive.backends.base import KVEntry, Operation, PartitionedMessage
from reactive.backends.nats._errors import _mapped
from reactive.backends.nats._jsapi import _api
from reactive.backends.nats._keeper import _Keeper
from reactive.backends.nats._pull_consumer import _JetStreamMessage
from reactive.backends.nats._supervised import _Supervised
from reactive.backends.partitions import (
    PRIORITY_GROUP,
    consumer_name,
    kv_revision,
    partitioned_stream,
    presence_consumer,
)
from reactive.errors import BackendError, ConnectionLostError

if TYPE_CHECKING:
    from reactive.backends.nats.backend import NatsBackend

__all__ = ["_PartitionPuller", "_PartitionedMessage", "_SetInfo", "_share"]

log = logging.getLogger("reactive.backends.nats")  # one logger for the whole backend

_NANOS: Final = 1_000_000_000
_KV_OPERATIONS: Final[dict[str | None, Operation]] = {None: "PUT", "DEL": "DEL", "PURGE": "PURGE"}
_encode: Final = msgspec.json.Encoder()


class _SetInfo(msgspec.Struct, frozen=True):
    """What a process reads of a partitioned set before it pulls."""

    partitions: int
    group: str
    depths: frozenset[int]
    ack_wait: float
    pin_timeout: float


def _share(partitions: int, members: int) -> int:
    """How many partitions each of ``members`` processes holds at most."""
    return math.ceil(partitions / max(1, members))


class _PartitionedMessage(_JetStreamMessage):
    """A change from a partition's durable: the message, and the change it carries."""

    __slots__ = ("entry", "partition")

    def __init__(
        self, msg: Msg, partition: int, bucket: str, cut: int, keeper: _Keeper | None
    ) -> None:
        super().__init__(msg, keeper)
        headers = self._headers
        op = headers.get("KV-Operation")
        self.partition = partition
        self.entry = KVEntry(
            bucket,
            msg.subject[cut:],  # <partition>.$KV.<bucket>.<key>
            msg.data if op is None else b"",
            kv_revision(headers.get("Nats-Stream-Source", "")),
            _KV_OPERATIONS.get(op, "PUT"),
        )

    def __repr__(self) -> str:
        e = self.entry
        return (
            f"<partition {self.partition} {e.bucket}/{e.key}@{e.revision} {e.operation} "
            f"delivered={self.num_delivered}>"
        )


class _PartitionPuller(_Supervised):
    """The iterator of one ``consume_partitions`` context, and the task that pulls for it."""

    def __init__(
        self, backend: NatsBackend, bucket: str, info: _SetInfo, keep_alive: bool = False
    ) -> None:
        super().__init__(backend)
        n = info.partitions
        self._info = info
        self._bucket = bucket
        self._n = n
        self._stream = stream = partitioned_stream(bucket, info.group)
        self._what = f"partitions of {bucket}"
        # The pinned process renews its pin with each pull: well within priority_timeout.
        self._expires = min(max(info.pin_timeout / 3, 0.05), 30.0)
        self._grace = max(1.0, self._expires)
        # How often the members are counted (and a pull overdue, or due again, looked for).
        self._every = min(self._expires, 1.0)
        self._batch = backend._fetch_batch
        self._low = self._batch // 2
        api = self._conn.jetstream()._prefix
        self._next = [f"{api}.CONSUMER.MSG.NEXT.{stream}.{consumer_name(p)}" for p in range(n)]
        self._presence_next = f"{api}.CONSUMER.MSG.NEXT.{stream}.{presence_consumer()}"
        self._cuts = [len(f"{p}.$KV.{bucket}.") for p in range(n)]
        self._pins: list[str | None] = [None] * n
        self._req = [0] * n  # the number of the pull waiting on each partition; 0: none
        self._remaining = [0] * n  # how many messages that pull may still bring
        self._deadline = [0.0] * n  # when that pull is overdue, lost
        self._buffered = [0] * n  # fetched, not yet handed out
        self._cooloff = [0.0] * n  # no pull on it before then
        self._presence_req = 0
        self._presence_deadline = 0.0
        self._pulls = 0
        self._members = 1
        self._next_balance = 0.0
        self._missing = False  # a consumer is gone: make the set again
        self._buffer: deque[_PartitionedMessage] = deque()
        self._arrived = asyncio.Event()
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        self._inbox = ""
        self._cut = 0
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._keeper = _Keeper(info.ack_wait) if keep_alive else None

    # -- what the engine sees -------------------------------------------------------

    @property
    def held(self) -> frozenset[int]:
        return frozenset(p for p, pin in enumerate(self._pins) if pin is not None)

    def holds(self, partition: int) -> bool:
        return 0 <= partition < self._n and self._pins[partition] is not None

    @property
    def members(self) -> int:
        return self._members

    def __aiter__(self) -> _PartitionPuller:
        return self

    async def __anext__(self) -> PartitionedMessage:
        while True:
            buffer = self._buffer
            if buffer:
                msg = buffer.popleft()
                p = msg.partition
                self._buffered[p] -= 1
                if self._buffered[p] == self._low and not self._req[p]:
                    self._wake.set()  # room for another pull
                return msg
            if self._failure is not None:
                raise self._failure
            if self._closed or self._conn.closing:
                raise StopAsyncIteration
            self._arrived.clear()
            await self._arrived.wait()

    # -- subscription (``_Supervised``) ------------------------------------------------

    async def open(self) -> None:
        """Subscribe (errors reach the caller) and start pulling."""
        await self._subscribe()
        self._task = asyncio.get_running_loop().create_task(self._run())
        if self._keeper is not None:
            self._keeper.start()

    def _subscribed(self) -> bool:
        return self._sub is not None

    async def _subscribe(self) -> None:
        nc = self._conn.client()
        reconnects = nc.stats["reconnects"]
        inbox = nc.new_inbox()
        with _mapped(f"consume {self._what}"):
            self._sub = await nc.subscribe(inbox + ".>", cb=self._on_reply)
        self._inbox, self._cut = inbox, len(inbox) + 1
        self._forget_pulls()
        self._subscribed_now(reconnects)

    async def _unsubscribe(self) -> None:
        """Drop the inbox: the server drops the pulls waiting on it at once."""
        sub, self._sub = self._sub, None
        self._forget_pulls()
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _forget_pulls(self) -> None:
        self._req = [0] * self._n
        self._presence_req = 0

    async def aclose(self) -> None:
        """Stop pulling; hand back what was fetched and not handed out; give the pins up.

        Once, whoever calls it (the context's end, the backend's close) and however often.
        """
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._closed = True
        self._arrived.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        held = sorted(self.held)
        self._pins = [None] * self._n
        if self._keeper is not None:
            await self._keeper.stop()
        await self._unsubscribe()
        buffered, self._buffer = list(self._buffer), deque()
        for msg in buffered:
            with contextlib.suppress(Exception):
                await msg._msg.nak()
        nc = self._conn.nc
        if held and nc is not None and nc.is_connected:  # (then the others need not wait)
            await asyncio.gather(*(self._unpin(p) for p in held), return_exceptions=True)

    # -- replies ----------------------------------------------------------------------

    async def _on_reply(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is not None:
            # A status comes on the pull's reply subject: <inbox>.<partition or m>.<number>.
            head, _, number = msg.subject[self._cut :].partition(".")
            try:
                n, p = int(number), (-1 if head == "m" else int(head))
            except ValueError:
                return
            if p < 0:  # the presence pull: it only ever ends
                if n == self._presence_req:
                    self._presence_req = 0
                    self._wake.set()
            elif p < self._n:
                await self._on_status(p, n, status, (headers or {}).get("Description", ""))
            return
        # A message keeps its own subject: <partition>.$KV.<bucket>.<key>.
        try:
            p = int(msg.subject[: msg.subject.index(".")])
        except ValueError:
            return
        if not 0 <= p < self._n:
            return
        pin = headers.get("Nats-Pin-Id") if headers else None
        if pin is not None and self._pins[p] != pin:
            if self._pins[p] is None:
                log.debug("%s: partition %d is pinned here", self._what, p)
            self._pins[p] = pin
        if self._req[p]:
            self._remaining[p] -= 1
            if self._remaining[p] <= 0:
                self._req[p] = 0  # the pull has brought all it asked for
                self._wake.set()
        keeper = self._keeper
        if keeper is not None:
            keeper.hold(msg)
        self._buffer.append(_PartitionedMessage(msg, p, self._bucket, self._cuts[p], keeper))
        self._buffered[p] += 1
        self._arrived.set()

    async def _on_status(self, p: int, n: int, status: str, description: str) -> None:
        if status == "100":  # a heartbeat: the pull goes on
            return
        if n == self._req[p]:
            self._req[p] = 0
            self._wake.set()
        if status == "408":  # the pull expired
            return
        if status == "423":  # the pin is another process's now
            if self._pins[p] is not None:
                log.info("%s: partition %d moved to another process", self._what, p)
                await self._lose(p)
            return
        # 503 (no responders), 404, 409 Consumer Deleted: the consumer is gone; other 409s
        # (too many pulls waiting, a leader change): wait a pull's time.
        if status in ("503", "404") or "deleted" in description.lower():
            self._missing = True
        log.warning("%s: a pull on partition %d got %s %s", self._what, p, status, description)
        self._cooloff[p] = asyncio.get_running_loop().time() + self._every

    async def _lose(self, p: int) -> None:
        """The pin of ``p`` is gone: what was fetched of it goes back, for its new holder."""
        self._pins[p] = None
        if not self._buffered[p]:
            return
        mine = [m for m in self._buffer if m.partition == p]
        self._buffer = deque(m for m in self._buffer if m.partition != p)
        self._buffered[p] = 0
        keeper = self._keeper
        for msg in mine:
            if keeper is not None:
                keeper.release(msg._msg)
            with contextlib.suppress(Exception):
                await msg._msg.nak()

    # -- the pulling task -------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wake.clear()
                try:
                    if not await self._ready():
                        continue
                    if self._missing:
                        await self._make_set_again()
                    await self._pull(loop.time())
                    if loop.time() >= self._next_balance:
                        self._next_balance = loop.time() + self._every
                        await self._balance()
                except ConnectionLostError:
                    raise
                except BackendError as exc:
                    delay = self._backoff.next_delay()
                    log.warning("%s; again in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                timeout = max(0.01, min(self._next_balance - loop.time(), self._every))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        except StopAsyncIteration:
            return
        except Exception as exc:
            if not isinstance(exc, ConnectionLostError):
                log.exception("%s: pulling failed", self._what)
            self._failure = exc
            self._arrived.set()

    async def _pull(self, now: float) -> None:
        """A pull waiting on every partition that may deliver to this process."""
        nc = self._conn.client()
        expires = round(self._expires * _NANOS)
        if not self._presence_req or now > self._presence_deadline:
            self._pulls += 1
            self._presence_req = self._pulls
            self._presence_deadline = now + self._expires + self._grace
            with _mapped(f"pull {self._what}"):
                await nc.publish(
                    self._presence_next,
                    _encode.encode({"batch": 1, "expires": expires}),
                    reply=f"{self._inbox}.m.{self._pulls}",
                )
        share = _share(self._n, self._members)
        held = sum(pin is not None for pin in self._pins)
        for p in range(self._n):
            if self._req[p] and now <= self._deadline[p]:
                continue  # one is waiting
            if self._buffered[p] > self._low or now < self._cooloff[p]:
                continue
            pin = self._pins[p]
            if pin is None and held >= share:
                continue  # at its share: no standing by for more
            room = self._batch - self._buffered[p]
            self._pulls += 1
            self._req[p], self._remaining[p] = self._pulls, room
            self._deadline[p] = now + self._expires + self._grace
            request: dict[str, object] = {
                "batch": room,
                "expires": expires,
                "group": PRIORITY_GROUP,
            }
            if pin is not None:
                request["id"] = pin
            with _mapped(f"pull {self._what}"):
                await nc.publish(
                    self._next[p], _encode.encode(request), reply=f"{self._inbox}.{p}.{self._pulls}"
                )

    async def _balance(self) -> None:
        """Count the members; give up (UNPIN) what is held beyond this process's share."""
        info = await _api(
            self._backend, f"CONSUMER.INFO.{self._stream}.{presence_consumer()}", None, self._what
        )
        self._members = max(1, int(info.get("num_waiting", 0)))
        share = _share(self._n, self._members)
        held = sorted(self.held)
        for p in held[share:]:
            log.info(
                "%s: %d processes, %d partitions each at most: giving partition %d up",
                self._what,
                self._members,
                share,
                p,
            )
            await self._unpin(p)
            self._cooloff[p] = asyncio.get_running_loop().time() + self._every
            await self._lose(p)

    async def _unpin(self, p: int) -> None:
        await _api(
            self._backend,
            f"CONSUMER.UNPIN.{self._stream}.{consumer_name(p)}",
            {"group": PRIORITY_GROUP},
            f"give partition {p} of {self._bucket} up",
        )

    async def _make_set_again(self) -> None:
        """A consumer of the set is gone (deleted by hand?): make the set again."""
        info = self._info
        await self._backend.ensure_partitioned(
            self._bucket,
            info.partitions,
            group=info.group,
            depths=info.depths,
            ack_wait=info.ack_wait,
            pin_timeout=info.pin_timeout,
        )
        self._missing = False
