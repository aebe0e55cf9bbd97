"""Workflows with one planted mistake each, for the lint's tests (and the CLI's)."""

from __future__ import annotations

import msgspec

from reactive import ExecutionState, RuleContext, Workflow, rule
from reactive.conditions import phase_is


class Ticket(ExecutionState):
    count: int = 0


class Opened(msgspec.Struct):
    ticket_id: str


class Ask(msgspec.Struct):
    ticket_id: str
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class Answer(msgspec.Struct):
    task_id: str
    ok: bool


def opened(ctx: RuleContext[Ticket, Opened]) -> None:
    ctx.state.phase = "open"


class NeverFires(Workflow, id="never-fires", state=Ticket, timeout="1h"):
    """``escalate`` runs in 'open' like ``close``, which comes first and always moves on."""

    @rule(on_subject="tickets.a", state_key=lambda m: m.ticket_id, mutate=True, max_firings=1)
    def open(self, ctx: RuleContext[Ticket, Opened]) -> None:
        ctx.state.phase = "open"

    @rule(watch_kv=True, when=phase_is("open"), complete=True)
    def close(self, ctx: RuleContext[Ticket, None]) -> None: ...

    @rule(watch_kv=True, when=phase_is("open"), mutate=True)
    def escalate(self, ctx: RuleContext[Ticket, None]) -> None:
        ctx.state.escalate("too slow")


class UnenteredPhase(Workflow, id="unentered-phase", state=Ticket, timeout="1h"):
    """``reopen`` waits for 'reopened', which no rule sets."""

    @rule(on_subject="tickets.b", state_key=lambda m: m.ticket_id, mutate=True, max_firings=1)
    def open(self, ctx: RuleContext[Ticket, Opened]) -> None:
        ctx.state.phase = "open"

    @rule(watch_kv=True, when=phase_is("open"), complete=True)
    def close(self, ctx: RuleContext[Ticket, None]) -> None: ...

    @rule(watch_kv=True, when=phase_is("reopened"), mutate=True)
    def reopen(self, ctx: RuleContext[Ticket, None]) -> None:
        ctx.state.phase = "open"


class DeadEnd(Workflow, id="dead-end", state=Ticket, timeout="1h"):
    """``park`` moves an open ticket to 'parked', from which nothing goes on."""

    @rule(on_subject="tickets.c", state_key=lambda m: m.ticket_id, mutate=True, max_firings=1)
    def open(self, ctx: RuleContext[Ticket, Opened]) -> None:
        ctx.state.phase = "open"

    @rule(watch_kv=True, when=phase_is("open"), mutate=True)
    def park(self, ctx: RuleContext[Ticket, None]) -> None:
        ctx.state.phase = "parked"


class AlwaysFalse(Workflow, id="always-false", state=Ticket, timeout="1h"):
    """``overflow`` needs a count above 100 in 'open'; nothing ever counts."""

    @rule(on_subject="tickets.d", state_key=lambda m: m.ticket_id, mutate=True, max_firings=1)
    def open(self, ctx: RuleContext[Ticket, Opened]) -> None:
        ctx.state.phase = "open"

    @rule(
        watch_kv=True,
        when=[phase_is("open"), lambda ctx: ctx.state.count > 100],
        mutate=True,
    )
    def overflow(self, ctx: RuleContext[Ticket, None]) -> None:
        ctx.state.fail("overflow")

    @rule(watch_kv=True, when=phase_is("open"), complete=True)
    def close(self, ctx: RuleContext[Ticket, None]) -> None: ...


class StuckAfterResult(Workflow, id="stuck-after-result", state=Ticket, timeout="1h"):
    """A refusal moves the ticket to 'refused', where no rule fires."""

    @rule(on_subject="tickets.e", state_key=lambda m: m.ticket_id, mutate=True, max_firings=1)
    def open(self, ctx: RuleContext[Ticket, Opened]) -> None:
        ctx.state.phase = "open"

    @rule(watch_kv=True, when=phase_is("open"), publish_async="tickets.check")
    def check(self, ctx: RuleContext[Ticket, None]) -> Ask:
        return Ask(ticket_id=ctx.state.id)

    @check.on_result
    def checked(self, ctx: RuleContext[Ticket, None], result: Answer) -> None:
        ctx.state.phase = "accepted" if result.ok else "refused"

    @rule(watch_kv=True, when=phase_is("accepted"), complete=True)
    def accept(self, ctx: RuleContext[Ticket, None]) -> None: ...


class DynamicNever(Workflow, id="dynamic-never", state=Ticket, timeout="1h"):
    """The phase comes from a variable (static analysis cannot tell); ``late`` never fires."""

    @rule(on_subject="tickets.f", state_key=lambda m: m.ticket_id, mutate=True, max_firings=1)
    def open(self, ctx: RuleContext[Ticket, Opened]) -> None:
        ctx.state.phase = NEXT[ctx.state.phase]

    @rule(watch_kv=True, when=phase_is("open"), complete=True)
    def close(self, ctx: RuleContext[Ticket, None]) -> None: ...

    @rule(watch_kv=True, when=phase_is("late"), complete=True)
    def late(self, ctx: RuleContext[Ticket, None]) -> None: ...


NEXT = {"": "open", "open": "open"}
