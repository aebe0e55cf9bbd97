"""Partitioned buckets: which partition a key belongs to, and how NATS is told so.

Both backends use these: the NATS backend to configure the server (a work-queue
stream sourcing the bucket's stream, its subjects rewritten by
``{{partition(n, ...)}}`` transforms; one durable consumer per partition in a
pinned-client priority group), the memory backend to place keys exactly where the
server would. The engine may use :func:`partition_of` to route other subjects of
an execution (callbacks, timers) to the partition of its key, with a stream
transform hashing the same tokens (``cb.*.*`` -> ``{{partition(n,1,2)}}.cb...``
puts ``cb.wf.e3`` in the partition of the key ``wf.e3``).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable
from typing import Final

__all__ = [
    "ALL_DEPTHS",
    "DEEPER",
    "MAX_KEY_DEPTH",
    "MAX_PARTITIONS",
    "PRIORITY_GROUP",
    "check_depths",
    "check_partitions",
    "consumer_name",
    "depth_of",
    "key_depths",
    "kv_revision",
    "partition_of",
    "partitioned_stream",
    "presence_consumer",
    "source_consumer",
    "source_deliver_subject",
    "source_transforms",
]

# A key is hashed on its first 16 tokens (all of them for a key of 16 or fewer): the
# server's ``partition()`` hashes the ``*`` tokens of a subject transform, so there is
# one transform per depth from 1 to 16, and one for every deeper key (16 ``*`` and a
# ``>``). A sourced message's ``Nats-Stream-Source`` header lists them all (1.7 KB).
MAX_KEY_DEPTH: Final = 16

# Every process pulls on every partition, so each partition costs one outstanding pull
# request per process and one durable consumer on the server.
MAX_PARTITIONS: Final = 1024

# The depth of every key of more than MAX_KEY_DEPTH tokens (one transform takes them all).
DEEPER: Final = MAX_KEY_DEPTH + 1
ALL_DEPTHS: Final = frozenset(range(1, DEEPER + 1))

# The priority group of the partitions' consumers (ADR-42: at most 16 characters).
PRIORITY_GROUP: Final = "engines"

_FNV_OFFSET: Final = 0x811C9DC5
_FNV_PRIME: Final = 0x01000193


def check_partitions(partitions: int) -> None:
    """Refuse a partition count the server cannot take (ValueError)."""
    if type(partitions) is not int or not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(
            f"partitions must be an int from 1 to {MAX_PARTITIONS}, not {partitions!r}"
        )


@functools.lru_cache(maxsize=4096)  # (a key's changes come in bursts: a transition, its echo)
def partition_of(key: str, partitions: int) -> int:
    """The partition of ``key`` among ``partitions``, as nats-server's ``{{partition()}}``
    places it: FNV-1a (32 bits) of the key's first 16 tokens concatenated, modulo
    ``partitions``."""
    tokens = key.split(".", MAX_KEY_DEPTH)[:MAX_KEY_DEPTH]
    h = _FNV_OFFSET
    for byte in "".join(tokens).encode():
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h % partitions


def partitioned_stream(bucket: str, group: str = "") -> str:
    """The work-queue stream that holds a partitioned bucket's unacknowledged changes.

    A bucket may be partitioned once per ``group`` (each group gets every change: the
    engine makes one per workflow that watches the bucket). The group's length comes
    first, so no two (group, bucket) pairs share a name.
    """
    return f"KVPART_{len(group)}_{group}_{bucket}" if group else f"KVPART_{bucket}"


def source_consumer(bucket: str, group: str = "") -> str:
    """The durable consumer on the bucket's own stream that feeds its partitioned stream
    (durable sourcing, ADR-60): named as the partitioned stream it feeds."""
    return partitioned_stream(bucket, group)


def source_deliver_subject(bucket: str, group: str = "") -> str:
    """Where :func:`source_consumer` delivers (the partitioned stream's server takes it)."""
    return f"_REACTIVE.SRC.{partitioned_stream(bucket, group)}"


def consumer_name(partition: int) -> str:
    """The durable consumer of one partition (its filter: ``<partition>.>``)."""
    return f"p{partition}"


def presence_consumer() -> str:
    """The consumer every process keeps one pull waiting on, so the server counts them.

    Its filter matches nothing the stream ever stores: it delivers nothing, and its
    ``num_waiting`` is the number of processes consuming the partitions.
    """
    return "members"


def check_depths(depths: Collection[int]) -> None:
    """Refuse key depths that are not 1 to DEEPER, or none (ValueError)."""
    if not depths or not all(type(d) is int and 1 <= d <= DEEPER for d in depths):
        raise ValueError(f"depths must be key depths from 1 to {DEEPER}, not {depths!r}")


def depth_of(key: str) -> int:
    """A key's depth as the partitions see it: its tokens, DEEPER for more than 16."""
    return min(key.count(".") + 1, DEEPER)


def key_depths(patterns: Iterable[str]) -> frozenset[int]:
    """The depths of the keys that ``patterns`` (NATS wildcards) can match."""
    depths: set[int] = set()
    for pattern in patterns:
        tokens = pattern.split(".")
        if tokens[-1] == ">":
            depths.update(range(min(len(tokens), DEEPER), DEEPER + 1))
        else:
            depths.add(min(len(tokens), DEEPER))
    return frozenset(depths)


def source_transforms(
    bucket: str, partitions: int, depths: Collection[int] = ALL_DEPTHS
) -> list[dict[str, str]]:
    """The subject transforms of the bucket's source: ``$KV.<bucket>.<key>`` becomes
    ``<partition>.$KV.<bucket>.<key>``, one transform per key depth up to 16 and one for
    deeper keys (DEEPER), for the ``depths`` given: keys of other depths are not taken
    in. (``$n`` rather than ``{{wildcard(n)}}``: half the header. Each sourced message's
    header lists every transform: a workflow whose keys have one depth writes one.)"""
    transforms = []
    for depth in sorted(depths):
        hashed = range(1, min(depth, MAX_KEY_DEPTH) + 1)
        rest = ".>" if depth > MAX_KEY_DEPTH else ""
        transforms.append(
            {
                "src": f"$KV.{bucket}." + ".".join("*" for _ in hashed) + rest,
                "dest": f"{{{{partition({partitions},{','.join(map(str, hashed))})}}}}"
                f".$KV.{bucket}." + ".".join(f"${i}" for i in hashed) + rest,
            }
        )
    return transforms


def kv_revision(stream_source: str) -> int:
    """The KV revision (the origin's stream sequence) in a sourced message's
    ``Nats-Stream-Source`` header (``KV_<bucket> <sequence> <filter> <transform> ...``); 0
    when it cannot be read."""
    parts = stream_source.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return 0
    return int(parts[1])
