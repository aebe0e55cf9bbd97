"""Engines share the work through the server's partitioned consumers, against a real
nats-server: once the partitions are split, each change goes to the one engine holding its
key's partition; a starting engine resumes from the changes not acknowledged; an engine
that leaves hands its partitions over at once."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest
from nats.aio.client import Client
from prometheus_client import CollectorRegistry
from test_engine_nats import engine_on, eventually, uid

from reactive import Engine, RuleContext, Workflow, rule
from reactive.backends.partitions import partition_of
from reactive.conditions import condition
from reactive.runtime.metrics import EngineMetrics

pytestmark = pytest.mark.anyio


def watcher(seen: Counter[tuple[str, int]]) -> tuple[type[Workflow], str]:
    """A workflow that records each revision of each ``ent.>`` key of its bucket it evaluates."""
    wid = uid("part")
    bucket = f"ENT_{wid}"

    @condition
    def record(ctx: RuleContext[Any, Any]) -> bool:
        seen[(ctx.key, ctx.revision)] += 1
        return False

    class Watcher(Workflow, id=wid):
        @rule(watch_kv="ent.>", bucket=bucket, when=record, publish="never")
        def alert(self, ctx: RuleContext[Any, None]) -> None:
            return None

    return Watcher, bucket


def held(engine: Engine, workflow: type[Workflow], bucket: str) -> frozenset[int]:
    found = engine.triggers.partitions.get((workflow.__reactive__.id, bucket))  # type: ignore[attr-defined]
    return found[0].held if found else frozenset()


async def split(
    a: Engine, b: Engine, flow: type[Workflow], bucket: str, kv: Any, written: dict[str, int]
) -> bool:
    """Whether a and b hold four partitions each; if not, a change of every key (the server
    pins a partition when it has something to deliver on it), its revision in ``written``."""
    if len(held(a, flow, bucket)) == len(held(b, flow, bucket)) == 4:
        return True
    for i in range(64):
        written[f"ent.k{i}"] = await kv.put(f"ent.k{i}", b"{}")
    await anyio.sleep(0.05)
    return False


def evaluations(metrics: EngineMetrics, workflow: type[Workflow]) -> float:
    wid = workflow.__reactive__.id  # type: ignore[attr-defined]
    return metrics.rule_evaluations.labels(wid, "alert", "false")._value.get()


async def test_two_engines_split_the_partitions_and_evaluate_each_change_once(
    nats_url: str, nc: Client
) -> None:
    seen: Counter[tuple[str, int]] = Counter()
    flow, bucket = watcher(seen)
    kv = None
    ma, mb = EngineMetrics(CollectorRegistry()), EngineMetrics(CollectorRegistry())
    keys = [f"ent.k{i}" for i in range(64)]
    async with (
        # (Long ack wait and pin timeout: a stalled process must not move what it holds.)
        engine_on(nats_url, [flow], metrics=ma, ack_wait=30.0, pin_timeout=60.0) as a,
        engine_on(nats_url, [flow], metrics=mb, ack_wait=30.0, pin_timeout=60.0) as b,
    ):
        kv = await nc.jetstream().key_value(bucket)
        # Changes until the two hold four partitions each (none holds more than its share).
        written: dict[str, int] = {}
        await eventually(
            lambda: split(a, b, flow, bucket, kv, written), what="four partitions each"
        )
        await eventually(
            lambda: all(change in seen for change in written.items()),
            what="the changes so far evaluated",
        )
        seen.clear()
        before_a, before_b = evaluations(ma, flow), evaluations(mb, flow)
        held_a, held_b = held(a, flow, bucket), held(b, flow, bucket)
        # With the partitions split, each change goes to one engine: the holder of its key's.
        revisions = {key: await kv.put(key, b"{}") for key in keys}
        await eventually(lambda: len(seen) == len(keys), what="the second round evaluated")
        assert (held(a, flow, bucket), held(b, flow, bucket)) == (held_a, held_b)
    assert sorted(seen) == sorted(revisions.items())
    assert set(seen.values()) == {1}
    mine_a = sum(partition_of(k, 8) in held_a for k in keys)
    assert evaluations(ma, flow) - before_a == mine_a
    assert evaluations(mb, flow) - before_b == len(keys) - mine_a


async def test_a_starting_engine_resumes_from_the_changes_not_acknowledged(
    nats_url: str, nc: Client
) -> None:
    seen: Counter[tuple[str, int]] = Counter()
    flow, bucket = watcher(seen)
    async with engine_on(nats_url, [flow]) as engine:
        kv = await nc.jetstream().key_value(bucket)
        first = {key: await kv.put(key, b"{}") for key in ("ent.a", "ent.b", "ent.c")}
        await eventually(lambda: len(seen) == 3, what="three evaluated")
        # (Acknowledged before it stops: a change in hand at the stop is handed back.)
        await eventually(lambda: engine.idle, what="the engine done with what it took")
    # Written while no engine runs: the next one takes these changes up, and only them.
    later = {key: await kv.put(key, b"{}") for key in ("ent.b", "ent.d")}
    async with engine_on(nats_url, [flow]):
        await eventually(lambda: len(seen) == 5, what="the two new changes evaluated")
    assert sorted(seen) == sorted([*first.items(), *later.items()])
    assert set(seen.values()) == {1}


async def test_an_engine_that_stops_hands_its_partitions_over_at_once(
    nats_url: str, nc: Client
) -> None:
    # pin_timeout of an hour: only the leaving engine's giving its partitions up (not
    # the server's timeout) can move them within the test's wait.
    seen: Counter[tuple[str, int]] = Counter()
    flow, bucket = watcher(seen)
    keys = [f"ent.k{i}" for i in range(64)]
    async with engine_on(nats_url, [flow], pin_timeout=3600.0) as a:
        kv = await nc.jetstream().key_value(bucket)
        async with engine_on(nats_url, [flow], pin_timeout=3600.0) as b:
            await eventually(lambda: split(a, b, flow, bucket, kv, {}), what="four partitions each")
        # b is gone: a takes every partition, and every change comes to it.
        revisions = {key: await kv.put(key, b"{}") for key in keys}
        await eventually(lambda: len(held(a, flow, bucket)) == 8, what="a holds all eight")
        await eventually(
            lambda: all((k, r) in seen for k, r in revisions.items()),
            what="every later change evaluated",
        )
