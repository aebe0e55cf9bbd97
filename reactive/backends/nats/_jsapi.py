"""JetStream's JSON API, for what nats-py lacks (priority groups: pinned pulls, UNPIN).

A request on ``$JS.API.<subject>`` with a JSON body, answered on the backend's reply
inbox; an error in the reply is raised as nats-py raises it, translated (``_mapped``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import msgspec
import nats.js.errors

from reactive.backends.nats._errors import _mapped

if TYPE_CHECKING:
    from reactive.backends.nats.backend import NatsBackend

__all__ = ["_api"]

_decode: Final = msgspec.json.Decoder(dict[str, Any])
_encode: Final = msgspec.json.Encoder()


async def _api(backend: NatsBackend, subject: str, body: Any, what: str) -> dict[str, Any]:
    """``$JS.API.<subject>`` with ``body`` (JSON; None for none) and its JSON reply."""
    prefix = backend._conn.jetstream()._prefix
    replies = backend._replies or await backend._reply_inbox()
    data = b"" if body is None else _encode.encode(body)
    with _mapped(what):
        msg = await replies.request(f"{prefix}.{subject}", data, None, backend._api_timeout)
        if not msg.data:
            status = (msg.headers or {}).get("Status")
            if status == "503":  # no responders: JetStream is not there (yet)
                raise nats.js.errors.ServiceUnavailableError(code=503, description="no responders")
            raise nats.js.errors.APIError(description=f"an empty reply (status {status})")
        try:
            reply = _decode.decode(msg.data)
        except msgspec.DecodeError:
            raise nats.js.errors.APIError(
                description=f"an unreadable reply: {msg.data[:200]!r}"
            ) from None
        error = reply.get("error")
        if error:
            nats.js.errors.APIError.from_error(error)  # (it raises)
    return reply
