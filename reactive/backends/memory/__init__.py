"""An in-process twin of the NATS JetStream backend, for fast unit and property tests.

It keeps the semantics the runtime depends on (see /work/shared/NATS-NOTES.md):

* KV buckets are streams: one revision counter per bucket, shared by all its keys;
  deletes write a ``DEL`` marker; compare-and-set against the key's latest
  revision (0 meaning "no entry at all", as ``Nats-Expected-Last-Subject-Sequence: 0``).
* Watches replay the latest entry of every matching key (delete markers included,
  in revision order), then every later change; their buffers are unbounded so a
  slow reader never blocks a writer.
* Streams store what their subjects capture, deduplicated by ``msg_id`` within
  ``duplicate_window`` seconds of *clock* time.
* Core subscriptions are at-most-once; queue groups deliver to exactly one member
  (round-robin here, random on a real server). A group is its name, whatever the
  subjects: a message matching members on ``a.*`` and ``a.>`` reaches one of them.
* Durable pull consumers persist across contexts, share messages between every open
  context, and redeliver on ``nak(delay)`` or after ``ack_wait`` — all measured on the
  injected clock, so a ``ManualClock`` drives redelivery deterministically.
* A work-queue stream removes a message once it is acknowledged and refuses
  durables with overlapping filters. A stream that allows message schedules
  holds a message published with ``Nats-Schedule: @at <time>`` until the clock
  gets there, then stores its target message (one schedule per subject, the later
  replacing the earlier; a time that has passed fires at once), as nats-server
  2.12+ does; ``next_schedule()`` says when the next one fires.
* Partitioned buckets take every change into a durable per partition (placed as the
  server's ``{{partition()}}`` places it); each partition is pinned to one open
  ``consume_partitions`` context at a time, none holding more than its share.

The modules follow those concepts: ``_kv`` (buckets and watches), ``_streams``
(streams and core subscriptions), ``_consumers`` (durable consumers), ``_partitioned``
(partitioned buckets), ``_queue``
(the wake-ups and queues they share) and ``backend`` (``MemoryBackend``, which
ties them together).
"""

from __future__ import annotations

from reactive.backends.memory.backend import MSG_ID_HEADER as MSG_ID_HEADER
from reactive.backends.memory.backend import MemoryBackend, PublishedMessage

__all__ = ["MemoryBackend", "PublishedMessage"]
