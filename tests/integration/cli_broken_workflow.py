"""A workflow file that does not pass the definition checks (for ``validate``)."""

from __future__ import annotations

from reactive import ExecutionState, RuleContext, Workflow, rule


class Thing(ExecutionState):
    count: int = 0


class Broken(Workflow, id="broken", state=Thing, max_iterations=-1):
    @rule(watch_kv=True, publish="bad subject")
    def shout(self, ctx: RuleContext[Thing, None]) -> dict[str, int]:
        return {"count": ctx.state.count}

    @rule(on_subject="things.in")
    def nothing_to_do(self, ctx: RuleContext[Thing, None]) -> None:
        pass
