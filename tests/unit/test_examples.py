"""The examples (examples/*.py) end to end on the in-memory TestEngine, with a manual clock."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import msgspec
import pytest

from reactive import Engine, MemoryBackend, Status
from reactive.__main__ import load_example
from reactive.testing import TestEngine

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name: str) -> ModuleType:
    """Import examples/<name>.py once per session (load_example registers it in sys.modules)."""
    module = sys.modules.get(f"reactive_example_{name}")
    return module if module is not None else load_example(EXAMPLES / f"{name}.py")


pr = example("plan_review")
gh = example("github_issue_to_pr")
cs = example("cold_storage")
saga = example("order_saga")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def run_demo_in_memory(module: ModuleType) -> tuple[Engine, list[str]]:
    """The example's run_demo on a real-time engine over the in-memory backend."""
    lines: list[str] = []
    backend = MemoryBackend()
    with anyio.fail_after(15):
        async with Engine(backend, module.WORKFLOWS, workers=4) as engine:
            await module.run_demo(backend, engine, lines.append)
    return engine, lines


# =========================================================================== plan review


def plan(plan_id: str) -> Any:
    return next(p for p in pr.DEMO_PLANS if p.plan_id == plan_id)


def reviewer(req: dict[str, Any]) -> Any:
    return pr.review_plan(msgspec.convert(req, pr.ReviewRequest))


async def test_plan_approved_on_first_review() -> None:
    async with TestEngine(pr.PlanReview) as te:
        te.respond(pr.REVIEWER, reviewer)
        await te.trigger_message(pr.SUBMITTED, plan("plan-cache"))
        st = await te.wait_for_status(pr.PlanReview, "plan-cache", Status.COMPLETED)
        assert (st.phase, st.iteration, st.reviews, st.verdict) == ("approved", 0, 1, "approved")
        assert [e.rule_id for e in st.timeline] == [
            "submit",
            "request_review",
            "request_review",
            "approve",
        ]
        [event] = te.assert_published(pr.APPROVED, count=1)
        assert event["execution_id"] == "plan-cache"
        assert event["workflow_id"] == "plan-review"
        assert event["final_phase"] == "approved"
        te.assert_not_published(pr.ESCALATED)
        te.assert_not_published(pr.FAILED)


async def test_plan_approved_after_a_revision() -> None:
    async with TestEngine(pr.PlanReview) as te:
        te.respond(pr.REVIEWER, reviewer)
        await te.trigger_message(pr.SUBMITTED, plan("plan-migration"))
        st = await te.wait_for_status(pr.PlanReview, "plan-migration", Status.COMPLETED)
        assert (st.iteration, st.reviews) == (1, 2)
        assert "Rollback: added in revision 1" in st.plan
        requests = te.assert_published(pr.REVIEWER, count=2)
        assert [r["revision"] for r in requests] == [0, 1]
        assert all(r["task_id"] and r["callback_subject"] for r in requests)
        assert requests[0]["execution_id"] == "plan-migration"
        te.assert_published(pr.APPROVED, count=1)


async def test_plan_escalated_after_max_iterations() -> None:
    async with TestEngine(pr.PlanReview) as te:
        te.respond(pr.REVIEWER, reviewer)
        await te.trigger_message(pr.SUBMITTED, plan("plan-rewrite"))
        st = await te.wait_for_status(pr.PlanReview, "plan-rewrite", Status.ESCALATED)
        # Four reviews asked for four revisions; the fourth would pass max_iterations=3.
        assert st.reviews == 4
        assert st.iteration == 3
        assert st.phase == "revise"  # the passing transition did not happen
        assert "Monitoring" not in st.plan
        assert "max iterations (3)" in st.error
        assert st.timeline[-1].action == "escalate"
        te.assert_published(pr.REVIEWER, count=4)
        [event] = te.assert_published(pr.ESCALATED, count=1)
        assert event["execution_id"] == "plan-rewrite"
        assert "max iterations" in event["reason"]
        te.assert_not_published(pr.APPROVED)


async def test_plan_resubmission_is_ignored() -> None:
    async with TestEngine(pr.PlanReview) as te:  # no reviewer: the review stays pending
        await te.trigger_message(pr.SUBMITTED, plan("plan-cache"))
        te.assert_status(pr.PlanReview, "plan-cache", Status.WAITING)
        changed = msgspec.structs.replace(plan("plan-cache"), plan="something else entirely")
        await te.trigger_message(pr.SUBMITTED, changed)
        st = te.state(pr.PlanReview, "plan-cache")
        assert st.plan == plan("plan-cache").plan
        assert st.firings["submit"].count == 1
        te.assert_published(pr.REVIEWER, count=1)


