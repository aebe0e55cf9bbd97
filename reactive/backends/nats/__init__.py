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

One module per concern, as FastStream's ``faststream/nats/subscriber/usecases``:
``_errors`` (the translation above, and what is refused before the wire),
``_connection`` (connecting, failing fast, renewing a connection closed for good),
``_replies`` (the reply inbox of JetStream requests), ``_jsapi`` (JetStream's JSON
API, for what nats-py lacks), ``_supervised`` (what a watch and a pull consumer
share), ``_kv_watch``, ``_pull_consumer``, ``_core_subscriber``, ``_partition_puller``
(one per subscription kind), ``_partitioned`` (partitioned buckets: the stream and
durables, and the context of a member) and ``backend`` (``NatsBackend``).
"""

from __future__ import annotations

from reactive.backends.nats.backend import NatsBackend

__all__ = ["NatsBackend"]
