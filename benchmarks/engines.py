"""K engine processes on one workflow set: throughput and engine CPU per transition, summed.

    python benchmarks/engines.py                       # K = 1, 2, 4; 2 interleaved rounds
    python benchmarks/engines.py --engines 1,2,4,8 --rounds 3 --n 3000
    python benchmarks/engines.py --cluster             # against a 3-node cluster, R3

The 3-transition KV workflow (the one run.py measures) at 100 executions in flight,
driven by run.py's harness against one embedded nats-server; K ``engine`` contenders
(benchmarks/scenarios/engine_nats.py) serve it together. For each K it prints the
transitions per second, the engine CPU per transition summed over the K processes,
and both as ratios to K=1 measured in the same round. The machine's core count is
printed: K engines can only run faster than one where there are cores for them.

``--cluster`` runs it against a 3-node nats-server cluster (benchmarks/cluster.py): the
bucket, and every bucket and stream the engines make (``--replicas 3``), have 3 replicas;
each client is given all three URLs.
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

import nats  # noqa: E402
import run  # noqa: E402
from cluster import NatsCluster  # noqa: E402
from harness import Harness  # noqa: E402

from reactive import NatsServer  # noqa: E402


async def _create_bucket(url: str, bucket: str, replicas: int) -> None:
    if replicas == 1:
        await run._create_bucket(url, bucket)
        return
    nc = await nats.connect(url.split(","))
    # As NatsBackend.ensure_bucket makes them with replicas: no direct gets (a follower
    # that lags would answer).
    await nc.jetstream().create_key_value(bucket=bucket, history=1, replicas=replicas, direct=False)
    await nc.close()


async def _cleanup(url: str, names: dict[str, str]) -> None:
    nc = await nats.connect(url.split(","))
    js = nc.jetstream()
    for b in (names["bucket"], names["meta"]):
        try:
            await js.delete_key_value(b)
        except Exception:
            pass
    try:
        await js.delete_stream(names["cb_stream"])
    except Exception:
        pass
    await nc.close()


async def measure(
    url: str, server_pid: int | None, k: int, n: int, warm: int, c: int, replicas: int = 1
) -> dict[str, Any]:
    names = run._names(f"k{k}c{c}")
    await _create_bucket(url, names["bucket"], replicas)
    args = ["--url", url, "--replicas", str(replicas), *run._child_args("engine", names, "kv")]
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
        await _cleanup(url, names)
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
    cluster: NatsCluster | None = None
    server: NatsServer | None = None
    if args.cluster:
        cluster = NatsCluster(3)
        cluster.start()
        url, server_pid, replicas = cluster.url, None, 3
        print(f"on a 3-node cluster, R3: {url}")
    else:
        server = NatsServer()
        server.start()
        url, server_pid, replicas = server.url, server.pid, 1
    try:
        for round_ in range(1, args.rounds + 1):
            base: dict[str, Any] | None = None
            for k in ks:
                r = await measure(url, server_pid, k, args.n, args.warm, args.c, replicas)
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
        if cluster is not None:
            cluster.stop()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="1,2,4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--warm", type=int, default=200)
    p.add_argument("-c", type=int, default=100)
    p.add_argument("--cluster", action="store_true", help="a 3-node cluster, every stream R3")
    asyncio.run(main(p.parse_args()))
