"""Two processes add subjects to one stream at once: neither subject is lost (real server).

JetStream has no compare-and-set on a stream's configuration, so the race is made here:
one process's write of the configuration is held (``update_stream`` waits on a gate) until
the other's has landed; the held write then drops the other's subject.
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.js import JetStreamContext

from reactive.backends.nats import NatsBackend
from reactive.errors import BackendError
from reactive.meta.streams import StreamSubjects, ensure_shared_stream, stream_subjects_key

pytestmark = pytest.mark.anyio

_held: contextvars.ContextVar[anyio.Event | None] = contextvars.ContextVar("held", default=None)


@pytest.fixture
def held_updates(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """``update_stream`` waits for the event in ``_held`` (in the task that set it); the
    subjects each held write carried are recorded."""
    original = JetStreamContext.update_stream
    writes: list[list[str]] = []

    async def update_stream(self: JetStreamContext, config: Any = None, **params: Any) -> Any:
        gate = _held.get()
        if gate is not None:
            writes.append(list(config.subjects))
            await gate.wait()
        return await original(self, config, **params)

    monkeypatch.setattr(JetStreamContext, "update_stream", update_stream)
    yield writes


async def _subjects(url: str, stream: str) -> set[str]:
    nc = await nats.connect(url)
    try:
        return set((await nc.jetstream().stream_info(stream)).config.subjects or [])
    finally:
        await nc.close()


async def _race(url: str, held: list[list[str]], both: Any) -> tuple[str, str, str]:
    """Process a's write is held while b adds its subject; then a's write lands."""
    tag = uuid.uuid4().hex[:8]
    stream, meta = f"RACE_{tag}", f"META_{tag}"
    base, sa, sb = f"race{tag}.base", f"race{tag}.a", f"race{tag}.b"
    async with NatsBackend(url) as a, NatsBackend(url) as b:
        await a.ensure_bucket(meta)
        await a.ensure_stream(stream, [base])
        gate = anyio.Event()

        async def add_a() -> None:
            _held.set(gate)
            await both(a, meta, stream, [sa])

        async with anyio.create_task_group() as tg:
            tg.start_soon(add_a)
            with anyio.fail_after(30):
                while not held:  # a read the configuration and is about to write it
                    await anyio.sleep(0.01)
            await both(b, meta, stream, [sb])
            assert sb in await _subjects(url, stream)
            gate.set()
    return stream, sa, sb


async def test_a_subject_added_while_another_process_writes_the_stream_is_kept(
    nats_url: str, held_updates: list[list[str]]
) -> None:
    stream, sa, sb = await _race(nats_url, held_updates, ensure_shared_stream)
    assert sb not in held_updates[0]  # the held write was made without b's subject ...
    assert {sa, sb} <= await _subjects(nats_url, stream)  # ... and was made again


async def test_without_the_shared_set_the_held_write_drops_the_other_subject(
    nats_url: str, held_updates: list[list[str]]
) -> None:
    """The race the set closes, as a plain ``ensure_stream`` has it (the control)."""

    async def plain(backend: NatsBackend, _meta: str, stream: str, subjects: list[str]) -> None:
        await backend.ensure_stream(stream, subjects)

    stream, sa, sb = await _race(nats_url, held_updates, plain)
    subjects = await _subjects(nats_url, stream)
    assert sa in subjects and sb not in subjects


async def test_the_set_of_subjects_is_kept_in_the_meta_bucket_with_a_ttl(nats_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    stream, meta = f"SET_{tag}", f"META_{tag}"
    async with NatsBackend(nats_url) as b:
        await b.ensure_bucket(meta)
        await ensure_shared_stream(b, meta, stream, [f"set{tag}.a"])
        await ensure_shared_stream(b, meta, stream, [f"set{tag}.b", f"set{tag}.a"])
        entry = await b.kv_get(meta, stream_subjects_key(stream))
        assert entry is not None
        kept = msgspec.json.decode(entry.value, type=StreamSubjects).subjects
        assert kept == [f"set{tag}.a", f"set{tag}.b"]
        nc = await nats.connect(nats_url)
        try:
            msg = await nc.jetstream().get_msg(f"KV_{meta}", seq=entry.revision)
            assert (msg.headers or {}).get("Nats-TTL") == "600s"
        finally:
            await nc.close()


async def test_a_subject_the_stream_cannot_take_is_taken_out_of_the_set(nats_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    meta = f"META_{tag}"
    async with NatsBackend(nats_url) as b:
        await b.ensure_bucket(meta)
        await b.ensure_stream(f"OTHER_{tag}", [f"taken{tag}.>"])
        await ensure_shared_stream(b, meta, f"MINE_{tag}", [f"mine{tag}.a"])
        with pytest.raises(BackendError):
            await ensure_shared_stream(b, meta, f"MINE_{tag}", [f"taken{tag}.x"])
        # The bad subject does not fail the next process that adds a good one.
        await ensure_shared_stream(b, meta, f"MINE_{tag}", [f"mine{tag}.b"])
        assert await _subjects(nats_url, f"MINE_{tag}") == {f"mine{tag}.a", f"mine{tag}.b"}


async def test_a_bad_subject_another_process_left_in_the_set_does_not_fail_this_one(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uuid.uuid4().hex[:8]
    meta, mine = f"META_{tag}", f"MINE_{tag}"
    async with NatsBackend(nats_url) as b:
        await b.ensure_bucket(meta)
        await b.ensure_stream(f"OTHER_{tag}", [f"taken{tag}.>"])
        # A process added a subject another stream has, and died before taking it out.
        left = StreamSubjects([f"taken{tag}.x"])
        await b.kv_put(meta, stream_subjects_key(mine), msgspec.json.encode(left))
        with caplog.at_level("WARNING", logger="reactive"):
            await ensure_shared_stream(b, meta, mine, [f"mine{tag}.a"])
        assert await _subjects(nats_url, mine) == {f"mine{tag}.a"}
        assert f"stream {mine} refused a subject another process asked of it" in caplog.text
        # This process's own bad subject still fails it.
        with pytest.raises(BackendError):
            await ensure_shared_stream(b, meta, mine, [f"taken{tag}.y"])
