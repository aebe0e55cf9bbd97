"""Child workflows against a real nats-server: the parent's engine and the child's are two
processes' worth of engines (each serves one of the workflows); the child's end is the
parent's task answer, and cancelling the parent cancels the child."""

from __future__ import annotations

import msgspec
import pytest
from nats.aio.client import Client
from test_engine_nats import engine_on, eventually, uid

from reactive import (
    ExecutionState,
    RuleContext,
    Status,
    TaskFailure,
    Workflow,
    rule,
    when_cancelled,
)
from reactive.conditions import phase_is
from reactive.dsl.workflow import definition_of

pytestmark = pytest.mark.anyio


class Shipment(ExecutionState):
    order: str = ""
    hold: bool = False
    tracking: str = ""
    released: bool = False


class Order(ExecutionState):
    hold: bool = False
    tracking: str = ""
    why: str = ""


def workflows() -> tuple[type[Workflow], type[Workflow]]:
    child_id, parent_id = uid("ship"), uid("order")

    class Ship(Workflow, id=child_id, state=Shipment):
        @rule(watch_kv=True, when=phase_is(""), mutate=True)
        def book(self, ctx: RuleContext[Shipment, None]) -> None:
            if ctx.state.hold:
                ctx.state.phase = "held"  # until cancelled
            else:
                ctx.state.phase, ctx.state.tracking = "booked", f"T-{ctx.state.order}"

        @rule(watch_kv=True, when=phase_is("booked"), complete=True)
        def done(self, ctx: RuleContext[Shipment, None]) -> None: ...

        @when_cancelled
        def release(self, ctx: RuleContext[Shipment, None], reason: str) -> None:
            ctx.state.released = True
            ctx.state.cancel(reason)

    class Orders(Workflow, id=parent_id, state=Order):
        @rule(watch_kv=True, when=phase_is("shipping"), child=Ship, timeout="1h")
        def ship(self, ctx: RuleContext[Order, None]) -> Shipment:
            return Shipment(order=ctx.execution_id, hold=ctx.state.hold)

        @ship.on_result
        def shipped(self, ctx: RuleContext[Order, None], result: Shipment) -> None:
            ctx.state.phase, ctx.state.tracking = "shipped", result.tracking

        @ship.on_error
        def not_shipped(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
            ctx.state.phase, ctx.state.why = "refund", failure.message

        @rule(watch_kv=True, when=phase_is("shipped"), complete=True)
        def done(self, ctx: RuleContext[Order, None]) -> None: ...

    return Orders, Ship


async def test_a_child_on_another_engine_answers_and_is_cancelled_with_its_parent(
    nats_url: str, nc: Client
) -> None:
    orders, ship = workflows()
    parent_bucket, child_bucket = definition_of(orders).bucket, definition_of(ship).bucket
    async with engine_on(nats_url, [ship]) as child_engine, engine_on(nats_url, [orders]) as parent:
        await parent.start_execution(orders, "o1", Order(phase="shipping"))
        await parent.start_execution(orders, "o2", Order(phase="shipping", hold=True))

        async def state(bucket: str, key: str, t: type[ExecutionState]) -> object:
            entry = await parent.backend.kv_get(bucket, key)
            return None if entry is None else msgspec.json.decode(entry.value, type=t)

        async def done_o1() -> Order | None:
            st = await state(parent_bucket, f"{definition_of(orders).id}.o1", Order)
            return st if isinstance(st, Order) and st.status is Status.COMPLETED else None

        o1 = await eventually(done_o1, what="o1 shipped by its child")
        assert o1.tracking == "T-o1"

        async def held_child() -> Shipment | None:
            keys = await child_engine.backend.kv_keys(child_bucket)
            for key in keys:
                st = await state(child_bucket, key, Shipment)
                if isinstance(st, Shipment) and st.order == "o2" and st.phase == "held":
                    return st
            return None

        child = await eventually(held_child, what="o2's child held")
        assert child.parent is not None and child.parent.id == "o2"
        await parent.cancel(orders, "o2", "customer changed their mind")

        async def released() -> Shipment | None:
            st = await state(child_bucket, f"{definition_of(ship).id}.{child.id}", Shipment)
            return st if isinstance(st, Shipment) and st.status is Status.CANCELLED else None

        ended = await eventually(released, what="o2's child cancelled")
        assert ended.released
        assert ended.error == f"parent {definition_of(orders).id}.o2: customer changed their mind"
        o2 = await state(parent_bucket, f"{definition_of(orders).id}.o2", Order)
        assert isinstance(o2, Order) and o2.status is Status.CANCELLED
