"""Bounded input: ids and keys too long for NATS subjects, states larger than the max payload.

Each case ends clearly (refused, terminated, skipped or failed; counted and logged)
and leaves every other execution running.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from reactive import (
    Engine,
    ExecutionState,
    InvalidExecutionId,
    MemoryBackend,
    ReactiveError,
    RuleContext,
    Status,
    Workflow,
    WorkflowFailureEvent,
    rule,
)
from reactive.conditions import phase_is
from reactive.errors import PayloadTooLargeError
from reactive.runtime.metrics import EngineMetrics
from reactive.subjects import MAX_EXECUTION_ID_LENGTH, MAX_KEY_LENGTH
from reactive.testing import TestEngine

pytestmark = pytest.mark.anyio

MB = 1024 * 1024


def count(counter: Any, *labels: str) -> float:
    return float(counter.labels(*labels)._value.get())


class Doc(ExecutionState):
    text: str = ""
    size: int = 0
    summary: str = ""


class Upload(msgspec.Struct):
    doc_id: str
    size: int = 0


class SummaryRequest(msgspec.Struct):
    text: str
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class Summary(msgspec.Struct):
    task_id: str
    summary: str


class Docs(Workflow, id="docs", state=Doc, on_fail="docs.failed"):
    """Uploads grow a document to the size they ask for; a worker summarizes it."""

    @rule(on_subject="docs.upload", state_key=lambda m: m.doc_id, mutate=True)
    def upload(self, ctx: RuleContext[Doc, Upload]) -> None:
        ctx.state.size = ctx.message.size
        ctx.state.phase = "uploaded"

    @rule(watch_kv=True, when=phase_is("uploaded"), mutate=True)
    def grow(self, ctx: RuleContext[Doc, None]) -> None:
        ctx.state.text = "x" * ctx.state.size
        ctx.state.phase = "grown"

    @rule(watch_kv=True, when=phase_is("grown"), publish_async="docs.summarize")
    def summarize(self, ctx: RuleContext[Doc, None]) -> SummaryRequest:
        return SummaryRequest(text=ctx.state.text)

    @summarize.on_result
    def summarized(self, ctx: RuleContext[Doc, None], result: Summary) -> None:
        ctx.state.summary = result.summary
        ctx.state.phase = "summarized"

    @rule(watch_kv=True, when=phase_is("summarized"), complete=True)
    def done(self, ctx: RuleContext[Doc, None]) -> None: ...


class Entity(msgspec.Struct):
    level: int = 0


class Watcher(Workflow, id="watcher"):
    """Publishes an alert for every entity key written to a bucket it only watches."""

    @rule(watch_kv="ent.>", bucket="ENTITIES", publish="alerts.level")
    def alert(self, ctx: RuleContext[Any, None]) -> dict[str, str]:
        return {"key": ctx.key}


# --------------------------------------------------------------------------- ids and keys


async def test_execution_id_longer_than_the_limit_is_terminated_counted_and_the_rest_goes_on(
    metrics: EngineMetrics,
) -> None:
    async with TestEngine(Docs, metrics=metrics) as te:
        te.respond("docs.summarize", lambda req: {"summary": "s"})
        await te.trigger_message("docs.upload", Upload(doc_id="d" * 4096, size=1))
        await te.trigger_message("docs.upload", Upload(doc_id="d" * (MAX_EXECUTION_ID_LENGTH + 1)))
        assert count(metrics.invalid_ids, "docs") == 2
        assert te.executions(Docs) == []
        longest = "d" * MAX_EXECUTION_ID_LENGTH
        await te.trigger_message("docs.upload", Upload(doc_id=longest, size=1))
        te.assert_status(Docs, longest, Status.COMPLETED)
        assert count(metrics.invalid_ids, "docs") == 2


async def test_starting_an_execution_with_a_too_long_id_is_refused_naming_the_limit() -> None:
    async with TestEngine(Docs) as te:
        with pytest.raises(InvalidExecutionId, match=f"longer than {MAX_EXECUTION_ID_LENGTH}"):
            await te.start(Docs, "x" * 5000)
        with pytest.raises(InvalidExecutionId) as info:
            await te.start(Docs, "x" * 5000)
        assert len(str(info.value)) < 300  # the id is not repeated whole in the message
        assert te.executions(Docs) == []


async def test_watched_key_longer_than_the_limit_is_skipped_counted_and_others_fire(
    metrics: EngineMetrics,
) -> None:
    async with TestEngine(Watcher, metrics=metrics) as te:
        long_key = "ent." + "k" * MAX_KEY_LENGTH
        await te.put("ENTITIES", long_key, Entity(level=1))
        assert count(metrics.invalid_keys, "ENTITIES") == 1
        te.assert_not_published("alerts.level")
        await te.put("ENTITIES", "ent.ok", Entity(level=2))
        assert [p["key"] for p in te.published("alerts.level")] == ["ent.ok"]
        # Skipped is done with: a restart resumes from the changes not acknowledged, and
        # the long key's is not among them. Nothing else changes.
        await te.restart()
        assert count(metrics.invalid_keys, "ENTITIES") == 1
        assert [p["key"] for p in te.published("alerts.level")] == ["ent.ok"]


async def test_backend_refuses_keys_and_subjects_that_nats_could_not_carry() -> None:
    backend = MemoryBackend()
    await backend.ensure_bucket("B")
    with pytest.raises(ValueError, match="longer than"):
        await backend.kv_put("B", "k" * 5000, b"v")
    with pytest.raises(ValueError, match="longer than"):
        await backend.kv_get("B", "k" * 5000)
    with pytest.raises(ValueError, match="longer than"):
        await backend.publish("s" * 5000, b"")


def test_workflow_whose_names_make_subjects_too_long_is_refused_at_registration() -> None:
    class Wordy(Workflow, id="w" * 1500, bucket="B" * 200):
        @rule(watch_kv=True, mutate=True)
        def step(self, ctx: RuleContext[ExecutionState, None]) -> None: ...

    with pytest.raises(ReactiveError, match="too long"):
        Engine(MemoryBackend(), [Wordy])


# --------------------------------------------------------------------------- state size


async def test_a_request_carrying_a_large_field_is_stored_once_as_json_not_in_base64() -> None:
    # 480 kB of text in the state and again in the request's outbox: 960 kB as JSON
    # fits the 1 MiB max payload; in base64 the outbox copy alone would be 640 kB.
    async with TestEngine(Docs) as te:
        requests: list[int] = []

        def worker(req: dict[str, Any]) -> dict[str, str]:
            requests.append(len(req["text"]))
            return {"summary": "long"}

        te.respond("docs.summarize", worker)
        await te.trigger_message("docs.upload", Upload(doc_id="big", size=480_000))
        te.assert_status(Docs, "big", Status.COMPLETED)
        assert requests == [480_000]


async def test_a_transition_whose_state_exceeds_the_max_payload_fails_the_execution(
    metrics: EngineMetrics,
) -> None:
    async with TestEngine(Docs, metrics=metrics) as te:
        te.respond("docs.summarize", lambda req: {"summary": "s"})
        await te.trigger_message("docs.upload", Upload(doc_id="huge", size=2 * MB))
        st = te.state(Docs, "huge")
        assert st.status is Status.FAILED
        assert "larger than" in st.error and "bytes" in st.error
        assert st.phase == "uploaded"  # where the transition that grew too large started
        assert st.text == ""
        assert st.timeline[-1].rule_id == "grow"
        assert count(metrics.executions_failed, "docs", "state_too_large") == 1
        [event] = te.published("docs.failed", WorkflowFailureEvent)
        assert event.execution_id == "huge" and "larger than" in event.error
        # The rest goes on.
        await te.trigger_message("docs.upload", Upload(doc_id="small", size=10))
        te.assert_status(Docs, "small", Status.COMPLETED)


async def test_a_request_that_makes_the_state_too_large_fails_it_before_anything_is_sent(
    metrics: EngineMetrics,
) -> None:
    # 700 kB fits as state; with its request in the outbox it would be 1.4 MB.
    async with TestEngine(Docs, metrics=metrics) as te:
        te.respond("docs.summarize", lambda req: {"summary": "s"})
        await te.trigger_message("docs.upload", Upload(doc_id="twice", size=700_000))
        st = te.state(Docs, "twice")
        assert st.status is Status.FAILED
        assert st.phase == "grown" and len(st.text) == 700_000
        assert st.timeline[-1].rule_id == "summarize"
        te.assert_not_published("docs.summarize")
        assert count(metrics.executions_failed, "docs", "state_too_large") == 1


class Notes(ExecutionState):
    notes: str = ""


class Note(msgspec.Struct):
    task_id: str
    text: str


class Noting(Workflow, id="noting", state=Notes):
    @rule(watch_kv=True, when=phase_is("ask"), publish_async="noting.ask")
    def ask(self, ctx: RuleContext[Notes, None]) -> dict[str, str]:
        return {}

    @ask.on_result
    def noted(self, ctx: RuleContext[Notes, None], result: Note) -> None:
        ctx.state.notes += result.text
        ctx.state.phase = "noted"


async def test_a_result_that_makes_the_state_too_large_fails_the_execution(
    metrics: EngineMetrics,
) -> None:
    async with TestEngine(Noting, metrics=metrics) as te:
        await te.start(Noting, "n1", Notes(phase="ask", notes="x" * 600_000))
        te.assert_status(Noting, "n1", Status.WAITING)
        await te.callback(Noting, "n1", {"text": "y" * 600_000})
        st = te.state(Noting, "n1")
        assert st.status is Status.FAILED
        assert "larger than" in st.error
        assert st.notes == "x" * 600_000
        assert count(metrics.callbacks_received, "noting", "ask", "too_large") == 1
        assert count(metrics.executions_failed, "noting", "state_too_large") == 1
        assert count(metrics.pending_callbacks, "noting") == 0


async def test_memory_backend_refuses_values_and_messages_over_its_max_payload() -> None:
    backend = MemoryBackend(max_payload=1000)
    await backend.ensure_bucket("B")
    await backend.kv_put("B", "k", b"v" * 1000)
    with pytest.raises(PayloadTooLargeError):
        await backend.kv_put("B", "k", b"v" * 1001)
    with pytest.raises(PayloadTooLargeError):
        await backend.kv_update("B", "k", b"v" * 990, 1)  # its header does not fit
    with pytest.raises(PayloadTooLargeError):
        await backend.publish("s", b"v" * 990, msg_id="an-id")


class _FailingStreams(MemoryBackend):
    async def ensure_stream(self, name: str, subjects: list[str], **options: bool) -> None:
        raise PayloadTooLargeError(f"refused: {name}")  # any error while triggers start


async def test_engine_whose_triggers_cannot_start_raises_instead_of_hanging() -> None:
    engine = Engine(_FailingStreams(), [Docs], workers=2)
    with anyio.fail_after(10):
        with pytest.raises(PayloadTooLargeError, match="refused"):
            await engine.start()
    assert not engine.running
