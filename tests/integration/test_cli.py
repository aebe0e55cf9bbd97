"""``python -m reactive`` as a user runs it: subprocesses against the embedded nats-server.

One ``serve`` (examples/plan_review.py and tests/integration/cli_workflows.py, an
embedded server in a temporary data dir) and the example's simulated reviewer
run for the module; the client commands find the server through
``<data-dir>/nats.url``. The SIGTERM test runs a ``serve`` of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from reactive import NatsBackend
from reactive.backends.server import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORKFLOWS = "tests/integration/cli_workflows.py"
PAIR = "tests/integration/cli_pair.py"
BROKEN = "tests/integration/cli_broken_workflow.py"
PLAN_REVIEW = "examples/plan_review.py"

COMPLETE_PLAN = "Scope: one service.\nTests: yes.\nRollback: a flag.\nMonitoring: a dashboard."


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REACTIVE_", "OTEL_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m reactive ARGS`` in the repository and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "reactive", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Serve:
    """A ``python -m reactive serve`` subprocess, its output in files."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None,
        *targets: str,
        nats: Sequence[str] = (),
        metrics_host: str | None = "127.0.0.1",
        extra: Sequence[str] = (),
    ) -> None:
        """``port``: the embedded server's (None: let serve choose); ``nats``: connect to
        another server instead (``--nats-url`` and its credentials); ``metrics_host``: None
        leaves ``--metrics-host`` to its default; ``extra``: more options."""
        self.data_dir = data_dir
        self.port = port
        self.metrics_port = free_port()
        self.stdout_path = data_dir.parent / f"serve-{port}-{time.monotonic_ns()}.out"
        self.stderr_path = self.stdout_path.with_suffix(".err")
        embedded = ("--port", str(port)) if port is not None else ()
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "reactive",
                    "serve",
                    *targets,
                    "--data-dir",
                    str(data_dir),
                    *(nats or embedded),
                    "--metrics-port",
                    str(self.metrics_port),
                    *(("--metrics-host", metrics_host) if metrics_host is not None else ()),
                    *extra,
                ],
                cwd=REPO,
                env=_env(),
                stdout=out,
                stderr=err,
            )

    @property
    def url(self) -> str:
        """The embedded server's URL: from ``--port``, else as serve printed it."""
        if self.port is not None:
            return f"nats://127.0.0.1:{self.port}"
        for line in self.stdout.splitlines():
            if line.startswith("nats-server listening on "):
                return line.split()[3]
        raise AssertionError(f"serve printed no URL:\n{self.stdout}\n{self.stderr}")

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.stderr}")
            try:
                status, body = _get(f"{self.metrics_url}/healthz", timeout=0.5)
            except OSError:
                status, body = 0, ""
            if status == 200:
                assert body.strip() == "ok"
                return
            time.sleep(0.05)
        pytest.fail(f"serve not healthy within {timeout}s:\n{self.stderr}")

    def wait_for_log(self, *words: str, timeout: float = 30.0) -> str:
        """Wait until one line of serve's log has every one of ``words``; that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stderr.splitlines():
                if all(w in line for w in words):
                    return line
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.stderr}")
            time.sleep(0.05)
        pytest.fail(f"serve logged no line with {words} within {timeout}s:\n{self.stderr}")

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM; the exit status and how long it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"serve did not stop within {timeout}s of SIGTERM:\n{self.stderr}")
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """serve plan_review and the CLI test workflows; the example's reviewer alongside."""
    root = tmp_path_factory.mktemp("cli")
    server = Serve(root / "data", free_port(), f"{PLAN_REVIEW}:PlanReview", WORKFLOWS, PAIR)
    reviewer: subprocess.Popen[str] | None = None
    try:
        server.wait_healthy()
        reviewer = subprocess.Popen(
            [sys.executable, str(HERE / "cli_reviewer.py"), server.url],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert reviewer.stdout is not None
        assert reviewer.stdout.readline().strip() == "ready"
        yield server
    finally:
        if reviewer is not None:
            reviewer.terminate()
            reviewer.wait(timeout=10)
        if server.proc.poll() is None:
            code, _ = server.terminate()
            assert code == 0, server.stderr
        server.kill()


def client(served: Serve) -> list[str]:
    """The client commands find the server through <data-dir>/nats.url."""
    return ["--data-dir", str(served.data_dir)]


# --------------------------------------------------------------------------- serve


def test_serve_starts_the_embedded_server_and_is_healthy(served: Serve) -> None:
    assert f"nats-server listening on {served.url}" in served.stdout
    assert (served.data_dir / "nats.url").read_text().strip() == served.url
    assert (served.data_dir / "jetstream").is_dir()
    status, body = _get(f"{served.metrics_url}/healthz")
    assert (status, body) == (200, "ok\n")
    status, _ = _get(f"{served.metrics_url}/nothing-here")
    assert status == 404
    log = served.stderr
    assert "level=info logger=reactive.serve msg=ready" in log
    assert "workflows=countdown,pair,plan-review,ticket" in log


def test_a_second_serve_on_the_same_data_dir_is_refused(served: Serve) -> None:
    proc = cli("serve", WORKFLOWS, "--data-dir", str(served.data_dir), "--metrics-port", "0")
    assert proc.returncode == 1
    assert "another serve runs an embedded nats-server" in proc.stderr
    assert f"--nats-url {served.url}" in proc.stderr


# --------------------------------------------------------------------------- start


def test_start_wait_completes_a_plan(served: Serve) -> None:
    plan = {"plan_id": "cli-plan-ok", "title": "A good plan", "plan": COMPLETE_PLAN}
    proc = cli(
        "start", f"{PLAN_REVIEW}:PlanReview", "--input", json.dumps(plan), "--wait",
        *client(served),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "started plan-review.cli-plan-ok (published to plans.submitted)" in out
    assert "phase=submitted  status=waiting" in out  # each change, live
    assert "phase=approved  status=completed" in out
    assert out.rstrip().splitlines()[-1].startswith("plan-review.cli-plan-ok completed")


def test_start_wait_exits_1_for_an_escalated_plan(served: Serve) -> None:
    # By the announced id, without the code: --id is checked against the input's plan_id.
    plan = {"plan_id": "cli-plan-bad", "title": "A weekend rewrite", "plan": "Ship it."}
    proc = cli(
        "start", "plan-review", "--id", "cli-plan-bad", "--input", json.dumps(plan), "--wait",
        *client(served),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "status=escalated" in proc.stdout
    assert "max iterations (3) exceeded" in proc.stdout


def test_start_by_first_state_and_refuse_a_duplicate(served: Serve) -> None:
    args = ["start", "countdown", "--id", "cli-count", "--input", '{"steps": 2}', *client(served)]
    proc = cli(*args, "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "first state written to CLI_COUNTDOWN/countdown.cli-count" in proc.stdout
    assert "phase=done  status=completed  iteration=2" in proc.stdout
    again = cli(*args)
    assert again.returncode == 4  # not started
    assert "execution countdown.cli-count already exists" in again.stderr


def test_start_wait_exit_codes_for_escalation_and_timeout(served: Serve) -> None:
    esc = cli("start", "countdown", "--input", '{"steps": 9}', "--wait", *client(served))
    assert esc.returncode == 1, esc.stdout + esc.stderr
    assert "escalated" in esc.stdout
    # A pair parks and never ends: --wait gives up at its --timeout, with its own status.
    never = cli(
        "start", f"{PAIR}:Pair", "--input", '{"lot": "cli", "slot": 7}',
        "--wait", "--timeout", "1", *client(served),
    )  # fmt: skip
    assert never.returncode == 3, never.stdout + never.stderr
    assert "started pair.cli-7" in never.stdout
    assert "did not end within 1s" in never.stderr


def test_start_errors(served: Serve) -> None:
    unknown = cli("start", "no-such-workflow", "--input", "{}", *client(served))
    assert unknown.returncode == 4
    assert "workflow 'no-such-workflow' is not announced" in unknown.stderr
    assert "countdown" in unknown.stderr  # what is announced
    bad_json = cli("start", "countdown", "--input", "{not json", *client(served))
    assert bad_json.returncode == 2 and "--input is not valid JSON" in bad_json.stderr
    no_id = cli("start", "pair", "--input", '{"lot": "x", "slot": 1}', "--wait", *client(served))
    assert no_id.returncode == 2 and "module:Workflow" in no_id.stderr
    bad_id = cli("start", "countdown", "--id", "a.b", "--input", "{}", *client(served))
    assert bad_id.returncode == 2, bad_id.stderr
    bad_timeout = cli("start", "countdown", "--wait", "--timeout", "0", *client(served))
    assert bad_timeout.returncode == 2, bad_timeout.stderr
    unreachable = cli(
        "start", "countdown", "--nats-url", f"nats://127.0.0.1:{free_port()}",
        "--connect-attempts", "1",
    )  # fmt: skip
    assert unreachable.returncode == 4, unreachable.stderr
    assert "cannot connect to NATS" in unreachable.stderr
    helped = " ".join(cli("start", "--help").stdout.split())
    assert (
        "exit status: 0 started (with --wait: completed); 1 with --wait, the execution failed, "
        "escalated or timed out; 2 a usage error: the arguments or the input are wrong, nothing "
        "was started; 3 with --wait, still running after --timeout; 4 not started: NATS "
        "unreachable or failing, the workflow not announced, the execution exists"
    ) in helped


async def _stream_messages(url: str, stream: str) -> int:
    backend = NatsBackend(url)
    await backend.start()
    try:
        info = await backend.nc.jetstream().stream_info(stream)
        return int(info.state.messages)
    finally:
        await backend.close()


def test_start_refuses_input_the_engine_would_discard(served: Serve) -> None:
    """By the announced id, without the code: checked against the announced JSON Schema."""
    published = anyio.run(_stream_messages, served.url, "CLI_TICKETS_IN")
    missing = cli("start", "ticket", "--input", '{"steps": 2}', *client(served))
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "started" not in missing.stdout
    assert "not a valid TicketOpened" in missing.stderr
    assert "missing required field 'ticket'" in missing.stderr
    wrong = cli(
        "start", "ticket", "--input", '{"ticket": "cli-typed", "steps": "two", "delay": [1]}',
        *client(served),
    )  # fmt: skip
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert "$.steps: expected integer, got string" in wrong.stderr  # every field named at once
    assert "$.delay: expected number, got array" in wrong.stderr
    assert anyio.run(_stream_messages, served.url, "CLI_TICKETS_IN") == published  # nothing sent
    # A first state is checked the same way.
    state = cli("start", "countdown", "--id", "cli-typed", "--input", '{"steps": "2"}',
                *client(served))  # fmt: skip
    assert state.returncode == 2, state.stdout + state.stderr
    assert "$.steps: expected integer, got string" in state.stderr
    shown = cli("show", "countdown.cli-typed", *client(served))
    assert shown.returncode == 1 and "no execution" in shown.stderr  # nothing written
    # What the engine takes passes.
    good = cli("start", "ticket", "--input", '{"ticket": "cli-typed", "steps": 1}', "--wait",
               *client(served))  # fmt: skip
    assert good.returncode == 0, good.stdout + good.stderr


def test_start_checks_the_id_against_the_input(served: Serve) -> None:
    plan = {"plan_id": "cli-p8", "title": "Eight", "plan": COMPLETE_PLAN}
    # The id the start rule derives (plan_id) is announced: a different --id is refused.
    refused = cli(
        "start", "plan-review", "--id", "cli-p9", "--input", json.dumps(plan), *client(served)
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--id cli-p9 does not match" in refused.stderr and "cli-p8" in refused.stderr
    assert "started" not in refused.stdout
    assert cli("show", "plan-review.cli-p8", *client(served)).returncode == 1  # not created
    # Without --id, the id comes from the input: it can be waited for.
    derived = cli("start", "plan-review", "--input", json.dumps(plan), "--wait", *client(served))
    assert derived.returncode == 0, derived.stdout + derived.stderr
    assert "started plan-review.cli-p8 (published to plans.submitted)" in derived.stdout
    # A start rule that computes the id (pair: lot-slot) cannot be checked without the code.
    park = '{"lot": "cli", "slot": 9}'
    unchecked = cli("start", "pair", "--id", "cli-9", "--input", park, *client(served))
    assert unchecked.returncode == 2, unchecked.stdout + unchecked.stderr
    assert "cannot check --id" in unchecked.stderr
    assert f"start {PAIR}:Pair" not in unchecked.stderr  # (the hint names the form, not a path)
    assert "module:Workflow" in unchecked.stderr
    # With the code named, it is checked and derived.
    by_code = cli("start", f"{PAIR}:Pair", "--id", "cli-8", "--input", park, *client(served))
    assert by_code.returncode == 2 and "does not match" in by_code.stderr
    fine = cli("start", "pair", "--input", park, *client(served))
    assert fine.returncode == 0, fine.stderr
    assert "started pair (published to pairs.park; the start rule names the execution)" in (
        fine.stdout
    )


# --------------------------------------------------------------------------- list, show


def test_list_shows_executions_as_a_table(served: Serve) -> None:
    assert cli("start", "countdown", "--id", "cli-list", "--input", "{}", "--wait",
               *client(served)).returncode == 0  # fmt: skip
    proc = cli("list", *client(served))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["ID", "WORKFLOW", "PHASE", "STATUS", "ITERATION", "AGE"]
    row = next(line for line in lines if line.startswith("cli-list "))
    assert row.split()[:5] == ["cli-list", "countdown", "done", "completed", "3"]
    assert row.split()[5].endswith(("s", "m"))

    only = cli(
        "list", "--workflow", "countdown", "--status", "completed", "--json", *client(served)
    )
    assert only.returncode == 0, only.stderr
    rows = json.loads(only.stdout)
    assert rows and all(r["workflow"] == "countdown" and r["status"] == "completed" for r in rows)
    assert "cli-list" in {r["id"] for r in rows}

    bad = cli("list", "--status", "sleeping", *client(served))
    assert bad.returncode == 1 and "unknown status 'sleeping'" in bad.stderr


def test_show_prints_state_and_timeline(served: Serve) -> None:
    plan = {"plan_id": "cli-show", "title": "Shown", "plan": "Scope: x. Tests: y. Rollback: z."}
    assert cli("start", f"{PLAN_REVIEW}:PlanReview", "--input", json.dumps(plan), "--wait",
               *client(served)).returncode == 0  # fmt: skip
    for ref in ("plan-review.cli-show", "cli-show"):
        proc = cli("show", ref, *client(served))
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "execution     plan-review.cli-show" in out
        assert "status        completed" in out
        assert "phase         approved" in out
        assert "iteration     1" in out
        assert "title     Shown" in out  # the workflow's own fields
        assert "timeline (7 entries):" in out
        assert "message+state plans.submitted" in out
        assert "request_review  callback" in out
        # It has ended: the workflow's deadline (10m after it started) is no longer ahead.
        deadline = next(line for line in out.splitlines() if line.startswith("deadline "))
        assert deadline.split(None, 1)[1] == "- (the execution has ended)"
    raw = cli("show", "cli-show", "--json", *client(served))
    assert json.loads(raw.stdout)["verdict"] == "approved"
    missing = cli("show", "cli-nothing", *client(served))
    assert missing.returncode == 1 and "no execution 'cli-nothing'" in missing.stderr


# --------------------------------------------------------------------------- watch


def test_watch_tails_transitions(served: Serve, tmp_path: Path) -> None:
    out_path = tmp_path / "watch.out"
    with out_path.open("w") as out:
        watch = subprocess.Popen(
            [sys.executable, "-m", "reactive", "watch", *client(served)],
            cwd=REPO,
            env=_env(),
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        deadline = time.monotonic() + 15
        while "TIME (UTC)" not in out_path.read_text():  # the header: it is watching
            assert watch.poll() is None, watch.stderr.read() if watch.stderr else ""
            assert time.monotonic() < deadline, "watch printed no header"
            time.sleep(0.05)
        started = cli(
            "start", "ticket", "--input", '{"ticket": "cli-watched", "steps": 2}',
            *client(served),
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        while "cli-watched" not in out_path.read_text() or "completed" not in out_path.read_text():
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.05)
        # A later execution in the same bucket: the watch prints a bucket's changes in
        # order, so once it is printed every line about cli-watched has been.
        later = cli(
            "start", "ticket", "--input", '{"ticket": "cli-later", "steps": 0}', *client(served)
        )
        assert later.returncode == 0, later.stderr
        while "cli-later" not in out_path.read_text():
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.05)
    finally:
        watch.send_signal(signal.SIGTERM)
        code = watch.wait(timeout=10)
    assert code == 0
    lines = [line.split() for line in out_path.read_text().splitlines() if "cli-watched" in line]
    # time, workflow, execution, phase, status, iteration, rule, action
    assert [line[3:6] for line in lines] == [
        ["open", "running", "0"],
        ["counting", "running", "1"],
        ["counting", "running", "2"],
        ["done", "completed", "2"],
    ]
    assert all(line[1] == "ticket" for line in lines)
    assert [line[6:] for line in lines] == [
        ["open", "mutate"],
        ["step", "mutate"],
        ["step", "mutate"],
        ["finish", "complete"],
    ]
    # Only news: executions that ended before the watch started are not printed.
    assert "cli-count " not in out_path.read_text()


# --------------------------------------------------------------------------- metrics


def _samples(text: str, name: str, workflow: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("workflow") == workflow:
                total += sample.value
    return total


def test_metrics_are_scraped_over_http(served: Serve) -> None:
    assert cli("start", "countdown", "--input", '{"steps": 1}', "--wait",
               *client(served)).returncode == 0  # fmt: skip
    status, text = _get(f"{served.metrics_url}/metrics")
    assert status == 200
    assert _samples(text, "reactive_rule_evaluations_total", "countdown") > 0
    assert _samples(text, "reactive_executions_completed_total", "countdown") >= 1
    assert _samples(text, "reactive_action_dispatches_total", "countdown") > 0
    with urllib.request.urlopen(f"{served.metrics_url}/metrics", timeout=2) as response:
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST


# --------------------------------------------------------------------------- graph, validate


def test_graph_prints_a_mermaid_flowchart() -> None:
    proc = cli("graph", f"{PLAN_REVIEW}:PlanReview")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("flowchart TB\n")
    assert 'msg_plans_submitted>"plans.submitted"]' in proc.stdout
    assert "request_review: publish_async reviewer.input" in proc.stdout
    md = cli("graph", WORKFLOWS, "--format", "markdown")
    assert md.returncode == 0, md.stderr
    assert md.stdout.count("```mermaid\n") == 2  # both workflows of the file
    assert "%% workflow countdown" in md.stdout and "%% workflow ticket" in md.stdout


def test_validate() -> None:
    good = cli("validate", WORKFLOWS, f"{PLAN_REVIEW}:PlanReview")
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.splitlines() == [
        "ok: countdown (2 rules)",
        "ok: ticket (3 rules)",
        "ok: plan-review (4 rules)",
    ]
    bad = cli("validate", BROKEN)
    assert bad.returncode == 1
    assert "invalid workflow class Broken" in bad.stdout
    assert "max_iterations must be a non-negative int" in bad.stdout
    assert "rule 'shout': publish: subject 'bad subject'" in bad.stdout
    assert "rule 'nothing_to_do': no action" in bad.stdout


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_xyz:Flow", "module not found: 'no_such_module_xyz'"),
        ("tests/integration/nowhere.py:Flow", "file not found: tests/integration/nowhere.py"),
        (f"{WORKFLOWS}:not_a_workflow", "is not a workflow: it is a function"),
        (f"{WORKFLOWS}:Count", "is not a workflow: it is the class Count"),
        (f"{WORKFLOWS}:Missing", "has no attribute 'Missing'; workflows defined there: Countdown"),
        (BROKEN, "invalid workflow class Broken"),
    ],
)
def test_serve_refuses_bad_targets(target: str, message: str, tmp_path: Path) -> None:
    started = time.monotonic()
    proc = cli("serve", target, "--data-dir", str(tmp_path / "data"), "--metrics-port", "0")
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before starting anything
    assert time.monotonic() - started < 60  # (not a hang: the time is the machine's)


def test_unreachable_server() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = cli(
        "serve", WORKFLOWS, "--nats-url", url, "--metrics-port", "0", "--startup-timeout", "2"
    )
    assert proc.returncode == 1
    assert "serve gave up starting after 2s (--startup-timeout)" in proc.stderr
    assert f"cannot connect to NATS at {url}" in proc.stderr
    assert "is a nats-server running and reachable" in proc.stderr
    assert time.monotonic() - started < 60  # gave up, not hung (2 s, and Python's start)
    listing = cli("list", "--nats-url", url)
    assert listing.returncode == 1
    assert f"cannot connect to NATS at {url}" in listing.stderr
    assert "Traceback" not in listing.stderr + proc.stderr


# --------------------------------------------------------------------------- SIGTERM under load


def _held(i: int) -> bool:
    """Which of the load's executions stop after their first step while the hold file exists."""
    return i % 6 == 0


async def _start_load(url: str, n: int, hold: Path) -> list[tuple[str, str, int]]:
    """Start n executions, two thirds by first state, one third by message: (bucket, key, steps).

    Those ``_held`` (by first state) stop after one step while ``hold`` exists.
    """
    from reactive.codecs import encode_json

    cli_workflows = _load_workflows_module()
    backend = NatsBackend(url)
    await backend.start()
    started: list[tuple[str, str, int]] = []
    try:
        for i in range(n):
            steps = 3 + i % 2
            if i % 3 == 2:
                msg = cli_workflows.TicketOpened(ticket=f"load-{i}", steps=steps, delay=0.03)
                await backend.publish("tickets.open", encode_json(msg), msg_id=f"load-{i}")
                started.append(("CLI_TICKETS", f"ticket.load-{i}", steps))
            else:
                state = cli_workflows.Count(
                    steps=steps, delay=0.03, hold_while=str(hold) if _held(i) else ""
                )
                state.initialize(f"load-{i}", "countdown", time.time(), 300.0)
                await backend.kv_create("CLI_COUNTDOWN", f"countdown.load-{i}", encode_json(state))
                started.append(("CLI_COUNTDOWN", f"countdown.load-{i}", steps))
    finally:
        await backend.close()
    return started


def _load_workflows_module() -> Any:
    from reactive.cli.loading import load_module

    return load_module(str(HERE / "cli_workflows.py"))


async def _read_states(url: str, keys: list[tuple[str, str, int]]) -> dict[str, dict[str, Any]]:
    backend = NatsBackend(url, initial_connect_attempts=2)
    await backend.start()
    try:
        out = {}
        for bucket, key, _ in keys:
            entry = await backend.kv_get(bucket, key)
            if entry is not None:
                out[key] = msgspec.json.decode(entry.value)
        return out
    finally:
        await backend.close()


async def _rewrite(url: str, keys: list[str]) -> None:
    """Write each key's latest value again: a new revision, the same state."""
    backend = NatsBackend(url, initial_connect_attempts=2)
    await backend.start()
    try:
        for key in keys:
            entry = await backend.kv_get("CLI_COUNTDOWN", key)
            assert entry is not None
            await backend.kv_update("CLI_COUNTDOWN", key, entry.value, entry.revision)
    finally:
        await backend.close()


def _completed(states: dict[str, dict[str, Any]]) -> int:
    return sum(1 for s in states.values() if s.get("status") == "completed")


@pytest.mark.timeout(300)  # (subprocesses one after another: a slow machine)
def test_sigterm_during_load_loses_nothing(tmp_path: Path) -> None:
    n = 30
    port = free_port()
    # Some executions stop after their first step while this file exists: at the
    # SIGTERM they are provably unfinished, whatever the machine's speed.
    hold = tmp_path / "hold"
    hold.touch()
    held = [f"countdown.load-{i}" for i in range(n) if _held(i)]
    first = Serve(tmp_path / "data", port, WORKFLOWS)
    try:
        first.wait_healthy()
        keys = anyio.run(_start_load, first.url, n, hold)

        def ready_for_sigterm() -> bool:
            states = anyio.run(_read_states, first.url, keys)
            at_hold = all(states.get(key, {}).get("done") == 1 for key in held)
            return at_hold and _completed(states) >= 3

        deadline = time.monotonic() + 20
        while not ready_for_sigterm():
            assert time.monotonic() < deadline, first.stderr
            time.sleep(0.05)
        code, took = first.terminate()
    finally:
        first.kill()
    assert code == 0, first.stderr
    assert took < 30, f"serve took {took:.1f}s to stop"  # (it bounds its stop: no hang)
    assert "msg=stopping signal=SIGTERM" in first.stderr
    assert "msg=stopped" in first.stderr
    assert not (tmp_path / "data" / "nats.url").exists()  # its server is gone

    # The held ones were still at their first step when the SIGTERM came (and could
    # not move on). Their revisions were evaluated: a serve resumes from the changes
    # not acknowledged, not from every key. With the file gone, each is written again
    # (as is): the next serve takes those changes up.
    hold.unlink()

    second = Serve(tmp_path / "data", port, WORKFLOWS)
    try:
        second.wait_healthy()
        anyio.run(_rewrite, second.url, held)
        deadline = time.monotonic() + 30
        while True:
            states = anyio.run(_read_states, second.url, keys)
            if _completed(states) == n:
                break
            assert time.monotonic() < deadline, (
                f"{_completed(states)}/{n} completed:\n{second.stderr[-3000:]}"
            )
            time.sleep(0.1)
        listing = cli("list", "--status", "completed", "--json", "--nats-url", second.url)
        assert listing.returncode == 0, listing.stderr
        assert len(json.loads(listing.stdout)) == n
    finally:
        code, _ = second.terminate()
        second.kill()
    assert code == 0
    for _, key, steps in keys:
        st = states[key]
        # Every step counted once: no step lost, none applied twice, nothing half-written.
        assert (st["done"], st["iteration"], st["phase"]) == (steps, steps, "done"), (key, st)
        rules = [e["rule_id"] for e in st["timeline"]]
        opening = ["open"] if key.startswith("ticket.") else []
        assert rules == [*opening, *["step"] * steps, "finish"], (key, rules)
