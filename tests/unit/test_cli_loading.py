"""The command line without a server: loading targets, their errors, graph, validate, helpers."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from reactive import Workflow
from reactive.cli import build_parser, main
from reactive.cli.common import (
    DEFAULT_URL,
    LoadError,
    format_age,
    resolve_url,
    table,
)
from reactive.cli.loading import is_target, load_targets, load_workflows
from reactive.cli.logfmt import LogfmtFormatter
from reactive.dsl.workflow import definition_of

GOOD = '''
from __future__ import annotations

from reactive import ExecutionState, RuleContext, Workflow, rule
from reactive.conditions import phase_is


class Doc(ExecutionState):
    text: str = ""


class Base(Workflow, abstract=True):
    """Shared rules."""


class Publish(Workflow, id="{prefix}-publish", state=Doc):
    @rule(watch_kv=True, when=phase_is("draft"), mutate=True)
    def review(self, ctx: RuleContext[Doc, None]) -> None:
        ctx.state.phase = "reviewed"

    @rule(watch_kv=True, when=phase_is("reviewed"), complete=True)
    def done(self, ctx: RuleContext[Doc, None]) -> None:
        pass


class Archive(Workflow, id="{prefix}-archive", state=Doc):
    @rule(watch_kv=True, when=phase_is("old"), complete=True)
    def archive(self, ctx: RuleContext[Doc, None]) -> None:
        pass


instance = Archive()
NOT_A_WORKFLOW = 42


def helper() -> None:
    pass
'''

BROKEN = """
from reactive import ExecutionState, Workflow, rule


class S(ExecutionState):
    pass


class Bad(Workflow, id="bad id", state=S):
    @rule(watch_kv=True)
    def nothing(self, ctx) -> None:
        pass
"""


@pytest.fixture(autouse=True)
def _isolated_imports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Loading adds folders to sys.path and modules to sys.modules: undo both (for our files)."""
    base = str(tmp_path_factory.getbasetemp())
    path = list(sys.path)
    modules = set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(base):
            del sys.modules[name]


def write(folder: Path, name: str, source: str) -> Path:
    file = folder / name
    file.write_text(textwrap.dedent(source))
    return file


def good_file(tmp_path: Path, stem: str = "flows") -> Path:
    return write(tmp_path, f"{stem}.py", GOOD.replace("{prefix}", stem.replace("_", "-")))


# --------------------------------------------------------------------------- loading


def test_file_and_class(tmp_path: Path) -> None:
    file = good_file(tmp_path, "flows_a")
    [cls] = load_workflows(f"{file}:Publish")
    assert isinstance(cls, type) and issubclass(cls, Workflow)
    assert definition_of(cls).id == "flows-a-publish"
    # The module is importable under its stem, so msgspec resolves its annotations.
    assert sys.modules["flows_a"].Publish is cls


def test_a_file_alone_means_every_workflow_defined_there(tmp_path: Path) -> None:
    file = good_file(tmp_path, "flows_b")
    ids = [definition_of(w).id for w in load_workflows(str(file))]
    assert ids == ["flows-b-publish", "flows-b-archive"]  # not Base (abstract), not Workflow


def test_module_and_class_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good_file(tmp_path, "flows_mod_c")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    [cls] = load_workflows("flows_mod_c:Archive")
    assert definition_of(cls).id == "flows-mod-c-archive"
    assert len(load_workflows("flows_mod_c")) == 2


def test_an_instance_is_a_workflow_too(tmp_path: Path) -> None:
    file = good_file(tmp_path, "flows_d")
    [obj] = load_workflows(f"{file}:instance")
    assert isinstance(obj, Workflow)


def test_load_targets_dedupes(tmp_path: Path) -> None:
    file = good_file(tmp_path, "flows_e")
    workflows = load_targets([f"{file}:Publish", str(file)])
    assert [definition_of(w).id for w in workflows] == ["flows-e-publish", "flows-e-archive"]


def test_a_stem_that_names_another_module_gets_a_name_of_its_own(tmp_path: Path) -> None:
    file = good_file(tmp_path, "json")
    [cls] = load_workflows(f"{file}:Publish")
    assert cls.__module__.startswith("reactive_file_json_")
    import json

    assert json.dumps({}) == "{}"  # the standard library's json is untouched


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_for_cli_tests:Flow", "module not found: 'no_such_module_for_cli_tests'"),
        ("no_such_package_cli.sub:Flow", "module not found: 'no_such_package_cli'"),
        ("missing/file.py:Flow", "file not found: missing/file.py"),
        ("json:dumps", "json:dumps is not a workflow: it is a function"),
        ("json:JSONDecoder", "is not a workflow: it is the class JSONDecoder"),
        ("json:nope", "json has no attribute 'nope'"),
        ("json:1bad", "'1bad' is not a Python name"),
        ("reactive:Workflow", "is an abstract workflow class"),
        ("", "empty target"),
        (":Flow", "no module or file before ':'"),
    ],
)
def test_loading_errors(target: str, message: str) -> None:
    with pytest.raises(LoadError) as info:
        load_workflows(target)
    assert message in str(info.value)


def test_errors_in_a_file(tmp_path: Path) -> None:
    file = good_file(tmp_path, "flows_f")
    with pytest.raises(
        LoadError,
        match=r"flows_f.py has no attribute 'Nope'; workflows defined there: Publish, Archive",
    ):
        load_workflows(f"{file}:Nope")
    with pytest.raises(LoadError, match="is not a workflow: it is a int"):
        load_workflows(f"{file}:NOT_A_WORKFLOW")
    with pytest.raises(LoadError, match="is an abstract workflow class"):
        load_workflows(f"{file}:Base")
    empty = write(tmp_path, "flows_empty.py", "X = 1\n")
    with pytest.raises(LoadError, match="defines no workflow"):
        load_workflows(str(empty))
    text = write(tmp_path, "notes.txt", "hello")
    with pytest.raises(LoadError, match=r"is not a Python file"):
        load_workflows(f"{text}:X")


