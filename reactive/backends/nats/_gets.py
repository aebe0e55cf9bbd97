"""Reading a key: by direct get (any replica answers, no JSON), or from the stream's leader."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import nats.js.errors
from nats.js.kv import KeyValue

from reactive.backends.base import KVEntry
from reactive.backends.nats._errors import _check_key, _mapped
from reactive.errors import BackendError, TransientBackendError

if TYPE_CHECKING:
    from reactive.backends.nats.backend import NatsBackend

__all__ = ["_direct_get", "_leader_get"]

_NO_MESSAGE: Final = 10037  # JetStream's "no message found"


async def _direct_get(backend: NatsBackend, kv: KeyValue, bucket: str, key: str) -> KVEntry | None:
    """The key's last message by JetStream's direct get: the raw message, no JSON."""
    _check_key("get", bucket, key)
    replies = backend._replies or await backend._reply_inbox()
    subject = f"{backend._conn.jetstream()._prefix}.DIRECT.GET.{kv._stream}.{kv._pre}{key}"
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


async def _leader_get(backend: NatsBackend, kv: KeyValue, bucket: str, key: str) -> KVEntry | None:
    """The key's last message as the stream's leader has it: JetStream's message get
    API, which only the leader answers (a direct get goes to any replica, and a
    follower answers once it is 90 % caught up)."""
    _check_key("get", bucket, key)
    js = backend._conn.jetstream()
    with _mapped(f"get {bucket}/{key} from its leader"):
        try:
            msg = await js.get_last_msg(kv._stream, f"{kv._pre}{key}")
        except nats.js.errors.NotFoundError as e:
            if e.err_code != _NO_MESSAGE:
                raise  # (the stream is gone: NotFoundError)
            return None
    if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
        return None
    return KVEntry(bucket=bucket, key=key, value=msg.data or b"", revision=int(msg.seq or 0))
