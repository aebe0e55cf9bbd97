"""Partitioned buckets on NATS: a work-queue stream sourcing the bucket, one pinned durable
per partition, and the messages they hand out.

The server does the partitioning and the membership (orbit.go's ``pcgroups`` shape):

* the stream ``KVPART_<bucket>`` (work-queue retention, no subjects of its own)
  sources ``KV_<bucket>`` with one subject transform per key depth (1 to 16 tokens,
  and one for deeper keys, hashed on their first 16): ``$KV.<bucket>.<key>`` ->
  ``{{partition(n,1,...)}}.$KV.<bucket>.<key>``. A change is stored under its
  partition's subject until it is acknowledged, then removed. (One source with 17
  transforms, although its messages' ``Nats-Stream-Source`` header lists them all,
  1.7 KB, where one source per depth would write 100 bytes: with several sources of
  one stream, nats-server 2.15.1 lost messages of the work-queue stream once it
  deleted what was acknowledged, in every try.)
* the source reads the bucket through a durable consumer of ``KV_<bucket>`` named as
  the stream (durable sourcing, ADR-60, nats-server 2.14+), replicated as the bucket
  is: a node's loss moves it to a new leader, which goes on where it stood. (The
  server's default, an ephemeral consumer on the bucket's leader, is set up again only
  after a health check of 10 s and a backoff: the partitions stalled 8-45 s.) It is
  acknowledged by flow control, once the stream stored what it sent; a change of the
  key depths pauses it until then, so nothing is sourced twice;
* one durable per partition (``p<n>``, filter ``<n>.>``) in the pinned-client
  priority group ``engines`` (ADR-42): the server pins each partition to one of the
  processes pulling on it; the others stand by, and take over when the pinned one
  stops pulling for ``priority_timeout`` or gives the pin up (UNPIN);
* the durable ``members`` (a filter nothing matches): every process keeps one pull
  waiting on it, so its ``num_waiting`` counts the processes (the server drops the
  pull of a process that disconnects or unsubscribes, at once).

nats-py 2.16 has no priority groups: consumers are created, pulled and unpinned by
JetStream's JSON API here (``_api``); the pulling is in ``_partition_puller``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, cast

import anyio
import nats.js.errors

from reactive.backends.base import PartitionedConsumer
from reactive.backends.nats._jsapi import _api
from reactive.backends.nats._partition_puller import _PartitionPuller, _SetInfo
from reactive.backends.partitions import (
    ALL_DEPTHS,
    DEEPER,
    PRIORITY_GROUP,
    check_depths,
    check_partitions,
    consumer_name,
    partitioned_stream,
    presence_consumer,
    source_consumer,
    source_deliver_subject,
    source_transforms,
)
from reactive.errors import BackendError, NotFoundError, PartitionCountError

if TYPE_CHECKING:
    from reactive.backends.nats.backend import NatsBackend

__all__ = ["_PartitionedBuckets"]

log = logging.getLogger("reactive.backends.nats")  # one logger for the whole backend

_STREAM_NAME_IN_USE: Final = 10058
_NANOS: Final = 1_000_000_000
_SOURCE_WAIT: Final = 10.0
# The source consumer's flow-control window: what it sends before the partitioned stream
# confirms it stored it (and what a new leader may send again after a node's loss).
_SOURCE_WINDOW: Final = 10_000
_SOURCE_PAUSE: Final = 30.0
_PARTITION_COUNT: Final = re.compile(r"\{\{\s*partition\(\s*(\d+)")


def _partition_count(stream_info: dict[str, Any]) -> int | None:
    """How many partitions an existing partitioned stream has (from its transforms)."""
    for source in stream_info.get("config", {}).get("sources") or []:
        for transform in source.get("subject_transforms") or []:
            found = _PARTITION_COUNT.search(transform.get("dest", ""))
            if found:
                return int(found.group(1))
    return None


def _depths(stream_info: dict[str, Any]) -> frozenset[int]:
    """The key depths an existing partitioned stream takes in (from its transforms)."""
    depths = set()
    for source in stream_info.get("config", {}).get("sources") or []:
        for transform in source.get("subject_transforms") or []:
            tokens = transform.get("src", "").split(".")[2:]  # ($KV.<bucket>.)
            depths.add(DEEPER if tokens[-1:] == [">"] else len(tokens))
    return frozenset(depths) or ALL_DEPTHS


async def _set_info(backend: NatsBackend, bucket: str, partitions: int, group: str) -> _SetInfo:
    """Check that ``bucket`` is partitioned into ``partitions``; read its consumers' timeouts."""
    check_partitions(partitions)
    stream = partitioned_stream(bucket, group)
    try:
        info = await _api(backend, f"STREAM.INFO.{stream}", None, f"partitions of {bucket}")
    except NotFoundError:
        raise NotFoundError(
            f"bucket {bucket!r} is not partitioned (call ensure_partitioned first)"
        ) from None
    found = _partition_count(info)
    if found != partitions:
        raise PartitionCountError(bucket, found, partitions)
    first = await _api(
        backend, f"CONSUMER.INFO.{stream}.{consumer_name(0)}", None, f"partitions of {bucket}"
    )
    config = first.get("config", {})
    return _SetInfo(
        partitions,
        group,
        _depths(info),
        config.get("ack_wait", 30 * _NANOS) / _NANOS,
        config.get("priority_timeout", 5 * _NANOS) / _NANOS,
    )


