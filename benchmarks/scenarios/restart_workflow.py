"""The restart benchmark's workflow, served by ``python -m reactive serve`` (``restart.py``).

An item is started by a message on ``restart.start`` (stream ``RESTART_IN``). One that
is not told to wait completes at once: that is the history. One told to wait parks in
phase ``parked`` until a message on ``restart.go`` (stream ``RESTART_GO``) names it;
meanwhile it holds the workflow's deadline (``timeout``, hours away: a schedule in
NATS, never reached during a run). The ``go`` message moves it to ``going`` (the
"first new transition" the benchmark times), and the next KV change completes it.
"""

from __future__ import annotations

import msgspec

from reactive import ExecutionState, RuleContext, Workflow, rule
from reactive.conditions import phase_is

BUCKET = "RESTART"
WORKFLOW_ID = "restart"
START_SUBJECT = "restart.start"
GO_SUBJECT = "restart.go"


class Item(ExecutionState):
    n: int = 0


class Start(msgspec.Struct):
    id: str
    wait: bool = False


class Go(msgspec.Struct):
    id: str


class Restart(Workflow, id=WORKFLOW_ID, state=Item, bucket=BUCKET, timeout="6h"):
    @rule(on_subject=START_SUBJECT, stream="RESTART_IN", state_key=lambda m: m.id, mutate=True)
    def start(self, ctx: RuleContext[Item, Start]) -> None:
        ctx.state.phase = "parked" if ctx.message.wait else "working"

    @rule(watch_kv=True, when=phase_is("working"), complete=True)
    def finish(self, ctx: RuleContext[Item, None]) -> None:
        ctx.state.n += 1

    @rule(
        on_subject=GO_SUBJECT,
        stream="RESTART_GO",
        state_key=lambda m: m.id,
        when=phase_is("parked"),
        mutate=True,
    )
    def go(self, ctx: RuleContext[Item, Go]) -> None:
        ctx.state.phase = "going"

    @rule(watch_kv=True, when=phase_is("going"), complete=True)
    def done(self, ctx: RuleContext[Item, None]) -> None:
        ctx.state.n += 1
