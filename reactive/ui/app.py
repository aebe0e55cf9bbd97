"""The web view's pages and actions: a Starlette app over an :class:`ExecutionIndex`.

Pages are rendered on the server (Jinja2); ``/events`` streams server-sent events when
the index changes, and a small script re-fetches the part of the page that shows it.
Actions (cancel, start) are refused unless the app was made with ``allow_actions``; every
form carries a per-process anti-forgery value, and with a ``token`` the token too.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import anyio
import msgspec
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from reactive.cli.common import (
    STATUSES,
    TERMINAL,
    CLIError,
    UsageError,
    decode_state,
    format_age,
    format_time,
    parse_time,
)
from reactive.cli.executions import (
    check_start,
    child_of,
    deadline_text,
    find_execution,
    own_fields,
    pending_task,
    schema_title,
    send_cancel,
    start_action,
    timers_due,
)
from reactive.errors import BackendError
from reactive.graph import highlight_path
from reactive.subjects import is_valid_execution_id
from reactive.ui.index import RATE_WINDOW, ExecutionIndex

if TYPE_CHECKING:
    from reactive.backends.base import Backend
    from reactive.meta import WorkflowInfo

__all__ = ["PAGE_SIZE", "UIConfig", "create_app"]

PAGE_SIZE = 50
_MAX_SEARCH = 256
_MAX_PAGE_DIGITS = 9
_MAX_FORM = 1 << 20
_STATUS_GROUPS = {"active": ("pending", "running", "waiting"), "ended": TERMINAL}
_LIFECYCLE_RULES = {
    "cancel": "cancelled",
    "deadline": "timed out",
    "task_timeout": "task timed out",
}
_STATIC = Path(__file__).parent / "static"


@dataclass
class UIConfig:
    """What the app serves from, and what it lets a visitor do."""

    backend: Backend
    index: ExecutionIndex
    allow_actions: bool = False
    token: str | None = None
    timer_stream: str = "REACTIVE_TIMERS"
    page_size: int = PAGE_SIZE
    # At most one live update per client this often (seconds), more as the index grows.
    throttle: float = 0.25
    # The host names the pages may be asked for under (None: any). On loopback, only the
    # loopback names: a page of another site that a DNS name rebound to 127.0.0.1 cannot
    # read the view or post its forms.
    hosts: list[str] | None = None
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))


class _Refused(Exception):
    """A request the view refuses: its HTTP status, a message and the reasons."""

    def __init__(self, status: int, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reasons = reasons or []


class _Missing(_Refused):
    """No such execution in an announced workflow."""

    def __init__(self, info: WorkflowInfo, message: str) -> None:
        super().__init__(404, message)
        self.info = info


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("reactive.ui", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = lambda t: format_time(t if isinstance(t, datetime) else parse_time(t))
    env.filters["json"] = lambda v: v if isinstance(v, str) else json.dumps(v, indent=2)
    return env


def create_app(config: UIConfig) -> Starlette:
    """The web view as an ASGI app; ``config.index`` must be kept running by the caller."""
    env = _environment()
    index = config.index

    def render(request: Request, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        context.update(
            request=request,
            config=config,
            indexed=len(index),
            path=request.url.path,
            version=context.pop("version", index.version),
            statuses=STATUSES,
        )
        return HTMLResponse(env.get_template(name).render(**context), status_code=code)

    def refused(request: Request, error: _Refused) -> HTMLResponse:
        return render(
            request,
            "error.html",
            code=error.status,
            message=str(error),
            reasons=error.reasons,
            title="error",
        )

    def workflow_of(wf_id: str) -> WorkflowInfo:
        if not is_valid_execution_id(wf_id):
            raise _Refused(400, f"{wf_id[:80]!r} is not a workflow id (letters, digits, '-', '_')")
        info = index.workflows.get(wf_id)
        if info is None:
            known = ", ".join(index.workflows) or "none"
            raise _Refused(404, f"workflow {wf_id!r} is not announced (announced: {known})")
        return info

    async def workflows(request: Request) -> Response:
        cards = []
        for wf_id, info in index.workflows.items():
            transitions, failures = index.rates(wf_id)
            counts = index.statuses(wf_id)
            cards.append(
                {
                    "info": info,
                    "counts": [(s, counts[s]) for s in (*STATUSES, "undecodable") if counts[s]],
                    "total": sum(counts.values()),
                    "transitions": transitions,
                    "failures": failures,
                }
            )
        return render(
            request,
            "workflows.html",
            cards=cards,
            window=int(RATE_WINDOW // 60),
            title="workflows",
        )

    def list_query(request: Request) -> dict[str, Any]:
        q = request.query_params
        wf = q.get("workflow") or None
        if wf is not None:
            workflow_of(wf)
        status_text = q.get("status") or ""
        statuses: frozenset[str] | None = None
        if status_text:
            if status_text in _STATUS_GROUPS:
                statuses = frozenset(_STATUS_GROUPS[status_text])
            elif status_text in STATUSES or status_text == "undecodable":
                statuses = frozenset({status_text})
            else:
                raise _Refused(
                    400,
                    f"unknown status {status_text[:40]!r}",
                    [f"use one of {', '.join(STATUSES)}, active or ended"],
                )
        phase = q.get("phase")
        search = q.get("q", "").strip()
        if len(search) > _MAX_SEARCH:
            raise _Refused(400, f"the search is too long (at most {_MAX_SEARCH} characters)")
        page_text = q.get("page") or "1"
        if not page_text.isdigit() or len(page_text) > _MAX_PAGE_DIGITS or int(page_text) < 1:
            raise _Refused(400, f"page {page_text[:20]!r} is not a page number (1, 2, ...)")
        return {
            "workflow": wf,
            "status": status_text,
            "statuses": statuses,
            "phase": phase if phase else None,
            "search": search,
            "page": int(page_text),
        }

    async def executions(request: Request) -> Response:
        try:
            f = list_query(request)
        except _Refused as e:
            return refused(request, e)
        size = config.page_size
        page = index.query(
            f["workflow"],
            f["statuses"],
            f["phase"],
            f["search"],
            offset=(f["page"] - 1) * size,
            limit=size,
        )
        pages = max(1, math.ceil(page.total / size))
        if f["page"] > pages:
            return refused(
                request,
                _Refused(404, f"page {f['page']} is out of range: there are {pages}"),
            )
        params = {k: f[k] for k in ("workflow", "status", "phase") if f[k]}
        if f["search"]:
            params["q"] = f["search"]
        listing = {"page": page, "pages": pages, "current": f["page"], "filters": f}
        listing.update(params=params, phases=index.phases(f["workflow"]), title="executions")
        return render(request, _part(request, "executions.html", "_results.html"), **listing)

    async def load(wf_id: str, exec_id: str) -> tuple[WorkflowInfo, dict[str, Any]]:
        info = workflow_of(wf_id)
        if not is_valid_execution_id(exec_id):
            raise _Refused(
                400, f"{exec_id[:80]!r} is not an execution id (letters, digits, '-', '_')"
            )
        hits = await find_execution(config.backend, [info], exec_id)
        if not hits:
            raise _Missing(info, f"no execution {wf_id}.{exec_id}")
        state = decode_state(hits[0][1])
        if state is None:
            raise _Refused(500, f"{wf_id}.{exec_id}: the stored value is not a JSON object")
        return info, state

    async def execution(request: Request) -> Response:
        wf_id, exec_id = request.path_params["workflow"], request.path_params["exec_id"]
        # What the index had before the state is read: the live updates start from there.
        row = index.get(wf_id, exec_id)
        since = row.revision if row is not None else 0
        try:
            info, state = await load(wf_id, exec_id)
        except _Missing as e:
            # Not there (yet: a start message is taken in by an engine first). The page
            # follows the index and shows the execution when it appears.
            if request.query_params.get("fragment"):
                return refused(request, e)
            return render(
                request,
                "execution.html",
                code=404,
                missing=str(e),
                info=e.info,
                exec_id=exec_id,
                message=request.query_params.get("msg", "")[:200],
                version=0,
                title=f"{wf_id}.{exec_id}",
            )
        except _Refused as e:
            return refused(request, e)
        now = time.time()
        status = str(state.get("status") or "pending")
        timers: list[tuple[str, datetime]] = []
        # (An ended execution's schedules that remain fire into nothing: none is due.)
        if hasattr(config.backend, "nc") and status not in TERMINAL:
            timers = await timers_due(
                config.backend,  # type: ignore[arg-type]
                config.timer_stream,
                info,
                f"{info.key_prefix}{exec_id}",
            )
        timeline = [e for e in state.get("timeline") or [] if isinstance(e, dict)]
        steps = []
        previous: datetime | None = None
        for entry in timeline:
            at = parse_time(entry.get("timestamp"))
            gap = at.timestamp() - previous.timestamp() if at and previous else None
            steps.append({"entry": entry, "at": at, "gap": _gap(gap)})
            previous = at or previous
        return render(
            request,
            _part(request, "execution.html", "_execution.html"),
            info=info,
            exec_id=exec_id,
            state=state,
            status=status,
            ended=status in TERMINAL,
            own=own_fields(state),
            steps=steps,
            pending=pending_task(state, now),
            child=child_of(info, state),
            deadline=deadline_text(state, now),
            timers=sorted(timers),
            events=_lifecycle(info, state, timeline, await _delivered(config, info, exec_id)),
            graph=highlight_path(info.graph, timeline, status),
            path_rules=[str(e.get("rule_id") or "-") for e in timeline],
            message=request.query_params.get("msg", "")[:200],
            version=since,
            title=f"{wf_id}.{exec_id}",
        )

    async def check_action(request: Request) -> dict[str, str]:
        if not config.allow_actions:
            raise _Refused(
                403, "actions are off", ["start the view with --allow-actions to cancel or start"]
            )
        fields = await _form(request)
        if not secrets.compare_digest(fields.get("csrf", ""), config.csrf):
            raise _Refused(403, "the form is stale or from another site: reload the page")
        if config.token is not None:
            given = fields.get("token") or request.headers.get("authorization", "").removeprefix(
                "Bearer "
            )
            if not secrets.compare_digest(given.encode(), config.token.encode()):
                raise _Refused(401, "a valid token is needed for this action")
        return fields

    async def cancel(request: Request) -> Response:
        wf_id, exec_id = request.path_params["workflow"], request.path_params["exec_id"]
        try:
            fields = await check_action(request)
            info, _ = await load(wf_id, exec_id)
            reason = (fields.get("reason") or "cancelled from the web view").strip()[:500]
            try:
                await send_cancel(config.backend, info, exec_id, reason)
            except CLIError as e:
                raise _Refused(409, str(e)) from None
        except _Refused as e:
            return refused(request, e)
        return _back_to(wf_id, exec_id, "cancellation sent")

    async def start_form(request: Request) -> Response:
        try:
            info = workflow_of(request.path_params["workflow"])
        except _Refused as e:
            return refused(request, e)
        if request.method == "GET":
            return _start_page(request, info, _skeleton(info), "", None)
        try:
            fields = await check_action(request)
        except _Refused as e:
            return refused(request, e)
        raw = fields.get("input", "")
        exec_id = (fields.get("id") or "").strip() or None
        try:
            if exec_id is not None and not is_valid_execution_id(exec_id):
                raise UsageError(
                    f"{exec_id[:80]!r} is not an execution id (letters, digits, '-', '_')"
                )
            if info.start_subject:
                exec_id = None  # the start rule names the execution from the message
            exec_id, value = check_start(info, raw.encode(), exec_id)
            where, action = start_action(
                config.backend, info, exec_id, value, config.index.meta_bucket
            )
            await action()
        except CLIError as e:
            return _start_page(request, info, raw, fields.get("id", ""), e, status=400)
        if exec_id is None:
            return RedirectResponse(f"/executions?workflow={info.id}", status_code=303)
        return _back_to(info.id, exec_id, f"started ({where})")

    def _start_page(
        request: Request,
        info: WorkflowInfo,
        text: str,
        exec_id: str,
        error: CLIError | None,
        status: int = 200,
    ) -> HTMLResponse:
        return render(
            request,
            "start.html",
            code=status,
            info=info,
            input=text,
            exec_id=exec_id,
            error=error,
            what=schema_title(info, "start message" if info.start_subject else "first state"),
            schema=json.dumps(info.input_schema, indent=2) if info.input_schema else "",
            title=f"start {info.id}",
        )

    async def events(request: Request) -> Response:
        key = request.query_params.get("key", "")
        wf_id, _, exec_id = key.partition(".")
        if key and not (is_valid_execution_id(wf_id) and is_valid_execution_id(exec_id)):
            return Response("key: workflow.execution-id\n", status_code=400)
        since_text = request.query_params.get("since", "")
        if since_text and not (since_text.isdigit() and len(since_text) <= 18):
            return Response("since: the version (or revision) the page shows\n", status_code=400)

        def revision() -> int:
            row = index.get(wf_id, exec_id)
            return row.revision if row is not None else 0

        async def stream() -> AsyncIterator[str]:
            # From what the page shows (``since``): a change in between is sent at once.
            version = index.version
            seen = revision() if key else 0
            if since_text:
                seen = int(since_text) if key else 0
                version = version if key else int(since_text)
            yield f"retry: 2000\nevent: ready\ndata: {version}\n\n"
            if key and revision() != seen:
                seen = revision()
                yield f"event: changed\ndata: {version}\n\n"
            while True:
                with anyio.move_on_after(15.0):
                    version = await index.wait_changed(version)
                    if key:
                        now_at = revision()
                        if now_at == seen:
                            continue
                        seen = now_at
                    yield f"event: changed\ndata: {version}\n\n"
                    # A page re-rendered costs more as the index grows: fewer updates then
                    # (0.35 s apart at 10^4 executions, 1.25 s at 10^5).
                    await anyio.sleep(config.throttle * (1 + len(index) / 25_000))
                    continue
                yield ": keep-alive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def healthz(request: Request) -> Response:
        return Response(f"ok {len(index)} executions indexed\n", media_type="text/plain")

    routes = [
        Route("/", workflows),
        Route("/workflows", workflows),
        Route("/executions", executions),
        Route("/executions/{workflow}/{exec_id}", execution),
        Route("/executions/{workflow}/{exec_id}/cancel", cancel, methods=["POST"]),
        Route("/workflows/{workflow}/start", start_form, methods=["GET", "POST"]),
        Route("/events", events),
        Route("/ui/healthz", healthz),
        Mount("/static", StaticFiles(directory=_STATIC), name="static"),
    ]

    async def unreachable(request: Request, exc: Exception) -> Response:
        return refused(
            request,
            _Refused(503, f"NATS did not answer: {exc}", ["the page comes back when it does"]),
        )

    middleware = (
        [Middleware(TrustedHostMiddleware, allowed_hosts=config.hosts, www_redirect=False)]
        if config.hosts
        else []
    )
    return Starlette(
        routes=routes, middleware=middleware, exception_handlers={BackendError: unreachable}
    )


def _back_to(wf_id: str, exec_id: str, message: str) -> Response:
    """After an action: to the execution's page, saying what was done."""
    return RedirectResponse(
        f"/executions/{wf_id}/{exec_id}?{urlencode({'msg': message})}", status_code=303
    )


