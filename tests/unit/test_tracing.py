"""Trace context across an async round trip: one execution, one trace."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_trace_id

from reactive import ExecutionState, RuleContext, Status, Workflow, rule
from reactive.conditions import phase_is
from reactive.testing import TestEngine

pytestmark = pytest.mark.anyio


class Order(ExecutionState):
    item: str = ""
    paid: bool = False


class OrderPlaced(msgspec.Struct):
    order_id: str
    item: str


class Charge(msgspec.Struct):
    item: str
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class Charged(msgspec.Struct):
    task_id: str
    ok: bool


class Checkout(Workflow, id="checkout", state=Order, on_complete="orders.done"):
    @rule(on_subject="orders.placed", state_key=lambda m: m.order_id, mutate=True)
    def place(self, ctx: RuleContext[Order, OrderPlaced]) -> None:
        ctx.state.item = ctx.message.item
        ctx.state.phase = "placed"

    @rule(watch_kv=True, when=phase_is("placed"), publish_async="payments.charge")
    def charge(self, ctx: RuleContext[Order, None]) -> Charge:
        return Charge(item=ctx.state.item)

    @charge.on_result
    def charged(self, ctx: RuleContext[Order, None], result: Charged) -> None:
        ctx.state.paid = result.ok
        ctx.state.phase = "paid"

    @rule(watch_kv=True, when=phase_is("paid"), complete=True)
    def done(self, ctx: RuleContext[Order, None]) -> None: ...


def _tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


SENDER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SENDER = f"00-{SENDER_TRACE}-00f067aa0ba902b7-01"


async def test_one_execution_forms_one_trace_across_an_async_round_trip() -> None:
    provider, exporter = _tracing()
    async with TestEngine(Checkout, tracer_provider=provider) as te:
        # The worker does not pass the trace context on: the callback still joins the trace.
        te.respond("payments.charge", lambda req: {"ok": True})
        await te.trigger_message(
            "orders.placed",
            OrderPlaced(order_id="o1", item="book"),
            headers={"traceparent": SENDER},
        )
        te.assert_status(Checkout, "o1", Status.COMPLETED)
        request = te.published_messages("payments.charge")[0]
        event = te.published_messages("orders.done")[0]

    spans = exporter.get_finished_spans()
    names = {s.name for s in spans}
    assert {
        "reactive.message",
        "reactive.kv",
        "reactive.evaluate",
        "reactive.dispatch",
        "reactive.callback",
    } <= names
    # Every span of the execution belongs to the sender's trace.
    assert {format_trace_id(s.context.trace_id) for s in spans} == {SENDER_TRACE}
    # The request and the lifecycle event carry it on to other services.
    assert request.headers["traceparent"].split("-")[1] == SENDER_TRACE
    assert event.headers["traceparent"].split("-")[1] == SENDER_TRACE
    # Evaluation and dispatch are children of the trigger spans.
    by_id = {s.context.span_id: s for s in spans}
    for s in spans:
        if s.name in ("reactive.evaluate", "reactive.dispatch"):
            assert s.parent is not None and by_id[s.parent.span_id].name.startswith("reactive.")


async def test_callback_continues_the_worker_span_when_the_worker_propagates() -> None:
    provider, exporter = _tracing()
    worker_span = "00-{trace}-1111111111111111-01"
    async with TestEngine(Checkout, tracer_provider=provider) as te:
        await te.trigger_message("orders.placed", OrderPlaced(order_id="o2", item="pen"))
        request = te.published_messages("payments.charge")[0]
        trace_id = request.headers["traceparent"].split("-")[1]
        st = te.state(Checkout, "o2")
        body: dict[str, Any] = {"task_id": st.pending_task_id, "ok": True}
        await te.backend.publish(
            request.headers["Reactive-Callback-Subject"],
            msgspec.json.encode(body),
            headers={"traceparent": worker_span.format(trace=trace_id)},
        )
        await te.settle()
        te.assert_status(Checkout, "o2", Status.COMPLETED)

    callback = next(s for s in exporter.get_finished_spans() if s.name == "reactive.callback")
    assert format_trace_id(callback.context.trace_id) == trace_id
    assert callback.parent is not None and callback.parent.span_id == 0x1111111111111111


async def test_tracing_is_off_without_a_tracer_provider() -> None:
    async with TestEngine(Checkout) as te:
        te.respond("payments.charge", lambda req: {"ok": True})
        await te.trigger_message("orders.placed", OrderPlaced(order_id="o3", item="cup"))
        te.assert_status(Checkout, "o3", Status.COMPLETED)
        assert not te.engine.tracing.enabled
        assert "traceparent" not in te.published_messages("payments.charge")[0].headers
        assert te.state(Checkout, "o3").trace_parent == ""


def _configure_in_subprocess(env: dict[str, str]) -> str:
    import os
    import subprocess
    import sys

    code = (
        "from reactive.runtime.tracing import configure_from_env, tracing_configured\n"
        "from opentelemetry import trace\n"
        "on = configure_from_env()\n"
        "print(on, tracing_configured(), type(trace.get_tracer_provider()).__name__)\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_otel_variables_turn_on_otlp_and_nothing_is_exported_without_them() -> None:
    assert _configure_in_subprocess({}) == "False False ProxyTracerProvider"
    assert (
        _configure_in_subprocess({"OTEL_TRACES_EXPORTER": "none"})
        == "False False ProxyTracerProvider"
    )
    assert (
        _configure_in_subprocess({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
        == "True True TracerProvider"
    )
    assert (
        _configure_in_subprocess({"OTEL_TRACES_EXPORTER": "console"}) == "True True TracerProvider"
    )
