"""msgspec codecs, cached per type: nothing on the hot path builds a decoder twice."""

from __future__ import annotations

import typing
from collections.abc import Hashable
from functools import cache
from typing import Any

import msgspec

from reactive.errors import DecodeError

__all__ = ["callback_fields_of", "decode", "decoder_for", "encode", "inject_callback_fields"]

_encoder = msgspec.json.Encoder()
encode_json = _encoder.encode


@cache
def decoder_for(tp: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(tp)


def decode(tp: Any, data: bytes) -> Any:
    """Decode JSON ``data`` into ``tp``; raise DecodeError with the reason."""
    if tp is bytes:
        return data
    try:
        return decoder_for(tp).decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        name = getattr(tp, "__name__", repr(tp))
        raise DecodeError(f"cannot decode {name}: {e}") from e


def encode(payload: Any) -> bytes:
    """Encode a payload for publishing: bytes as they are, str as UTF-8, anything else as JSON."""
    if payload is None:
        return b""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return encode_json(payload)


_CALLBACK_FIELDS = ("task_id", "callback_subject", "execution_id")


@cache
def callback_fields_of(tp: Any) -> tuple[str, ...]:
    """Which callback fields a payload struct type declares."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tuple(f for f in _CALLBACK_FIELDS if f in tp.__struct_fields__)
    return ()


def inject_callback_fields(
    payload: Any, task_id: str, callback_subject: str, execution_id: str
) -> Any:
    """Set the callback fields that ``payload`` declares (a struct or a dict)."""
    values = {
        "task_id": task_id,
        "callback_subject": callback_subject,
        "execution_id": execution_id,
    }
    if isinstance(payload, dict):
        return {**payload, **values}
    fields = callback_fields_of(typing.cast(Hashable, type(payload)))
    if fields:
        return msgspec.structs.replace(payload, **{f: values[f] for f in fields})
    return payload
