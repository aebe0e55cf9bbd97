"""A failed or late task handled by the workflow, against a real nats-server: a worker's
error reaches ``on_error``, and a task that gets no answer reaches ``on_timeout`` after
the rule's own timeout (a message schedule in NATS), each compensating."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from test_engine_nats import Responder, engine_on, uid

from reactive import ExecutionState, RuleContext, Status, TaskFailure, Workflow, rule
from reactive.conditions import phase_in, phase_is
from reactive.dsl.workflow import definition_of

pytestmark = pytest.mark.anyio


class Order(ExecutionState):
    why: str = ""


class Charged(msgspec.Struct):
    receipt: str
    task_id: str = ""


def saga(timeout: str) -> type[Workflow]:
    wid = uid("saga")

    class Saga(Workflow, id=wid, state=Order, task_timeout="1h"):
        @rule(
            watch_kv=True,
            when=phase_is("charging"),
            publish_async=f"{wid}.charge",
            timeout=timeout,
        )
        def charge(self, ctx: RuleContext[Order, None]) -> dict[str, str]:
            return {"order": ctx.execution_id}

        @charge.on_result
        def charged(self, ctx: RuleContext[Order, None], result: Charged) -> None:
            ctx.state.phase = "charged"

        @charge.on_error
        def declined(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
            ctx.state.phase, ctx.state.why = "releasing", f"{failure.kind}: {failure.message}"

        @charge.on_timeout
        def too_slow(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
            ctx.state.phase, ctx.state.why = "releasing", f"{failure.kind}: {failure.message}"

        @rule(watch_kv=True, when=phase_is("releasing"), mutate=True)
        def release(self, ctx: RuleContext[Order, None]) -> None:
            ctx.state.phase = "released"

        @rule(watch_kv=True, when=phase_in("charged", "released"), complete=True)
        def done(self, ctx: RuleContext[Order, None]) -> None: ...

    return Saga


async def run(nats_url: str, nc: Client, flow: type[Workflow], orders: list[str]) -> list[Order]:
    wid = definition_of(flow).id

    def answer(req: dict[str, Any]) -> dict[str, Any] | None:
        if req["order"] == "declined":
            return {"error": "card declined"}
        if req["order"] == "paid":
            return {"receipt": "r1"}
        return None  # "silent": no answer, the rule's timeout comes

    await Responder(nc, f"{wid}.charge", answer).start()
    async with engine_on(nats_url, [flow]) as engine:
        for order in orders:
            await engine.start_execution(flow, order, Order(phase="charging"))
        return [await engine.wait_for(flow, order, timeout=20) for order in orders]


async def test_a_workers_error_reaches_on_error_on_nats(nats_url: str, nc: Client) -> None:
    # (The rule's timeout is an hour: the answers come first, however slow the machine.)
    declined, paid = await run(nats_url, nc, saga("1h"), ["declined", "paid"])
    assert (declined.status, declined.phase) == (Status.COMPLETED, "released")
    assert declined.why == "error: card declined"
    assert (paid.status, paid.phase) == (Status.COMPLETED, "charged")


async def test_a_task_with_no_answer_reaches_on_timeout_on_nats(nats_url: str, nc: Client) -> None:
    # The rule's own timeout (1 s; the workflow's is an hour) is a schedule in NATS.
    [silent] = await run(nats_url, nc, saga("1s"), ["silent"])
    assert (silent.status, silent.phase) == (Status.COMPLETED, "released")
    assert silent.why == "timeout: no callback within 1s"
