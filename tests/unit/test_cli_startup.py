"""serve's start of the engine: a transient failure (a request to a node that has just died,
a cluster electing its leader) is retried until --startup-timeout, anything else ends it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import pytest

from reactive import Engine as RealEngine
from reactive import ExecutionState, MemoryBackend, RuleContext, Workflow, rule
from reactive.cli.common import CLIError
from reactive.cli.startup import GaveUp, prepare, start_engine
from reactive.errors import BackendError, TimedOutError, TransientBackendError

pytestmark = pytest.mark.anyio


class Engine:
    """Fails its first ``failing`` starts with ``error``."""

    def __init__(self, failing: int, error: Exception) -> None:
        self.failing = failing
        self.error = error
        self.starts = 0

    async def start(self, *, wait: bool = True) -> None:
        self.starts += 1
        if self.starts <= self.failing:
            raise self.error


async def test_a_transient_failure_of_the_start_is_retried() -> None:
    engine = Engine(2, TransientBackendError("put REACTIVE_META/wf.x: TimeoutError"))
    await start_engine(engine, "nats://x", timeout=60.0)
    assert engine.starts == 3


async def test_the_start_gives_up_after_the_startup_timeout_and_on_a_lasting_failure() -> None:
    engine = Engine(1000, TransientBackendError("no responders"))
    with pytest.raises(GaveUp, match="no responders"):
        await start_engine(engine, "nats://x", timeout=0.0)
    assert engine.starts == 1
    broken = Engine(1, BackendError("stream REACTIVE_TIMERS exists with limits retention"))
    with pytest.raises(CLIError, match="cannot start the workflows on nats://x: stream"):
        await start_engine(broken, "nats://x", timeout=60.0)
    assert broken.starts == 1


class FlakyBackend(MemoryBackend):
    """Its first ``sync_schedules`` fails, as a request to a node that died would, while the
    durable consumers the start has begun are still being made (held until then): the
    engine's start fails half-way, with some of its triggers not set up."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1
        self.made = anyio.Event()

    async def sync_schedules(self, *args: Any, **kwargs: Any) -> None:
        if self.failures:
            self.failures -= 1
            self.made.set()  # (the consumers of the next start are made at once)
            raise TransientBackendError("set the schedules: TimeoutError: nats: timeout")
        await super().sync_schedules(*args, **kwargs)

    def consume(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> AbstractAsyncContextManager[Any]:
        @asynccontextmanager
        async def made_later() -> AsyncIterator[Any]:
            await self.made.wait()
            async with MemoryBackend.consume(self, *args, **kwargs) as messages:
                yield messages

        return made_later()


class Item(ExecutionState):
    pass


class Items(Workflow, id="items", state=Item):
    @rule(on_subject="items.new", state_key=lambda m: m["id"], message=dict, mutate=True)
    def new(self, ctx: RuleContext[Item, dict[str, str]]) -> None:
        ctx.state.phase = "new"


async def test_an_engine_whose_start_failed_half_way_is_ready_after_the_retry() -> None:
    """The triggers a failed start had begun do not count against the next start's: once
    the retry has set every trigger up, the engine is ready (/healthz says 200)."""
    engine = RealEngine(FlakyBackend(), [Items])
    await start_engine(engine, "memory", timeout=60.0)
    try:
        await engine.wait_ready(timeout=10.0)
        assert engine.ready
    finally:
        await engine.stop()


class LeaderlessStream(MemoryBackend):
    """Its callback stream cannot be made until ``healed`` (its servers elect a leader)."""

    def __init__(self) -> None:
        super().__init__()
        self.healed = False

    async def ensure_stream(self, name: str, subjects: list[str], **options: bool) -> None:
        if name == "REACTIVE_CALLBACKS" and not self.healed:
            raise TimedOutError(f"ensure stream {name}: TimeoutError: nats: timeout")
        await super().ensure_stream(name, subjects, **options)


async def test_an_engine_works_while_one_of_its_streams_cannot_be_made_yet() -> None:
    """Each trigger makes its own stream: one whose servers have no leader yet holds up no
    other (serve starts so); ``start()`` waits for all of them, and fails with the first
    failure of one that cannot start."""
    backend = LeaderlessStream()
    engine = RealEngine(backend, [Items])
    with anyio.fail_after(10):
        with pytest.raises(TimedOutError, match="REACTIVE_CALLBACKS"):
            await engine.start()
        assert not engine.running
        await engine.start(wait=False)
        try:
            triggers = engine.triggers  # (all but the callback consumer run: then publish)
            while triggers.ready_count < triggers.expected_ready - 1:
                await anyio.sleep(0.01)
            await backend.publish("items.new", b'{"id": "i1"}')
            while (await backend.kv_get("ITEMS", "items.i1")) is None:
                await anyio.sleep(0.01)
            assert not engine.ready
            assert list(engine.startup_failures) == ["callback consumer for items"]
            error, tries = engine.startup_failures["callback consumer for items"]
            assert isinstance(error, TimedOutError) and tries >= 1
            backend.healed = True
            await engine.wait_ready(timeout=10.0)
            assert engine.startup_failures == {}
        finally:
            await engine.stop()


async def test_a_setup_step_that_gets_no_answer_is_tried_again_soon(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A request sent while a group has no leader is never answered: the try is cut short
    # and sent again, so the start follows the election closely instead of waiting out
    # the request timeout; the other buckets and streams do not wait for it.
    calls: list[str] = []

    def step(name: str, silent: int) -> Any:
        async def run() -> None:
            calls.append(name)
            if calls.count(name) <= silent:
                await anyio.sleep_forever()

        return run

    steps = [
        ("connect", step("connect", 0)),
        ("check", step("check", 0)),
        ("ensure bucket B", step("bucket", 2)),
        ("ensure stream S", step("stream", 0)),
    ]
    with anyio.fail_after(30):
        await prepare(steps, "nats://x", timeout=60.0, try_timeout=2.0)
    assert calls == ["connect", "check", "bucket", "stream", "bucket", "bucket"]
    cuts = [r.getMessage() for r in caplog.records if "no answer" in r.getMessage()]
    assert [c.split(" (", 1)[0] for c in cuts] == [
        "not started yet: ensure bucket B: no answer in 0.5s",
        "not started yet: ensure bucket B: no answer in 0.5s",
    ]
    assert all(c.endswith(f"; retrying retry={n}") for n, c in enumerate(cuts, 1))
    assert "did not answer in time" in cuts[0]  # (the hint: JetStream, not the connection)
    # What stays unanswered until the startup timeout is named when serve gives up.
    with pytest.raises(GaveUp, match=r"ensure bucket B: no answer in 0\.5s"):
        await prepare(
            [*steps[:2], ("ensure bucket B", step("b2", 99)), ("ensure stream S", step("s2", 0))],
            "nats://x",
            timeout=3.0,  # (several tries cut at 0.5 s in it, each failing the same way)
        )

    # A failure retrying cannot heal ends the start at once, the other steps with it.
    async def broken() -> None:
        raise BackendError("stream S exists with limits retention")

    with anyio.fail_after(30), pytest.raises(CLIError, match="limits retention"):
        await prepare(
            [*steps[:2], ("ensure bucket B", step("b3", 99)), ("ensure stream S", broken)],
            "nats://x",
            timeout=60.0,
        )
