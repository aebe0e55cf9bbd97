"""Retention against a real nats-server: a terminal execution and its records leave the buckets
after the workflow's retention (per-key TTLs); running executions stay."""

from __future__ import annotations

from typing import Any

import msgspec
import nats
import pytest
from test_engine_nats import WAIT, dumps, engine_on, eventually, uid

from reactive import ExecutionState, RuleContext, Status, Workflow, rule
from reactive.conditions import phase_is

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


class Order(ExecutionState):
    total: int = 0


class Placed(msgspec.Struct):
    order_id: str
    total: int


def orders_workflow() -> type[Workflow]:
    wid = uid("orders")

    class Orders(Workflow, id=wid, state=Order, retention="1s"):
        @rule(
            on_subject=f"{wid}.placed",
            stream=f"IN_{wid}",
            state_key=lambda m: m.order_id,
            mutate=True,
        )
        def place(self, ctx: RuleContext[Order, Placed]) -> None:
            ctx.state.total = ctx.message.total
            ctx.state.phase = "placed" if ctx.message.total else "held"

        @rule(watch_kv=True, when=phase_is("placed"), publish=f"{wid}.audit")
        def audit(self, ctx: RuleContext[Order, None]) -> dict[str, int]:
            return {"total": ctx.state.total}

        @rule(watch_kv=True, when=phase_is("placed"), complete=True, publish=f"{wid}.done")
        def done(self, ctx: RuleContext[Order, None]) -> None: ...

    return Orders


async def test_a_completed_execution_and_its_records_expire_and_a_running_one_stays(
    nats_url: str,
) -> None:
    flow = orders_workflow()
    d = flow.__reactive__  # type: ignore[attr-defined]
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        async with engine_on(nats_url, [flow]) as engine:
            await js.publish(f"{d.id}.placed", dumps({"order_id": "held", "total": 0}))
            await js.publish(f"{d.id}.placed", dumps({"order_id": "o1", "total": 5}))
            done = await engine.wait_for(flow, "o1", timeout=WAIT)
            assert done.status is Status.COMPLETED
            meta = await js.key_value(engine.meta_bucket)

            async def records_of_o1() -> list[str]:
                keys: list[str] = []
                try:
                    keys = await meta.keys()
                except Exception:  # no keys at all
                    return []
                # (This workflow's: other tests leave records of executions named o1.)
                return [k for k in keys if k.endswith(f"{d.id}.o1")]

            # (That they were there is pinned on the manual clock, tests/unit/test_retention.py:
            # here a slow moment could let them expire before a look.)
            async def gone() -> bool:
                return await engine.get(flow, "o1") is None and not await records_of_o1()

            await eventually(gone, timeout=WAIT, what="o1 and its records expired")
            held: Any = await engine.get(flow, "held")
            assert held is not None and held.status is Status.RUNNING
            assert [s.id for s in await engine.executions(flow)] == ["held"]
    finally:
        await nc.drain()
