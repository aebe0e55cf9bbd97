"""Backends: NATS JetStream, and an in-memory twin with the same semantics."""

from __future__ import annotations

from reactive.backends.base import Backend, InboundMessage, KVEntry

__all__ = ["Backend", "InboundMessage", "KVEntry"]