async def test_plan_review_task_timeout_fails() -> None:
    async with TestEngine(pr.PlanReview) as te:  # the reviewer never answers
        await te.trigger_message(pr.SUBMITTED, plan("plan-cache"))
        await te.advance(59)
        te.assert_status(pr.PlanReview, "plan-cache", Status.WAITING)
        await te.advance(2)
        st = te.state(pr.PlanReview, "plan-cache")
        assert st.status is Status.FAILED
        assert "no callback within 60s" in st.error
        [event] = te.assert_published(pr.FAILED, count=1)
        assert event["execution_id"] == "plan-cache"


async def test_plan_reviewer_worker_on_the_memory_backend() -> None:
    async with TestEngine(pr.PlanReview) as te, anyio.create_task_group() as tg:
        await tg.start(pr.reviewer_worker, te.backend)
        for p in pr.DEMO_PLANS:
            await te.trigger_message(pr.SUBMITTED, p)
        for plan_id, status in pr.EXPECTED.items():
            await te.wait_for_status(pr.PlanReview, plan_id, status)
        tg.cancel_scope.cancel()
    te.assert_published(pr.APPROVED, count=2)
    te.assert_published(pr.ESCALATED, count=1)


async def test_plan_review_demo_in_memory() -> None:
    engine, lines = await run_demo_in_memory(pr)
    for plan_id, status in pr.EXPECTED.items():
        st = await engine.get(pr.PlanReview, plan_id)
        assert st.status is status
        assert any(line.startswith(f"plan-review/{plan_id}: {status.value}") for line in lines)
    text = "\n".join(lines)
    assert "request_review" in text and "lifecycle events:" in text
    assert text.count("plans.approved ") == 2 and text.count("plans.escalated ") == 1


# =========================================================================== GitHub issue -> PR


def issue(number: int, **changes: Any) -> Any:
    found = next(i for i in gh.DEMO_ISSUES if i.number == number)
    return msgspec.structs.replace(found, **changes) if changes else found


def exec_id(number: int) -> str:
    return gh.issue_execution_id(gh.REPO, number)


def agents(te: TestEngine, **overrides: Any) -> None:
    """Answer the three agents' requests with the example's functions (or ``overrides``)."""
    for subject, (request_type, act) in gh.AGENTS.items():
        fn = overrides.get(subject.rsplit(".", 1)[1], act)
        te.respond(subject, lambda req, t=request_type, f=fn: f(msgspec.convert(req, t)))


def test_issue_execution_ids_are_token_safe() -> None:
    assert gh.issue_execution_id("acme/widgets", 7) == "acme-widgets-7"
    assert gh.issue_execution_id("acme/my.repo", 7) == "acme-my-repo-7"


async def test_issue_approved_after_one_review_cycle() -> None:
    async with TestEngine(gh.IssueToPR) as te:
        agents(te)
        await te.trigger_message(gh.OPENED, issue(101))
        st = await te.wait_for_status(gh.IssueToPR, exec_id(101), Status.COMPLETED)
        assert (st.phase, st.iteration, st.reviews) == ("approved", 1, 2)
        assert st.changes == ["code", "regression-test"]
        assert st.pr_url == "https://github.com/acme/widgets/pull/1101"
        assert st.tokens_used == gh.QUALIFIER_TOKENS + 2 * (6_000 + gh.REVIEWER_TOKENS)
        [event] = te.assert_published(gh.PR_READY, count=1)
        assert event["execution_id"] == exec_id(101)
        te.assert_not_published(gh.ISSUE_FAILED)
        te.assert_not_published(gh.ISSUE_ESCALATED)
        developer = te.assert_published(gh.DEVELOPER, count=2)
        assert [d["attempt"] for d in developer] == [1, 2]
        assert developer[1]["feedback"] == ["regression-test"]
        assert developer[1]["pr_number"] == 1101


