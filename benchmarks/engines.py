"""K engine processes on one workflow set: throughput and engine CPU per transition, summed.

    python benchmarks/engines.py                       # K = 1, 2, 4; 2 interleaved rounds
    python benchmarks/engines.py --engines 1,2,4,8 --rounds 3 --n 3000
    python benchmarks/engines.py --cluster             # against a 3-node cluster, R3
    python benchmarks/engines.py --cluster --kill-node # and a node SIGKILLed in each window

The 3-transition KV workflow (the one run.py measures) at 100 executions in flight,
driven by run.py's harness against one embedded nats-server; K ``engine`` contenders
(benchmarks/scenarios/engine_nats.py) serve it together. For each K it prints the
transitions per second, the engine CPU per transition summed over the K processes,
and both as ratios to K=1 measured in the same round. The machine's core count is
printed (and how many are about free: the cores less the load average): K engines can
only run faster than one where there are cores for them. At the end it says, round by
round, which of issue 11's targets were met: K=2 and K=4 at 0.9x one engine's throughput
or more, K=4 at 1.25x its CPU or less, and, where about 8 cores or more are free, K=4 at
3x its throughput or more (not judged on fewer).

``--cluster`` runs it against a 3-node nats-server cluster (benchmarks/cluster.py): the
bucket, and every bucket and stream the engines make (``--replicas 3``), have 3 replicas;
each client is given all three URLs.

``--kill-node`` (with ``--cluster``) SIGKILLs one node in the middle of each K's measured
window (once half its executions have completed): the node that leads the bucket's stream
then, where every transition is written. It is started again (same ports and store)
``--down`` seconds later (default 3), and the next K starts once it is back. The figures
are those of the whole window, the kill included: throughput drops while the streams
elect new leaders and the clients reconnect, and the line says when the node went down
and came back, and the longest time without a completion (the failover's pause). The
load side tries a failed create again and also counts an execution
done when it sees it completed (a completion event sent while a connection moves is
lost); transitions are counted as 3 per completed execution (compare-and-set commits
each once), the observer's count is printed beside it, since a watch that moves to
another node can miss a revision history 1 has already replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.request
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


async def _kill_mid_window(
    cluster: NatsCluster, harness: Harness, bucket: str, n: int, down: float, log: dict[str, Any]
) -> None:
    """Once half of the window's ``n`` executions are done, SIGKILL the node leading the
    bucket's stream; ``down`` seconds later start it again and wait until the cluster sees
    it. The moments (seconds into the window) go into ``log``."""
    # Started right before ``drive``, it first runs once drive has set ``remaining`` to n.
    t0 = time.monotonic()
    while harness.remaining > n - n // 2:
        await asyncio.sleep(0.02)
    nc = await nats.connect(cluster.urls)
    try:
        leader = (await nc.jetstream().stream_info(f"KV_{bucket}")).cluster.leader
    finally:
        await nc.close()
    node = int(leader.removeprefix("n"))
    cluster.kill(node)
    log.update(node=leader, killed_at_s=round(time.monotonic() - t0, 2))
    await asyncio.sleep(down)
    await asyncio.to_thread(cluster.restart, node, 120.0)
    log["back_at_s"] = round(time.monotonic() - t0, 2)


def _engine_messages(port: int) -> tuple[int, int]:
    """Messages the server took from and delivered to the engines' connections so far
    (``connz`` on its monitoring port: the connections named ``reactive``)."""
    url = f"http://127.0.0.1:{port}/connz?state=all&limit=100000"
    with urllib.request.urlopen(url, timeout=5) as reply:
        conns: list[dict[str, Any]] = json.load(reply)["connections"]
    mine = [c for c in conns if c.get("name") == "reactive"]
    return sum(c["in_msgs"] for c in mine), sum(c["out_msgs"] for c in mine)


def _messages(r: dict[str, Any]) -> str:
    m = r.get("messages_per_transition")
    return f"; messages per transition: {m[0]:.2f} to the server, {m[1]:.2f} from it" if m else ""


async def measure(
    url: str,
    server_pid: int | None,
    k: int,
    n: int,
    warm: int,
    c: int,
    replicas: int = 1,
    cluster: NatsCluster | None = None,
    down: float = 3.0,
    monitor_port: int = 0,
) -> dict[str, Any]:
    names = run._names(f"k{k}c{c}")
    await _create_bucket(url, names["bucket"], replicas)
    args = ["--url", url, "--replicas", str(replicas), *run._child_args("engine", names, "kv")]
    harness = Harness(url, names["bucket"], names["done"], "", failover=cluster is not None)
    children = [run.Child(run.SCRIPTS["engine"], args) for _ in range(k)]
    kill: dict[str, Any] = {}
    killer: asyncio.Task[None] | None = None
    try:
        await harness.start()
        for child in children:
            await child.start()
        if warm:
            await harness.drive("w", warm, c)
        for child in children:
            await child.mark()
        window = run.CpuWindow(server_pid, None)
        msgs_before = _engine_messages(monitor_port) if monitor_port else (0, 0)
        if cluster is not None:
            killer = asyncio.create_task(
                _kill_mid_window(cluster, harness, names["bucket"], n, down, kill)
            )
        stats = await harness.drive("m", n, c)
        stats.update(window.stop())
        msgs_after = _engine_messages(monitor_port) if monitor_port else (0, 0)
        results = [await child.stop() for child in children]
        if killer is not None:
            await killer  # the node is back before the next K
            kill["window_s"] = round(stats["elapsed_s"], 2)
    finally:
        if killer is not None and not killer.done():
            killer.cancel()
            with contextlib.suppress(BaseException):
                await killer
        for child in children:
            await child.kill()
            child.cleanup()
        await harness.close()
        await _cleanup(url, names)
    cpu = sum(r.get("cpu_s", 0.0) for r in results)
    transitions = stats["transitions"]
    if monitor_port and transitions:
        # What the server took from the engines and delivered to them, per transition.
        taken, delivered = (b - a for a, b in zip(msgs_before, msgs_after, strict=True))
        stats["messages"] = (taken / transitions, delivered / transitions)
    out = {
        "engines": k,
        "transitions_per_s": transitions / stats["elapsed_s"],
        "engine_cpu_us_per_transition": 1e6 * cpu / transitions if transitions else float("nan"),
        "cpu_per_engine_s": [round(r.get("cpu_s", 0.0), 3) for r in results],
        "messages_per_transition": stats.get("messages"),
    }
    if cluster is not None:
        # Each completed execution committed its 3 transitions once (compare-and-set); the
        # observer may have missed a revision while its watch moved off the killed node.
        transitions = 3 * stats["executions"]
        out.update(
            transitions_per_s=transitions / stats["elapsed_s"],
            engine_cpu_us_per_transition=1e6 * cpu / transitions,
            observed_transitions=stats["transitions"],
            longest_pause_s=stats["done_gap_max_s"],
            create_retries=harness.create_retries,
            node_kill=kill,
        )
    return out


async def main(args: argparse.Namespace) -> None:
    ks = [int(x) for x in args.engines.split(",")]
    cores = len(os.sched_getaffinity(0))
    free = max(0.0, cores - os.getloadavg()[0])
    print(
        f"cores: {cores} (about {free:.1f} free); engines: {ks}; {args.n} executions at "
        f"c={args.c}, {args.rounds} rounds"
    )
    ratios: dict[int, list[tuple[float, float]]] = {}  # K: (throughput, CPU) against K=1
    cluster: NatsCluster | None = None
    server: NatsServer | None = None
    if args.cluster:
        cluster = NatsCluster(3)
        cluster.start()
        url, server_pid, replicas = cluster.url, None, 3
        print(f"on a 3-node cluster, R3: {url}")
        if args.kill_node:
            print(
                f"a node SIGKILLed mid-window in every K, back after {args.down:g}s: "
                "the figures include the failover"
            )
    else:
        # (--monitor-port: the server's monitoring endpoint, for engines_probe.py's connz.)
        server = NatsServer(extra_args=["-m", str(args.monitor_port)] if args.monitor_port else [])
        server.start()
        url, server_pid, replicas = server.url, server.pid, 1
    try:
        for round_ in range(1, args.rounds + 1):
            base: dict[str, Any] | None = None
            for k in ks:
                r = await measure(
                    url,
                    server_pid,
                    k,
                    args.n,
                    args.warm,
                    args.c,
                    replicas,
                    cluster if args.kill_node else None,
                    args.down,
                    args.monitor_port,
                )
                base = base or r
                ratios.setdefault(k, []).append(
                    (
                        r["transitions_per_s"] / base["transitions_per_s"],
                        r["engine_cpu_us_per_transition"] / base["engine_cpu_us_per_transition"],
                    )
                )
                kill = ""
                if args.kill_node:
                    nk = r["node_kill"]
                    kill = (
                        f"; node {nk['node']} killed {nk['killed_at_s']}s into the "
                        f"{nk['window_s']}s window, back at {nk['back_at_s']}s, "
                        f"longest pause without a completion {r['longest_pause_s']:.2f}s; "
                        f"{r['observed_transitions']} transitions observed of "
                        f"{3 * args.n}, {r['create_retries']} creates retried"
                    )
                print(
                    f"round {round_} K={k}: {r['transitions_per_s']:8.0f} transitions/s "
                    f"({r['transitions_per_s'] / base['transitions_per_s']:.2f}x K=1), "
                    f"engine CPU {r['engine_cpu_us_per_transition']:6.0f} µs/transition summed "
                    f"({r['engine_cpu_us_per_transition'] / base['engine_cpu_us_per_transition']:.2f}x K=1), "
                    f"per engine {r['cpu_per_engine_s']}{kill}{_messages(r)}",
                    flush=True,
                )
    finally:
        if cluster is not None:
            cluster.stop()
        if server is not None:
            server.stop()
    if ks[0] == 1 and not args.kill_node:
        _targets(ratios, free)


def _targets(ratios: dict[int, list[tuple[float, float]]], free: float) -> None:
    """Issue 11's targets, round by round: K=2 and K=4 at 0.9x one engine's throughput or
    more; K=4's CPU at 1.25x or less; and with 8 free cores or more, K=4 at 3x or more."""

    def verdict(k: int, what: str, values: list[float], ok: Any) -> None:
        shown = ", ".join(f"{v:.2f}x" for v in values)
        met = sum(1 for v in values if ok(v))
        print(f"  K={k} {what}: {shown}: met in {met} of {len(values)} rounds")

    print("targets (issue 11), each round against its own K=1:")
    for k in (2, 4):
        if k in ratios:
            verdict(k, "throughput >= 0.9x", [t for t, _ in ratios[k]], lambda v: v >= 0.9)
    if 4 in ratios:
        verdict(4, "CPU <= 1.25x", [c for _, c in ratios[4]], lambda v: v <= 1.25)
        if free >= 8:
            verdict(4, "throughput >= 3x", [t for t, _ in ratios[4]], lambda v: v >= 3.0)
        else:
            print(f"  K=4 throughput >= 3x: not judged here, about {free:.1f} free cores (needs 8)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="1,2,4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--warm", type=int, default=200)
    p.add_argument("-c", type=int, default=100)
    p.add_argument("--cluster", action="store_true", help="a 3-node cluster, every stream R3")
    p.add_argument(
        "--kill-node",
        action="store_true",
        help="with --cluster: SIGKILL a node in the middle of each measured window, restart it",
    )
    p.add_argument("--down", type=float, default=3.0, help="seconds the node stays down")
    p.add_argument(
        "--monitor-port",
        type=int,
        default=0,
        help="the server's monitoring port: also count the engines' messages (one server only)",
    )
    parsed = p.parse_args()
    if parsed.kill_node and not parsed.cluster:
        p.error("--kill-node needs --cluster")
    asyncio.run(main(parsed))
