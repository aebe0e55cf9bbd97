"""The soak's workflow, served by ``python -m reactive serve`` in each engine process.

A job is started by a message on ``soak.start`` (stream ``SOAK_IN``), takes three KV
steps, asks a worker (``soak.work``) and waits for its answer, then completes with an
event on ``soak.done`` (stream ``SOAK_EVENTS``, which drops a repeat by its message id).
Every transition is in the timeline, so a transition made twice shows there.
"""

from __future__ import annotations

import msgspec

from reactive import ExecutionState, RuleContext, Workflow, rule
from reactive.conditions import phase_is


class Job(ExecutionState):
    steps: int = 0
    answer: str = ""


class Start(msgspec.Struct):
    id: str


class Work(msgspec.Struct):
    n: int
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class Answer(msgspec.Struct):
    task_id: str
    answer: str


STEPS = 3
EXPECTED = ["start", *["step"] * STEPS, "ask", "ask", "finish"]


class Soak(
    Workflow, id="soak", state=Job, bucket="SOAK", task_timeout="5m", on_complete="soak.done"
):
    @rule(on_subject="soak.start", stream="SOAK_IN", state_key=lambda m: m.id, mutate=True)
    def start(self, ctx: RuleContext[Job, Start]) -> None:
        ctx.state.phase = "stepping"

    @rule(
        watch_kv=True,
        when=lambda ctx: ctx.state.phase == "stepping" and ctx.state.steps < STEPS,
        mutate=True,
    )
    def step(self, ctx: RuleContext[Job, None]) -> None:
        ctx.state.steps += 1
        if ctx.state.steps == STEPS:
            ctx.state.phase = "asking"

    @rule(watch_kv=True, when=phase_is("asking"), publish_async="soak.work")
    def ask(self, ctx: RuleContext[Job, None]) -> Work:
        return Work(n=ctx.state.steps)

    @ask.on_result
    def answered(self, ctx: RuleContext[Job, None], result: Answer) -> None:
        ctx.state.answer = result.answer
        ctx.state.phase = "answered"

    @rule(watch_kv=True, when=phase_is("answered"), complete=True)
    def finish(self, ctx: RuleContext[Job, None]) -> None: ...
