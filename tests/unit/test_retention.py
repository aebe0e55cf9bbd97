"""Retention: a terminal execution leaves its bucket after its workflow's ``retention``, with
the meta bucket's records about it; nothing else expires. On the manual clock."""

from __future__ import annotations

import msgspec
import pytest

from reactive import (
    DefinitionError,
    ExecutionState,
    MemoryBackend,
    RuleContext,
    Status,
    Workflow,
    rule,
)
from reactive.clock import ManualClock
from reactive.conditions import phase_is
from reactive.testing import TestEngine

pytestmark = pytest.mark.anyio

HOUR = 3600.0


class Order(ExecutionState):
    total: int = 0


class Placed(msgspec.Struct):
    order_id: str
    total: int


class Orders(Workflow, id="orders", state=Order, retention="1h", on_complete="orders.done"):
    @rule(on_subject="orders.placed", state_key=lambda m: m.order_id, mutate=True)
    def place(self, ctx: RuleContext[Order, Placed]) -> None:
        ctx.state.total = ctx.message.total
        ctx.state.phase = "placed" if ctx.message.total else "held"

    @rule(watch_kv=True, when=phase_is("placed"), publish="orders.audit")
    def audit(self, ctx: RuleContext[Order, None]) -> dict[str, int]:
        return {"total": ctx.state.total}

    @rule(watch_kv=True, when=phase_is("placed"), complete=True)
    def done(self, ctx: RuleContext[Order, None]) -> None: ...


class Kept(Workflow, id="kept", state=Order):
    @rule(on_subject="kept.placed", state_key=lambda m: m.order_id, complete=True)
    def place(self, ctx: RuleContext[Order, Placed]) -> None: ...


def meta_keys(te: TestEngine) -> list[str]:
    return te.backend.peek_keys("REACTIVE_META", "fire.>") + te.backend.peek_keys(
        "REACTIVE_META", "out.>"
    )


async def test_a_terminal_execution_and_its_records_leave_after_the_retention() -> None:
    async with TestEngine(Orders, Kept) as te:
        await te.trigger_message("orders.placed", Placed(order_id="o1", total=5))
        await te.trigger_message("orders.placed", Placed(order_id="o2", total=0))  # stays running
        await te.trigger_message("kept.placed", Placed(order_id="k1", total=1))
        te.assert_status(Orders, "o1", Status.COMPLETED)
        te.assert_published("orders.audit", count=1)
        assert [k for k in meta_keys(te) if "o1" in k]  # its claim and its outbox marker
        await te.advance(HOUR - 1)
        assert te.state(Orders, "o1") is not None  # found until then
        assert [s.id for s in await te.engine.executions(Orders)] == ["o1", "o2"]
        await te.advance(2)
        assert te.state(Orders, "o1") is None
        assert await te.engine.get(Orders, "o1") is None
        assert [k for k in meta_keys(te) if "o1" in k] == []
        # A running execution, and a workflow without retention, stay.
        await te.advance(10 * HOUR)
        te.assert_status(Orders, "o2", Status.RUNNING)
        te.assert_status(Kept, "k1", Status.COMPLETED)
        assert [s.id for s in await te.engine.executions(Orders)] == ["o2"]


async def test_an_expired_key_reads_as_missing_and_is_not_watched_as_deleted() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    await backend.ensure_bucket("B")
    async with backend.kv_watch("B") as entries:
        await backend.kv_put("B", "a", b"1", ttl=10)
        rev = await backend.kv_put("B", "b", b"1", ttl=10)
        await backend.kv_update("B", "b", b"2", rev)  # written again without a TTL: it stays
        await backend.kv_put("B", "c", b"1", ttl=0.2)  # at least a second, as on NATS
        clock.advance(1.0)
        assert await backend.kv_keys("B") == ["a", "b"]
        clock.advance(8.9)
        assert await backend.kv_get("B", "a") is not None
        clock.advance(0.1)
        assert await backend.kv_get("B", "a") is None
        assert await backend.kv_keys("B") == ["b"]
        # Gone, and free to create again (no delete marker left).
        await backend.kv_create("B", "a", b"again")
        await backend.kv_put("B", "end", b"")
        seen = []
        async for entry in entries:
            seen.append((entry.key, entry.operation))
            if entry.key == "end":
                break
    assert seen == [
        ("a", "PUT"),
        ("b", "PUT"),
        ("b", "PUT"),
        ("c", "PUT"),
        ("a", "PUT"),
        ("end", "PUT"),
    ]


def test_retention_is_a_positive_duration() -> None:
    with pytest.raises(DefinitionError, match="retention"):

        class Bad(Workflow, id="bad-retention", retention="-1s"):
            @rule(watch_kv=True, mutate=True)
            def step(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

    assert Orders.__reactive__.retention == HOUR
    assert Kept.__reactive__.retention is None
