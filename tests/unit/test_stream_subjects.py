"""The set of subjects processes ask of a shared stream (``reactive.meta.streams``), in memory.

The race it closes needs a server whose configuration writes can interleave: see
tests/integration/test_stream_subjects_nats.py.
"""

from __future__ import annotations

import msgspec
import pytest

from reactive.backends.memory import MemoryBackend
from reactive.errors import DecodeError
from reactive.meta.streams import StreamSubjects, ensure_shared_stream, stream_subjects_key

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_subjects_are_added_to_the_set_and_the_stream() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("META")
    await ensure_shared_stream(b, "META", "EV", ["ev.a"])
    await ensure_shared_stream(b, "META", "EV", ["ev.b"])
    await ensure_shared_stream(b, "META", "EV", ["ev.a"])  # nothing new: no write
    entry = await b.kv_get("META", "streams.EV")
    assert entry is not None
    assert msgspec.json.decode(entry.value, type=StreamSubjects).subjects == ["ev.a", "ev.b"]
    await b.publish("ev.b", b"1")
    async with b.consume("EV", "d", "ev.b") as messages:
        assert (await messages.__anext__()).data == b"1"


@pytest.mark.parametrize("name", ["ORDERS", "a" * 300, "ORDERS!v2", "ÜBER", "x y"])
def test_any_stream_name_has_a_valid_key(name: str) -> None:
    key = stream_subjects_key(name)
    assert key.startswith("streams.") and len(key) <= 210
    assert all(c.isascii() and (c.isalnum() or c in "-_=.") for c in key)
    assert stream_subjects_key(name) == key
    assert stream_subjects_key(name + "1") != key


async def test_a_set_that_is_not_one_is_a_clear_error() -> None:
    b = MemoryBackend()
    await b.ensure_bucket("META")
    await b.kv_put("META", "streams.EV", b"not json")
    with pytest.raises(DecodeError, match=r"streams\.EV"):
        await ensure_shared_stream(b, "META", "EV", ["ev.a"])
