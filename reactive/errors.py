"""The exception tree: one base error, a few specific ones."""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConflictError",
    "ConnectionLostError",
    "DecodeError",
    "DefinitionError",
    "InvalidExecutionId",
    "NotFoundError",
    "PartitionCountError",
    "PayloadTooLargeError",
    "ReactiveError",
    "ServerFeatureError",
    "TimedOutError",
    "TransientBackendError",
]


class ReactiveError(Exception):
    """Base of every error this package raises."""


class DefinitionError(ReactiveError, TypeError):
    """A workflow class cannot work; raised when the class is created, with every reason."""

    def __init__(self, class_name: str, reasons: list[str]) -> None:
        self.class_name = class_name
        self.reasons = list(reasons)
        if len(reasons) == 1:
            text = f"Invalid workflow class {class_name}: {reasons[0]}"
        else:
            lines = "\n".join(f"  - {r}" for r in reasons)
            text = f"Invalid workflow class {class_name} for {len(reasons)} reasons:\n{lines}"
        super().__init__(text)


class InvalidExecutionId(ReactiveError, ValueError):
    """An execution id that is not NATS-token-safe (letters, digits, '-' and '_')."""


class DecodeError(ReactiveError, ValueError):
    """A message or state value that cannot be decoded into its declared type."""


class BackendError(ReactiveError):
    """The state store or the message transport failed."""


class TransientBackendError(BackendError):
    """A failure worth retrying: the server is unreachable, a request timed out."""


class TimedOutError(TransientBackendError):
    """A request the server did not answer in time: a node that died with it, a group of
    servers electing its leader, a server too busy. The try already waited; the next
    may follow at once."""


class ConflictError(BackendError):
    """A compare-and-set lost: the key is not at the expected revision."""


class NotFoundError(BackendError):
    """A bucket, key or stream that does not exist."""


class PartitionCountError(BackendError):
    """A bucket is partitioned already, into another number of partitions (``found``)."""

    def __init__(self, bucket: str, found: int | None, wanted: int) -> None:
        super().__init__(f"bucket {bucket!r} is partitioned into {found} partitions, not {wanted}")
        self.found = found
        self.wanted = wanted


class PayloadTooLargeError(BackendError):
    """A value or message larger than the server's max payload: refused before it is sent."""


class ConnectionLostError(BackendError):
    """The NATS connection is closed for good and the backend cannot make a new one."""


class ServerFeatureError(BackendError):
    """The NATS server lacks a feature the engine uses (JetStream, or a newer version)."""
