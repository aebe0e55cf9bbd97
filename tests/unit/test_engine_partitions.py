"""Engines share the work through partitioned consumers (in memory, as on NATS): each change
of a watched bucket goes to the one engine holding its key's partition; a starting engine
resumes from the changes not acknowledged, not from every key; every workflow watching a
bucket gets every change."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from reactive import (
    ExecutionState,
    MemoryBackend,
    RuleContext,
    Status,
    Workflow,
    definition_of,
    rule,
)
from reactive.backends.partitions import partition_of
from reactive.clock import ManualClock
from reactive.conditions import condition
from reactive.errors import TransientBackendError
from reactive.runtime.engine import Engine
from reactive.runtime.metrics import EngineMetrics
from reactive.testing import TestEngine

pytestmark = pytest.mark.anyio

BUCKET = "ENTITIES"


class Entity(msgspec.Struct):
    level: int = 0


def watcher(workflow_id: str, seen: Counter[tuple[str, int]]) -> type[Workflow]:
    """A workflow that records each revision of each ``ent.>`` key it evaluates."""

    @condition
    def record(ctx: RuleContext[Any, Any]) -> bool:
        seen[(ctx.key, ctx.revision)] += 1
        return False

    class Watcher(Workflow, id=workflow_id):
        @rule(watch_kv="ent.>", bucket=BUCKET, when=record, publish="never")
        def alert(self, ctx: RuleContext[Any, None]) -> None:
            return None

    return Watcher


def evaluations(metrics: EngineMetrics, workflow_id: str) -> float:
    return metrics.rule_evaluations.labels(workflow_id, "alert", "false")._value.get()


def held(engine: Engine, workflow_id: str) -> frozenset[int]:
    consumer, _ = engine.triggers.partitions[(workflow_id, BUCKET)]
    return consumer.held


async def settle(*tes: TestEngine) -> None:
    for _ in range(2):
        for te in tes:
            await te.settle()


async def put(backend: MemoryBackend, keys: list[str], level: int = 1) -> None:
    for key in keys:
        await backend.kv_put(BUCKET, key, msgspec.json.encode(Entity(level=level)))


async def test_two_engines_share_the_partitions_and_evaluate_each_change_once() -> None:
    seen: Counter[tuple[str, int]] = Counter()
    wf = watcher("shared", seen)
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    ma, mb = EngineMetrics(CollectorRegistry()), EngineMetrics(CollectorRegistry())
    keys = [f"ent.k{i}" for i in range(64)]
    async with (
        TestEngine(wf, clock=clock, backend=backend, instance_id="a", metrics=ma) as a,
        TestEngine(wf, clock=clock, backend=backend, instance_id="b", metrics=mb) as b,
    ):
        await put(backend, keys)
        await settle(a, b)
        await put(backend, keys, level=2)
        await settle(a, b)
        held_a, held_b = held(a.engine, "shared"), held(b.engine, "shared")
    # Every revision was evaluated, once.
    assert len(seen) == 2 * len(keys)
    assert set(seen.values()) == {1}
    # The partitions are split between the two (four each: none holds more than its
    # share), and each engine evaluated the keys of the partitions it holds.
    assert len(held_a) == len(held_b) == 4
    assert not held_a & held_b
    mine_a = [k for k in keys if partition_of(k, 8) in held_a]
    assert evaluations(ma, "shared") == 2 * len(mine_a)
    assert evaluations(mb, "shared") == 2 * (len(keys) - len(mine_a))


async def test_a_starting_engine_resumes_from_the_changes_not_acknowledged() -> None:
    seen: Counter[tuple[str, int]] = Counter()
    wf = watcher("resume", seen)
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    async with TestEngine(wf, clock=clock, backend=backend) as te:
        await put(backend, ["ent.a", "ent.b", "ent.c"])
        await te.settle()
    assert sorted(seen) == [("ent.a", 1), ("ent.b", 2), ("ent.c", 3)]
    # Written while no engine runs: the next one takes these changes up, and only them.
    await put(backend, ["ent.b", "ent.d"], level=2)
    async with TestEngine(wf, clock=clock, backend=backend) as te:
        await te.settle()
    assert sorted(seen) == [("ent.a", 1), ("ent.b", 2), ("ent.b", 4), ("ent.c", 3), ("ent.d", 5)]
    assert set(seen.values()) == {1}


async def test_every_workflow_watching_a_bucket_gets_every_change_with_engines_apart() -> None:
    # Two workflows on one bucket, each served by its own engine (process): each has its
    # own partitions of the bucket, so neither takes the other's changes away.
    seen_one: Counter[tuple[str, int]] = Counter()
    seen_two: Counter[tuple[str, int]] = Counter()
    one, two = watcher("one", seen_one), watcher("two", seen_two)
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    keys = [f"ent.k{i}" for i in range(16)]
    async with (
        TestEngine(one, clock=clock, backend=backend) as a,
        TestEngine(two, clock=clock, backend=backend) as b,
    ):
        await put(backend, keys)
        await settle(a, b)
        assert len(held(a.engine, "one")) == len(held(b.engine, "two")) == 8
    assert seen_one == seen_two == Counter({(k, i + 1): 1 for i, k in enumerate(keys)})


class Counted(ExecutionState):
    step: int = 0


class Counter3(Workflow, id="counter3", state=Counted):
    @rule(watch_kv=True, when=lambda ctx: ctx.state.step < 3, mutate=True)
    def step(self, ctx: RuleContext[Counted, None]) -> None:
        ctx.state.step += 1

    @rule(watch_kv=True, when=lambda ctx: ctx.state.step >= 3, complete=True)
    def done(self, ctx: RuleContext[Counted, None]) -> None: ...


class Dying(MemoryBackend):
    """The engine's process dies in its write of ``step == 2``, once the change it is
    evaluating (``step == 1``, which it committed and evaluates right after) has come back
    to it from its partition."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock=clock)
        self.engine: Engine | None = None
        self.delivered: set[int] = set()
        self.deliveries: list[int] = []  # each message's num_delivered, as taken
        self.died = anyio.Event()

    def consume_partitions(self, bucket: str, partitions: int, **kwargs: Any) -> Any:
        inner = super().consume_partitions(bucket, partitions, **kwargs)
        backend = self

        class Recording:
            async def __aenter__(self) -> Any:
                consumer = await inner.__aenter__()

                class Reader:
                    held = property(lambda _: consumer.held)
                    members = property(lambda _: consumer.members)
                    holds = staticmethod(consumer.holds)

                    def __aiter__(self) -> Any:
                        return self

                    async def __anext__(self) -> Any:
                        msg = await consumer.__anext__()
                        backend.delivered.add(msg.entry.revision)
                        backend.deliveries.append(msg.num_delivered)
                        return msg

                return Reader()

            async def __aexit__(self, *exc: Any) -> Any:
                return await inner.__aexit__(*exc)

        return Recording()

    async def kv_update(
        self, bucket: str, key: str, value: bytes, revision: int, *, ttl: float | None = None
    ) -> int:
        if not self.died.is_set() and self.engine is not None and b'"step":2' in value:
            # The write of step 2, from the evaluation of step 1's revision: wait until
            # step 1's change has come back from the partition, then die.
            with anyio.fail_after(5):
                while revision not in self.delivered:
                    await anyio.sleep(0)
            self.died.set()
            await kill(self.engine)
        return await super().kv_update(bucket, key, value, revision, ttl=ttl)


