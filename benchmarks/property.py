"""Property-based tests of rule sets: where the time of ``workflow_machine(...)`` goes, and how deep.

    python benchmarks/property.py                       # 1,000 examples of each machine
    python benchmarks/property.py --examples 200 --only saga --repeat 1
    python benchmarks/property.py --out benchmarks/PROPERTY.md   # also append the report

Each machine runs ``--examples`` examples (Hypothesis's other settings as
``workflow_machine`` sets them, no database, derandomized; nothing fails) of the
machine of an example workflow: ``plan-review`` (examples/plan_review.py) and
``saga`` (examples/order_saga.py), ``--repeat`` times each (the median shown: the
targets are theirs), then ``issue-to-pr`` and ``cold-storage`` once. The time of
a run is split into

* **set-up**: building and closing the machine of each example (engine, backend);
* **engine**: applying the steps (the engine processes each event and settles),
  and the teardown's final rounds (the clock moved past every deadline);
* **checks**: the invariants after every step and at teardown;
* **draws**: Hypothesis drawing each step's rule and arguments (with the event decoded);
* **Hypothesis**: everything else (its generation loop, statistics, the rest).

The same run measures two baselines, so the ratios hold on a shared machine:
Hypothesis's own cost (a machine whose one rule draws nothing and does
nothing, the same number of examples and steps) and the engine's (the same
workflows' happy paths driven directly on a ``TestEngine``, one event loop, no
Hypothesis: its time per transition). It prints the breakdown, the ratios, how
deep the runs went (how executions ended, in how many examples each rule fired,
the phases visited, what no example reached), and a hunt for the planted saga
bug (``tests/unit/saga_planted.py``) with the machine's default settings: the
time until the shrunk failure is reported, and its steps. No test under tests/
measures time; this is where these timings live.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import hypothesis
import msgspec
from hypothesis import HealthCheck, settings
from hypothesis.internal.conjecture.data import ConjectureData
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reactive import Status  # noqa: E402
from reactive.__main__ import load_example  # noqa: E402
from reactive.testing import TestEngine  # noqa: E402
from reactive.testing import strategies as rts  # noqa: E402

pr = load_example(ROOT / "examples" / "plan_review.py")
saga = load_example(ROOT / "examples" / "order_saga.py")
gh = load_example(ROOT / "examples" / "github_issue_to_pr.py")
cs = load_example(ROOT / "examples" / "cold_storage.py")
sys.path.insert(0, str(ROOT / "tests" / "unit"))
from saga_planted import ForgetfulSaga, released_when_declined  # noqa: E402

# --------------------------------------------------------------------------- instrumentation


@dataclass
class Tally:
    """Seconds per part, and what the run reached."""

    setup: float = 0.0
    engine: float = 0.0
    checks: float = 0.0
    draws: float = 0.0
    total: float = 0.0
    cpu: float = 0.0  # CPU seconds of this process over the run
    others: float = 0.0  # share of the machine's CPU that other processes used meanwhile
    examples: int = 0
    steps: int = 0
    choices: int = 0
    transitions: int = 0
    executions: collections.Counter[str] = field(default_factory=collections.Counter)
    rules: collections.Counter[str] = field(default_factory=collections.Counter)
    phases: collections.Counter[str] = field(default_factory=collections.Counter)
    unreached: list[str] = field(default_factory=list)

    @property
    def hypothesis(self) -> float:
        return max(0.0, self.total - self.setup - self.engine - self.checks - self.draws)


class Meter:
    """Times the parts by wrapping the machine's methods and Hypothesis's top-level draws."""

    def __init__(self) -> None:
        self.tally = Tally()
        self._depth = 0

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.tally, name, getattr(self.tally, name) + time.perf_counter() - t0)

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        meter = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with meter.part(name):
                return fn(*args, **kwargs)

        return wrapper

    @contextmanager
    def draws(self) -> Iterator[None]:
        """Time ConjectureData.draw at its outermost level (a draw inside a rule is the rule's)."""
        original = ConjectureData.draw
        meter = self

        def draw(data: ConjectureData, *args: Any, **kwargs: Any) -> Any:
            if meter._depth:
                return original(data, *args, **kwargs)
            meter._depth += 1
            t0 = time.perf_counter()
            try:
                return original(data, *args, **kwargs)
            finally:
                meter.tally.draws += time.perf_counter() - t0
                meter._depth -= 1

        ConjectureData.draw = draw  # type: ignore[method-assign]
        try:
            yield
        finally:
            ConjectureData.draw = original  # type: ignore[method-assign]


def instrument(machine: type[Any], meter: Meter) -> type[Any]:
    """A subclass of ``machine`` whose parts report to ``meter``."""
    tally = meter.tally

    class Measured(machine):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            with meter.part("setup"):
                super().__init__()
            tally.examples += 1
            self.host.close = meter.timed("setup", self.host.close)  # type: ignore[method-assign]

        def apply(self, event: Any) -> None:
            tally.steps += 1
            with meter.part("engine"):
                super().apply(event)

        @invariant()
        def engine_invariants(self) -> None:
            with meter.part("checks"):
                super().engine_invariants()

        def _finish(self) -> Any:
            return meter.timed("engine", super()._finish)()

        def reached(self) -> Any:
            for d in self.definitions:
                for _key, _rev, _raw, state in self.checks.entries(self.te, d):
                    tally.transitions += len(state.timeline)
            return super().reached()

        def teardown(self) -> None:
            data = hypothesis.control.current_build_context().data
            tally.choices += len(data.nodes)
            self.checks.check_all = meter.timed("checks", self.checks.check_all)  # type: ignore[method-assign]
            super().teardown()

    Measured.__name__ = Measured.__qualname__ = machine.__name__
    return Measured


def record(coverage: Any, tally: Tally) -> None:
    """How the run's executions ended, which rules fired, which phases they went through."""
    tally.unreached = coverage.unreached(outside=True)
    for (_wf, status), n in coverage.ended.items():
        tally.executions[status.value] += n
    for (_wf, r), n in coverage.rules.items():
        tally.rules[r] += n
    for (_wf, r), n in coverage.results.items():
        tally.rules[r + "*"] += n
    for (_wf, p), n in coverage.phases.items():
        tally.phases[p] += n


# --------------------------------------------------------------------------- the machines


def machines() -> dict[str, tuple[type[Any], Any]]:
    return {
        "plan-review": (rts.workflow_machine(pr.PlanReview), pr.PlanReview),
        "saga": (rts.workflow_machine(saga.OrderSaga), saga.OrderSaga),
        "issue-to-pr": (rts.workflow_machine(gh.IssueToPR), gh.IssueToPR),
        "cold-storage": (rts.workflow_machine(cs.ColdStorageMonitor), cs.ColdStorageMonitor),
    }


TARGETS = {"plan-review": 10.0, "saga": 15.0}  # seconds for 1,000 examples (issue 13)


def bug_hunt(runs: int) -> list[tuple[float, int]]:
    """The planted saga bug with the machine's default settings (no database): per run, the
    seconds until Hypothesis reports it shrunk, and the steps of the shrunk example."""
    out = []
    for _ in range(runs):
        machine = rts.workflow_machine(ForgetfulSaga, invariants=[released_when_declined])
        t0 = time.perf_counter()
        try:
            run_state_machine_as_test(
                machine, settings=settings(machine.TestCase.settings, database=None)
            )
        except AssertionError as e:
            notes = getattr(e, "__notes__", [])
            steps = sum(
                1 for n in notes for line in n.splitlines() if line.startswith("state.step(")
            )
            out.append((time.perf_counter() - t0, steps))
        else:
            out.append((time.perf_counter() - t0, 0))  # not found
    return out


def run_settings(machine: type[Any], examples: int) -> settings:
    base = getattr(machine.TestCase, "settings", None) or settings()
    return settings(
        base,
        max_examples=examples,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )


def measure(machine: type[Any], examples: int) -> Tally:
    meter = Meter()
    measured = instrument(machine, meter)
    gc.collect()
    busy0, cpu0, t0 = machine_busy(), time.process_time(), time.perf_counter()
    with meter.draws():
        run_state_machine_as_test(measured, settings=run_settings(machine, examples))
    t = meter.tally
    t.total = time.perf_counter() - t0
    t.cpu = time.process_time() - cpu0
    busy = machine_busy() - busy0
    t.others = max(0.0, busy - t.cpu) / (t.total * CORES)
    record(measured.coverage, t)
    return t


CORES = os.cpu_count() or 1


def machine_busy() -> float:
    """CPU seconds all cores have spent busy so far (from /proc/stat; 0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in parts[:7])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0


def wait_quiet(max_wait: float, threshold: float = 0.2) -> float:
    """Wait (up to ``max_wait`` s) until the machine is mostly idle; the busy share last seen."""
    deadline = time.perf_counter() + max_wait
    while True:
        b0, t0 = machine_busy(), time.perf_counter()
        time.sleep(0.5)
        share = (machine_busy() - b0) / ((time.perf_counter() - t0) * CORES)
        if share <= threshold or time.perf_counter() >= deadline:
            return share


# --------------------------------------------------------------------------- baselines


class Idle(RuleBasedStateMachine):
    """Hypothesis's own cost: one rule that draws nothing, one invariant, nothing else."""

    @rule()
    def step(self) -> None:
        pass

    @invariant()
    def holds(self) -> None:
        pass


def hypothesis_floor(examples: int, steps: int) -> float:
    """Seconds for ``examples`` examples of ``steps`` steps of a machine that does nothing."""
    t0 = time.perf_counter()
    run_state_machine_as_test(
        Idle,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        ),
    )
    return time.perf_counter() - t0


