"""Instructions per in-memory execution: a cost that does not move with the machine's load.

    python benchmarks/instructions.py                  # this checkout
    python benchmarks/instructions.py /path/to/other/checkout /path/to/this/one

Runs ``scenarios/inmemory.py --what transitions`` under valgrind's callgrind twice,
with 500 and with 2,500 measured executions, and divides the difference in
instructions by the executions between them (2,200, warm-up included): start-up,
imports and the workflow's compilation cancel out. Wall-clock runs on a shared
machine drift by up to 1.6x; instruction counts repeat to within about 0.5 %.
The per-change figures in RESULTS.md ("instructions per execution") come from here.

Needs valgrind; takes about a minute per checkout (two checkouts run side by side).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMALL, LARGE = 500, 2500


def _warm(n: int) -> int:
    return max(50, n // 10)  # what inmemory.py warms up with


def instructions(checkout: Path, n: int) -> int:
    env = dict(os.environ, PYTHONPATH=str(checkout), PYTHONHASHSEED="0")
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "inmemory.py",
            "--what",
            "transitions",
            "--n",
            str(n),
        ],
        cwd=checkout / "benchmarks" / "scenarios",
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def per_execution(checkout: Path) -> float:
    executions = (LARGE + _warm(LARGE)) - (SMALL + _warm(SMALL))
    return (instructions(checkout, LARGE) - instructions(checkout, SMALL)) / executions


def main() -> None:
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt install valgrind)")
    checkouts = [Path(p).resolve() for p in sys.argv[1:]] or [HERE.parent]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(per_execution, checkouts))
    for checkout, value in zip(checkouts, results, strict=True):
        print(f"{value / 1000:7.1f} k instructions per in-memory execution  {checkout}")


if __name__ == "__main__":
    main()
