"""Typing reaches users: the package ships ``py.typed``, so ``mypy --strict`` checks a user's
workflow against the installed package's types.

The package is installed as a user gets it (built from a copy of the project, not the
editable install, whose import hook mypy cannot follow) into a folder of its own; mypy
runs from another folder with only that one on its path. Without ``py.typed`` in what is
installed, mypy refuses the import ("missing library stubs or py.typed marker").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
USER = Path(__file__).resolve().parent / "typing_user"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package, built and installed (not editable) into a folder: that folder."""
    root = tmp_path_factory.mktemp("typed")
    project = root / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(
        REPO / "reactive", project / "reactive", ignore=shutil.ignore_patterns("__pycache__")
    )
    site = root / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
         str(project)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "reactive" / "__init__.py").is_file()
    return site


def _mypy(installed: Path, source: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    work = tmp_path / "user"
    work.mkdir(exist_ok=True)
    shutil.copy(source, work / source.name)
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    env["PYTHONPATH"] = str(installed)  # what mypy sees as installed: that folder
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--config-file", "",
         source.name],
        cwd=work, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


@pytest.mark.timeout(600)
def test_a_user_workflow_type_checks_strictly_against_the_installed_package(
    installed: Path, tmp_path: Path
) -> None:
    assert (installed / "reactive" / "py.typed").is_file(), "py.typed is not installed"
    proc = _mypy(installed, USER / "good_workflow.py", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found in 1 source file" in proc.stdout


@pytest.mark.timeout(600)
def test_strict_mypy_reports_a_type_error_in_a_user_workflow(
    installed: Path, tmp_path: Path
) -> None:
    proc = _mypy(installed, USER / "bad_workflow.py", tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert errors == [
        "bad_workflow.py:19: error: Incompatible types in assignment (expression has type "
        '"str", variable has type "int")  [assignment]'
    ], proc.stdout
