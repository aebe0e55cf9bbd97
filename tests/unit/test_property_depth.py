"""The property machine goes deep by default: progress-biased events, coverage reported, bugs shrunk.

The 1,000-example figures (every rule fired, every reachable terminal status, the share of
executions that complete, the time to find the planted bug) are measured by
``benchmarks/property.py``; these tests pin the same behaviour on modest example counts.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test
from saga_planted import ForgetfulSaga, released_when_declined, saga

from reactive import ExecutionState, RuleContext, Status, Workflow, definition_of, rule
from reactive.conditions import phase_is
from reactive.phases import model_of
from reactive.testing.strategies import (
    UnreachedWarning,
    WorkflowMachine,
    workflow_machine,
)

REPO = Path(__file__).resolve().parents[2]
pr = sys.modules.get("reactive_example_plan_review")
if pr is None:
    from reactive.__main__ import load_example

    pr = load_example(REPO / "examples" / "plan_review.py")


def quick(machine: type[WorkflowMachine], examples: int) -> settings:
    """The machine's own settings, fewer examples, no database, the same examples each run."""
    return settings(
        machine.TestCase.settings, max_examples=examples, database=None, derandomize=True
    )


def steps_of(error: BaseException) -> list[str]:
    """The steps of the falsifying example Hypothesis reported with ``error``."""
    notes = getattr(error, "__notes__", [])
    return [line for note in notes for line in note.splitlines() if line.startswith("state.step(")]


def test_the_planted_saga_bug_is_found_and_shrunk_to_at_most_four_steps() -> None:
    machine = workflow_machine(ForgetfulSaga, invariants=[released_when_declined])
    # The machine's default settings (random examples), without the example database.
    with pytest.raises(AssertionError, match="never released") as caught:
        run_state_machine_as_test(
            machine, settings=settings(machine.TestCase.settings, database=None)
        )
    steps = steps_of(caught.value)
    assert 1 <= len(steps) <= 4, steps
    # The shrunk example reads as the events it is made of (Python that builds them).
    assert not any("seed" in s for s in steps), steps


def test_the_saga_as_written_keeps_its_promise() -> None:
    machine = workflow_machine(saga.OrderSaga, invariants=[released_when_declined])
    run_state_machine_as_test(machine, settings=quick(machine, 60))


@pytest.mark.parametrize("workflow", [pr.PlanReview, saga.OrderSaga], ids=lambda w: w.__name__)
def test_every_rule_fires_and_executions_complete_in_a_short_run(workflow: type[Workflow]) -> None:
    machine = workflow_machine(workflow)
    run_state_machine_as_test(machine, settings=quick(machine, 60))
    d = definition_of(workflow)
    coverage = machine.coverage
    assert {r.id for r in d.rules} <= {r for (_, r) in coverage.rules}
    # (Over 1,000 examples at least a fifth complete: benchmarks/property.py. The first examples
    # Hypothesis makes are its simplest, so a short run completes fewer.)
    assert coverage.completed_share(d.id) >= 0.1
    assert coverage.ended[(d.id, Status.COMPLETED)] and coverage.ended[(d.id, Status.FAILED)]


def test_the_default_step_count_follows_the_workflow_depth() -> None:
    assert model_of(definition_of(pr.PlanReview)).depth() == 2  # a submission, a verdict
    assert model_of(definition_of(saga.OrderSaga)).depth() == 4  # the order, three results
    assert workflow_machine(pr.PlanReview).TestCase.settings.stateful_step_count == 12
    assert workflow_machine(saga.OrderSaga).TestCase.settings.stateful_step_count == 24
    assert (
        workflow_machine(saga.OrderSaga, execution_ids=("a",)).TestCase.settings.stateful_step_count
        == 12
    )


def test_the_explain_phase_is_off_by_default() -> None:
    from hypothesis import Phase

    phases = workflow_machine(pr.PlanReview).TestCase.settings.phases
    assert Phase.explain not in phases and Phase.shrink in phases


class Ticket(ExecutionState):
    note: str = ""


class Opened(msgspec.Struct):
    ticket_id: str


class Unreachable(Workflow, id="unreachable", state=Ticket):
    @rule(on_subject="tickets.opened", state_key=lambda m: m.ticket_id, mutate=True)
    def open(self, ctx: RuleContext[Ticket, Opened]) -> None:
        ctx.state.phase = "open"

    @rule(watch_kv=True, when=phase_is("open"), complete=True)
    def close(self, ctx: RuleContext[Ticket, None]) -> None: ...

    @rule(watch_kv=True, when=phase_is("reopened"), mutate=True)
    def never(self, ctx: RuleContext[Ticket, None]) -> None:
        ctx.state.note = "no rule sets 'reopened'"


def test_a_run_that_never_fires_a_rule_says_so() -> None:
    machine = workflow_machine(Unreachable, include_writes=False)
    test = machine.TestCase("runTest")
    test.settings = quick(machine, 20)
    with pytest.warns(UnreachedWarning, match=r"unreachable: rules never fired: never") as caught:
        test.runTest()
    assert "phases never visited: 'reopened'" in str(caught[0].message)


def test_a_restart_after_an_outage_times_out_what_passed_its_deadline() -> None:
    machine = workflow_machine(saga.OrderSaga)()
    try:
        from reactive.testing.strategies import Message, Restart

        machine.apply(
            Message(
                saga.PLACED, saga.OrderPlaced(order_id="o1", sku="mug", quantity=1, amount_cents=1)
            )
        )
        assert machine.te.state(saga.OrderSaga, "o1").status is Status.WAITING
        machine.apply(Restart(down_for=7201))  # past the 2 h timeout while no engine ran
        assert machine.te.state(saga.OrderSaga, "o1").status is Status.TIMED_OUT
        machine.engine_invariants()
    finally:
        machine.host.close()


@pytest.mark.timeout(300)  # (a nested pytest run: a slow machine)
def test_coverage_is_reported_through_hypothesis_statistics(tmp_path: Path) -> None:
    test = tmp_path / "test_reviews.py"
    test.write_text(
        textwrap.dedent(
            f"""
            import sys
            from hypothesis import settings
            from reactive.__main__ import load_example
            from reactive.testing.strategies import workflow_machine

            pr = load_example({str(REPO / "examples" / "plan_review.py")!r})
            Machine = workflow_machine(pr.PlanReview)
            TestReviews = Machine.TestCase
            TestReviews.settings = settings(
                TestReviews.settings, max_examples=20, database=None, derandomize=True
            )
            """
        )
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(test),
            "-q",
            "-p",
            "no:cacheprovider",
            "--hypothesis-show-statistics",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    ).stdout
    assert "1 passed" in out, out
    for line in (
        "plan-review: rule submit fired",
        "plan-review: result of request_review handled",
        "plan-review: phase 'approved' visited",
        "plan-review: an execution ended completed",
        "plan-review: executions completed",
    ):
        assert line in out, out
