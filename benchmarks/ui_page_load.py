"""The web view with 10^5 executions stored: how long its pages take to load.

    python benchmarks/ui_page_load.py                 # 100,000 executions, 20 loads per page
    python benchmarks/ui_page_load.py --executions 10000 --loads 10

An embedded nats-server (JetStream, file storage, loopback) holds N executions of the
plan-review example (each state as the engine writes it: a timeline of 5 entries, a mix
of statuses and phases) and the example's announcement. The web view runs in this
process as ``python -m reactive ui`` runs it (uvicorn on a loopback socket, its index
built from the KV by a watch); the pages are loaded over HTTP with httpx, one at a time,
after the index has taken in every execution. Printed: the time to write the
executions, the time the index took to take them in and the memory it holds, then the
median, p90 and max of each page's load time.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx
import msgspec

from reactive import NatsBackend, NatsServer
from reactive.cli.demo import load_example
from reactive.dsl.workflow import definition_of
from reactive.meta import describe_workflow, workflow_key
from reactive.ui.server import UIServer, bind

REPO = Path(__file__).resolve().parents[1]
META = "REACTIVE_META"
STATUSES = ("completed",) * 6 + ("waiting", "running", "failed", "escalated")
PHASES = {"completed": "approved", "waiting": "submitted", "running": "revise"}


def _state(i: int, t0: datetime) -> bytes:
    status = STATUSES[i % len(STATUSES)]
    at = t0 + timedelta(milliseconds=i)
    steps = [
        ("submit", "message+state", "mutate", "submitted"),
        ("request_review", "kv", "publish_async", "submitted"),
        ("request_review", "callback", "callback", "revise"),
        ("revise", "kv", "mutate", "submitted"),
        ("request_review", "kv", "publish_async", "submitted"),
    ]
    return msgspec.json.encode(
        {
            "id": f"plan-{i:06d}",
            "workflow_id": "plan-review",
            "phase": PHASES.get(status, "submitted"),
            "iteration": 1,
            "status": status,
            "error": "no reviewer" if status == "failed" else "",
            "created_at": at,
            "updated_at": at + timedelta(seconds=2),
            "timeline": [
                {
                    "timestamp": at + timedelta(milliseconds=100 * n),
                    "rule_id": rule,
                    "trigger_mode": mode,
                    "action": action,
                    "phase_after": phase,
                    "iteration": 1 if n >= 3 else 0,
                }
                for n, (rule, mode, action, phase) in enumerate(steps)
            ],
            "title": f"plan {i}",
            "plan": "Scope: one service.\nTests: yes.\nRollback: a flag.",
            "reviews": 1,
        }
    )


async def _store(url: str, n: int) -> float:
    plan_review = load_example(REPO / "examples" / "plan_review.py")
    info = describe_workflow(definition_of(plan_review.PlanReview))
    backend = NatsBackend(url)
    await backend.start()
    started = time.perf_counter()
    try:
        for bucket in (META, info.bucket):
            await backend.ensure_bucket(bucket)
        await backend.kv_put(META, workflow_key(info.id), msgspec.json.encode(info))
        t0 = datetime.now(UTC) - timedelta(hours=1)
        for start in range(0, n, 1000):
            for i in range(start, min(n, start + 1000)):
                await backend.kv_put_unacked(
                    info.bucket, f"plan-review.plan-{i:06d}", _state(i, t0)
                )
            await backend.nc.flush()
        # The last one acknowledged: every write before it is stored.
        await backend.kv_put(info.bucket, "plan-review.plan-000000", _state(0, t0))
    finally:
        await backend.close()
    return time.perf_counter() - started


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


async def _measure(url: str, n: int, loads: int) -> None:
    backend = NatsBackend(url)
    await backend.start()
    server = UIServer(bind("127.0.0.1", 0))
    stop = anyio.Event()
    gc.collect()
    rss_before = _rss_mb()
    try:
        async with anyio.create_task_group() as tg:
            started = time.perf_counter()
            tg.start_soon(server.run, backend, META, stop)
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                while True:
                    try:
                        health = (await client.get("/ui/healthz")).text
                    except httpx.TransportError:
                        health = ""
                    if f"ok {n} " in health:
                        break
                    await anyio.sleep(0.05)
                took = time.perf_counter() - started
                gc.collect()
                print(
                    f"index: {n:,} executions taken in {took:.2f} s "
                    f"({n / took:,.0f}/s); process RSS +{_rss_mb() - rss_before:.0f} MB",
                    flush=True,
                )
                deep = max(1, n // 50 // 2)
                pages = [
                    ("workflows", "/workflows"),
                    ("executions, page 1", "/executions"),
                    ("executions, page 1 of one workflow", "/executions?workflow=plan-review"),
                    (f"executions, page {deep:,} (the middle)", f"/executions?page={deep}"),
                    ("executions, status=failed (a filtered scan)", "/executions?status=failed"),
                    ("executions, search id '12345'", "/executions?q=12345"),
                    (
                        "executions, phase + status, page 50",
                        "/executions?phase=approved&status=completed&page=50",
                    ),
                    ("one execution", f"/executions/plan-review/plan-{n // 2:06d}"),
                ]
                print(f"{'page':48} {'median':>9} {'p90':>9} {'max':>9}  (ms, {loads} loads)")
                for name, path in pages:
                    times = []
                    for _ in range(loads):
                        t = time.perf_counter()
                        r = await client.get(path)
                        times.append((time.perf_counter() - t) * 1000)
                        assert r.status_code == 200, (path, r.status_code, r.text[:300])
                    times.sort()
                    p90 = times[min(len(times) - 1, int(len(times) * 0.9))]
                    print(
                        f"{name:48} {statistics.median(times):9.2f} {p90:9.2f} {times[-1]:9.2f}",
                        flush=True,
                    )
            stop.set()
    finally:
        server.close()
        await backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=100_000)
    parser.add_argument("--loads", type=int, default=20, help="loads of each page")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as store:
        server = NatsServer(data_dir=Path(store))
        server.start()
        try:
            wrote = anyio.run(_store, server.url, args.executions)
            print(f"stored {args.executions:,} executions in {wrote:.1f} s", flush=True)
            anyio.run(_measure, server.url, args.executions, args.loads)
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
