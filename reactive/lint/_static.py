"""What the phase graph tells without running anything (see ``reactive.phases``).

Each check returns ``Finding``s; where the graph cannot decide (a condition that
reads more than the phase, a phase assigned from a variable), it says nothing
and leaves the question to exploration (``_explore``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reactive.compiled import ActionType, TriggerMode
from reactive.dsl.state import Status
from reactive.phases import DYNAMIC, Model, RuleModel

__all__ = ["KINDS", "Finding", "static_findings"]

#: The kinds of finding, in the order they are reported.
KINDS = (
    "never-fires",  # a rule that can never fire
    "unentered-phase",  # a phase a condition tests that no rule enters
    "dead-end",  # a phase from which no terminal status is reachable
    "always-false",  # a condition that is false in every phase that reaches its rule
    "stuck-after-result",  # an async rule whose result can leave the execution with nothing to do
)

_PURE_PHASE = re.compile(r"phase_(?:is|in)\([^()&|~]*\)")


@dataclass(frozen=True)
class Finding:
    """One mistake in a rule set: its kind, where (workflow, rule, phase), why, and how we know."""

    kind: str
    workflow: str
    reason: str
    rule: str = ""
    phase: str | None = None
    source: str = "static"  # "static" (from the definitions) or "exploration" (the machine's run)

    def __str__(self) -> str:
        where = f"rule {self.rule!r}" if self.rule else f"phase {self.phase!r}"
        return f"{self.workflow}: {where}: {self.kind}: {self.reason} ({self.source})"


def static_findings(model: Model) -> list[Finding]:
    """Every finding the phase graph proves."""
    if not any(m.writes for m in model.rules):
        return []  # nothing moves an execution: no phases to speak of (a monitor, say)
    out: list[Finding] = []
    out += _always_false(model)
    out += _unentered(model)
    out += _never_fires(model, {f.rule for f in out})
    stuck = _stuck_after_result(model)
    out += _dead_ends(model, {f.phase for f in stuck})
    return out + stuck


def _always_false(model: Model) -> list[Finding]:
    wf = model.workflow.id
    out = []
    for m in model.rules:
        r = m.rule
        if r.condition_description == "never":
            out.append(Finding("always-false", wf, "its condition is `never`", rule=r.id))
        elif m.enters is not None and not m.enters:
            out.append(
                Finding(
                    "always-false",
                    wf,
                    f"its conditions ({r.condition_description}) require two phases at once",
                    rule=r.id,
                )
            )
    return out


def _entered(model: Model) -> set[str]:
    """Phases the rules (and the start) put an execution in."""
    entered = {model.initial}
    for m in model.rules:
        entered |= {o.phase for o in m.outcomes + m.results if o.phase not in (None, DYNAMIC)}
    entered |= {o.phase for o in model.anywhere if o.phase not in (None, DYNAMIC)}
    return entered


def _dynamic(model: Model) -> bool:
    return any(o.phase == DYNAMIC for m in model.rules for o in m.outcomes + m.results) or any(
        not m.known for m in model.rules
    )


def _unentered(model: Model) -> list[Finding]:
    if _dynamic(model):
        return []  # a phase set from a variable may be any of them
    wf = model.workflow.id
    entered = _entered(model)
    out = []
    for phase in sorted({p for m in model.rules for p in (m.enters or ())} - entered):
        users = [m.rule.id for m in model.rules if m.enters and phase in m.enters]
        out.append(
            Finding(
                "unentered-phase",
                wf,
                f"rule(s) {', '.join(map(repr, users))} test it, but no rule sets it",
                phase=phase,
            )
        )
    return out


def _never_fires(model: Model, told: set[str]) -> list[Finding]:
    wf = model.workflow.id
    reachable = model.reachable()
    out = []
    for m in model.rules:
        r = m.rule
        if r.id in told or m.enters is None:
            continue
        if not _dynamic(model) and not (m.enters & reachable) and r.mode is TriggerMode.STATE:
            out.append(
                Finding(
                    "never-fires",
                    wf,
                    f"it runs only in phase(s) {', '.join(map(repr, sorted(m.enters)))}, which "
                    "the rules never reach",
                    rule=r.id,
                )
            )
            continue
        shadow = _shadowed_by(model, m)
        if shadow:
            out.append(
                Finding(
                    "never-fires",
                    wf,
                    f"in every phase it runs in, {shadow!r} comes first (definition order), "
                    "fires on the same revision and moves the execution on",
                    rule=r.id,
                )
            )
    return out


def _shadowed_by(model: Model, later: RuleModel) -> str:
    """An earlier KV rule that writes state, tests only the phase, runs in every phase ``later``
    runs in and always leaves it: ``later`` is never evaluated on a revision it could fire on."""
    if later.rule.mode is not TriggerMode.STATE or not later.enters:
        return ""
    for m in model.rules:
        if m.rule.index >= later.rule.index:
            break
        r = m.rule
        if (
            r.mode is not TriggerMode.STATE
            or not m.writes
            or r.action is ActionType.PUBLISH_ASYNC
            or r.has_limits
            or not m.known
            or m.enters is None
            or not later.enters <= m.enters
            or not _PURE_PHASE.fullmatch(r.condition_description)
        ):
            continue
        if all(
            o.status is not None or (o.phase not in (None, DYNAMIC) and o.phase not in later.enters)
            for o in m.outcomes
        ):
            return r.id
    return ""


def _dead_ends(model: Model, explained: set[str | None]) -> list[Finding]:
    """Reachable phases with no way on to an end: where the rules leave executions (the phases
    that lead only there are not reported again), but those a stuck result explains."""
    if _dynamic(model):
        return []
    wf = model.workflow.id
    d = model.workflow
    ends = [Status.COMPLETED, Status.FAILED, Status.ESCALATED, Status.TIMED_OUT, Status.CANCELLED]
    dead = {p for p in model.reachable() if not model.leads_to(p, ends)}
    sinks = {p for p in dead if not (model.successors(p) - {p})} or dead
    waits = (
        f"until its timeout ({d.timeout:g} s) times it out"
        if d.timeout
        else "for ever (the workflow has no timeout)"
    )
    out = []
    for phase in sorted(sinks - explained):
        before = sorted(q for q in dead - sinks if phase in model.successors(q))
        came = f" (it comes after {', '.join(map(repr, before))})" if before else ""
        out.append(
            Finding(
                "dead-end",
                wf,
                f"no rule leads from it to an end: an execution there waits {waits}{came}",
                phase=phase,
            )
        )
    return out


def _handlers(m: RuleModel) -> str:
    """An async rule's handlers, as a finding names them (its result's results counted with
    those of its failure handlers: see ``reactive.phases``)."""
    r = m.rule
    others = [n for n in (r.error_handler_name, r.timeout_handler_name) if n]
    if not others:
        return f"its result handler ({r.result_handler_name})"
    return f"its handlers ({', '.join([r.result_handler_name or '?', *others])})"


def _stuck_after_result(model: Model) -> list[Finding]:
    wf = model.workflow.id
    out = []
    for m in model.rules:
        if m.rule.action is not ActionType.PUBLISH_ASYNC:
            continue
        stuck = sorted(
            {
                o.phase
                for o in m.results
                if o.status is None
                and o.phase not in (None, DYNAMIC)
                and not any(n.writes and n.runs_in(o.phase) for n in model.rules)
            }
        )
        if stuck:
            out.append(
                Finding(
                    "stuck-after-result",
                    wf,
                    f"{_handlers(m)} can move the execution "
                    f"to {', '.join(map(repr, stuck))}, where no rule fires and nothing ends it"
                    + (" but its timeout" if model.workflow.timeout else ""),
                    rule=m.rule.id,
                    phase=stuck[0],
                )
            )
    return out
