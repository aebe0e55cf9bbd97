"""The web view in a real headless Chromium, as a person uses it.

A nats-server of the module's own, ``python -m reactive serve`` running the plan-review
example and the CLI tests' countdown with the web view on (``--ui-port``, actions on), and
the example's simulated reviewer. The browser is Debian's ``chromium`` driven by
Playwright (never a downloaded browser); where it is missing the tests are skipped, unless
``$CI`` is set (then they fail).

``REACTIVE_SCREENSHOTS=DIR`` saves the screenshots the README shows into DIR (``docs``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from reactive import NatsBackend
from reactive.backends.server import NatsServer, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("REACTIVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000  # the longest any condition is waited for
COMPLETE_PLAN = "Scope: one service.\nTests: yes.\nRollback: a flag.\nMonitoring: a dashboard."
SHOTS = os.environ.get("REACTIVE_SCREENSHOTS", "")


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (and $CI is set: the browser tests must run)")
    pytest.skip(reason)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REACTIVE_", "OTEL_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


class View:
    """The running system: NATS, serve with the web view, the reviewer."""

    def __init__(self, root: Path) -> None:
        self.nats = NatsServer(data_dir=root / "nats")
        self.nats.start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hold = root / "hold"  # while it exists, a countdown stops after its first step
        self.hold.write_text("")
        self.log = (root / "serve.err").open("w")
        self.procs: list[subprocess.Popen[Any]] = []
        self.procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "reactive",
                    "serve",
                    "examples/plan_review.py:PlanReview",
                    "tests/integration/cli_workflows.py:Countdown",
                    "--nats-url",
                    self.nats.url,
                    "--metrics-port",
                    "0",
                    "--ui-port",
                    str(self.port),
                    "--allow-actions",
                ],
                cwd=REPO,
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=self.log,
            )
        )
        reviewer = subprocess.Popen(
            [sys.executable, str(HERE / "cli_reviewer.py"), self.nats.url],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(reviewer)
        assert reviewer.stdout is not None
        assert reviewer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while _get(f"{self.url}/ui/healthz") != 200:
            assert self.procs[0].poll() is None, (root / "serve.err").read_text()
            assert time.monotonic() < deadline, "the web view did not come up"
            time.sleep(0.05)

    def publish_plans(self, ids: list[str], plan: str = COMPLETE_PLAN) -> None:
        async def publish() -> None:
            backend = NatsBackend(self.nats.url)
            await backend.start()
            try:
                for plan_id in ids:
                    body = {"plan_id": plan_id, "title": f"plan {plan_id}", "plan": plan}
                    await backend.publish("plans.submitted", msgspec.json.encode(body))
            finally:
                await backend.close()

        # (Playwright's sync API runs an event loop in this thread: publish from another.)
        failed: list[BaseException] = []

        def run() -> None:
            try:
                anyio.run(publish)
            except BaseException as e:
                failed.append(e)

        worker = threading.Thread(target=run)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive() and not failed, failed

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log.close()
        self.nats.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    executable = CHROMIUM if Path(CHROMIUM).exists() else str(shutil.which("chromium"))
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def view(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[View]:
    running = View(tmp_path_factory.mktemp("ui"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def page(browser: Any, view: View) -> Iterator[Any]:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield tab
    finally:
        context.close()
    assert not errors, errors


def _shot(page: Any, name: str) -> None:
    if SHOTS:
        page.screenshot(path=str(REPO / SHOTS / name), full_page=True)


def _run_id() -> str:
    return uuid.uuid4().hex[:6]


def test_the_list_shows_new_executions_without_a_reload(page: Any, view: View) -> None:
    from playwright.sync_api import expect

    page.goto(f"{view.url}/executions?workflow=plan-review")
    expect(page.locator("#live")).to_have_text("● live")
    page.evaluate("window.notReloaded = true")
    run = _run_id()
    ids = [f"live-{run}-{i}" for i in range(3)]
    view.publish_plans(ids)
    for plan_id in ids:
        row = page.locator(f'tr[data-key="plan-review.{plan_id}"]')
        expect(row).to_be_visible()
        expect(row.locator(".status")).to_have_text("completed")
    assert page.evaluate("window.notReloaded") is True
    # A filter is applied on the server, and kept by the live updates.
    page.select_option("select[name=status]", "completed")
    page.fill("input[name=q]", f"live-{run}-1")
    page.click("button[type=submit]")
    expect(page.locator("#executions tbody tr")).to_have_count(1)
    expect(page.locator(f'tr[data-key="plan-review.live-{run}-1"]')).to_be_visible()


def test_start_from_the_form_then_the_timeline_and_the_path(page: Any, view: View) -> None:
    from playwright.sync_api import expect

    plan_id = f"form-{_run_id()}"
    page.goto(f"{view.url}/workflows")
    expect(page.locator('section[data-workflow="plan-review"]')).to_be_visible()
    page.click('section[data-workflow="plan-review"] a.button')
    body = {"plan_id": plan_id, "title": "from the browser", "plan": "Scope: one service."}
    page.fill("textarea[name=input]", msgspec.json.encode(body).decode())
    page.click("#start")
    page.wait_for_url(f"**/executions/plan-review/{plan_id}?**")
    # Reviewed three times (tests, rollback, monitoring missing), then approved: followed live.
    expect(page.locator("#status")).to_have_text("completed")
    expect(page.locator("#timeline tbody tr")).to_have_count(13)
    expect(page.locator("#timeline tbody tr").nth(1).locator(".gap")).to_contain_text("+")
    expect(page.locator("#events")).to_contain_text("completed event on plans.approved")
    expect(page.locator("#path")).to_contain_text("submit → request_review")
    page.wait_for_selector("body[data-graph=drawn]")
    taken = page.locator("#graph svg .taken")
    expect(taken.first).to_be_visible()
    assert taken.count() >= 5  # plans.submitted, submitted, waiting, revise, approved, completed
    _shot(page, "ui-execution.png")
    page.goto(f"{view.url}/executions")
    _shot(page, "ui-executions.png")
    page.goto(f"{view.url}/workflows")
    _shot(page, "ui-workflows.png")


def test_cancel_an_execution_and_see_it_end(page: Any, view: View) -> None:
    from playwright.sync_api import expect

    exec_id = f"cancel-{_run_id()}"
    page.goto(f"{view.url}/workflows/countdown/start")
    page.fill("input[name=id]", exec_id)
    body = {"steps": 3, "hold_while": str(view.hold)}
    page.fill("textarea[name=input]", msgspec.json.encode(body).decode())
    page.click("#start")
    page.wait_for_url(f"**/executions/countdown/{exec_id}?**")
    expect(page.locator("#phase")).to_have_text("counting")  # held after its first step
    expect(page.locator("#status")).to_have_text("running")
    page.fill("input[name=reason]", "no longer wanted")
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("cancelled")
    expect(page.locator("#summary")).to_contain_text("no longer wanted")
    expect(page.locator("#cancel")).to_have_count(0)
    expect(page.locator("#timeline")).to_contain_text("cancel")


def test_an_invalid_start_is_refused_naming_the_field(page: Any, view: View) -> None:
    from playwright.sync_api import expect

    page.goto(f"{view.url}/workflows/plan-review/start")
    page.fill("textarea[name=input]", '{"plan_id": "bad-one", "plan": 42}')
    page.click("#start")
    error = page.locator("#start-error")
    expect(error).to_contain_text("missing required field 'title'")
    expect(error).to_contain_text("$.plan: expected string, got integer 42")
    expect(page.locator("textarea[name=input]")).to_have_value('{"plan_id": "bad-one", "plan": 42}')
    _shot(page, "ui-start-refused.png")
    page.goto(f"{view.url}/executions?q=bad-one")
    expect(page.locator("#summary")).to_have_text("0 executions")
