"""The rule-set lint: mistakes a workflow's rules can make, found before they run in production.

``lint(Workflow)`` reads the compiled definition and the rules' code (``reactive.phases``:
the phases each rule runs in and the phases and statuses each path through its
method or result handler leaves), reports what that proves (``_static``), and
runs the property machine (``_explore``, needs Hypothesis) to decide what it
cannot. The kinds of finding:

* ``never-fires``: a rule that can never fire (its phases are never reached, or
  an earlier rule always takes the revision it would fire on);
* ``unentered-phase``: a phase a condition tests that no rule sets;
* ``dead-end``: a phase the rules reach from which no rule leads to an end;
* ``always-false``: a condition false in every phase that reaches its rule;
* ``stuck-after-result``: an async rule whose result handler can leave the
  execution in a phase where no rule fires;
* ``property-failure``: the machine found a failing example while exploring.

``python -m reactive validate --lint module:Workflow`` prints them (exit 1 when any).
"""

from __future__ import annotations

import dataclasses
import importlib.util

from reactive.dsl.workflow import Workflow, definition_of
from reactive.lint._static import KINDS, Finding, static_findings
from reactive.phases import model_of

__all__ = ["KINDS", "Finding", "hypothesis_installed", "lint"]


def hypothesis_installed() -> bool:
    """Whether exploration can run (it needs Hypothesis, a test dependency)."""
    return importlib.util.find_spec("hypothesis") is not None


def lint(workflow: type[Workflow] | Workflow, *, explore: int = 200) -> list[Finding]:
    """The findings for ``workflow``: static ones, then what ``explore`` examples of the
    property machine show (0: no exploration; without Hypothesis installed, none either)."""
    model = model_of(definition_of(workflow))
    found = static_findings(model)
    if explore and hypothesis_installed():
        from reactive.lint._explore import exploration_findings
        from reactive.lint._explore import explore as run

        seen = run(workflow, model, explore)
        # What the run saw fire was not "never" after all (the code read from source misled).
        found = [
            f
            for f in found
            if not (f.rule and f.kind in ("never-fires", "always-false") and f.rule in seen.fired)
        ]
        stuck_phases = {phase for (_, _, phase) in seen.stuck}
        found = [
            dataclasses.replace(f, source="static, seen in exploration")
            if (f.kind in ("never-fires", "always-false") and not seen.failure)
            or (f.kind in ("dead-end", "stuck-after-result") and f.phase in stuck_phases)
            else f
            for f in found
        ]
        found += exploration_findings(model, seen, found)
    order = {k: i for i, k in enumerate((*KINDS, "property-failure"))}
    return sorted(found, key=lambda f: (order.get(f.kind, 99), f.rule, f.phase or ""))