async def kill(engine: Engine) -> None:
    assert engine._tg is not None
    engine._tg.cancel_scope.cancel()
    await anyio.lowlevel.checkpoint()
    raise AssertionError("a killed engine kept running")


async def test_a_change_evaluated_right_after_its_commit_is_not_lost_with_the_engine() -> None:
    # Its echo from the partition is acknowledged only once that evaluation has completed:
    # an engine that dies in the middle of it leaves the change to the next engine.
    clock = ManualClock()
    backend = Dying(clock)
    a = Engine(backend, [Counter3], clock=clock, instance_id="a", workers=2)
    backend.engine = a
    await a.start()
    await a.start_execution(Counter3, "c1", Counted())
    with anyio.fail_after(5):
        await backend.died.wait()
    await a.stop()
    async with TestEngine(Counter3, clock=clock, backend=backend) as te:
        await te.advance(10)  # (what the dead engine had taken comes again after ack_wait)
        st = te.state(Counter3, "c1")
        assert (st.status, st.step) == (Status.COMPLETED, 3)


COUNTERS = definition_of(Counter3).bucket


class Interfering(Dying):
    """The engine's writes wait for the test (``hold``: the write of ``step == 1`` waits
    until ``go``), or fail (``failing``: every write of an execution's state raises a
    transient failure while it is set)."""

    def __init__(self, clock: ManualClock, *, hold: bool = False, failing: bool = False) -> None:
        super().__init__(clock)
        self.waiting = anyio.Event()
        self.go = anyio.Event()
        if not hold:
            self.go.set()
        self.failing = failing
        self.failures = 0

    async def kv_update(
        self, bucket: str, key: str, value: bytes, revision: int, *, ttl: float | None = None
    ) -> int:
        if self.failing and bucket == COUNTERS:
            self.failures += 1
            raise TransientBackendError(f"update {bucket}/{key}: injected")
        if b'"step":1' in value and not self.go.is_set():
            self.waiting.set()
            await self.go.wait()
        return await MemoryBackend.kv_update(self, bucket, key, value, revision, ttl=ttl)


