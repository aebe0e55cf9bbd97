"""A user's workflow with one type error that ``mypy --strict`` must report (line 19)."""

from __future__ import annotations

from reactive import ExecutionState, RuleContext, Workflow, rule


class Count(ExecutionState):
    done: int = 0


def _pending(ctx: RuleContext[Count, None]) -> bool:
    return ctx.state.done < 3


class Counter(Workflow, id="counter", state=Count):
    @rule(watch_kv=True, when=_pending, mutate=True)
    def step(self, ctx: RuleContext[Count, None]) -> None:
        ctx.state.done = "one more"
