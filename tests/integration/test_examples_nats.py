"""The examples' demos against a real nats-server, and ``python -m reactive demo`` as a user runs it."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import msgspec
import pytest

from reactive import Engine, NatsBackend, definition_of
from reactive.__main__ import load_example
from reactive.runtime.metrics import REGISTRY

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def example(name: str) -> ModuleType:
    """Import examples/<name>.py once per session (load_example registers it in sys.modules)."""
    module = sys.modules.get(f"reactive_example_{name}")
    return module if module is not None else load_example(EXAMPLES / f"{name}.py")


async def run_demo_on_nats(
    module: ModuleType, url: str, **kwargs: Any
) -> tuple[list[str], dict[str, Any]]:
    """Run the example's demo on an engine over NATS; returns its output and the final states by id."""
    lines: list[str] = []
    backend = NatsBackend(url)
    states: dict[str, Any] = {}
    try:
        with anyio.fail_after(30):
            async with Engine(backend, module.WORKFLOWS) as engine:
                await module.run_demo(backend, engine, lines.append, **kwargs)
                expected = getattr(module, "EXPECTED", {})
                for execution_id in expected:
                    states[execution_id] = await engine.get(module.WORKFLOWS[0], execution_id)
    finally:
        await backend.close()
    return lines, states


@pytest.mark.anyio
async def test_plan_review_demo_on_nats(nats_url: str) -> None:
    pr = example("plan_review")
    lines, states = await run_demo_on_nats(pr, nats_url)
    for plan_id, status in pr.EXPECTED.items():
        st = states[plan_id]
        assert st is not None and st.status is status, (plan_id, st)
    assert states["plan-migration"].iteration == 1
    assert states["plan-rewrite"].iteration == 3
    text = "\n".join(lines)
    assert text.count("plans.approved ") == 2
    assert text.count("plans.escalated ") == 1


@pytest.mark.anyio
async def test_order_saga_demo_on_nats(nats_url: str) -> None:
    saga = example("order_saga")
    lines, states = await run_demo_on_nats(saga, nats_url)
    for order_id, status in saga.EXPECTED.items():
        st = states[order_id]
        assert st is not None and st.status is status, (order_id, st)
    assert states["o-102"].phase == "released"
    assert "inventory.release  o-102    res-o-102" in "\n".join(lines)


@pytest.mark.anyio
async def test_github_issue_to_pr_demo_on_nats(nats_url: str) -> None:
    gh = example("github_issue_to_pr")
    lines, states = await run_demo_on_nats(gh, nats_url)
    for execution_id, status in gh.EXPECTED.items():
        st = states[execution_id]
        assert st is not None and st.status is status, (execution_id, st)
    assert states[gh.issue_execution_id(gh.REPO, 101)].announcements == 1
    assert "token budget exceeded" in states[gh.issue_execution_id(gh.REPO, 103)].error
    assert "max iterations" in states[gh.issue_execution_id(gh.REPO, 104)].error
    text = "\n".join(lines)
    for subject, count in ((gh.PR_READY, 1), (gh.ISSUE_FAILED, 1), (gh.ISSUE_ESCALATED, 2)):
        assert text.count(f"  {subject} ") == count, subject


def condition_held(workflow: str, rule: str) -> float:
    """How often a rule's condition held, in this process (every engine's metrics)."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == "reactive_rule_evaluations_total"
        and sample.labels.get("workflow") == workflow
        and sample.labels.get("rule") == rule
        and sample.labels.get("fired") == "true"
    )


async def until(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Poll ``check`` (sync or async) until it holds."""
    deadline = time.monotonic() + 10
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not within 10s: {what}"
        await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_cold_storage_demo_on_nats(nats_url: str) -> None:
    cs = example("cold_storage")
    wf = definition_of(cs.ColdStorageMonitor).id
    rules = {metric: f"{metric}_alert" for metric in ("temperature", "humidity", "pressure")}
    held_before = {rule: condition_held(wf, rule) for rule in rules.values()}
    alerts: list[Any] = []
    lines: list[str] = []
    listener = NatsBackend(nats_url)
    await listener.start()
    backend = NatsBackend(nats_url)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(cs.collect_alerts, listener, alerts)
            with anyio.fail_after(30):
                async with Engine(backend, cs.WORKFLOWS) as engine:
                    await cs.run_demo(backend, engine, lines.append)

                    # Every out-of-range reading was evaluated (each alert rule's condition
                    # held on three readings of one unit)...
                    def all_evaluated() -> bool:
                        return all(
                            condition_held(wf, rule) - held_before[rule] >= 3
                            for rule in rules.values()
                        )

                    await until(all_evaluated, "every out-of-range reading evaluated")

                    # ...and every firing decided has gone out: no claim is pending.
                    async def delivered() -> bool:
                        return not await backend.kv_keys(engine.meta_bucket, f"pend.{wf}.>")

                    await until(delivered, "every alert out")
                    firings = {}
                    for key in await backend.kv_keys(engine.meta_bucket, f"fire.{wf}.>"):
                        _, _, rule, _, _, unit = key.split(".")
                        entry = await backend.kv_get(engine.meta_bucket, key)
                        assert entry is not None
                        firings[(unit, rule)] = msgspec.json.decode(entry.value)["count"]
            # A marker published after all that comes after every alert: the listener
            # has had every one once it has the marker.
            marker = cs.Alert(
                unit_id="sync", metric="sync", value=0, limit="", message="", at=datetime.now(UTC),
                revision=0,
            )  # fmt: skip
            await listener.publish(f"{cs.ALERTS}.sync", msgspec.json.encode(marker))
            await until(lambda: any(a.unit_id == "sync" for a in alerts), "the marker")
            tg.cancel_scope.cancel()
    finally:
        await backend.close()
        await listener.close()
    # Each expected alert decided once and sent once: the cooldown held back the repeats.
    assert firings == {(unit, rules[metric]): 1 for unit, metric in cs.EXPECTED_ALERTS}
    got = [(a.unit_id, a.metric) for a in alerts if a.unit_id != "sync"]
    assert sorted(got) == sorted(cs.EXPECTED_ALERTS)
    text = "\n".join(lines)
    assert "temperature: 3 out of range, 1 alerted" in text


def test_cli_demo_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "reactive", "demo", "examples/plan_review.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,  # (a hang; the time it takes is the machine's)
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "embedded nats-server (JetStream) listening on nats://127.0.0.1:" in out
    assert "plan-review/plan-cache: completed" in out
    assert "plan-review/plan-migration: completed" in out
    assert "plan-review/plan-rewrite: escalated" in out
    assert "request_review" in out and "callback" in out  # timeline rows
    assert "demo finished in" in out


def test_cli_demo_missing_example() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "reactive", "demo", "examples/no_such_example.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "example file not found: examples/no_such_example.py" in proc.stderr
