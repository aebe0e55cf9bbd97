"""Contender "engine": the benchmark workflows in the reactive DSL, on the NATS backend.

Run by ``benchmarks/run.py``; speaks the protocol in ``common.py``.

``--workflow kv``     the 3-transition KV-driven workflow (``workflows.kv_workflow``),
                      optionally with ``--noise N`` non-matching rules;
``--workflow async``  the publish_async round trip (``workflows.async_workflow``);
                      the simulated worker runs in the harness.
``--at-rest``         no load: start, replay the bucket (prepared by the harness
                      with N executions at rest), wait until the replay has been
                      processed, and report RSS before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import common
from workflows import BenchState, async_workflow, kv_workflow

from reactive import ConflictError, Engine, NatsBackend, Status, TransientBackendError


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True, help="a server URL, or several joined by commas")
    p.add_argument("--replicas", type=int, default=1, help="of the buckets and streams it makes")
    p.add_argument("--bucket", required=True)
    p.add_argument("--workflow", choices=["kv", "async"], default="kv")
    p.add_argument("--done-subject", required=True)
    p.add_argument("--work-subject", default="")
    p.add_argument("--cb-stream", default="REACTIVE_CALLBACKS")
    p.add_argument("--cb-prefix", default="reactive.callback")
    p.add_argument("--meta-bucket", default="REACTIVE_META")
    p.add_argument("--noise", type=int, default=0)
    p.add_argument("--workers", type=int, default=128)  # the engine's default
    p.add_argument("--profile", default=None)
    p.add_argument("--ready-timeout", type=float, default=30.0)
    p.add_argument("--at-rest", action="store_true")
    p.add_argument(
        "--tracemalloc",
        action="store_true",
        help="at rest: report the top allocation sites still held",
    )
    return p.parse_args()


def _arenas() -> int | None:
    """pymalloc's 1 MiB arenas in use: a few live objects keep a whole arena."""
    import os
    import tempfile

    try:
        with tempfile.TemporaryFile() as f:
            saved = os.dup(2)
            os.dup2(f.fileno(), 2)
            try:
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            f.seek(0)
            for line in f.read().decode(errors="replace").splitlines():
                if line.startswith("# arenas allocated current"):
                    return int(line.split("=")[1].replace(",", "").strip())
    except (OSError, ValueError, AttributeError):
        pass
    return None


def main() -> None:
    args = parse()
    if args.workflow == "kv":
        wf = kv_workflow(args.bucket, args.done_subject, noise=args.noise)
    else:
        wf = async_workflow(args.bucket, args.done_subject, args.work_subject)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def start() -> AsyncIterator[dict[str, Any]]:
        urls = args.url.split(",")
        backend = NatsBackend(urls if len(urls) > 1 else urls[0], replicas=args.replicas)
        engine = Engine(
            backend,
            [wf],
            meta_bucket=args.meta_bucket,
            callback_stream=args.cb_stream,
            callback_prefix=args.cb_prefix,
            workers=args.workers,
        )
        info: dict[str, Any] = {}
        if args.at_rest:
            if args.tracemalloc:
                import tracemalloc

                tracemalloc.start(12)
            await backend.start()
            gc.collect()
            info["rss_before_kb"] = common.rss_kb()
            info["blocks_before"] = sys.getallocatedblocks()
        t0 = time.perf_counter()
        async with backend, engine:
            with anyio.move_on_after(args.ready_timeout):
                while not engine.ready:
                    await anyio.sleep(0.01)
            if not engine.ready:
                consumers: Any = "?"
                with contextlib.suppress(Exception):
                    info_ = await backend.nc.jetstream().stream_info(f"KV_{args.bucket}")
                    consumers = info_.state.consumer_count
                common.emit(
                    {
                        "event": "error",
                        "error": f"the engine was not ready (watching) after {args.ready_timeout:g} s; "
                        f"consumers on the bucket's stream: {consumers}",
                    }
                )
                raise SystemExit(3)
            if args.at_rest:
                # Where does the replay wait? Sample the client-side queues meanwhile:
                # the nats-py subscriptions' pending queues (entries pushed by the
                # server, not yet taken by the engine) and the workers' streams.
                peaks = {"pending_msgs": 0, "pending_bytes": 0, "worker_queued": 0}

                async def sample() -> None:
                    while True:
                        subs = list(backend.nc._subs.values())
                        pm = max((x._pending_queue.qsize() for x in subs), default=0)
                        pb = max((x._pending_size for x in subs), default=0)
                        wq = sum(len(inbox) for inbox in engine.shards.inboxes)
                        peaks["pending_msgs"] = max(peaks["pending_msgs"], pm)
                        peaks["pending_bytes"] = max(peaks["pending_bytes"], pb)
                        peaks["worker_queued"] = max(peaks["worker_queued"], wq)
                        await anyio.sleep(0.05)

                sampler = asyncio.ensure_future(sample())
                # The watch replays every key before the sentinel's create (stream
                # order); once the sentinel has completed and the workers are idle,
                # the whole replay has been processed.
                sentinel = BenchState(id="zz-sentinel", phase="c" if args.workflow == "kv" else "b")
                sentinel.status = Status.RUNNING
                retries = 0
                while True:
                    try:
                        await engine.start_execution(wf, "zz-sentinel", sentinel)
                        break
                    except ConflictError:
                        break  # an earlier try timed out here but was written
                    except TransientBackendError:
                        # The engine's own request can time out behind the replay
                        # flood on its connection; count it and try again.
                        retries += 1
                        if retries > 20:
                            raise
                info["sentinel_retries"] = retries
                await engine.wait_for(wf, "zz-sentinel", timeout=600)
                while not engine.idle:
                    await anyio.sleep(0.01)
                info["replay_s"] = time.perf_counter() - t0
                sampler.cancel()
                info["replay_peaks"] = peaks
                gc.collect()
                info["rss_after_kb"] = common.rss_kb()
                info["timers"] = len(engine.timers)
                # Diagnostic: how much of that RSS is memory the allocator holds but
                # no object uses any more (glibc returns it on malloc_trim).
                try:
                    import ctypes

                    ctypes.CDLL("libc.so.6").malloc_trim(0)
                    info["rss_after_trim_kb"] = common.rss_kb()
                except (OSError, AttributeError):
                    pass
                info["blocks_after"] = sys.getallocatedblocks()
                info["pymalloc_arenas"] = _arenas()
                info["gc_objects"] = len(gc.get_objects())
                info["engine_sizes"] = {
                    name: len(getattr(engine, name))
                    for name in ("_latest", "_delivered", "_retries")
                    if hasattr(engine, name)
                }
                if args.tracemalloc:
                    import tracemalloc

                    snap = tracemalloc.take_snapshot()
                    stats = snap.statistics("traceback")[:8]
                    info["tracemalloc"] = [
                        {
                            "kb": st.size / 1024,
                            "count": st.count,
                            "where": [f"{fr.filename}:{fr.lineno}" for fr in st.traceback][-8:],
                        }
                        for st in stats
                    ]
            state["engine"] = engine
            yield info

    common.run(lambda: common.serve(start, profile=args.profile))


if __name__ == "__main__":
    main()