def _part(request: Request, page: str, fragment: str) -> str:
    """The template: the whole page, or (``?fragment=1``, for the live updates) its live part."""
    return fragment if request.query_params.get("fragment") else page


async def _form(request: Request) -> dict[str, str]:
    """A URL-encoded form (what the pages post), at most _MAX_FORM bytes."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise _Refused(415, "post the form as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM:
            raise _Refused(413, f"the form is too large (at most {_MAX_FORM} bytes)")
    try:
        return dict(parse_qsl(body.decode(), keep_blank_values=True))
    except (UnicodeDecodeError, ValueError) as e:
        raise _Refused(400, f"the form cannot be read: {e}") from None


def _gap(seconds: float | None) -> str:
    """The time between two steps: to the millisecond under a second, then as ``format_age``."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"+{seconds * 1000:.0f} ms" if seconds < 1 else f"+{seconds:.1f} s"
    return f"+{format_age(seconds)}"


async def _delivered(config: UIConfig, info: WorkflowInfo, exec_id: str) -> str:
    """The id of the execution's last outbox that went out (the engines' marker), or ""."""
    from reactive.errors import BackendError
    from reactive.meta import outbox_marker_key

    marker = outbox_marker_key(info.bucket, f"{info.key_prefix}{exec_id}")
    try:
        entry = await config.backend.kv_get(config.index.meta_bucket, marker)
    except BackendError:
        return ""
    return entry.value.decode(errors="replace") if entry is not None else ""


