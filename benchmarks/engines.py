"""K engine processes on one workflow set: throughput and engine CPU per transition, summed.

    python benchmarks/engines.py                       # K = 1, 2, 4; 2 interleaved rounds
    python benchmarks/engines.py --engines 1,2,4,8 --rounds 3 --n 3000

The 3-transition KV workflow (the one run.py measures) at 100 executions in flight,
driven by run.py's harness against one embedded nats-server; K ``engine`` contenders
(benchmarks/scenarios/engine_nats.py) serve it together. For each K it prints the
transitions per second, the engine CPU per transition summed over the K processes,
and both as ratios to K=1 measured in the same round. The machine's core count is
printed: K engines can only run faster than one where there are cores for them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "scenarios"))

import run  # noqa: E402
from harness import Harness  # noqa: E402

from reactive import NatsServer  # noqa: E402


async def measure(
    url: str, server_pid: int | None, k: int, n: int, warm: int, c: int
) -> dict[str, Any]:
    names = run._names(f"k{k}c{c}")
    await run._create_bucket(url, names["bucket"])
    args = ["--url", url, *run._child_args("engine", names, "kv")]
    harness = Harness(url, names["bucket"], names["done"], "")
    children = [run.Child(run.SCRIPTS["engine"], args) for _ in range(k)]
    try:
        await harness.start()
        for child in children:
            await child.start()
        if warm:
            await harness.drive("w", warm, c)
        for child in children:
            await child.mark()
        window = run.CpuWindow(server_pid, None)
        stats = await harness.drive("m", n, c)
        stats.update(window.stop())
        results = [await child.stop() for child in children]
    finally:
        for child in children:
            await child.kill()
            child.cleanup()
        await harness.close()
        await run._cleanup(url, names)
    cpu = sum(r.get("cpu_s", 0.0) for r in results)
    transitions = stats["transitions"]
    return {
        "engines": k,
        "transitions_per_s": transitions / stats["elapsed_s"],
        "engine_cpu_us_per_transition": 1e6 * cpu / transitions if transitions else float("nan"),
        "cpu_per_engine_s": [round(r.get("cpu_s", 0.0), 3) for r in results],
    }


async def main(args: argparse.Namespace) -> None:
    ks = [int(x) for x in args.engines.split(",")]
    cores = os.cpu_count() or 1
    print(f"cores: {cores}; engines: {ks}; {args.n} executions at c={args.c}, {args.rounds} rounds")
    server = NatsServer()
    server.start()
    try:
        for round_ in range(1, args.rounds + 1):
            base: dict[str, Any] | None = None
            for k in ks:
                r = await measure(server.url, server.pid, k, args.n, args.warm, args.c)
                base = base or r
                print(
                    f"round {round_} K={k}: {r['transitions_per_s']:8.0f} transitions/s "
                    f"({r['transitions_per_s'] / base['transitions_per_s']:.2f}x K=1), "
                    f"engine CPU {r['engine_cpu_us_per_transition']:6.0f} µs/transition summed "
                    f"({r['engine_cpu_us_per_transition'] / base['engine_cpu_us_per_transition']:.2f}x K=1), "
                    f"per engine {r['cpu_per_engine_s']}",
                    flush=True,
                )
    finally:
        server.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="1,2,4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--warm", type=int, default=200)
    p.add_argument("-c", type=int, default=100)
    asyncio.run(main(p.parse_args()))
