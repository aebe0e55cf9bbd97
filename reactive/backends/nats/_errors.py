"""Where nats-py meets the reactive error tree, and what is refused before it reaches the wire.

Everything nats-py raises is translated at the backend's boundary (``_mapped``):

* a lost compare-and-set (``KeyWrongLastSequenceError``, API codes 10071 and
  10164, creating a key that exists) becomes :class:`~reactive.errors.ConflictError`;
* timeouts (:class:`~reactive.errors.TimedOutError`), no responders, a closed / reconnecting / draining connection and a
  503 from JetStream become :class:`~reactive.errors.TransientBackendError`;
* a missing bucket or stream becomes :class:`~reactive.errors.NotFoundError`;
* any other nats-py error becomes :class:`~reactive.errors.BackendError`.

Keys, subjects and sizes that would make the server close the connection are
refused here first, with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Literal

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from reactive.errors import (
    BackendError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    TimedOutError,
    TransientBackendError,
)
from reactive.subjects import MAX_STORED_KEY_LENGTH, MAX_SUBJECT_LENGTH, preview

__all__ = ["_check_key", "_check_size", "_check_subject", "_mapped", "_translate"]

_CONFLICT_CODES: Final = frozenset({10071, 10164})

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

_KEY_RE: Final = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")


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
    if isinstance(exc, TimeoutError):
        return TimedOutError(f"{what}: {type(exc).__name__}: {exc}")
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
