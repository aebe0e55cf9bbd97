"""The README's "Testing your rule sets", as written there: the one-line test, the complete
example (its statistics, a failure it shrinks), and the lint's output, both clean and with the
forgotten compensation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reactive.cli import main

REPO = Path(__file__).resolve().parents[2]
SECTION = (
    (REPO / "README.md").read_text().split("## Testing your rule sets", 1)[1].split("\n## ", 1)[0]
)
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", SECTION, re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHORT, EXAMPLE = PYTHON  # the one-line test, the complete example
COMMAND = next(code for lang, code in BLOCKS if lang == "bash").strip()
OUTPUTS = [code for lang, code in BLOCKS if lang == ""]
STATISTICS, FAILURE, CLEAN, FINDING = OUTPUTS
# What the README says to change to forget the compensation.
BUGGY = EXAMPLE.replace(
    '        ctx.state.phase = "paid" if result.approved else "declined"\n',
    '        ctx.state.phase = "paid" if result.approved else "declined"\n'
    "        if not result.approved:\n"
    '            ctx.state.fail("payment declined")\n',
)


def pytest_run(cwd: Path, *files: str) -> str:
    env = dict(os.environ, PYTHONPATH=f"{cwd}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--hypothesis-show-statistics",
            # One seed: the same examples, the same shrinking, whatever the machine (Hypothesis
            # otherwise draws a new seed per run, and how far a failure shrinks varies).
            "--hypothesis-seed=0",
            *files,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout


@pytest.mark.timeout(600)  # (a nested pytest run: a slow machine)
def test_the_one_line_test_and_the_complete_example_pass(tmp_path: Path) -> None:
    assert BUGGY != EXAMPLE and "TestOrders = workflow_test(Orders)" in SHORT
    (tmp_path / "test_orders.py").write_text(EXAMPLE)
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "orders.py").write_text(EXAMPLE)  # where the one-liner imports from
    (tmp_path / "test_short.py").write_text(SHORT)
    out = pytest_run(tmp_path, "test_orders.py", "test_short.py")
    assert "2 passed" in out, out
    # The statistics the README shows (their shares vary from run to run).
    for line in STATISTICS.splitlines():
        shown = re.match(r"\s*\* [\d.]+%, (.*)", line)
        if shown:
            assert shown.group(1) in out, (shown.group(1), out)


@pytest.mark.timeout(600)  # (a nested pytest run: a slow machine)
def test_a_forgotten_compensation_fails_with_the_steps_that_make_it(tmp_path: Path) -> None:
    (tmp_path / "test_orders.py").write_text(BUGGY)
    out = pytest_run(tmp_path, "test_orders.py")
    assert "1 failed" in out, out
    assert re.search(r"AssertionError: e\d: declined, stock kept", out), out
    # The failing steps as the traceback shows them (with CI set, Hypothesis prints the
    # example again in the captured output: those lines are not counted twice).
    lines = [line for line in out.splitlines() if "state.step(" in line]
    steps = [line for line in lines if line.startswith("E ")] or lines
    shown = [line for line in FAILURE.splitlines() if "state.step(" in line]
    assert 1 <= len(steps) <= 4 and len(shown) == 3, steps  # (a write can make it shorter)
    assert "'charge', Charged(" in steps[-1] and "approved=False" in steps[-1], steps


def test_the_lint_says_what_the_readme_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = COMMAND.split()[3:]  # python -m reactive <argv>
    (tmp_path / "test_orders.py").write_text(EXAMPLE)
    assert main(argv) == 0
    assert capsys.readouterr().out == CLEAN
    for name in [m for m in sys.modules if m in ("test_orders",)]:
        del sys.modules[name]  # the buggy file has the same name
    (tmp_path / "test_orders.py").write_text(BUGGY)
    assert main(argv) == 1
    assert capsys.readouterr().out == FINDING
