"""The engine's Prometheus metrics carry real values after workflows ran."""

from __future__ import annotations

import msgspec
import pytest

from reactive import ExecutionState, RuleContext, Status, Workflow, rule
from reactive.conditions import phase_is
from reactive.runtime.metrics import REGISTRY
from reactive.testing import TestEngine

pytestmark = pytest.mark.anyio


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Job(ExecutionState):
    answer: str = ""


class JobOpened(msgspec.Struct):
    job_id: str


class Ask(msgspec.Struct):
    task_id: str = ""
    execution_id: str = ""


class Answer(msgspec.Struct):
    task_id: str
    answer: str


class Metered(Workflow, id="metered", state=Job, on_complete="metered.done", max_iterations=1):
    @rule(on_subject="metered.open", stream="METERED", state_key=lambda m: m.job_id, mutate=True)
    def open(self, ctx: RuleContext[Job, JobOpened]) -> None:
        ctx.state.phase = "open"

    @rule(watch_kv=True, when=phase_is("open"), publish_async="metered.ask")
    def ask(self, ctx: RuleContext[Job, None]) -> Ask:
        return Ask()

    @ask.on_result
    def answered(self, ctx: RuleContext[Job, None], result: Answer) -> None:
        ctx.state.answer = result.answer
        ctx.state.phase = "again" if result.answer == "again" else "answered"

    @rule(watch_kv=True, when=phase_is("again"), mutate=True)
    def again(self, ctx: RuleContext[Job, None]) -> None:
        ctx.state.iteration += 1
        ctx.state.phase = "open"

    @rule(watch_kv=True, when=phase_is("answered"), complete=True)
    def done(self, ctx: RuleContext[Job, None]) -> None: ...


async def test_metrics_count_evaluations_dispatches_executions_and_callbacks() -> None:
    wf = "metered"
    before = {
        "created": sample("reactive_executions_created_total", workflow=wf),
        "completed": sample("reactive_executions_completed_total", workflow=wf),
        "escalated": sample(
            "reactive_executions_escalated_total", workflow=wf, reason="max_iterations"
        ),
        "fired": sample("reactive_rule_evaluations_total", workflow=wf, rule="done", fired="true"),
        "dispatched": sample(
            "reactive_action_dispatches_total", workflow=wf, rule="ask", action="publish_async"
        ),
        "ok": sample("reactive_callbacks_received_total", workflow=wf, rule="ask", status="ok"),
        "stale": sample("reactive_callbacks_received_total", workflow=wf, rule="", status="stale"),
        "latency": sample("reactive_callback_latency_seconds_count", workflow=wf, rule="ask"),
        "poison": sample("reactive_poison_messages_total", workflow=wf, kind="message"),
        "duration": sample(
            "reactive_execution_duration_seconds_count", workflow=wf, status="completed"
        ),
    }
    async with TestEngine(Metered) as te:
        answers = {"j1": ["yes"], "j2": ["again", "again"]}
        te.respond("metered.ask", lambda req: {"answer": answers[req["execution_id"]].pop(0)})
        await te.trigger_message("metered.open", JobOpened(job_id="j1"))
        await te.trigger_message("metered.open", JobOpened(job_id="j2"))
        await te.trigger_message("metered.open", b"{not json")
        te.assert_status(Metered, "j1", Status.COMPLETED)
        te.assert_status(Metered, "j2", Status.ESCALATED)
        await te.callback(Metered, "j1", {"answer": "late"}, task_id="nope")

    def delta(key: str, value: float) -> float:
        return value - before[key]

    assert delta("created", sample("reactive_executions_created_total", workflow=wf)) == 2
    assert delta("completed", sample("reactive_executions_completed_total", workflow=wf)) == 1
    assert (
        delta(
            "escalated",
            sample("reactive_executions_escalated_total", workflow=wf, reason="max_iterations"),
        )
        == 1
    )
    assert (
        delta(
            "fired",
            sample("reactive_rule_evaluations_total", workflow=wf, rule="done", fired="true"),
        )
        == 1
    )
    assert (
        delta(
            "dispatched",
            sample(
                "reactive_action_dispatches_total", workflow=wf, rule="ask", action="publish_async"
            ),
        )
        == 3
    )
    assert (
        delta(
            "ok", sample("reactive_callbacks_received_total", workflow=wf, rule="ask", status="ok")
        )
        == 3
    )
    assert (
        delta(
            "stale",
            sample("reactive_callbacks_received_total", workflow=wf, rule="", status="stale"),
        )
        == 1
    )
    assert (
        delta("latency", sample("reactive_callback_latency_seconds_count", workflow=wf, rule="ask"))
        == 3
    )
    assert (
        delta("poison", sample("reactive_poison_messages_total", workflow=wf, kind="message")) == 1
    )
    assert (
        delta(
            "duration",
            sample("reactive_execution_duration_seconds_count", workflow=wf, status="completed"),
        )
        == 1
    )
    assert sample("reactive_pending_callbacks", workflow=wf) == 0
    assert sample("reactive_rule_duration_seconds_count", workflow=wf, rule="ask") >= 3


@pytest.mark.parametrize(
    "amounts", [[0.0], [0.00005, 0.0001, 0.0003, 0.7, 2.0, 1e9], [5.0, 5.0, 0.01, 0.0101]]
)
def test_lock_free_handles_write_what_prometheus_client_would(amounts: list[float]) -> None:
    from prometheus_client import CollectorRegistry

    from reactive.runtime.metrics import EngineMetrics, fast_child

    def samples(m: EngineMetrics) -> list[tuple[str, list[tuple[str, str]], float]]:
        return sorted(
            (s.name, sorted(s.labels.items()), s.value)
            for metric in (m.rule_duration, m.rule_evaluations, m.pending_callbacks)
            for family in metric.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        )

    plain, fast = EngineMetrics(CollectorRegistry()), EngineMetrics(CollectorRegistry())
    for m, wrap in ((plain, False), (fast, True)):

        def child(metric: object, *labels: str, m: EngineMetrics = m, wrap: bool = wrap) -> object:
            c = metric.labels(*labels)  # type: ignore[attr-defined]
            return fast_child(metric, c) if wrap else c

        for a in amounts:
            child(m.rule_duration, "wf", "r").observe(a)  # type: ignore[attr-defined]
            child(m.rule_evaluations, "wf", "r", "true").inc()  # type: ignore[attr-defined]
            child(m.pending_callbacks, "wf").inc()  # type: ignore[attr-defined]
        child(m.pending_callbacks, "wf").dec()  # type: ignore[attr-defined]
    assert type(fast_child(fast.rule_duration, fast.rule_duration.labels("wf", "r"))).__name__ == (
        "_FastHistogram"
    )
    assert samples(fast) == samples(plain)
