"""The web view's handlers without a browser: httpx against the app, on the in-memory backend.

Workflows are announced and states written as engines would (``wf.<id>`` in the meta
bucket, states as JSON); the index runs as it does under ``python -m reactive ui``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from partition_contract import wait_for

from reactive import ExecutionState, RuleContext, ScheduledRun, Workflow, rule
from reactive.backends.base import KVEntry
from reactive.backends.memory import MemoryBackend
from reactive.cli.common import CLIError
from reactive.conditions import phase_is
from reactive.dsl.workflow import definition_of
from reactive.graph import highlight_path, path_taken
from reactive.meta import describe_workflow, workflow_key
from reactive.ui import ExecutionIndex, UIConfig, create_app
from reactive.ui.server import LOOPBACK_NAMES, check_exposure

pytestmark = pytest.mark.anyio

META = "REACTIVE_META"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class Doc(ExecutionState):
    words: int = 0
    author: str = ""


class Docs(Workflow, id="docs", state=Doc, bucket="UI_DOCS", on_complete="docs.done"):
    """Drafted, then reviewed."""

    @rule(watch_kv=True, when=phase_is("draft"), mutate=True)
    def review(self, ctx: RuleContext[Doc, None]) -> None:
        ctx.state.phase = "reviewed"

    @rule(watch_kv=True, when=phase_is("reviewed"), complete=True)
    def finish(self, ctx: RuleContext[Doc, None]) -> None:
        """Done."""


class Opened(msgspec.Struct):
    doc: str
    words: int
    author: str = "someone"


class Tickets(Workflow, id="tickets", state=Doc, bucket="UI_TICKETS"):
    @rule(on_subject="ui.tickets.open", state_key=lambda m: m.doc, mutate=True)
    def open(self, ctx: RuleContext[Doc, Opened]) -> None:
        ctx.state.words = ctx.message.words
        ctx.state.phase = "open"


def _state(exec_id: str, status: str, phase: str, minute: int, **more: Any) -> bytes:
    at = T0 + timedelta(minutes=minute)
    timeline = [
        {
            "timestamp": (at + timedelta(seconds=1)).isoformat(),
            "rule_id": "review",
            "trigger_mode": "kv",
            "action": "mutate",
            "phase_after": "reviewed",
        },
        {
            "timestamp": (at + timedelta(seconds=3.5)).isoformat(),
            "rule_id": "finish",
            "trigger_mode": "kv",
            "action": "complete",
            "phase_after": "reviewed",
        },
    ]
    state = {
        "id": exec_id,
        "workflow_id": "docs",
        "phase": phase,
        "status": status,
        "created_at": at.isoformat(),
        "updated_at": (at + timedelta(seconds=4)).isoformat(),
        "timeline": timeline if status == "completed" else [],
        "words": 7,
        **more,
    }
    return msgspec.json.encode(state)


@asynccontextmanager
async def _view(
    *,
    actions: bool = False,
    token: str | None = None,
    page_size: int = 50,
    executions: int = 5,
    hosts: list[str] | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, MemoryBackend, ExecutionIndex, UIConfig]]:
    backend = MemoryBackend()
    await backend.start()
    for wf in (Docs, Tickets):
        info = describe_workflow(definition_of(wf))
        await backend.ensure_bucket(META)
        await backend.ensure_bucket(info.bucket)
        await backend.kv_put(META, workflow_key(info.id), msgspec.json.encode(info))
    for i in range(executions):
        status, phase = ("completed", "reviewed") if i % 2 else ("running", "draft")
        await backend.kv_put("UI_DOCS", f"docs.e{i}", _state(f"e{i}", status, phase, i))
    index = ExecutionIndex(backend, META, clock=lambda: (T0 + timedelta(minutes=6)).timestamp())
    config = UIConfig(backend, index, actions, token, page_size=page_size, hosts=hosts)
    transport = httpx.ASGITransport(app=create_app(config))
    async with anyio.create_task_group() as tg:
        tg.start_soon(index.run)
        await wait_for(lambda: len(index) == executions and len(index.workflows) == 2)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield client, backend, index, config
        tg.cancel_scope.cancel()
    await backend.close()


def _ids(html: str) -> list[str]:
    return re.findall(r'<tr data-key="docs\.(\w+)">', html)


async def test_workflows_page_lists_rules_counts_and_rates() -> None:
    async with _view() as (client, *_):
        r = await client.get("/")
    assert r.status_code == 200
    assert 'data-workflow="docs"' in r.text and 'data-workflow="tickets"' in r.text
    assert "<code>review</code>" in r.text and "Drafted, then reviewed." in r.text
    assert re.search(r'status completed">completed</span></a></th><td>2</td>', r.text)
    assert re.search(r'status running">running</span></a></th><td>3</td>', r.text)
    # Updated at minutes 0..4 (+4 s), the clock at minute 6: the last 5 minutes hold e1..e4.
    assert '<td class="rate">4</td>' in r.text


async def test_list_filters_searches_and_pages_newest_first() -> None:
    async with _view(page_size=2, executions=5) as (client, *_):
        first = await client.get("/executions")
        second = await client.get("/executions", params={"page": 2})
        last = await client.get("/executions", params={"page": 3})
        done = await client.get("/executions", params={"status": "completed"})
        active = await client.get("/executions", params={"status": "active", "phase": "draft"})
        found = await client.get("/executions", params={"q": "3", "workflow": "docs"})
        fragment = await client.get("/executions", params={"fragment": "1"})
    assert _ids(first.text) == ["e4", "e3"] and "page 1 of 3" in first.text
    assert _ids(second.text) == ["e2", "e1"]
    assert _ids(last.text) == ["e0"]
    assert _ids(done.text) == ["e3", "e1"]
    assert _ids(active.text) == ["e4", "e2"] and "3 executions" in active.text
    assert _ids(found.text) == ["e3"]
    assert "<html" not in fragment.text and _ids(fragment.text) == ["e4", "e3"]


@pytest.mark.parametrize(
    ("params", "code", "says"),
    [
        ({"page": "9"}, 404, "page 9 is out of range: there are 3"),
        ({"page": "0"}, 400, "is not a page number"),
        ({"page": "-1"}, 400, "is not a page number"),
        ({"page": "x"}, 400, "is not a page number"),
        ({"page": "9" * 40}, 400, "is not a page number"),
        ({"status": "sleeping"}, 400, "unknown status"),
        ({"workflow": "nope"}, 404, "workflow &#39;nope&#39; is not announced"),
        ({"workflow": "a.b"}, 400, "is not a workflow id"),
        ({"q": "x" * 300}, 400, "the search is too long"),
    ],
)
async def test_list_refuses_bad_filters(params: dict[str, str], code: int, says: str) -> None:
    async with _view(page_size=2) as (client, *_):
        r = await client.get("/executions", params=params)
    assert r.status_code == code, r.text
    assert says in r.text


async def test_execution_page_shows_timeline_events_and_the_path() -> None:
    async with _view() as (client, *_):
        r = await client.get("/executions/docs/e1")
    assert r.status_code == 200
    assert r.text.count("<code>review</code>") >= 1 and "+2.5 s" in r.text
    assert "completed event on docs.done" in r.text
    # The path, in words and on the graph.
    assert re.search(r"path: <code>review</code> → <code>finish</code>", r.text)
    assert "classDef taken" in r.text and "linkStyle" in r.text
    assert "words" in r.text  # the workflow's own field


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("/executions/docs/e99", 404),
        ("/executions/nope/e1", 404),
        ("/executions/docs/a.b", 400),
        ("/executions/docs/" + "x" * 300, 400),
        ("/executions/docs/%C3%A9t%C3%A9", 400),
        ("/executions/docs/a%20b", 400),
        ("/executions/docs/e1/extra", 404),
    ],
)
async def test_execution_page_refuses_unknown_and_odd_ids(url: str, code: int) -> None:
    async with _view() as (client, *_):
        r = await client.get(url)
    assert r.status_code == code, r.text


async def test_the_index_follows_new_and_changed_executions() -> None:
    async with _view() as (client, backend, index, _):
        version = index.version
        await backend.kv_put("UI_DOCS", "docs.late", _state("late", "running", "draft", 30))
        await wait_for(lambda: index.get("docs", "late") is not None)
        assert index.version > version
        page = await client.get("/executions")
        assert _ids(page.text)[0] == "late"
        await backend.kv_put("UI_DOCS", "docs.late", _state("late", "failed", "draft", 30))
        await wait_for(lambda: index.statuses("docs")["failed"] == 1)
        await backend.kv_delete("UI_DOCS", "docs.late")
        await wait_for(lambda: index.get("docs", "late") is None)
        assert index.statuses("docs")["failed"] == 0


async def test_actions_are_off_unless_enabled() -> None:
    async with _view() as (client, backend, _, config):
        page = await client.get("/executions/docs/e0")
        assert 'id="cancel"' not in page.text
        r = await client.post("/executions/docs/e0/cancel", data={"csrf": config.csrf})
        s = await client.post("/workflows/docs/start", data={"csrf": config.csrf, "input": "{}"})
    assert r.status_code == 403 and "actions are off" in r.text
    assert s.status_code == 403
    assert not [m for m in backend.published if m.subject.startswith("reactive.callback")]


async def test_cancel_sends_the_request_and_needs_the_form_value_and_token() -> None:
    async with _view(actions=True, token="s3cret") as (client, backend, _, config):
        page = await client.get("/executions/docs/e0")
        assert 'id="cancel"' in page.text and 'name="token"' in page.text
        forged = await client.post("/executions/docs/e0/cancel", data={"token": "s3cret"})
        no_token = await client.post("/executions/docs/e0/cancel", data={"csrf": config.csrf})
        ended = await client.post(
            "/executions/docs/e1/cancel", data={"csrf": config.csrf, "token": "s3cret"}
        )
        ok = await client.post(
            "/executions/docs/e0/cancel",
            data={"csrf": config.csrf, "token": "s3cret", "reason": "not needed"},
        )
    assert forged.status_code == 403 and no_token.status_code == 401
    assert ended.status_code == 409 and "has ended already" in ended.text
    assert ok.status_code == 303 and ok.headers["location"].startswith("/executions/docs/e0")
    sent = [m for m in backend.published if m.subject == "reactive.callback.docs.e0"]
    assert [msgspec.json.decode(m.data) for m in sent] == [{"cancel": "not needed"}]


async def test_start_checks_the_input_against_the_schema_naming_the_field() -> None:
    async with _view(actions=True) as (client, backend, _, config):
        form = await client.get("/workflows/docs/start")
        bad = await client.post(
            "/workflows/docs/start", data={"csrf": config.csrf, "input": '{"words": "many"}'}
        )
        not_json = await client.post(
            "/workflows/docs/start", data={"csrf": config.csrf, "input": "{words"}
        )
        bad_id = await client.post(
            "/workflows/docs/start", data={"csrf": config.csrf, "input": "{}", "id": "a b"}
        )
        ok = await client.post(
            "/workflows/docs/start", data={"csrf": config.csrf, "input": '{"words": 3}', "id": "n1"}
        )
        taken = await client.post(
            "/workflows/docs/start", data={"csrf": config.csrf, "input": "{}", "id": "n1"}
        )
        message = await client.post(
            "/workflows/tickets/start", data={"csrf": config.csrf, "input": '{"doc": "t1"}'}
        )
        published = await client.post(
            "/workflows/tickets/start",
            data={"csrf": config.csrf, "input": '{"doc": "t1", "words": 2}'},
        )
        entry: KVEntry | None = await backend.kv_get("UI_DOCS", "docs.n1")
    assert form.status_code == 200 and 'id="start-form"' in form.text
    assert bad.status_code == 400 and "$.words: expected integer" in bad.text
    assert "{&#34;words&#34;: &#34;many&#34;}" in bad.text  # the input is kept to fix it
    assert not_json.status_code == 400 and "not valid JSON" in not_json.text
    assert bad_id.status_code == 400 and "is not an execution id" in bad_id.text
    assert ok.status_code == 303 and ok.headers["location"].startswith("/executions/docs/n1")
    assert entry is not None and msgspec.json.decode(entry.value)["words"] == 3
    assert taken.status_code == 400 and "already exists" in taken.text
    assert message.status_code == 400 and "missing required field &#39;words&#39;" in message.text
    assert published.status_code == 303
    assert [m.subject for m in backend.published if m.subject.startswith("ui.")] == [
        "ui.tickets.open"
    ]


async def test_forms_must_be_url_encoded_and_small() -> None:
    async with _view(actions=True) as (client, _, _, config):
        as_json = await client.post("/workflows/docs/start", json={"csrf": config.csrf})
        huge = await client.post(
            "/workflows/docs/start", data={"csrf": config.csrf, "input": "x" * (2 << 20)}
        )
    assert as_json.status_code == 415
    assert huge.status_code == 413


def test_actions_beyond_loopback_need_a_token() -> None:
    check_exposure("127.0.0.1", True, None)
    check_exposure("::1", True, None)
    check_exposure("0.0.0.0", False, None)
    check_exposure("0.0.0.0", True, "t")
    with pytest.raises(CLIError, match="needs a token"):
        check_exposure("0.0.0.0", True, None)


def test_the_path_is_drawn_from_the_timeline() -> None:
    graph = describe_workflow(definition_of(Docs)).graph
    timeline = [
        {"rule_id": "review", "trigger_mode": "kv", "phase_after": "reviewed"},
        {"rule_id": "finish", "trigger_mode": "kv", "phase_after": "reviewed"},
    ]
    edges, nodes = path_taken(graph, timeline, "completed")
    assert {"phase_draft", "phase_reviewed", "status_completed"} <= nodes
    assert len(edges) == 3  # draft -> reviewed, reviewed -> completed, completed -> its event
    drawn = highlight_path(graph, timeline, "completed")
    assert "class " in drawn and "linkStyle" in drawn
    cancel = [{"rule_id": "cancel", "trigger_mode": "callback", "phase_after": "draft"}]
    cancelled = highlight_path(graph, cancel, "cancelled")
    assert 'status_cancelled((("cancelled")))' in cancelled
    assert 'phase_draft -. "cancelled" .-> status_cancelled' in cancelled
    edges = len(re.findall(r"-->|\.->", graph))
    assert re.search(rf"linkStyle ([\d,]*,)?{edges}[ ,]", cancelled)  # the drawn end: on the path


def test_without_the_ui_extra_the_commands_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import argparse
    import sys

    from reactive.cli.ui import ui_server

    monkeypatch.setitem(sys.modules, "reactive.ui.server", None)  # as if starlette were missing
    args = argparse.Namespace(allow_actions=False, ui_token=None, timer_stream="REACTIVE_TIMERS")
    with pytest.raises(CLIError, match=r"pip install 'reactive\[ui\]'"):
        ui_server("127.0.0.1", 0, args)


async def test_on_loopback_only_the_loopback_names_are_answered() -> None:
    async with _view(actions=True, hosts=LOOPBACK_NAMES) as (client, backend, _, config):
        ok = await client.get("/executions")
        local = await client.get("/executions", headers={"host": "localhost:8642"})
        rebound = await client.get("/executions", headers={"host": "evil.example:8642"})
        posted = await client.post(
            "/executions/docs/e0/cancel",
            data={"csrf": config.csrf},
            headers={"host": "evil.example"},
        )
    assert ok.status_code == 200 and local.status_code == 200
    assert rebound.status_code == 400 and posted.status_code == 400
    assert not [m for m in backend.published if m.subject.startswith("reactive.callback")]


class ShipFlow(Workflow, id="ui-ship", state=Doc, bucket="UI_SHIP"):
    @rule(watch_kv=True, when=phase_is("booked"), complete=True)
    def done(self, ctx: RuleContext[Doc, None]) -> None: ...


class OrderFlow(Workflow, id="ui-orders", state=Doc, bucket="UI_ORDERS"):
    @rule(watch_kv=True, when=phase_is("shipping"), child=ShipFlow)
    def ship(self, ctx: RuleContext[Doc, None]) -> Doc:
        return Doc()

    @ship.on_result
    def shipped(self, ctx: RuleContext[Doc, None], result: Doc) -> None:
        ctx.state.phase = "shipped"

    @rule(schedule="0 2 * * *", mutate=True)
    def nightly(self, ctx: RuleContext[Doc, ScheduledRun]) -> None:
        ctx.state.phase = "shipping"


async def test_pages_show_schedules_children_and_parents() -> None:
    async with _view() as (client, backend, index, _):
        for wf in (ShipFlow, OrderFlow):
            info = describe_workflow(definition_of(wf))
            await backend.ensure_bucket(info.bucket)
            await backend.kv_put(META, workflow_key(info.id), msgspec.json.encode(info))
        task = "o1-ship-3-0123456789abcdef01234567"
        waiting = _state(
            "o1", "waiting", "shipping", 1, pending_task_id=task, pending_rule_id="ship"
        )
        await backend.kv_put("UI_ORDERS", "ui-orders.o1", waiting)
        link = {
            "workflow": "ui-orders",
            "id": "o1",
            "rule_id": "ship",
            "task_id": task,
            "callback": "c",
        }
        child = _state(task, "running", "", 1, parent=link)
        await backend.kv_put("UI_SHIP", f"ui-ship.{task}", child)
        await wait_for(lambda: index.get("ui-ship", task) is not None)
        workflows = await client.get("/")
        parent_page = await client.get("/executions/ui-orders/o1")
        child_page = await client.get(f"/executions/ui-ship/{task}")
    assert 'schedule <code class="schedule">0 0 2 * * *</code>' in workflows.text
    assert (
        'child <a class="child" href="/executions?workflow=ui-ship">ui-ship</a>' in workflows.text
    )
    assert f'<a id="child" href="/executions/ui-ship/{task}">' in parent_page.text
    assert '<a href="/executions/ui-orders/o1">ui-orders / o1</a> (rule <code>ship</code>)' in (
        child_page.text
    )