async def _sourcing(backend: NatsBackend, stream: str, what: str) -> None:
    """Wait until the server sources the bucket into ``stream`` (at most _SOURCE_WAIT seconds).

    A new stream's source starts a moment (~0.2 s) after the stream: a key written
    twice before then would come only as its later revision (the bucket keeps one).
    Once it runs, every change is taken in as it is made.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + _SOURCE_WAIT
    while True:
        info = await _api(backend, f"STREAM.INFO.{stream}", None, what)
        sources = info.get("sources") or []
        if all(s.get("active", -1) >= 0 for s in sources) or loop.time() > give_up:
            return
        await asyncio.sleep(0.01)


async def _ensure_source_consumer(
    backend: NatsBackend, origin: str, source: dict[str, Any], what: str
) -> None:
    """Create (or bring up to date) the durable consumer on the bucket's stream that feeds
    the partitioned stream (durable sourcing, ADR-60, nats-server 2.14+).

    It is replicated as the bucket is, so when the node leading the bucket dies the
    consumer's new leader goes on delivering where it stood: the server's own ephemeral
    source consumer lives on the bucket's leader only, and the partitioned stream sets it
    up again only after a health check of 10 s and a backoff of 10 s or more (changes
    stopped reaching the partitions for 8-45 s; ``benchmarks/source_failover.py``).
    Acknowledged by flow control (``flow_control``: the partitioned stream answers once
    it stored what came), filtered on the transforms' subjects.
    """
    consumer = source["consumer"]
    config = {
        "durable_name": consumer["name"],
        "deliver_subject": consumer["deliver_subject"],
        "deliver_policy": "all",
        "ack_policy": "flow_control",
        "flow_control": True,
        "idle_heartbeat": _NANOS,  # (flow-controlled sourcing wants exactly 1 s)
        "max_ack_pending": _SOURCE_WINDOW,
        "max_deliver": -1,
        "filter_subjects": [t["src"] for t in source["subject_transforms"]],
        "description": "feeds the partitions of the reactive engines (durable sourcing)",
    }
    await _api(
        backend,
        f"CONSUMER.CREATE.{origin}.{consumer['name']}",
        {"stream_name": origin, "config": config},
        what,
    )


async def _create_stream(
    backend: NatsBackend,
    bucket: str,
    stream: str,
    source: dict[str, Any],
    partitions: int,
    what: str,
) -> None:
    config = {
        "name": stream,
        "retention": "workqueue",
        "storage": "file",
        "num_replicas": backend._replicas,
        "subjects": [],
        "sources": [source],
    }
    try:
        await _api(backend, f"STREAM.CREATE.{stream}", config, what)
    except BackendError as exc:
        if not isinstance(exc.__cause__, nats.js.errors.APIError) or (
            exc.__cause__.err_code != _STREAM_NAME_IN_USE
        ):
            raise
        # Another process made it meanwhile, maybe for other key depths.
        info = await _api(backend, f"STREAM.INFO.{stream}", None, what)
        await _update_stream(backend, bucket, stream, info, source, partitions, what)


async def _update_stream(
    backend: NatsBackend,
    bucket: str,
    stream: str,
    info: dict[str, Any],
    source: dict[str, Any],
    partitions: int,
    what: str,
) -> None:
    """Check an existing partitioned stream; take in the key depths of ``source`` if
    they changed (the changes already taken in stay; the others come from now on)."""
    found = _partition_count(info)
    if found is None:
        raise BackendError(f"{what}: a stream {stream} exists and is not a partitioned bucket's")
    if found != partitions:
        raise PartitionCountError(bucket, found, partitions)
    existing = info.get("config", {})
    sources = existing.get("sources") or [{}]
    if sources[0].get("consumer") is None:
        # Made before durable sourcing: its position lives in the server's source state,
        # which a durable consumer cannot be told; it is kept (and fails over slowly).
        log.warning(
            "%s: %s sources the bucket without a durable consumer: a node's loss stalls it "
            "for 10 s or more; delete it while no engine runs to have it made again",
            what,
            stream,
        )
        if sources[0].get("subject_transforms") != source["subject_transforms"]:
            transforms = source["subject_transforms"]
            existing["sources"] = [{**sources[0], "subject_transforms": transforms}]
            await _api(backend, f"STREAM.UPDATE.{stream}", existing, what)
        return
    if len(sources) != 1 or any(sources[0].get(k) != v for k, v in source.items()):
        async with _paused(backend, source, what):
            await _ensure_source_consumer(backend, source["name"], source, what)
            existing["sources"] = [source]
            await _api(backend, f"STREAM.UPDATE.{stream}", existing, what)


@asynccontextmanager
async def _paused(backend: NatsBackend, source: dict[str, Any], what: str) -> AsyncIterator[None]:
    """The source consumer paused, and what it delivered confirmed stored, for a change of
    the stream's source: a changed source is set up again from the consumer's
    acknowledged place, and what was delivered after it would be stored twice. (The
    pause ends by itself after _SOURCE_PAUSE seconds should this process die here.)"""
    origin, name = source["name"], source["consumer"]["name"]
    until = datetime.now(UTC) + timedelta(seconds=_SOURCE_PAUSE)
    pause = {"pause_until": until.isoformat().replace("+00:00", "Z")}
    try:
        await _api(backend, f"CONSUMER.PAUSE.{origin}.{name}", pause, what)
    except NotFoundError:  # (the first time: no consumer yet)
        yield
        return
    try:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _SOURCE_WAIT
        while loop.time() < give_up:
            info = await _api(backend, f"CONSUMER.INFO.{origin}.{name}", None, what)
            if not info.get("num_ack_pending"):
                break
            await asyncio.sleep(0.05)
        yield
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(BackendError):
            await _api(backend, f"CONSUMER.PAUSE.{origin}.{name}", {}, what)


class _PartitionedBuckets:
    """The partitioned-bucket part of ``NatsBackend`` (see the module's docstring)."""

    async def ensure_partitioned(
        self,
        bucket: str,
        partitions: int,
        *,
        group: str = "",
        depths: Collection[int] = ALL_DEPTHS,
        ack_wait: float = 30.0,
        pin_timeout: float = 5.0,
    ) -> None:
        backend = cast("NatsBackend", self)
        check_depths(depths)
        check_partitions(partitions)
        if ack_wait <= 0 or pin_timeout <= 0:
            raise ValueError("ack_wait and pin_timeout must be positive")
        kv = await backend._kv(bucket)  # (NotFoundError for a missing bucket)
        stream = partitioned_stream(bucket, group)
        what = f"partition {bucket}"
        transforms = source_transforms(bucket, partitions, depths)
        source = {
            "name": kv._stream,
            "subject_transforms": transforms,
            "consumer": {
                "name": source_consumer(bucket, group),
                "deliver_subject": source_deliver_subject(bucket, group),
            },
        }
        try:
            info = await _api(backend, f"STREAM.INFO.{stream}", None, what)
        except NotFoundError:
            info = None
        if info is None:
            await _ensure_source_consumer(backend, kv._stream, source, what)
            await _create_stream(backend, bucket, stream, source, partitions, what)
        else:
            await _update_stream(backend, bucket, stream, info, source, partitions, what)
        consumers = [
            {
                "durable_name": consumer_name(p),
                "filter_subject": f"{p}.>",
                "ack_policy": "explicit",
                "ack_wait": round(ack_wait * _NANOS),
                "max_deliver": -1,
                "deliver_policy": "all",
                "priority_groups": [PRIORITY_GROUP],
                "priority_policy": "pinned_client",
                "priority_timeout": round(pin_timeout * _NANOS),
            }
            for p in range(partitions)
        ]
        consumers.append(
            # (A work queue's consumers need explicit acks; this one delivers nothing.)
            {
                "durable_name": presence_consumer(),
                "filter_subject": "members",
                "ack_policy": "explicit",
            }
        )
        await asyncio.gather(
            *(
                _api(
                    backend,
                    f"CONSUMER.CREATE.{stream}.{c['durable_name']}",
                    {"stream_name": stream, "config": c},
                    what,
                )
                for c in consumers
            )
        )
        await _sourcing(backend, stream, what)

    def consume_partitions(
        self, bucket: str, partitions: int, *, group: str = "", keep_alive: bool = False
    ) -> AbstractAsyncContextManager[PartitionedConsumer]:
        return self._consume_partitions(bucket, partitions, group, keep_alive)

    @asynccontextmanager
    async def _consume_partitions(
        self, bucket: str, partitions: int, group: str, keep_alive: bool
    ) -> AsyncIterator[PartitionedConsumer]:
        backend = cast("NatsBackend", self)
        info = await _set_info(backend, bucket, partitions, group)
        puller = _PartitionPuller(backend, bucket, info, keep_alive)
        await puller.open()
        backend._open.add(puller)
        try:
            yield puller
        finally:
            backend._open.discard(puller)
            # Even when the context ends by a cancellation: the partitions move at once,
            # not after pin_timeout. (Bounded: the requests time out after ack_timeout.)
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + 2 * backend._ack_timeout
                await puller.aclose()
