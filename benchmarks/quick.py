"""A quick comparison while changing the engine: a few contenders at c=100, interleaved.

    python benchmarks/quick.py                          # KV workflow, floor and engine, 2 rounds
    python benchmarks/quick.py --workflows kv,async --contenders floor,engine,peer --rounds 3
    python benchmarks/quick.py --at-rest 1000,100000    # engine memory at rest instead
    python benchmarks/quick.py --profile /tmp/engine.raw   # one engine run under py-spy (raw stacks)
    python benchmarks/quick.py --memory /path/to/old,.  --rounds 5   # in memory, checkouts interleaved

Each line is one run (its own contender process, one embedded nats-server for all);
compare an engine run with the floor runs around it. ``run.py`` is the full suite
and writes RESULTS.md; this prints one line per run and writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import run

from reactive import NatsServer


def _line(workflow: str, contender: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{workflow:5} {contender:7} error: {r['error'][:300]}"
    srv = 1000 * r.get("server_cpu_s", 0.0) / max(1, r["executions"])
    return (
        f"{workflow:5} {contender:7} execs/s {r['exec_per_s']:7.0f}  "
        f"CPU µs/event {r['cpu_us_per_event']:5.0f}  writes/exec {r['writes_per_exec']:.2f}  "
        f"loops/exec {r['loop_iterations_per_exec']:.2f}  server ms/exec {srv:.2f}  "
        f"p99 ms {r.get('lat_p99_ms', 0.0):.1f}"
    )


def memory(checkouts: list[str], rounds: int, n: int) -> None:
    """The in-memory 3-transition workflow (c=100) in each checkout, interleaved, rounds times."""
    cost: dict[str, list[float]] = {c: [] for c in checkouts}
    for _ in range(rounds):
        for checkout in checkouts:
            root = Path(checkout).resolve()
            out = subprocess.run(
                [sys.executable, "inmemory.py", "--what", "transitions", "--n", str(n)],
                cwd=root / "benchmarks" / "scenarios",
                env=dict(os.environ, PYTHONPATH=str(root)),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            ready = next(e for e in map(json.loads, out.splitlines()) if e.get("event") == "ready")
            cost[checkout].append(ready["cpu_us_per_event"])
    for checkout, values in cost.items():
        values.sort()
        print(
            f"{checkout}: CPU µs per KV event lowest {values[0]:.1f}, median "
            f"{values[len(values) // 2]:.1f} (runs {', '.join(f'{v:.1f}' for v in values)})"
        )


async def main(args: argparse.Namespace) -> None:
    if args.memory:
        memory(args.memory.split(","), args.rounds, max(args.n, 3000))
        return
    server = NatsServer()
    server.start()
    try:
        if args.at_rest:
            for n in (int(x) for x in args.at_rest.split(",")):
                r = await run.run_at_rest(server.url, n)
                keep = ("replay_s", "rss_before_mb", "rss_after_mb", "maxrss_mb", "timers")
                print(
                    n,
                    {k: round(r[k], 1) if isinstance(r.get(k), float) else r.get(k) for k in keep},
                )
            return
        if args.profile:
            r = await run.run_contender(
                server.url,
                "engine",
                args.workflows.split(",")[0],
                100,
                args.n,
                200,
                server_pid=server.pid,
                profile=args.profile,
            )
            print(
                _line(args.workflows.split(",")[0], "engine", r), f"(py-spy stacks: {args.profile})"
            )
            return
        for workflow in args.workflows.split(","):
            for _ in range(args.rounds):
                for contender in args.contenders.split(","):
                    r = await run.run_contender(
                        server.url, contender, workflow, 100, args.n, 200, server_pid=server.pid
                    )
                    print(_line(workflow, contender, r), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workflows", default="kv", help="kv, async or both (comma-separated)")
    p.add_argument("--contenders", default="floor,engine", help="floor, engine, peer")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n", type=int, default=1000, help="executions measured per run")
    p.add_argument("--at-rest", default="", help="engine memory at rest for these counts")
    p.add_argument("--profile", default="", help="one engine run under py-spy, raw stacks here")
    p.add_argument("--memory", default="", help="in memory instead: these checkouts, interleaved")
    asyncio.run(main(p.parse_args()))
