"""What every benchmark child process shares: the control protocol, resource readings, names.

A contender child (floor, engine, peer) starts, sets itself up against the
nats-server whose URL it is given, prints ``{"event": "ready"}`` on stdout and
then obeys one-word commands on stdin:

* ``mark``  -- remember CPU time now (and start the profiler, if asked for);
  answered with ``{"event": "mark"}``;
* ``stop``  -- stop the profiler, shut down cleanly, print
  ``{"event": "result", ...}`` with the CPU seconds since ``mark``, the peak RSS
  (VmHWM; see ``peak_rss_kb``), and the current RSS, and exit.

Everything on stdout is one JSON object per line; anything else goes to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import msgspec

# ---------------------------------------------------------------------------
# The workflow every contender runs (names shared with the harness)
# ---------------------------------------------------------------------------

WF_ID = "bench3"  # the workflow id, also the first token of every key
PHASES_KV = ("a", "b", "c")  # a -> b -> c -> done (completed): 3 transitions
# The async workflow: a -> (publish request, status waiting) -> callback sets b
# -> b completes. Also 3 committed transitions, one of them the round trip.


class Observed(msgspec.Struct):
    """The fields of an execution state the harness reads (every contender writes them)."""

    id: str = ""
    phase: str = ""
    status: str = ""


class Completion(msgspec.Struct):
    """The fields of a completion event the harness reads."""

    execution_id: str


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Resource readings
# ---------------------------------------------------------------------------


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cpu_split() -> tuple[float, float]:
    """(user, system) CPU seconds of this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def maxrss_kb() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def machine_busy() -> float:
    """CPU seconds all cores have spent busy so far (not idle, not iowait, not stolen)."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in parts[:7])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kb() -> int:
    """Current resident set size of this process, from /proc/self/status."""
    return _status_kb("VmRSS:")


def peak_rss_kb() -> int:
    """Peak resident set size of this process's address space (VmHWM).

    Not ``ru_maxrss``: on Linux that survives ``execve``, so a child started by
    a bigger parent reports at least the parent's RSS at fork time.
    """
    return _status_kb("VmHWM:")


# ---------------------------------------------------------------------------
# I/O counters: socket writes and reads of nats-py, event-loop iterations
# ---------------------------------------------------------------------------

COUNTS = {"writes": 0, "write_chunks": 0, "reads": 0, "loop_iterations": 0}


def install_counters() -> None:
    """Count nats-py socket writes / reads and event-loop iterations (same cost in every contender).

    One ``writelines`` of the nats-py flusher is one ``send`` system call (one
    TCP segment on loopback); ``write_chunks`` counts the protocol commands it
    carried, so ``write_chunks / writes`` says how well publishes are batched.
    """
    import asyncio.base_events

    from nats.aio.transport import TcpTransport

    orig_writelines = TcpTransport.writelines
    orig_read = TcpTransport.read
    orig_run_once = asyncio.base_events.BaseEventLoop._run_once  # type: ignore[attr-defined]

    def writelines(self: Any, payload: Any) -> Any:
        COUNTS["writes"] += 1
        COUNTS["write_chunks"] += len(payload)
        return orig_writelines(self, payload)

    async def read(self: Any, buffer_size: int) -> Any:
        COUNTS["reads"] += 1
        return await orig_read(self, buffer_size)

    def run_once(self: Any) -> Any:
        COUNTS["loop_iterations"] += 1
        return orig_run_once(self)

    TcpTransport.writelines = writelines  # type: ignore[method-assign]
    TcpTransport.read = read  # type: ignore[method-assign]
    asyncio.base_events.BaseEventLoop._run_once = run_once  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# The child side of the control protocol
# ---------------------------------------------------------------------------


class _Profile:
    """pyinstrument over the marked window, summarized as flat self / inclusive times."""

    def __init__(self, path: str) -> None:
        from pyinstrument import Profiler

        self.path = path
        # async_mode="disabled": sample the real stack of the main thread, so time
        # spent idle in the event loop's selector shows up as such.
        self.profiler = Profiler(interval=0.001, async_mode="disabled")

    def start(self) -> None:
        self.profiler.start()

    def stop(self) -> None:
        self.profiler.stop()
        session = self.profiler.last_session
        assert session is not None
        root = session.root_frame()
        total = root.time if root is not None else 0.0
        self_times: dict[str, float] = {}
        incl_times: dict[str, float] = {}

        def name_of(frame: Any) -> str:
            path = frame.file_path_short or frame.file_path or "?"
            return f"{frame.function} ({path}:{frame.line_no})"

        def walk(frame: Any, on_stack: frozenset[str]) -> None:
            name = name_of(frame)
            self_times[name] = self_times.get(name, 0.0) + frame.total_self_time
            if name not in on_stack:  # count recursion once
                incl_times[name] = incl_times.get(name, 0.0) + frame.time
            for child in frame.children:
                if not child.is_synthetic:
                    walk(child, on_stack | {name})

        if root is not None:
            walk(root, frozenset())
        share = 1.0 / total if total > 0 else 0.0
        out = {
            "samples": len(session.frame_records),
            "wall_s": total,
            "cpu_s": session.cpu_time,
            "self": [
                (k, v * share) for k, v in sorted(self_times.items(), key=lambda kv: -kv[1])[:40]
            ],
            "inclusive": [
                (k, v * share) for k, v in sorted(incl_times.items(), key=lambda kv: -kv[1])[:120]
            ],
        }
        with open(self.path, "w") as f:
            json.dump(out, f, indent=1)
        with contextlib.suppress(Exception):
            with open(self.path.replace(".json", ".txt"), "w") as f:
                f.write(self.profiler.output_text(unicode=False, color=False, show_all=False))


async def serve(
    start: Callable[[], AbstractAsyncContextManager[dict[str, Any]]],
    *,
    profile: str | None = None,
    extra: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Run a contender: set it up, say ready, obey mark / stop, report resources."""
    prof = _Profile(profile) if profile else None
    loop = asyncio.get_running_loop()
    counts0 = dict(COUNTS)
    cpu0 = cpu_split()
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    async with start() as info:
        emit({"event": "ready", **info})
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            cmd = line.strip()
            if cmd == "mark":
                counts0 = dict(COUNTS)
                cpu0 = cpu_split()
                t0 = time.perf_counter()
                if prof is not None:
                    prof.start()
                emit({"event": "mark"})
            elif cmd == "stop" or not line:
                cpu1 = cpu_split()
                result["cpu_user_s"] = cpu1[0] - cpu0[0]
                result["cpu_sys_s"] = cpu1[1] - cpu0[1]
                result["cpu_s"] = result["cpu_user_s"] + result["cpu_sys_s"]
                result.update({k: COUNTS[k] - counts0[k] for k in COUNTS})
                result["wall_s"] = time.perf_counter() - t0
                if prof is not None:
                    prof.stop()
                if extra is not None:
                    result.update(extra())
                break
            elif cmd:
                log(f"unknown command {cmd!r}")
    result.update(
        {
            "event": "result",
            "peak_rss_kb": peak_rss_kb(),
            "ru_maxrss_kb": maxrss_kb(),
            "rss_kb": rss_kb(),
        }
    )
    emit(result)


@contextlib.asynccontextmanager
async def nothing() -> AsyncIterator[dict[str, Any]]:
    yield {}


def run(main: Callable[[], Any]) -> None:
    """asyncio.run on the default event loop (no uvloop) for every contender."""
    install_counters()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