async def test_issue_rejected_by_the_qualifier_fails() -> None:
    async with TestEngine(gh.IssueToPR) as te:
        agents(te)
        await te.trigger_message(gh.OPENED, issue(102))
        st = await te.wait_for_status(gh.IssueToPR, exec_id(102), Status.FAILED)
        assert st.phase == "rejected"
        assert st.error.startswith("rejected by the qualifier: a question")
        [event] = te.assert_published(gh.ISSUE_FAILED, count=1)
        assert event["execution_id"] == exec_id(102)
        assert event["error"] == st.error
        te.assert_not_published(gh.DEVELOPER)
        te.assert_not_published(gh.PR_READY)


async def test_issue_escalates_when_the_token_budget_is_exceeded() -> None:
    async with TestEngine(gh.IssueToPR) as te:
        agents(te)
        await te.trigger_message(gh.OPENED, issue(103))
        st = await te.wait_for_status(gh.IssueToPR, exec_id(103), Status.ESCALATED)
        assert st.tokens_used == 124_400 > st.token_budget == gh.DEFAULT_TOKEN_BUDGET
        assert st.error == "token budget exceeded: 124400 > 100000"
        assert st.iteration == 2
        assert st.timeline[-1].rule_id == "budget_guard"
        # The budget rule won over the review that would have followed the third PR.
        te.assert_published(gh.REVIEWER, count=2)
        [event] = te.assert_published(gh.ISSUE_ESCALATED, count=1)
        assert event["reason"] == st.error
        te.assert_not_published(gh.PR_READY)


async def test_issue_escalates_after_max_review_cycles() -> None:
    async with TestEngine(gh.IssueToPR) as te:
        agents(te)
        await te.trigger_message(gh.OPENED, issue(104))
        st = await te.wait_for_status(gh.IssueToPR, exec_id(104), Status.ESCALATED)
        assert (st.iteration, st.reviews, st.phase) == (3, 4, "changes_requested")
        assert st.feedback == ["tests", "docs", "security-review", "threat-model"]
        assert st.tokens_used <= st.token_budget
        assert "max iterations (3)" in st.error
        te.assert_published(gh.DEVELOPER, count=4)
        te.assert_published(gh.ISSUE_ESCALATED, count=1)


@pytest.mark.parametrize(
    ("tokens", "status"), [(100_000, Status.COMPLETED), (100_001, Status.ESCALATED)]
)
async def test_issue_budget_boundary(tokens: int, status: Status) -> None:
    def qualifier(req: Any) -> Any:
        return gh.QualifyResult(task_id=req.task_id, accept=True, tokens_used=0)

    def developer(req: Any) -> Any:
        return msgspec.structs.replace(gh.develop_pr(req), tokens_used=tokens)

    def reviewer_(req: Any) -> Any:
        return gh.CodeReviewResult(task_id=req.task_id, approved=True, tokens_used=0)

    async with TestEngine(gh.IssueToPR) as te:
        agents(te, qualifier=qualifier, developer=developer, reviewer=reviewer_)
        await te.trigger_message(gh.OPENED, issue(101))
        st = await te.wait_for_status(gh.IssueToPR, exec_id(101), status)
        assert st.tokens_used == tokens


async def test_issue_agent_error_fails_the_execution() -> None:
    def broken(req: Any) -> Any:
        raise RuntimeError("the model is overloaded")

    async with TestEngine(gh.IssueToPR) as te:
        agents(te, developer=broken)
        await te.trigger_message(gh.OPENED, issue(101))
        st = await te.wait_for_status(gh.IssueToPR, exec_id(101), Status.FAILED)
        assert "the model is overloaded" in st.error
        te.assert_published(gh.ISSUE_FAILED, count=1)


