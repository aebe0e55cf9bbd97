"""How deep a machine's run went: rules fired, results handled, phases visited, how executions ended.

Each example reports its own through Hypothesis's statistics (``hypothesis.event``,
shown by ``pytest --hypothesis-show-statistics``); ``Coverage`` adds them up
over a run, and says what the run never reached.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hypothesis

from reactive.compiled import ActionType, WorkflowDef
from reactive.dsl.state import Status
from reactive.phases import model_of

__all__ = ["Coverage", "ExampleCoverage", "UnreachedWarning"]


class UnreachedWarning(UserWarning):
    """A machine's run never fired some rule, or never reached some phase or terminal status."""


@dataclass
class ExampleCoverage:
    """What one example reached, per workflow id."""

    rules: set[tuple[str, str]] = field(default_factory=set)
    results: set[tuple[str, str]] = field(default_factory=set)
    phases: set[tuple[str, str]] = field(default_factory=set)
    ended: collections.Counter[tuple[str, Status]] = field(default_factory=collections.Counter)

    def add(self, d: WorkflowDef, state: Any, fired_without_state: Iterable[str] = ()) -> None:
        """One execution of ``d`` as it is at the end of the example."""
        for e in state.timeline:
            if e.trigger_mode == "callback":
                if e.action == "callback" or e.action == "escalate":
                    self.results.add((d.id, e.rule_id))
            elif e.rule_id in d.rules_by_id and e.action != "error":
                self.rules.add((d.id, e.rule_id))
            self.phases.add((d.id, e.phase))
        self.rules.update((d.id, r) for r in fired_without_state)
        self.phases.add((d.id, state.phase))
        self.ended[(d.id, state.status)] += 1

    def report(self) -> None:
        """Tell Hypothesis's statistics (one event per thing reached)."""
        for wf, r in sorted(self.rules):
            hypothesis.event(f"{wf}: rule {r} fired")
        for wf, r in sorted(self.results):
            hypothesis.event(f"{wf}: result of {r} handled")
        for wf, p in sorted(self.phases):
            hypothesis.event(f"{wf}: phase {p!r} visited")
        totals: collections.Counter[str] = collections.Counter()
        done: collections.Counter[str] = collections.Counter()
        for (wf, status), n in sorted(self.ended.items()):
            totals[wf] += n
            if status.is_terminal:
                hypothesis.event(f"{wf}: an execution ended {status.value}")
            if status is Status.COMPLETED:
                done[wf] += n
        for wf, n in totals.items():
            share = done[wf] / n
            bucket = (
                "none"
                if share == 0
                else "all"
                if share == 1
                else "half or more"
                if share >= 0.5
                else "less than half"
            )
            hypothesis.event(f"{wf}: executions completed", bucket)


@dataclass
class Coverage:
    """What a run's examples reached, added up."""

    definitions: Sequence[WorkflowDef]
    examples: int = 0
    rules: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    results: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    phases: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    ended: collections.Counter[tuple[str, Status]] = field(default_factory=collections.Counter)

    def add(self, example: ExampleCoverage) -> None:
        self.examples += 1
        self.rules.update(example.rules)
        self.results.update(example.results)
        self.phases.update(example.phases)
        self.ended.update(example.ended)

    def completed_share(self, workflow_id: str) -> float:
        """The share of executions of the workflow that ended completed."""
        n = sum(c for (wf, _), c in self.ended.items() if wf == workflow_id)
        return self.ended[(workflow_id, Status.COMPLETED)] / n if n else 0.0

    def unreached(self, *, outside: bool = False) -> list[str]:
        """What no example reached: rules, results, phases the rules name, the terminal statuses
        the rules and the engine's own ends can reach (with ``outside``, also those only what
        happens from outside can: an outside writer, an engine down past a deadline)."""
        out = []
        for d in self.definitions:
            model = model_of(d)
            rules = [r.id for r in d.rules if not self.rules[(d.id, r.id)]]
            results = [
                r.id
                for r in d.rules
                if r.action is ActionType.PUBLISH_ASYNC and not self.results[(d.id, r.id)]
            ]
            phases = sorted(p for p in model.named - {model.initial} if not self.phases[(d.id, p)])
            statuses = sorted(
                s.value
                for s in model.terminal_statuses(outside=outside)
                if not self.ended[(d.id, s)]
            )
            for what, missing in (
                ("rules never fired", rules),
                ("results never handled", results),
                ("phases never visited", [repr(p) for p in phases]),
                ("terminal statuses never reached", statuses),
            ):
                if missing:
                    out.append(f"{d.id}: {what}: {', '.join(missing)}")
        return out

    def summary(self) -> str:
        lines = [f"{self.examples} examples"]
        for d in self.definitions:
            n = sum(c for (wf, _), c in self.ended.items() if wf == d.id)
            ended = ", ".join(
                f"{s.value} {c}" for (wf, s), c in sorted(self.ended.items()) if wf == d.id
            )
            lines.append(
                f"{d.id}: {n} executions ({ended}); {100 * self.completed_share(d.id):.0f} % completed"
            )
        return "\n".join(lines + self.unreached())