async def _happy_paths(n: int) -> tuple[int, float]:
    """The plan-review and saga happy paths on TestEngine, one event at a time: (transitions, s)."""
    transitions = 0
    t0 = time.perf_counter()
    async with TestEngine(pr.PlanReview, saga.OrderSaga) as te:
        for i in range(n):
            await te.trigger_message(
                pr.SUBMITTED, pr.PlanSubmitted(plan_id=f"p{i}", title="t", plan="p")
            )
            await te.callback(pr.PlanReview, f"p{i}", {"verdict": "approved"})
            await te.trigger_message(
                saga.PLACED,
                saga.OrderPlaced(order_id=f"o{i}", sku="mug", quantity=1, amount_cents=100),
            )
            await te.callback(saga.OrderSaga, f"o{i}", {"reserved": True})
            await te.callback(saga.OrderSaga, f"o{i}", {"approved": True})
            await te.callback(saga.OrderSaga, f"o{i}", {"tracking": "t"})
        elapsed = time.perf_counter() - t0
        for wf in (pr.PlanReview, saga.OrderSaga):
            for state in te.executions(wf):
                assert state.status is Status.COMPLETED
                transitions += len(state.timeline)
    return transitions, elapsed


def engine_floor(n: int) -> float:
    """Seconds per transition of the engine alone (TestEngine, settling after each event)."""
    transitions, elapsed = anyio.run(_happy_paths, n)
    return elapsed / transitions