def test_a_broken_definition_gives_its_reasons(tmp_path: Path) -> None:
    file = write(tmp_path, "broken_g.py", BROKEN)
    with pytest.raises(LoadError) as info:
        load_workflows(f"{file}:Bad")
    assert "invalid workflow class Bad" in str(info.value)
    assert any("id" in r for r in info.value.reasons)
    assert any("no action" in r for r in info.value.reasons)
    assert "broken_g" not in sys.modules  # not left half-imported


def test_import_errors_say_where(tmp_path: Path) -> None:
    raises = write(tmp_path, "raises_h.py", "X = 1\nraise RuntimeError('boom')\n")
    with pytest.raises(
        LoadError, match=r"importing .*raises_h.py failed: RuntimeError: boom \(.*raises_h.py:2\)"
    ):
        load_workflows(f"{raises}:X")
    dep = write(tmp_path, "needs_dep_i.py", "import no_such_dependency_for_cli\n")
    with pytest.raises(
        LoadError, match="failed: ModuleNotFoundError: No module named 'no_such_dependency_for_cli'"
    ):
        load_workflows(f"{dep}:X")
    syntax = write(tmp_path, "syntax_j.py", "def f(:\n")
    with pytest.raises(LoadError, match=r"syntax_j.py:1: syntax error"):
        load_workflows(f"{syntax}:f")


def test_is_target() -> None:
    assert is_target("pkg.mod:Flow")
    assert is_target("flows.py")
    assert is_target("dir/flows")
    assert not is_target("plan-review")


# --------------------------------------------------------------------------- commands without a server


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "start", "list", "show", "watch", "graph", "validate", "demo"):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([command, "--help"])
        assert info.value.code == 0
        assert f"usage: python -m reactive {command}" in capsys.readouterr().out


def test_serve_engine_options_parse_and_refuse_nonsense(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(["serve", "flows.py"])
    assert (args.workers, args.queue_limit) == (128, 2048)
    args = build_parser().parse_args(["serve", "flows.py", "--queue-limit", "64"])
    assert args.queue_limit == 64
    # (--timer-horizon is gone: no engine holds a timer per waiting execution.)
    for bad in (["--queue-limit", "0"], ["--queue-limit", "many"], ["--timer-horizon", "90"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "flows.py", *bad])
        assert "argument" in capsys.readouterr().err


def test_validate_and_graph_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = good_file(tmp_path, "flows_k")
    assert main(["validate", str(file)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ok: flows-k-publish (2 rules)",
        "ok: flows-k-archive (1 rule)",
    ]
    assert main(["graph", f"{file}:Publish"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flowchart TB\n") and "review: mutate" in out

    broken = write(tmp_path, "broken_l.py", BROKEN)
    assert main(["validate", str(broken), f"{file}:Archive"]) == 1
    captured = capsys.readouterr()
    assert "invalid: " in captured.out and "invalid workflow class Bad" in captured.out
    assert "ok: flows-k-archive (1 rule)" in captured.out
    assert "error: 1 problem found" in captured.err

    assert main(["graph", "no_such_module_for_cli_tests:X"]) == 1
    assert "error: module not found" in capsys.readouterr().err


def test_validate_finds_two_workflows_with_one_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = good_file(tmp_path, "flows_m")
    twin = write(tmp_path, "flows_m2.py", GOOD.replace("{prefix}", "flows-m"))
    assert main(["validate", str(one), str(twin)]) == 1
    assert "already registered" in capsys.readouterr().out


# --------------------------------------------------------------------------- helpers


def test_resolve_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REACTIVE_NATS_URL", raising=False)
    args = argparse.Namespace(nats_url=None, data_dir=str(tmp_path))
    assert resolve_url(args) == DEFAULT_URL
    (tmp_path / "nats.url").write_text("nats://127.0.0.1:5555\n")
    assert resolve_url(args) == "nats://127.0.0.1:5555"
    monkeypatch.setenv("REACTIVE_NATS_URL", "nats://env:4222")
    assert resolve_url(args) == "nats://env:4222"
    args.nats_url = "nats://flag:4222"
    assert resolve_url(args) == "nats://flag:4222"


def test_formatting() -> None:
    assert [format_age(s) for s in (0, 3, 59, 60, 299, 7200, 86400 * 3)] == [
        "0s",
        "3s",
        "59s",
        "1m",
        "4m",
        "2h",
        "3d",
    ]
    assert table(("A", "LONGER"), [("xyz", "1"), ("q", "22")]) == [
        "A    LONGER",
        "xyz  1",
        "q    22",
    ]


def test_logfmt_lifts_trailing_fields() -> None:
    record = logging.LogRecord(
        "reactive", logging.INFO, __file__, 1,
        "transition workflow=%s execution=%s phase=%s", ("wf", "e1", "done"), None,
    )  # fmt: skip
    line = LogfmtFormatter().format(record)
    assert " level=info logger=reactive msg=transition workflow=wf execution=e1 phase=done" in line
    assert line.startswith("ts=") and line.split(" ", 1)[0].endswith("Z")
    plain = logging.LogRecord("x", logging.WARNING, __file__, 1, 'a "quoted" thing', None, None)
    assert 'msg="a \\"quoted\\" thing"' in LogfmtFormatter().format(plain)
