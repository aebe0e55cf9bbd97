"""Where K engines' CPU goes: ``engines.py`` for one K, its engine processes sampled meanwhile.

    python benchmarks/engines_probe.py --engines 1
    python benchmarks/engines_probe.py --engines 4

Starts ``engines.py --engines K --rounds 1 --warm 3000 --n 40000`` (a measured window
long enough to sample), waits until its K engine processes run and the load has gone on
a few seconds, then samples them together for ``--seconds``:

* ``perf stat -e task-clock,context-switches`` over the K processes: CPU time and context
  switches (each a wake-up from ``epoll_wait``), printed per transition with the
  throughput ``engines.py`` reports;
* ``py-spy record --nonblocking`` on each (raw stacks), summed by the file of each
  sample's innermost frame into nats-py, the engine (``reactive/``), the parts of
  asyncio, msgspec and the rest, printed as shares of the samples and as samples per
  1,000 transitions, so K=1 and K=4 compare part by part. ``selectors`` is mostly an
  idle ``epoll_wait`` (py-spy's ``--nonblocking`` cannot tell it from work).

* each engine's ``/proc`` counters over the same seconds, summed: user and system CPU,
  and voluntary context switches (the process blocked: each one a wait in ``epoll_wait``
  with nothing to do) against involuntary ones (it was preempted), per transition;
* and ``engines.py`` (given ``--monitor-port``) counts the messages the server took from
  the engines and delivered to them over the whole measured window (``connz``), per
  transition, so K=1 and K=4 can be seen to move the same messages.

Needs ``perf`` and ``py-spy`` (``benchmarks/requirements.txt``). RESULTS.md's figures
for K=4 against K=1 ("Session 8", "Session 9") come from here.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reactive.backends.server import free_port

HERE = Path(__file__).resolve().parent

_PARTS = [
    ("asyncio/selector_events", "asyncio socket io"),
    ("asyncio/base_events", "asyncio loop"),
    ("asyncio/events", "asyncio handles"),
    ("asyncio/", "asyncio, other"),
    ("selectors", "selectors (epoll_wait)"),
    ("nats/", "nats-py"),
    ("reactive/", "reactive"),
    ("msgspec", "msgspec"),
]


def _engines() -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", "scenarios/engine_nats.py"], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split()]


def _proc(pids: list[int]) -> list[float]:
    """User and system CPU seconds, voluntary and involuntary context switches, summed."""
    tick = os.sysconf("SC_CLK_TCK")
    total = [0.0, 0.0, 0.0, 0.0]
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
        switches = [
            int(re.search(rf"^{kind}_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
            for kind in ("voluntary", "nonvoluntary")
        ]
        for i, v in enumerate((int(fields[11]) / tick, int(fields[12]) / tick, *switches)):
            total[i] += v
    return total


def _part(frame: str) -> str:
    m = re.search(r"\((.*?):\d+\)", frame)
    path = m.group(1) if m else frame
    return next((name for pattern, name in _PARTS if pattern in path), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=6.0, help="seconds of load first")
    args = parser.parse_args()
    k = args.engines
    monitor = free_port()
    with tempfile.TemporaryDirectory(prefix="reactive-probe-") as tmp:
        run = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "engines.py"),
                "--engines",
                str(k),
                "--rounds",
                "1",
                "--warm",
                "3000",
                "--n",
                "40000",
                "--monitor-port",
                str(monitor),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while len(_engines()) < k:
            if time.monotonic() > deadline or run.poll() is not None:
                sys.exit("the engines did not start")
            time.sleep(0.5)
        time.sleep(args.settle)
        pids = _engines()
        seconds = str(args.seconds)
        proc_before = _proc(pids)
        spies = [
            subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "-p",
                    str(p),
                    "-d",
                    seconds,
                    "-r",
                    "100",
                    "--nonblocking",
                    "-f",
                    "raw",
                    "-o",
                    f"{tmp}/{p}.raw",
                ],
                stdout=subprocess.DEVNULL,
            )
            for p in pids
        ]
        perf = subprocess.run(
            [
                "perf",
                "stat",
                "-x,",
                "-e",
                "task-clock,context-switches",
                "-p",
                ",".join(map(str, pids)),
                "--",
                "sleep",
                seconds,
            ],
            capture_output=True,
            text=True,
        ).stderr
        proc_after = _proc(pids)
        if any(spy.wait() for spy in spies):
            sys.exit("py-spy failed (above)")
        report, _ = run.communicate()
        parts: collections.Counter[str] = collections.Counter()
        for raw in Path(tmp).glob("*.raw"):
            for line in raw.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                if stack:
                    parts[_part(stack.split(";")[-1])] += int(n)
    print(report.strip())
    m = re.search(r"([\d.]+) transitions/s", report)
    rate = float(m.group(1)) if m else 0.0
    transitions = rate * args.seconds
    counters = {
        line.split(",")[2]: float(line.split(",")[0])
        for line in perf.splitlines()
        if line.count(",") >= 2 and line.split(",")[0].replace(".", "").isdigit()
    }
    if transitions:
        cpu = counters.get("task-clock", 0.0) * 1000 / transitions  # (msec -> µs)
        switches = counters.get("context-switches", 0.0) / transitions
        print(f"sampled {args.seconds:g} s at {rate:.0f} transitions/s: engine CPU {cpu:.0f} µs")
        print(f"  and {switches:.3f} context switches per transition (K={k}, summed)")
        # (/proc is read around perf's and py-spy's seconds: a little more.)
        user, system, voluntary, involuntary = (
            (b - a) / transitions for a, b in zip(proc_before, proc_after, strict=True)
        )
        print(
            f"  /proc: user {user * 1e6:.0f} µs, system {system * 1e6:.1f} µs, "
            f"voluntary switches {voluntary:.3f}, involuntary {involuntary:.3f} per transition"
        )

    total = sum(parts.values())
    for name, count in parts.most_common():
        per = count / transitions * 1000 if transitions else 0.0
        print(f"  {count / total * 100:5.1f} %  {per:6.1f} samples / 1,000 transitions  {name}")


if __name__ == "__main__":
    main()