async def test_issue_entry_rule_cooldown_and_max_firings() -> None:
    key = exec_id(105)
    new = gh.IssueOpened(repo=gh.REPO, number=105, title="v1", body="b", labels=["bug"])
    async with TestEngine(gh.IssueToPR) as te:  # no agents: the qualification stays pending
        await te.trigger_message(gh.OPENED, new)
        st = te.state(gh.IssueToPR, key)
        assert (st.announcements, st.phase, st.status) == (1, "triage", Status.WAITING)

        # A redelivery inside the cooldown (1 minute) is dropped.
        await te.trigger_message(gh.OPENED, msgspec.structs.replace(new, title="v2"))
        await te.advance(30)
        await te.trigger_message(gh.OPENED, msgspec.structs.replace(new, title="v3"))
        st = te.state(gh.IssueToPR, key)
        assert (st.announcements, st.title) == (1, "v1")

        # After the cooldown it is taken in again (the issue is refreshed, the flow goes on).
        await te.advance(31)
        await te.trigger_message(
            gh.OPENED, msgspec.structs.replace(new, title="v4", labels=["bug", "size/S"])
        )
        st = te.state(gh.IssueToPR, key)
        assert (st.announcements, st.title, st.labels) == (2, "v4", ["bug", "size/S"])
        assert (st.phase, st.status) == ("triage", Status.WAITING)

        await te.advance(61)
        await te.trigger_message(gh.OPENED, msgspec.structs.replace(new, title="v5"))
        assert te.state(gh.IssueToPR, key).announcements == 3

        # max_firings=3: the fourth announcement is dropped, however late.
        await te.advance(120)
        await te.trigger_message(gh.OPENED, msgspec.structs.replace(new, title="v6"))
        st = te.state(gh.IssueToPR, key)
        assert (st.announcements, st.title) == (3, "v5")
        assert st.firings["take_issue"].count == 3
        assert st.status is Status.WAITING
        te.assert_published(gh.QUALIFIER, count=1)  # the pending qualification was not repeated

        # The qualifier finally answers: the flow continues from the refreshed issue.
        await te.callback(gh.IssueToPR, key, {"accept": False, "reason": "duplicate of #101"})
        te.assert_status(gh.IssueToPR, key, Status.FAILED)


async def test_issue_demo_in_memory() -> None:
    engine, lines = await run_demo_in_memory(gh)
    for execution_id, status in gh.EXPECTED.items():
        st = await engine.get(gh.IssueToPR, execution_id)
        assert st.status is status, (execution_id, st.error)
    first = await engine.get(gh.IssueToPR, exec_id(101))
    assert first.announcements == 1  # the redelivered webhook fell in the cooldown
    text = "\n".join(lines)
    assert "token budget exceeded" in text and "lifecycle events:" in text
    assert text.count("github.issue.escalated ") == 2


# =========================================================================== cold storage


def reading(unit: str, t: float = 4.0, h: float = 60.0, p: float = 101.3, **limits: Any) -> Any:
    return cs.UnitReading(unit_id=unit, temperature=t, humidity=h, pressure=p, **limits)


def alerts(te: TestEngine) -> list[Any]:
    return te.published(f"{cs.ALERTS}.*", cs.Alert)


async def test_cold_storage_in_range_no_alert() -> None:
    async with TestEngine(cs.ColdStorageMonitor) as te:
        await te.put(cs.BUCKET, "unit.u1", reading("u1"))
        await te.put(cs.BUCKET, "unit.u1", reading("u1", t=8.0, h=85.0, p=102.8))  # on the limits
        assert alerts(te) == []


async def test_cold_storage_alerts_do_not_write_the_entity_state() -> None:
    async with TestEngine(cs.ColdStorageMonitor) as te:
        value = reading("u1", t=9.0)
        rev = await te.put(cs.BUCKET, "unit.u1", value)
        [alert] = te.published(f"{cs.ALERTS}.temperature", cs.Alert)
        assert (alert.unit_id, alert.metric, alert.value, alert.revision) == (
            "u1",
            "temperature",
            9.0,
            rev,
        )
        assert "above 8 °C" in alert.message
        entry = te.backend.peek(cs.BUCKET, "unit.u1")
        assert entry is not None and entry.revision == rev
        assert entry.value == msgspec.json.encode(value)
        assert te.engine.registry.get(cs.ColdStorageMonitor) is not None
        assert te.executions(cs.ColdStorageMonitor) == []


async def test_cold_storage_temperature_cooldown() -> None:
    async with TestEngine(cs.ColdStorageMonitor) as te:
        await te.put(cs.BUCKET, "unit.u1", reading("u1", t=9.0))
        assert [a.value for a in alerts(te)] == [9.0]

        # Warmer readings inside the cooldown (10 minutes) are not alerted...
        await te.advance(60)
        await te.put(cs.BUCKET, "unit.u1", reading("u1", t=9.5))
        await te.advance(60)
        await te.put(cs.BUCKET, "unit.u1", reading("u1", t=10.0))
        assert len(alerts(te)) == 1

        # ...but a unit still out of range when the cooldown ends is alerted then.
        await te.advance(480)
        assert [a.value for a in alerts(te)] == [9.0, 10.0]

        # Back in range: nothing more, even after another cooldown.
        await te.put(cs.BUCKET, "unit.u1", reading("u1", t=5.0))
        await te.advance(600)
        assert len(alerts(te)) == 2

        # Out of range again after the cooldown: alerted at once.
        await te.put(cs.BUCKET, "unit.u1", reading("u1", t=12.0))
        assert [a.value for a in alerts(te)] == [9.0, 10.0, 12.0]


