"""Workflows for the command-line tests (served by ``python -m reactive serve`` as a file).

* ``Countdown`` is started by its first state (``start countdown --input '{"steps": 3}'``):
  one ``step`` per KV revision until ``done == steps``, then it completes. More than
  ``max_iterations`` steps escalate it.
* ``Ticket`` is started by a message on ``tickets.open`` (stream ``CLI_TICKETS_IN``),
  then counts down the same way.

``delay`` makes each step block for that many seconds: load that a SIGTERM lands in.
``hold_while`` names a file: while it exists, the execution stops after its first step
(its state committed, no rule moving it on), so a test knows it is unfinished; a
replay after the file is gone carries it on.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from reactive import ExecutionState, RuleContext, Workflow, rule


class Count(ExecutionState):
    steps: int = 3
    done: int = 0
    delay: float = 0.0
    hold_while: str = ""


class TicketOpened(msgspec.Struct):
    ticket: str
    steps: int = 3
    delay: float = 0.0


def _pending(ctx: RuleContext[Count, None]) -> bool:
    st = ctx.state
    held = bool(st.hold_while) and st.done >= 1 and Path(st.hold_while).exists()
    return st.done < st.steps and not held


def _finished(ctx: RuleContext[Count, None]) -> bool:
    return ctx.state.done >= ctx.state.steps


class _Steps(Workflow, abstract=True):
    @rule(watch_kv=True, when=_pending, mutate=True)
    def step(self, ctx: RuleContext[Count, None]) -> None:
        """One step down."""
        if ctx.state.delay:
            time.sleep(ctx.state.delay)
        ctx.state.done += 1
        ctx.state.iteration += 1
        ctx.state.phase = "counting"

    @rule(watch_kv=True, when=_finished, complete=True)
    def finish(self, ctx: RuleContext[Count, None]) -> None:
        """Every step done."""
        ctx.state.phase = "done"


class Countdown(
    _Steps, id="countdown", state=Count, bucket="CLI_COUNTDOWN", max_iterations=5, timeout="5m"
):
    """Counts down from its first state."""


class Ticket(_Steps, id="ticket", state=Count, bucket="CLI_TICKETS", max_iterations=5):
    """Opened by a message, then counts down."""

    @rule(
        on_subject="tickets.open",
        stream="CLI_TICKETS_IN",
        state_key=lambda m: m.ticket,
        mutate=True,
        max_firings=1,
    )
    def open(self, ctx: RuleContext[Count, TicketOpened]) -> None:
        ctx.state.steps = ctx.message.steps
        ctx.state.delay = ctx.message.delay
        ctx.state.phase = "open"


def not_a_workflow() -> None:
    """For the loading errors."""
