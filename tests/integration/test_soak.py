"""The kill -9 soak's short form (benchmarks/soak.py --short): three engine processes, one
killed while half the executions wait for the worker; nothing lost, stuck or doubled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(400)
def test_killing_an_engine_with_work_in_flight_loses_and_doubles_nothing() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--short"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=390,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report["lost"], report["stuck"], report["doubled"]) == (0, 0, 0), report
    assert report["kills"] == 1 and report["executions"] == 60
    assert proc.returncode == 0, proc.stderr