async def test_cold_storage_each_metric_and_unit_has_its_own_cooldown() -> None:
    async with TestEngine(cs.ColdStorageMonitor) as te:
        await te.put(cs.BUCKET, "unit.u1", reading("u1", t=9.0))
        # The door is opened: humidity and pressure alert although temperature is cooling down.
        await te.put(cs.BUCKET, "unit.u1", reading("u1", t=9.0, h=90.0, p=99.0))
        assert sorted(a.metric for a in alerts(te)) == ["humidity", "pressure", "temperature"]
        [pressure] = te.published(f"{cs.ALERTS}.pressure", cs.Alert)
        assert "-2.3 kPa from nominal" in pressure.message
        # Another unit is not held back by u1's cooldown.
        await te.put(cs.BUCKET, "unit.u2", reading("u2", t=8.5))
        assert [(a.unit_id, a.metric) for a in alerts(te)][-1] == ("u2", "temperature")
        assert len(alerts(te)) == 4


async def test_cold_storage_limits_come_from_the_entity_state() -> None:
    async with TestEngine(cs.ColdStorageMonitor) as te:
        freezer = {"max_temperature": -15.0, "nominal_pressure": 100.0, "pressure_tolerance": 0.5}
        await te.put(cs.BUCKET, "unit.freezer", reading("freezer", t=-18.0, p=100.2, **freezer))
        assert alerts(te) == []
        await te.put(cs.BUCKET, "unit.freezer", reading("freezer", t=-12.0, p=100.2, **freezer))
        [alert] = alerts(te)
        assert (alert.metric, alert.limit) == ("temperature", "<= -15 °C")
        # A sensor that writes only some fields gets the defaults for the rest.
        await te.put(cs.BUCKET, "unit.bare", {"temperature": 8.1})
        assert [(a.unit_id, a.metric) for a in alerts(te)][-1] == ("bare", "temperature")


async def test_cold_storage_ignores_other_keys() -> None:
    async with TestEngine(cs.ColdStorageMonitor) as te:
        await te.put(cs.BUCKET, "site.north", reading("north", t=30.0))
        await te.put(cs.BUCKET, "unit.a.b", reading("ab", t=30.0))
        assert alerts(te) == []


async def test_cold_storage_sensor_on_the_memory_backend() -> None:
    async with TestEngine(cs.ColdStorageMonitor) as te:
        await cs.sensor(te.backend, "u9", [(4.0, 60.0, 101.3), (9.9, 60.0, 101.3)], interval=0)
        await te.settle()
        [alert] = alerts(te)
        assert (alert.unit_id, alert.value) == ("u9", 9.9)


async def test_cold_storage_demo_in_memory() -> None:
    _, lines = await run_demo_in_memory(cs)
    text = "\n".join(lines)
    assert "temperature  chiller-b" in text
    assert "humidity     dock-c" in text
    assert "pressure     dock-c" in text
    assert "freezer-a" in text and "all readings in range" in text
    assert "temperature: 3 out of range, 1 alerted" in text


# =========================================================================== order saga


def services(te: TestEngine, stock: dict[str, int]) -> None:
    """Answer the saga's requests with the example's simulated services."""
    te.respond(
        saga.INVENTORY_RESERVE,
        lambda r: saga.reserve_stock(msgspec.convert(r, saga.ReserveStock), stock),
    )
    te.respond(saga.PAYMENTS, lambda r: saga.charge_card(msgspec.convert(r, saga.Charge)))
    te.respond(saga.SHIPPING, lambda r: saga.ship_order(msgspec.convert(r, saga.Ship)))


def order(order_id: str, sku: str = "mug", quantity: int = 1, cents: int = 1_000) -> Any:
    return saga.OrderPlaced(order_id=order_id, sku=sku, quantity=quantity, amount_cents=cents)


async def test_saga_order_reserved_charged_and_shipped_completes() -> None:
    async with TestEngine(saga.OrderSaga) as te:
        stock = {"mug": 3}
        services(te, stock)
        await te.trigger_message(saga.PLACED, order("o1", quantity=2))
        st = await te.wait_for_status(saga.OrderSaga, "o1", Status.COMPLETED)
        assert [e.rule_id for e in st.timeline] == [
            "place",
            "reserve",
            "reserve",
            "charge",
            "charge",
            "ship",
            "ship",
            "done",
        ]
        assert st.tracking == "trk-o1" and stock == {"mug": 1}
        te.assert_published(saga.COMPLETED, count=1)
        te.assert_not_published(saga.INVENTORY_RELEASE)