async def start_c1(engine: Engine, reached: Callable[[], object]) -> None:
    """Start the execution c1, and wait until ``reached()`` (the backend has its write)."""
    await engine.start_execution(Counter3, "c1", Counted())
    with anyio.fail_after(5):
        while not reached():
            await anyio.sleep(0)


async def test_a_live_engine_keeps_the_change_it_works_on_however_long_it_takes() -> None:
    # The change it evaluates is held past twenty ack waits (the engine's write waits):
    # kept in progress (keep_alive), it is not sent again, to this engine or another.
    clock = ManualClock()
    backend = Interfering(clock, hold=True)
    async with Engine(backend, [Counter3], clock=clock, instance_id="a") as a:
        await start_c1(a, backend.waiting.is_set)
        clock.advance(60)
        await anyio.wait_all_tasks_blocked()
        backend.go.set()
        with anyio.fail_after(5):
            st = await a.wait_for(Counter3, "c1")
        assert (st.status, st.step) == (Status.COMPLETED, 3)
    assert backend.deliveries and set(backend.deliveries) == {1}


async def test_a_change_whose_evaluation_fails_is_held_while_retried_then_comes_again() -> None:
    # While this engine retries the key (a try every 2 s at most), the change stays in
    # progress: not sent again however long the failure lasts. Once a try succeeds, the
    # change comes again at once and is evaluated as it is.
    clock = ManualClock()
    backend = Interfering(clock, failing=True)
    async with Engine(backend, [Counter3], clock=clock, instance_id="a") as a:
        await start_c1(a, lambda: backend.failures)
        for _ in range(30):  # 30 s of failing, one second at a time
            clock.advance(1)
            await anyio.wait_all_tasks_blocked()
        assert backend.failures >= 10
        assert set(backend.deliveries) == {1}  # the change was not handed back meanwhile
        backend.failing = False
        clock.advance(2)  # the next try
        with anyio.fail_after(5):
            st = await a.wait_for(Counter3, "c1")
        assert (st.status, st.step) == (Status.COMPLETED, 3)
        with anyio.fail_after(5):
            while 2 not in backend.deliveries:  # the held change, again, after the retry
                await anyio.sleep(0)
    assert max(backend.deliveries) == 2


@pytest.mark.parametrize("ending", ["stops", "dies"])
async def test_an_engine_that_ends_while_retrying_leaves_the_change_to_the_next(
    ending: str,
) -> None:
    # One that stops hands it back at once; one that dies leaves it to come again an ack
    # wait (3 s) after its last sign of life. (Handed back for 6 s, it took 6 s either way.)
    clock = ManualClock()
    backend = Interfering(clock, failing=True)
    a = Engine(backend, [Counter3], clock=clock, instance_id="a")
    await a.start()
    await start_c1(a, lambda: backend.failures)
    clock.advance(0.5)  # a retry or two, still failing
    await anyio.wait_all_tasks_blocked()
    if ending == "dies":
        a.rt.held.clear()  # (what it held dies with it: nothing is settled on the way out)
    await a.stop()
    backend.failing = False
    async with TestEngine(Counter3, clock=clock, backend=backend, instance_id="b") as b:
        await b.settle()
        done = b.state(Counter3, "c1").status == Status.COMPLETED
        assert done == (ending == "stops")  # (the manual clock has not moved)
        await b.advance(3.1)
        st = b.state(Counter3, "c1")
        assert (st.status, st.step) == (Status.COMPLETED, 3)
