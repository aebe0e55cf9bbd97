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
import re
from collections.abc import AsyncIterator, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager
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
    source_transforms,
)
from reactive.errors import BackendError, NotFoundError, PartitionCountError

if TYPE_CHECKING:
    from reactive.backends.nats.backend import NatsBackend

__all__ = ["_PartitionedBuckets"]

_STREAM_NAME_IN_USE: Final = 10058
_NANOS: Final = 1_000_000_000
_SOURCE_WAIT: Final = 10.0
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
        config = {
            "name": stream,
            "retention": "workqueue",
            "storage": "file",
            "num_replicas": backend._replicas,
            "subjects": [],
            "sources": [{"name": kv._stream, "subject_transforms": transforms}],
        }
        try:
            await _api(backend, f"STREAM.CREATE.{stream}", config, what)
        except BackendError as exc:
            if not isinstance(exc.__cause__, nats.js.errors.APIError) or (
                exc.__cause__.err_code != _STREAM_NAME_IN_USE
            ):
                raise
            # It exists with another configuration: fine if it has this many partitions.
            info = await _api(backend, f"STREAM.INFO.{stream}", None, what)
            found = _partition_count(info)
            if found is None:
                raise BackendError(
                    f"{what}: a stream {stream} exists and is not a partitioned bucket's"
                ) from None
            if found != partitions:
                raise PartitionCountError(bucket, found, partitions) from None
            existing = info.get("config", {})
            sources = existing.get("sources") or []
            if [s.get("subject_transforms") for s in sources] != [transforms]:
                # Other key depths (the workflow's patterns changed): the source takes
                # these in from now on; the changes already taken in stay.
                existing["sources"] = [{**sources[0], "subject_transforms": transforms}]
                await _api(backend, f"STREAM.UPDATE.{stream}", existing, what)
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
        self, bucket: str, partitions: int, *, group: str = ""
    ) -> AbstractAsyncContextManager[PartitionedConsumer]:
        return self._consume_partitions(bucket, partitions, group)

    @asynccontextmanager
    async def _consume_partitions(
        self, bucket: str, partitions: int, group: str
    ) -> AsyncIterator[PartitionedConsumer]:
        backend = cast("NatsBackend", self)
        info = await _set_info(backend, bucket, partitions, group)
        puller = _PartitionPuller(backend, bucket, info)
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