async def test_saga_out_of_stock_fails_without_a_release() -> None:
    async with TestEngine(saga.OrderSaga) as te:
        services(te, {"mug": 0})
        await te.trigger_message(saga.PLACED, order("o1"))
        st = await te.wait_for_status(saga.OrderSaga, "o1", Status.FAILED)
        assert st.phase == "out_of_stock" and "out of stock" in st.error
        te.assert_not_published(saga.INVENTORY_RELEASE)
        te.assert_not_published(saga.PAYMENTS)


async def test_saga_declined_payment_releases_the_reservation_and_fails() -> None:
    async with TestEngine(saga.OrderSaga) as te:
        services(te, {"mug": 5})
        await te.trigger_message(saga.PLACED, order("o1", cents=saga.CREDIT_LIMIT_CENTS + 1))
        st = await te.wait_for_status(saga.OrderSaga, "o1", Status.FAILED)
        assert st.phase == "released" and st.error == "payment declined: over the credit limit"
        released = te.assert_published(saga.INVENTORY_RELEASE, count=1)
        assert released[0]["reservation_id"] == "res-o1"
        te.assert_not_published(saga.SHIPPING)


async def test_saga_payment_that_fails_or_never_answers_releases_the_reservation() -> None:
    async with TestEngine(saga.OrderSaga) as te:
        te.respond(
            saga.INVENTORY_RESERVE,
            lambda r: saga.reserve_stock(msgspec.convert(r, saga.ReserveStock), {"mug": 5}),
        )
        await te.trigger_message(saga.PLACED, order("o1"))
        await te.callback(saga.OrderSaga, "o1", error="card processor down")  # the charge
        st = te.state(saga.OrderSaga, "o1")
        assert (st.status, st.phase) == (Status.FAILED, "released")
        assert "the payment service failed: card processor down" in st.error
        # No answer at all: reminders every 10 minutes while it waits, then the release.
        await te.trigger_message(saga.PLACED, order("o2"))
        await te.advance(45 * 60)
        st = te.state(saga.OrderSaga, "o2")
        assert (st.status, st.phase) == (Status.FAILED, "released")
        assert "did not answer (no callback within 2700s)" in st.error
        assert [r["order_id"] for r in te.published(saga.REMINDER)] == ["o2"] * 4
        assert len(te.published(saga.INVENTORY_RELEASE)) == 2


async def test_saga_cancelled_releases_what_it_holds_and_ends_cancelled() -> None:
    async with TestEngine(saga.OrderSaga) as te:
        te.respond(
            saga.INVENTORY_RESERVE,
            lambda r: saga.reserve_stock(msgspec.convert(r, saga.ReserveStock), {"mug": 5}),
        )
        await te.trigger_message(saga.PLACED, order("o1"))
        assert te.state(saga.OrderSaga, "o1").phase == "charging"  # (the charge pending)
        await te.cancel(saga.OrderSaga, "o1", "the customer withdrew")
        st = te.state(saga.OrderSaga, "o1")
        assert (st.status, st.phase, st.error) == (
            Status.CANCELLED,
            "released",
            "the customer withdrew",
        )
        [released] = te.published(saga.INVENTORY_RELEASE)
        assert released["reservation_id"] == "res-o1"
        [event] = te.published(saga.CANCELLED)
        assert event["reason"] == "the customer withdrew"


async def test_saga_order_placed_twice_is_taken_once() -> None:
    async with TestEngine(saga.OrderSaga) as te:
        await te.trigger_message(saga.PLACED, order("o1"))
        await te.trigger_message(saga.PLACED, order("o1", quantity=9))
        st = te.state(saga.OrderSaga, "o1")
        assert st.quantity == 1 and len(te.published(saga.INVENTORY_RESERVE)) == 1


async def test_saga_demo_in_memory() -> None:
    engine, lines = await run_demo_in_memory(saga)
    for order_id, status in saga.EXPECTED.items():
        st = await engine.get(saga.OrderSaga, order_id)
        assert st.status is status, (order_id, st)
    text = "\n".join(lines)
    assert "inventory.release  o-102    res-o-102" in text