def _lifecycle(
    info: WorkflowInfo, state: dict[str, Any], timeline: list[dict[str, Any]], delivered: str
) -> list[dict[str, str]]:
    """The lifecycle events of an execution: its ends by timer or request (from its
    timeline), and the event its end published (or queued in its outbox, until the
    engines' marker says that outbox went out)."""
    events = [
        {
            "at": format_time(parse_time(e.get("timestamp"))),
            "what": _LIFECYCLE_RULES[str(e.get("rule_id"))],
            "detail": str(e.get("error") or ""),
        }
        for e in timeline
        if str(e.get("rule_id")) in _LIFECYCLE_RULES
    ]
    status = str(state.get("status") or "")
    subject = {
        "completed": info.on_complete,
        "escalated": info.on_escalate,
        "cancelled": info.on_cancel,
        "failed": info.on_fail,
        "timed_out": info.on_fail,
    }.get(status, "")
    if subject:
        queued = delivered != state.get("outbox_id") and any(
            isinstance(m, dict) and m.get("subject") == subject for m in state.get("outbox") or []
        )
        events.append(
            {
                "at": format_time(parse_time(state.get("completed_at"))),
                "what": f"{status} event on {subject}",
                "detail": "in the outbox, not published yet" if queued else "published",
            }
        )
    return events


def _skeleton(info: WorkflowInfo) -> str:
    """A start input to edit: the schema's fields with their defaults or an empty value."""
    schema = info.input_schema or {}
    ref = str(schema.get("$ref") or "")
    body = (schema.get("$defs") or {}).get(ref[len("#/$defs/") :], schema)
    empty = {"string": "", "integer": 0, "number": 0, "boolean": False, "array": [], "object": {}}
    fields: dict[str, Any] = {}
    required = set(body.get("required") or [])
    for name, prop in (body.get("properties") or {}).items():
        if not isinstance(prop, dict):
            continue
        if "default" in prop:
            fields[name] = prop["default"]
        elif name in required:
            kind = prop.get("type")
            fields[name] = empty.get(kind, None) if isinstance(kind, str) else None
    return msgspec.json.format(msgspec.json.encode(fields), indent=2).decode()