# --------------------------------------------------------------------------- report


def machine_info() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "reactive", "benchmarks"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        commit, dirty = "?", ""
    return (
        f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, "
        f"Hypothesis {hypothesis.__version__}, msgspec {msgspec.__version__}; "
        f"commit `{commit}`{' (with uncommitted changes)' if dirty else ' (clean)'}"
    )


def report(
    runs: dict[str, list[Tally]],
    examples: int,
    hyp_floor: dict[str, float],
    per_transition: float,
    command: str,
    hunts: list[tuple[float, int]],
) -> str:
    results = {name: median(ts) for name, ts in runs.items()}
    lines = [
        f"`{command}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"- {machine_info()}",
        f"- engine alone (happy paths on TestEngine, settling after each event): "
        f"{per_transition * 1e6:.0f} µs per transition",
        "",
        "| machine | examples | total s (runs) | CPU s | others busy | per example ms "
        "| set-up s | engine s | checks s | draws s | Hypothesis s | steps/example "
        "| choices/example | x Hypothesis floor | x engine floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in results.items():
        steps = t.steps / max(1, t.examples)
        engine_alone = t.transitions * per_transition
        every = ", ".join(f"{r.total:.1f}" for r in runs[name])
        lines.append(
            f"| {name} | {t.examples} | {t.total:.1f} ({every}) | {t.cpu:.1f} "
            f"| {100 * t.others:.0f} % | {1000 * t.total / max(1, t.examples):.1f} "
            f"| {t.setup:.1f} | {t.engine:.1f} | {t.checks:.1f} | {t.draws:.1f} "
            f"| {t.hypothesis:.1f} | {steps:.1f} | {t.choices / max(1, t.examples):.0f} "
            f"| {t.total / hyp_floor[name]:.1f} "
            f"| {f'{t.total / engine_alone:.1f}' if engine_alone else '-'} |"
        )
    lines += [
        "",
        "The breakdown is that of the median run (by total). Others busy: the share of the "
        "machine's CPU other processes used during it. "
        "x Hypothesis floor: total / the same examples and steps of a machine that does nothing "
        f"({', '.join(f'{k}: {v:.1f} s' for k, v in hyp_floor.items())}). x engine floor: total / "
        "the engine alone making the run's transitions at the happy paths' cost per transition.",
        "",
        "| machine | executions | ended (share of executions) | completed "
        "| examples in which each rule fired (its result was handled: *) | phases visited |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in results.items():
        n = sum(t.executions.values())
        ended = ", ".join(f"{s} {c}" for s, c in t.executions.most_common())
        lines.append(
            f"| {name} | {n} | {ended or '-'} | {100 * t.executions['completed'] / max(1, n):.0f} % "
            f"| {', '.join(f'{r} {c}' for r, c in sorted(t.rules.items()))} "
            f"| {', '.join(sorted(repr(p) for p in t.phases))} |"
        )
    lines += [
        "",
        "Not reached (rules, results, phases the rules name, terminal statuses reachable, "
        "also through outside writes and outages):",
    ]
    lines += [f"- {name}: {'; '.join(t.unreached) or 'nothing'}" for name, t in results.items()]
    targets = [
        f"{name} {results[name].total:.1f} s (target {limit:g} s: "
        f"{'met' if results[name].total <= limit else 'NOT met'})"
        for name, limit in TARGETS.items()
        if name in results
    ]
    if targets and examples == 1000:
        lines += ["", f"Targets, 1,000 examples: {'; '.join(targets)}."]
    if hunts:
        found = [h for h in hunts if h[1]]
        lines += [
            "",
            f"The planted saga bug (tests/unit/saga_planted.py), default settings, no database, "
            f"{len(hunts)} runs: found in {len(found)}; seconds to the shrunk report "
            f"{', '.join(f'{s:.1f}' for s, _ in hunts)} (target 15 s); steps of the shrunk "
            f"example {', '.join(str(k) for _, k in hunts)} (target <= 4).",
        ]
    return "\n".join(lines) + "\n"


def median(runs: list[Tally]) -> Tally:
    return sorted(runs, key=lambda t: t.total)[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per machine (median shown)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each run, wait up to this many seconds for the machine to be mostly idle",
    )
    parser.add_argument(
        "--only", choices=["plan-review", "saga", "issue-to-pr", "cold-storage"], action="append"
    )
    parser.add_argument("--hunts", type=int, default=5, help="runs of the planted-bug hunt")
    parser.add_argument("--out", help="append the report to this markdown file")
    args = parser.parse_args()
    command = "python benchmarks/property.py " + " ".join(sys.argv[1:])
    runs: dict[str, list[Tally]] = {}
    hyp_floor: dict[str, float] = {}
    for name, (machine, _wf) in machines().items():
        if (args.only and name not in args.only) or (
            not args.only and name not in TARGETS and False
        ):
            continue
        for i in range(args.repeat if name in TARGETS else 1):
            if args.quiet_wait:
                wait_quiet(args.quiet_wait)
            print(f"{name}: {args.examples} examples, run {i + 1} ...", flush=True)
            t = measure(machine, args.examples)
            runs.setdefault(name, []).append(t)
            print(f"  {t.total:.1f} s (CPU {t.cpu:.1f} s, others busy {100 * t.others:.0f} %)")
        t = median(runs[name])
        hyp_floor[name] = hypothesis_floor(args.examples, round(t.steps / max(1, t.examples)))
    per_transition = engine_floor(50)
    hunts = bug_hunt(args.hunts) if args.hunts else []
    text = report(runs, args.examples, hyp_floor, per_transition, command.strip(), hunts)
    print()
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
