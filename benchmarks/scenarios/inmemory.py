"""The engine on the in-memory backend: what property-based tests pay.

``--what transitions``  the 3-transition KV workflow on ``Engine(MemoryBackend())``
                        (system clock, 32 workers), ``--n`` executions with
                        ``--conc`` in flight; an execution is done when its
                        completion event is published. Reports executions/s and
                        transitions/s (3 per execution).
``--what evaluations``  the same workflow plus ``--conditions`` rules whose cheap
                        condition is evaluated on every event and never passes
                        (rules that only publish, so all of them are evaluated);
                        every condition call is counted. Reports evaluations/s.
``--what testengine``   ``reactive.testing.TestEngine``, one execution at a time:
                        ``trigger_kv`` writes the first state and settles, as a
                        property-based test step does. Reports executions/s.
``--what noise``        the 3-transition workflow plus ``--noise`` rules whose
                        patterns never match; reports wall time per KV event
                        (4 events per execution: the first state and 3 transitions).
``--what scaling``      the same for every count in ``--noise-list``, paired: one
                        engine per count in this process, and ``--rounds`` rounds
                        in each of which every engine runs a burst of ``--n``
                        executions, one right after the other. Reports each count's
                        CPU µs per KV event per round, and per round its ratio to
                        the first count's: bursts a fraction of a second apart see
                        the machine in the same phase, so the ratios hold where
                        single runs drift (the shared machine switches between a
                        fast phase and one up to 1.9x slower within seconds).

Everything runs in this one process, so wall time is CPU time of the engine
(plus the few microseconds of the driver) -- the cleanest per-event cost.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import common
import msgspec
from workflows import Counter, kv_workflow

from reactive import Engine, MemoryBackend
from reactive.testing import TestEngine

BUCKET = "BENCH_MEM"
DONE = "bench.done"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--what",
        choices=["transitions", "evaluations", "testengine", "noise", "scaling"],
        required=True,
    )
    p.add_argument("--noise-list", default="1,10,100,1000", help="for --what scaling")
    p.add_argument("--rounds", type=int, default=15, help="for --what scaling")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--conc", type=int, default=100)
    p.add_argument("--conditions", type=int, default=100)
    p.add_argument("--noise", type=int, default=0)
    p.add_argument("--workers", type=int, default=128)  # the engine's default
    return p.parse_args()


def first_state(eid: str) -> bytes:
    return msgspec.json.encode(
        {"id": eid, "workflow_id": common.WF_ID, "phase": "a", "status": "running"}
    )


async def drive_engine(
    wf: Any, n: int, conc: int, workers: int, warm: int, counter: Counter | None = None
) -> dict[str, Any]:
    backend = MemoryBackend()
    engine = Engine(backend, [wf], workers=workers)
    out: dict[str, Any] = {}
    async with engine:
        while not engine.ready:
            await anyio.sleep(0.001)
        async with backend.subscribe(DONE) as done_msgs, anyio.create_task_group() as tg:
            for phase, count in (("w", warm), ("m", n)):
                # Closed loop, like the NATS harness at c=100: `conc` executions start,
                # and each completion event starts the next, until `count` have run.
                finished = anyio.Event()
                started = 0

                async def start_next(phase: str = phase, count: int = count) -> None:
                    nonlocal started
                    if started < count:
                        eid = f"{phase}{started:07d}"
                        started += 1
                        await backend.kv_create(BUCKET, f"{common.WF_ID}.{eid}", first_state(eid))

                async def listen(finished: anyio.Event = finished, count: int = count) -> None:
                    done = 0
                    async for _msg in done_msgs:
                        done += 1
                        if done == count:
                            finished.set()
                            return
                        await start_next()

                tg.start_soon(listen)
                t0 = time.perf_counter()
                cpu0 = common.cpu_seconds()
                busy0 = common.machine_busy()
                evals0 = counter.n if counter is not None else 0
                for _ in range(min(conc, count)):
                    await start_next()
                with anyio.fail_after(300):
                    await finished.wait()
                elapsed = time.perf_counter() - t0
                if phase == "m":
                    cpu = common.cpu_seconds() - cpu0
                    others = max(0.0, common.machine_busy() - busy0 - cpu)
                    out = {
                        "executions": count,
                        "transitions": 3 * count,
                        "elapsed_s": elapsed,
                        "cpu_s": cpu,
                        "cpu_us_per_event": cpu / (4 * count) * 1e6,
                        "others_busy_pct": 100 * others / (elapsed * (os.cpu_count() or 1)),
                        "exec_per_s": count / elapsed,
                        "trans_per_s": 3 * count / elapsed,
                        "us_per_event": elapsed / (4 * count) * 1e6,
                    }
                    if counter is not None:
                        out["evaluations"] = counter.n - evals0
                        out["evals_per_s"] = out["evaluations"] / elapsed
            tg.cancel_scope.cancel()
        # Sanity: every measured execution completed after exactly 3 transitions.
        wrong = 0
        for i in range(0, n, max(1, n // 50)):
            st = await engine.get(wf, f"m{i:07d}")
            if st is None or st.status.value != "completed" or len(st.timeline) != 3:
                wrong += 1
        out["sanity_wrong"] = wrong
    return out


async def scaling(
    noises: list[int], n: int, conc: int, workers: int, rounds: int
) -> dict[str, Any]:
    """Per-event CPU cost for each rule count, measured in paired bursts (see the module doc)."""
    async with contextlib.AsyncExitStack() as stack:
        setups = []
        for noise in noises:
            backend = MemoryBackend()
            engine = Engine(backend, [kv_workflow(BUCKET, DONE, noise=noise)], workers=workers)
            await stack.enter_async_context(engine)
            while not engine.ready:
                await anyio.sleep(0.001)
            done = await stack.enter_async_context(backend.subscribe(DONE))
            setups.append((noise, backend, done))

        async def burst(backend: MemoryBackend, done: Any, tag: str, count: int) -> None:
            # Closed loop, as drive_engine: `conc` in flight, each completion starts the next.
            started = 0

            async def start_next() -> None:
                nonlocal started
                if started < count:
                    eid = f"{tag}{started:07d}"
                    started += 1
                    await backend.kv_create(BUCKET, f"{common.WF_ID}.{eid}", first_state(eid))

            for _ in range(min(conc, count)):
                await start_next()
            finished = 0
            async for _msg in done:
                finished += 1
                if finished == count:
                    return
                await start_next()

        for i, (_noise, backend, done) in enumerate(setups):
            await burst(backend, done, f"w{i}x", max(50, n // 5))
        costs: dict[int, list[float]] = {noise: [] for noise in noises}
        with anyio.fail_after(600):
            for r in range(rounds):
                for i, (noise, backend, done) in enumerate(setups):
                    cpu0 = time.process_time()
                    await burst(backend, done, f"r{r}c{i}x", n)
                    costs[noise].append((time.process_time() - cpu0) / (4 * n) * 1e6)
    first = noises[0]
    out: dict[str, Any] = {"rounds": rounds, "executions_per_burst": n, "per_count": {}}
    for noise in noises:
        ratios = sorted(c / b for c, b in zip(costs[noise], costs[first], strict=True))
        out["per_count"][str(noise)] = {
            "lowest_us_per_event": min(costs[noise]),
            "median_us_per_event": sorted(costs[noise])[len(costs[noise]) // 2],
            "runs_us_per_event": [round(c, 1) for c in costs[noise]],
            "median_ratio_to_first": ratios[len(ratios) // 2],
        }
    return out


async def testengine(n: int) -> dict[str, Any]:
    counter = Counter()
    wf = kv_workflow(BUCKET, DONE, counter=counter)
    async with TestEngine(wf) as te:
        for i in range(20):  # warm-up
            await te.trigger_kv(wf, f"w{i}", first_state(f"w{i}"))
        t0 = time.perf_counter()
        for i in range(n):
            await te.trigger_kv(wf, f"m{i}", first_state(f"m{i}"))
        elapsed = time.perf_counter() - t0
        te.assert_status(wf, f"m{n - 1}", "completed")
    return {
        "executions": n,
        "elapsed_s": elapsed,
        "exec_per_s": n / elapsed,
        "trans_per_s": 3 * n / elapsed,
    }


def main() -> None:
    args = parse()

    @contextlib.asynccontextmanager
    async def start() -> AsyncIterator[dict[str, Any]]:
        warm = max(50, args.n // 10)
        if args.what == "transitions":
            info = await drive_engine(
                kv_workflow(BUCKET, DONE), args.n, args.conc, args.workers, warm
            )
        elif args.what == "noise":
            info = await drive_engine(
                kv_workflow(BUCKET, DONE, noise=args.noise), args.n, args.conc, args.workers, warm
            )
        elif args.what == "scaling":
            info = await scaling(
                [int(x) for x in args.noise_list.split(",")],
                args.n,
                args.conc,
                args.workers,
                args.rounds,
            )
        elif args.what == "evaluations":
            counter = Counter()
            wf = kv_workflow(BUCKET, DONE, extra_conditions=args.conditions, counter=counter)
            info = await drive_engine(wf, args.n, args.conc, args.workers, warm, counter)
            info["conditions_per_event"] = info["evaluations"] / (4 * args.n)
        else:
            info = await testengine(args.n)
        yield info

    common.run(lambda: common.serve(start))


if __name__ == "__main__":
    main()
