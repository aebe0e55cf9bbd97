"""``list`` and ``show``: executions as a table, and one execution readable, from NATS without the code.

Workflows are found through what engines announce at ``wf.<id>`` in the meta
bucket (bucket, key prefix); states are read as plain JSON.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from reactive.cli.common import (
    STATUSES,
    TERMINAL,
    CLIError,
    Out,
    add_connection_args,
    age_of,
    announced_workflows,
    connect,
    decode_state,
    format_time,
    no_workflows_error,
    or_dash,
    parse_time,
    print_line,
    resolve_url,
    table,
    unknown_workflow_error,
)
from reactive.cli.executions import deadline_text, own_fields, pending_task

if TYPE_CHECKING:
    from reactive import NatsBackend
    from reactive.meta import WorkflowInfo

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_parsers", "cmd_list", "cmd_show", "format_state"]


async def _states(
    backend: NatsBackend, info: WorkflowInfo
) -> list[tuple[str, dict[str, Any] | None]]:
    """Every execution of a workflow: (key, state as plain JSON or None if undecodable)."""
    import anyio

    from reactive.errors import NotFoundError

    try:
        keys = await backend.kv_keys(info.bucket, f"{info.key_prefix}*")
    except NotFoundError:
        return []
    results: dict[str, dict[str, Any] | None] = {}
    limiter = anyio.Semaphore(32)

    async def one(key: str) -> None:
        async with limiter:
            entry = await backend.kv_get(info.bucket, key)
        if entry is not None:
            results[key] = decode_state(entry.value)

    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(one, key)
    return [(key, results[key]) for key in keys if key in results]


def _parse_statuses(text: str | None) -> set[str] | None:
    if not text:
        return None
    wanted = {s.strip().lower() for s in text.split(",") if s.strip()}
    expanded: set[str] = set()
    for s in wanted:
        if s == "active":
            expanded |= {"pending", "running", "waiting"}
        elif s in ("ended", "terminal"):
            expanded |= set(TERMINAL)
        elif s in STATUSES:
            expanded.add(s)
        else:
            raise CLIError(
                f"unknown status {s!r}: use {', '.join(STATUSES)}, 'active' or 'ended' "
                "(several comma-separated)"
            )
    return expanded


async def _list(args: argparse.Namespace, out: Out) -> int:
    import msgspec

    statuses = _parse_statuses(args.status)
    url = resolve_url(args)
    async with connect(args, url) as backend:
        found = await announced_workflows(backend, args.meta_bucket)
        if args.workflow:
            if args.workflow not in found:
                raise unknown_workflow_error(args.workflow, list(found), args.meta_bucket)
            infos = [found[args.workflow]]
        else:
            if not found:
                raise no_workflows_error(url, args.meta_bucket)
            infos = [found[k] for k in sorted(found)]
        rows: list[tuple[datetime, dict[str, Any]]] = []
        now = time.time()
        for info in infos:
            for key, state in await _states(backend, info):
                exec_id = key[len(info.key_prefix) :]
                if state is None:
                    state = {"id": exec_id, "status": "undecodable"}
                status = str(state.get("status") or "pending")
                if statuses is not None and status not in statuses:
                    continue
                created = parse_time(state.get("created_at"))
                rows.append(
                    (
                        created or datetime.fromtimestamp(0, UTC),
                        {
                            "id": exec_id,
                            "workflow": info.id,
                            "phase": state.get("phase") or "",
                            "status": status,
                            "iteration": state.get("iteration", 0),
                            "error": state.get("error") or "",
                            "created_at": state.get("created_at"),
                            "updated_at": state.get("updated_at"),
                            "age": age_of(created, now),
                        },
                    )
                )
    rows.sort(key=lambda r: (r[0], r[1]["workflow"], r[1]["id"]))
    if args.json:
        out(msgspec.json.format(msgspec.json.encode([r for _, r in rows])).decode())
        return 0
    if not rows:
        out("no executions" + (" with that status" if statuses else ""))
        return 0
    for line in table(
        ("ID", "WORKFLOW", "PHASE", "STATUS", "ITERATION", "AGE"),
        [
            (
                r["id"],
                r["workflow"],
                or_dash(r["phase"]),
                r["status"],
                str(r["iteration"]),
                r["age"],
            )
            for _, r in rows
        ],
    ):
        out(line)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import anyio

    return anyio.run(_list, args, print_line)


# --------------------------------------------------------------------------- show


def _value_lines(name: str, value: Any, width: int) -> list[str]:
    import msgspec

    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    lines = text.splitlines() or [""]
    pad = " " * (width + 4)
    return [f"  {name.ljust(width)}  {lines[0]}"] + [pad + line for line in lines[1:]]


def format_state(
    key: str,
    wf_id: str,
    state: dict[str, Any],
    now: float | None = None,
    timers: Sequence[tuple[str, datetime]] = (),
    child: tuple[str, str] | None = None,
) -> list[str]:
    """One execution, readable: a header, the workflow's own fields, the timeline as a table.

    ``timers``: its schedules pending in NATS (kind, when), as ``show`` found them (none
    is due once it has ended); ``child``: the child execution its pending task is.
    """
    now = time.time() if now is None else now
    created = parse_time(state.get("created_at"))
    updated = parse_time(state.get("updated_at"))
    completed = parse_time(state.get("completed_at"))
    pending = pending_task(state, now)
    if child is not None:
        pending += f" · child {child[0]}.{child[1]}"

    def ago(t: datetime | None) -> str:
        return "-" if t is None else f"{format_time(t)} ({age_of(t, now)} ago)"

    header = [
        ("execution", key),
        ("workflow", wf_id),
        ("id", or_dash(state.get("id"))),
        ("phase", or_dash(state.get("phase"))),
        ("status", or_dash(state.get("status") or "pending")),
        ("iteration", str(state.get("iteration", 0))),
        ("error", or_dash(state.get("error"))),
        ("pending task", pending),
        ("created", ago(created)),
        ("updated", ago(updated)),
    ]
    parent = state.get("parent")
    if isinstance(parent, dict):  # (a child execution: whose task it answers)
        header.append(
            (
                "parent",
                f"{parent.get('workflow')}.{parent.get('id')} (rule {parent.get('rule_id')})",
            )
        )
    if completed is not None:
        header.append(("completed", ago(completed)))
    header += [("deadline", deadline_text(state, now)), ("age", age_of(created, now))]
    if timers and str(state.get("status")) not in TERMINAL:
        header.append(
            ("timers due", ", ".join(f"{kind} {format_time(at)}" for kind, at in sorted(timers)))
        )
    width = max(len(k) for k, _ in header)
    lines = [f"{k.ljust(width)}  {v}" for k, v in header]

    own = own_fields(state)
    if own:
        lines += ["", "state:"]
        w = max(len(k) for k in own)
        for name in own:
            lines += _value_lines(name, own[name], w)

    timeline = [e for e in state.get("timeline") or [] if isinstance(e, dict)]
    lines += ["", f"timeline ({len(timeline)} entr{'y' if len(timeline) == 1 else 'ies'}):"]
    rows = []
    for e in timeline:
        mode = str(e.get("trigger_mode") or "-")
        info = str(e.get("trigger_info") or "")
        trigger = f"{mode} {info}" if info and mode.startswith("message") else mode
        rows.append(
            (
                format_time(parse_time(e.get("timestamp"))),
                or_dash(e.get("rule_id")),
                trigger,
                or_dash(e.get("action")),
                or_dash(e.get("phase_after")),
                str(e.get("iteration", 0)),
            )
        )
    if rows:
        lines += table(("TIME (UTC)", "RULE", "TRIGGER", "ACTION", "PHASE", "ITER"), rows, "  ")
    else:
        lines.append("  (empty)")
    return lines


async def _show(args: argparse.Namespace, out: Out) -> int:
    import msgspec

    from reactive.cli.executions import child_of, find_execution, timers_due
    from reactive.subjects import is_valid_execution_id

    wanted: str = args.id
    wf_id, dot, exec_id = wanted.partition(".")
    if not dot:
        wf_id, exec_id = "", wanted
    if not is_valid_execution_id(exec_id) or (dot and not is_valid_execution_id(wf_id)):
        raise CLIError(
            f"{wanted!r} is not an execution id (letters, digits, '-', '_') "
            "nor workflow-id.execution-id"
        )
    url = resolve_url(args)
    async with connect(args, url) as backend:
        found = await announced_workflows(backend, args.meta_bucket)
        if wf_id:
            if wf_id not in found:
                raise unknown_workflow_error(wf_id, list(found), args.meta_bucket)
            candidates = [found[wf_id]]
        else:
            if not found:
                raise no_workflows_error(url, args.meta_bucket)
            candidates = [found[k] for k in sorted(found)]
        hits = await find_execution(backend, candidates, exec_id)
        timers = (
            await timers_due(
                backend, args.timer_stream, hits[0][0], f"{hits[0][0].key_prefix}{exec_id}"
            )
            if len(hits) == 1 and not args.json
            else []
        )
    if not hits:
        where = ", ".join(i.id for i in candidates)
        raise CLIError(f"no execution {wanted!r} (looked in: {where})")
    if len(hits) > 1:
        raise CLIError(
            f"execution id {exec_id!r} exists in several workflows: name one as workflow.id",
            [f"{info.key_prefix}{exec_id}" for info, _ in hits],
        )
    info, value = hits[0]
    key = f"{info.key_prefix}{exec_id}"
    if args.json:
        out(msgspec.json.format(value).decode() if value else "")
        return 0
    state = decode_state(value)
    if state is None:
        raise CLIError(f"{key}: the stored value is not a JSON object (see --json)")
    child = child_of(info, state)
    for line in format_state(key, info.id, state, timers=timers, child=child):
        out(line)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import anyio

    return anyio.run(_show, args, print_line)


def add_parsers(commands: Subcommands) -> None:
    lister = commands.add_parser(
        "list",
        help="list executions as a table",
        description="Executions of every announced workflow (or one), oldest first.",
    )
    lister.add_argument("--workflow", "-w", default=None, metavar="W", help="only this workflow")
    lister.add_argument(
        "--status",
        "-s",
        default=None,
        metavar="S",
        help=f"only these statuses (comma-separated: {', '.join(STATUSES)}, active, ended)",
    )
    lister.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_args(lister)
    lister.set_defaults(handler=cmd_list)

    show = commands.add_parser(
        "show",
        help="show one execution's state and timeline",
        description="One execution: its status, its own fields and its timeline, readable.",
    )
    show.add_argument(
        "id",
        metavar="ID",
        help="workflow-id.execution-id, or an execution id that is unique across workflows",
    )
    show.add_argument("--json", action="store_true", help="print the stored state as JSON")
    show.add_argument(
        "--timer-stream",
        default="REACTIVE_TIMERS",
        metavar="STREAM",
        help="where the engines keep the timers (Engine(timer_stream=...); default: %(default)s)",
    )
    add_connection_args(show)
    show.set_defaults(handler=cmd_show)
