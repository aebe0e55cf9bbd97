"""The rule-set lint: one planted mistake per kind of finding, the examples clean, and the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import lint_planted as planted
import msgspec
import pytest

from reactive import ExecutionState, RuleContext, Workflow, rule
from reactive.cli import main
from reactive.conditions import phase_is
from reactive.dsl.workflow import definition_of
from reactive.lint import Finding, lint
from reactive.lint._static import static_findings
from reactive.phases import model_of

REPO = Path(__file__).resolve().parents[2]
PLANTED = Path(planted.__file__)
EXPLORE = 60  # examples of the property machine per workflow (the CLI's default is 200)


def kinds(findings: list[Finding]) -> list[tuple[str, str, str | None]]:
    return [(f.kind, f.rule, f.phase) for f in findings]


def test_a_rule_shadowed_by_an_earlier_one_never_fires() -> None:
    found = lint(planted.NeverFires, explore=EXPLORE)
    assert kinds(found) == [("never-fires", "escalate", None)]
    assert "'close' comes first" in found[0].reason
    assert found[0].source == "static, seen in exploration"


def test_a_phase_no_rule_sets_is_reported_with_the_rule_that_waits_for_it() -> None:
    found = lint(planted.UnenteredPhase, explore=EXPLORE)
    assert kinds(found) == [
        ("never-fires", "reopen", None),
        ("unentered-phase", "", "reopened"),
    ]
    assert "no rule sets it" in found[1].reason


def test_a_phase_with_no_way_to_an_end_is_a_dead_end() -> None:
    found = lint(planted.DeadEnd, explore=EXPLORE)
    assert kinds(found) == [("dead-end", "", "parked")]
    assert "timeout (3600 s)" in found[0].reason and "after 'open'" in found[0].reason
    assert found[0].source == "static, seen in exploration"


def test_a_condition_false_in_every_phase_that_reaches_it_is_found_by_exploration() -> None:
    assert static_findings(model_of(definition_of(planted.AlwaysFalse))) == []  # a lambda
    found = lint(planted.AlwaysFalse, explore=EXPLORE)
    assert kinds(found) == [("always-false", "overflow", None)]
    assert found[0].source == "exploration" and "never held" in found[0].reason


class Contradiction(Workflow, id="contradiction", state=planted.Ticket):
    @rule(on_subject="c.open", state_key=lambda m: m.ticket_id, mutate=True, max_firings=1)
    def open(self, ctx: RuleContext[planted.Ticket, planted.Opened]) -> None:
        ctx.state.phase = "open"

    @rule(watch_kv=True, when=[phase_is("open"), phase_is("closed")], complete=True)
    def both(self, ctx: RuleContext[planted.Ticket, None]) -> None: ...

    @rule(watch_kv=True, when=phase_is("open"), complete=True)
    def close(self, ctx: RuleContext[planted.Ticket, None]) -> None: ...


def test_a_condition_that_requires_two_phases_is_always_false_statically() -> None:
    found = lint(Contradiction, explore=0)
    assert kinds(found) == [("always-false", "both", None)]
    assert "two phases at once" in found[0].reason


def test_an_async_result_that_leaves_the_execution_with_nothing_to_do() -> None:
    found = lint(planted.StuckAfterResult, explore=EXPLORE)
    assert kinds(found) == [("stuck-after-result", "check", "refused")]
    assert "checked" in found[0].reason and found[0].source == "static, seen in exploration"


def test_exploration_decides_where_the_code_cannot_be_read() -> None:
    assert static_findings(model_of(definition_of(planted.DynamicNever))) == []
    found = lint(planted.DynamicNever, explore=EXPLORE)
    assert kinds(found) == [("never-fires", "late", None)]
    assert found[0].source == "exploration"


class Counter(ExecutionState):
    n: int = 0


class Tick(msgspec.Struct):
    counter_id: str


class Broken(Workflow, id="broken-at-rest", state=Counter):
    """A rule whose condition reads the clock: true at rest, so the machine's invariant 9 fails."""

    @rule(on_subject="ticks", state_key=lambda m: m.counter_id, mutate=True, max_firings=1)
    def tick(self, ctx: RuleContext[Counter, Tick]) -> None:
        ctx.state.phase = "counting"

    @rule(
        watch_kv=True,
        when=lambda ctx: ctx.state.phase == "counting" and ctx.now % 2 == 1,
        mutate=True,
    )
    def odd(self, ctx: RuleContext[Counter, None]) -> None:
        ctx.state.complete()


def test_a_failing_example_found_while_exploring_is_a_finding() -> None:
    found = lint(Broken, explore=EXPLORE)
    assert [f.kind for f in found] == ["property-failure"]
    assert "at rest, but rule 'odd'" in found[0].reason


@pytest.mark.parametrize(
    "example", ["plan_review", "order_saga", "github_issue_to_pr", "cold_storage"]
)
def test_the_examples_lint_clean(example: str) -> None:
    from reactive.__main__ import load_example

    module = sys.modules.get(f"reactive_example_{example}") or load_example(
        REPO / "examples" / f"{example}.py"
    )
    for wf in module.WORKFLOWS:
        assert lint(wf, explore=EXPLORE) == []


def test_validate_lint_prints_each_finding_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"{PLANTED}:StuckAfterResult"
    assert main(["validate", "--lint", "--explore", str(EXPLORE), target]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "ok: stuck-after-result (3 rules)"
    assert out[1].startswith("lint: stuck-after-result: 1 finding (static analysis and 60 examples")
    assert out[2].startswith("  - rule 'check': stuck-after-result: its result handler (checked)")


def test_validate_lint_of_a_clean_workflow_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"{REPO / 'examples' / 'order_saga.py'}:OrderSaga"
    assert main(["validate", "--lint", "--explore", "0", target]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ok: order-saga (7 rules)",
        "lint: order-saga: clean (static analysis only)",
    ]
