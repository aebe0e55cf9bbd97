"""Exploration: run the property machine on a workflow and see what its rules do.

Where the phase graph cannot decide (a condition that reads more than the
phase, a phase set from a variable), what the machine's run shows decides:
a rule that never fired, a condition that never held although executions were
in the phases it tests, executions left with nothing to do after a result.
The run has no outside writes of executions (they would put executions in
phases the rules never do), and is the same every time (derandomized).
Needs Hypothesis (a test dependency).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from reactive.compiled import ActionType, TriggerMode, WorkflowDef
from reactive.dsl.state import Status
from reactive.dsl.workflow import Workflow
from reactive.lint._static import Finding
from reactive.phases import Model

__all__ = ["Exploration", "exploration_findings", "explore"]


@dataclass
class Exploration:
    """What a run of the machine showed."""

    examples: int = 0
    fired: set[str] = field(default_factory=set)  # rules that fired (or whose result came)
    # Per rule: how many times an execution was in a phase in which the rule runs.
    visits: collections.Counter[str] = field(default_factory=collections.Counter)
    # Executions left with nothing to do: (rule whose transition left it, how, phase) -> count.
    stuck: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)
    failure: str = ""  # the machine found a failing example (its message)


def explore(workflow: type[Workflow] | Workflow, model: Model, examples: int) -> Exploration:
    """Run ``examples`` examples of the property machine of ``workflow``."""
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.stateful import run_state_machine_as_test

    from reactive.testing._machine import workflow_machine

    found = Exploration()
    base = workflow_machine(workflow, include_writes=False, report_unreached=False)
    d = model.workflow

    class Explorer(base):  # type: ignore[misc,valid-type]
        def reached(self) -> Any:
            found.examples += 1
            for _key, _rev, _raw, state in self.checks.entries(self.te, d):
                _observe(model, state, found)
            out = super().reached()
            found.fired.update(r for (_, r) in out.rules)
            found.fired.update(r for (_, r) in out.results)
            return out

    Explorer.__name__ = base.__name__
    try:
        run_state_machine_as_test(
            Explorer,
            settings=settings(
                base.TestCase.settings,
                max_examples=examples,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
            ),
        )
    except AssertionError as e:
        found.failure = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    return found


def _observe(model: Model, state: Any, found: Exploration) -> None:
    """One execution at the end of an example: the phases it went through, where it stopped."""
    timeline = state.timeline
    # The last transition of an ended execution left it in its phase, but ended: no rule runs
    # there. (A timeout's own entry repeats the phase it was in, alive, before.)
    alive = timeline[:-1] if state.status.is_terminal else timeline
    for e in alive:
        for m in model.rules:
            if m.writes and m.rule.mode is TriggerMode.STATE and m.runs_in(e.phase):
                found.visits[m.rule.id] += 1
    ended_idle = state.status is Status.TIMED_OUT or (
        state.status is Status.RUNNING and model.workflow.timeout is None
    )
    if not ended_idle:
        return
    before = [e for e in timeline if e.rule_id != "deadline"]
    if not before:
        return  # (it never started)
    last = before[-1]
    if last.action in (ActionType.PUBLISH_ASYNC.value, "publish_async"):
        return  # it was waiting for a result (an outage timed it out): not idle
    how = "result" if last.trigger_mode == "callback" else "rule"
    found.stuck[(last.rule_id, how, last.phase)] += 1


def exploration_findings(model: Model, found: Exploration, static: list[Finding]) -> list[Finding]:
    """What the run adds to the static findings (and confirms of them)."""
    d: WorkflowDef = model.workflow
    wf = d.id
    told_rules = {f.rule for f in static if f.rule}
    told_phases = {f.phase for f in static if f.phase is not None}
    out: list[Finding] = []
    if found.failure:
        out.append(
            Finding(
                "property-failure",
                wf,
                f"the property machine found a failing example: {found.failure}",
                source="exploration",
            )
        )
        return out
    n = found.examples
    for r in d.rules:
        if r.id in found.fired or r.id in told_rules:
            continue
        visits = found.visits[r.id]
        if r.mode is TriggerMode.STATE and visits:
            out.append(
                Finding(
                    "always-false",
                    wf,
                    f"its conditions ({r.condition_description}) never held in {n} examples, "
                    f"though executions were {visits} times in the phases it runs in",
                    rule=r.id,
                    source="exploration",
                )
            )
        elif r.mode is TriggerMode.STATE and r.writes_state:
            out.append(
                Finding(
                    "never-fires",
                    wf,
                    f"no execution was alive in a phase it runs in, in {n} examples",
                    rule=r.id,
                    source="exploration",
                )
            )
        else:
            out.append(
                Finding(
                    "never-fires",
                    wf,
                    f"it never fired in {n} examples ({r.condition_description})",
                    rule=r.id,
                    source="exploration",
                )
            )
    for (rule_id, how, phase), count in sorted(found.stuck.items()):
        async_rule = d.rules_by_id.get(rule_id)
        if (
            how == "result"
            and async_rule is not None
            and async_rule.action is ActionType.PUBLISH_ASYNC
        ):
            if rule_id in told_rules:
                continue
            out.append(
                Finding(
                    "stuck-after-result",
                    wf,
                    f"after its result, {count} execution(s) stayed in {phase!r} with no rule "
                    "to fire until their timeout",
                    rule=rule_id,
                    phase=phase,
                    source="exploration",
                )
            )
        elif phase not in told_phases:
            told_phases.add(phase)
            out.append(
                Finding(
                    "dead-end",
                    wf,
                    f"{count} execution(s) stayed in it after {rule_id!r} with no rule to fire "
                    "until their timeout",
                    phase=phase,
                    source="exploration",
                )
            )
    return out
