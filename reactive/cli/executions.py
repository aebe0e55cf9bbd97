"""``start``, ``list``, ``show`` and ``watch``: executions, read from NATS without the workflows' code.

Workflows are found through what engines announce at ``wf.<id>`` in the meta
bucket (bucket, key prefix, start subject); states are read as plain JSON.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reactive.cli.common import (
    CLIError,
    LoadError,
    UsageError,
    add_connection_args,
    age_of,
    announced_workflows,
    connect,
    format_age,
    format_time,
    no_workflows_error,
    parse_time,
    resolve_url,
    table,
    unknown_workflow_error,
)

if TYPE_CHECKING:
    from reactive.backends.base import KVEntry
    from reactive.backends.nats import NatsBackend
    from reactive.compiled import WorkflowDef
    from reactive.meta import WorkflowInfo

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_parsers", "cmd_list", "cmd_show", "cmd_start", "cmd_watch"]

TERMINAL = ("completed", "failed", "escalated", "timed_out")
STATUSES = ("pending", "running", "waiting", *TERMINAL)

# start's exit statuses (in its --help and the README).
EXIT_FAILED = 1  # with --wait: the execution ended, but not completed
EXIT_USAGE = UsageError.exit_code  # 2, as argparse's: the arguments or the input are wrong
EXIT_TIMEOUT = 3  # with --wait: still running after --timeout
EXIT_NOT_STARTED = 4  # NATS unreachable or failing, the workflow not announced, the id taken
START_EXIT_STATUSES = (
    "exit status: 0 started (with --wait: completed); 1 with --wait, the execution failed, "
    "escalated or timed out; 2 a usage error: the arguments or the input are wrong, nothing "
    "was started; 3 with --wait, still running after --timeout; 4 not started: NATS "
    "unreachable or failing, the workflow not announced, the execution exists"
)

Out = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


def _decode_state(value: bytes) -> dict[str, Any] | None:
    import msgspec

    try:
        state = msgspec.json.decode(value)
    except msgspec.DecodeError:
        return None
    return state if isinstance(state, dict) else None


def _text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return str(value)


def _last_step(state: dict[str, Any]) -> str:
    timeline = state.get("timeline") or []
    if not timeline or not isinstance(timeline[-1], dict):
        return ""
    last = timeline[-1]
    rule = last.get("rule_id") or "-"
    action = last.get("action") or ""
    return f"{rule} {action}".strip()


# --------------------------------------------------------------------------- start


def _read_input(text: str) -> bytes:
    import msgspec

    if text == "-":
        raw = sys.stdin.buffer.read()
        what = "stdin"
    elif text.startswith("@"):
        try:
            raw = Path(text[1:]).read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read --input file {text[1:]}: {e.strerror or e}") from e
        what = text[1:]
    else:
        raw = text.encode()
        what = "--input"
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise UsageError(f"{what} is not valid JSON: {e}") from e
    return raw


class _Target:
    """What ``start`` knows about the workflow: its announcement, and its code when given a target."""

    def __init__(self, info: WorkflowInfo, definition: WorkflowDef | None) -> None:
        self.info = info
        self.definition = definition


def _from_code(target: str) -> _Target:
    from reactive.cli.loading import load_workflows
    from reactive.dsl.workflow import definition_of
    from reactive.meta import describe_workflow

    try:
        workflows = load_workflows(target)
    except LoadError as e:
        raise UsageError(str(e), e.reasons) from e
    if len(workflows) != 1:
        ids = ", ".join(definition_of(w).id for w in workflows)
        raise UsageError(
            f"{target} defines several workflows ({ids}): name one with module:Workflow"
        )
    d = definition_of(workflows[0])
    return _Target(describe_workflow(d), d)


def _check_announced(info: WorkflowInfo, what: str, value: Any) -> None:
    """The input against the JSON Schema the engine announced: every problem named at once."""
    from reactive.cli.schema import problems

    if info.input_schema is None:
        return  # announced by an engine that describes no input (older, or raw bytes)
    found = problems(info.input_schema, value)
    if found:
        raise UsageError(
            f"the input is not a valid {what} for {info.id}; nothing was started", found
        )


def _schema_title(info: WorkflowInfo, default: str) -> str:
    schema = info.input_schema or {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target = (schema.get("$defs") or {}).get(ref[len("#/$defs/") :]) or {}
        return str(target.get("title") or default)
    return str(schema.get("title") or default)


def _announced_id(info: WorkflowInfo, message: Any) -> str | None:
    """The execution id the start rule derives from ``message``, if the announcement says which
    field it is (None: only the code knows)."""
    from reactive.subjects import is_valid_execution_id

    field = info.id_field
    if not field or not isinstance(message, dict):
        return None
    if field in message:
        value = message[field]
    else:  # a field with a default: the schema has it
        schema = info.input_schema or {}
        ref = str(schema.get("$ref") or "")
        body = (schema.get("$defs") or {}).get(ref[len("#/$defs/") :], schema)
        value = ((body.get("properties") or {}).get(field) or {}).get("default")
    if not isinstance(value, str) or not is_valid_execution_id(value):
        raise UsageError(
            f"the start rule of {info.id} takes the execution id from the input's {field!r}, "
            f"and {value!r} is not one (letters, digits, '-', '_'); nothing was started"
        )
    return value


async def _start(args: argparse.Namespace, out: Out) -> int:
    import msgspec

    from reactive.cli.loading import is_target
    from reactive.codecs import decode, encode_json
    from reactive.errors import ConflictError, DecodeError, InvalidExecutionId
    from reactive.subjects import validate_execution_id

    raw = _read_input(args.input)
    exec_id: str | None = args.id
    try:
        if exec_id is not None:
            validate_execution_id(exec_id)
    except InvalidExecutionId as e:
        raise UsageError(str(e)) from e
    target = _from_code(args.workflow) if is_target(args.workflow) else None
    url = resolve_url(args)
    async with connect(args, url) as backend:
        if target is None:
            found = await announced_workflows(backend, args.meta_bucket)
            info = found.get(args.workflow)
            if info is None:
                raise unknown_workflow_error(args.workflow, list(found), args.meta_bucket)
            target = _Target(info, None)
        info, d = target.info, target.definition

        action: Callable[[], Awaitable[None]]
        if info.start_subject:
            # Started by a message: publish the input where the start rule listens.
            if d is not None:
                from reactive.compiled import TriggerMode

                starter = next(r for r in d.rules if r.mode is TriggerMode.MESSAGE_AND_STATE)
                try:
                    message = decode(starter.message_type, raw)
                except DecodeError as e:
                    raise UsageError(
                        f"the input is not a valid message for {starter.id}: {e}; "
                        "nothing was started"
                    ) from e
                assert starter.state_key is not None
                try:
                    derived: str | None = validate_execution_id(starter.state_key(message))
                except Exception as e:
                    raise UsageError(
                        f"the start rule {starter.id} derives no valid execution id from the input: {e}"
                    ) from e
            else:
                fields = msgspec.json.decode(raw)
                _check_announced(info, _schema_title(info, "start message"), fields)
                derived = _announced_id(info, fields)
                if derived is None and exec_id is not None:
                    raise UsageError(
                        f"cannot check --id {exec_id} for {info.id}: its start rule computes the "
                        "execution id from the message in code (its state_key), which the "
                        "announcement cannot say; nothing was started",
                        [
                            "leave out --id (the start rule names the execution), or name the "
                            "code so the id is checked: start module:Workflow (or "
                            "path/file.py:Workflow)"
                        ],
                    )
            if exec_id is not None and derived is not None and exec_id != derived:
                raise UsageError(
                    f"--id {exec_id} does not match the execution id the start rule of "
                    f"{info.id} derives from the input ({derived}); nothing was started"
                )
            exec_id = derived
            if args.wait and exec_id is None:
                raise UsageError(
                    f"{info.id} is started by a message on {info.start_subject}; its execution id "
                    "comes from the message (the start rule's state_key), which only the code knows",
                    ["to --wait, name the code: start module:Workflow (or path/file.py:Workflow)"],
                )
            where = f"published to {info.start_subject}"

            async def publish() -> None:
                if info.start_stream:
                    await backend.ensure_stream(info.start_stream, [info.start_subject])
                await backend.publish(
                    info.start_subject, raw, msg_id=f"reactive-cli-start-{uuid.uuid4().hex}"
                )

            action = publish
        else:
            # Started by its first state: write it, initialized as Engine.start_execution does.
            exec_id = exec_id or uuid.uuid4().hex[:12]
            key = f"{info.key_prefix}{exec_id}"
            now = time.time()
            if d is not None:
                try:
                    state = decode(d.state_type, raw)
                except DecodeError as e:
                    raise UsageError(
                        f"the input is not a valid {d.state_type.__name__} state: {e}; "
                        "nothing was started"
                    ) from e
                state.initialize(exec_id, d.id, now, d.timeout)
                value = encode_json(state)
            else:
                fields = msgspec.json.decode(raw)
                if not isinstance(fields, dict):
                    raise UsageError(
                        "the input must be a JSON object (the execution's first state)"
                    )
                _check_announced(info, _schema_title(info, "first state"), fields)
                created = datetime.fromtimestamp(now, UTC)
                fields.update(
                    id=exec_id,
                    workflow_id=info.id,
                    status="running",
                    created_at=created,
                    updated_at=created,
                )
                if info.timeout:
                    fields["deadline"] = datetime.fromtimestamp(now + info.timeout, UTC)
                else:
                    fields.pop("deadline", None)
                value = msgspec.json.encode(fields)
            where = f"first state written to {info.bucket}/{key}"

            async def create() -> None:
                await backend.ensure_bucket(info.bucket)
                try:
                    await backend.kv_create(info.bucket, key, value)
                except ConflictError:
                    raise CLIError(f"execution {key} already exists (see: show {key})") from None

            action = create

        if exec_id is None:
            await action()
            out(f"started {info.id} ({where}; the start rule names the execution)")
            return 0
        if not args.wait:
            await action()
            out(f"started {info.id}.{exec_id} ({where})")
            return 0
        # Watch first, so that every revision from the first one on is seen.
        await backend.ensure_bucket(info.bucket)
        key = f"{info.key_prefix}{exec_id}"
        async with backend.kv_watch(info.bucket, key) as entries:
            await action()
            out(f"started {key} ({where})")
            return await _follow(entries, key, args.timeout, out)


async def _follow(entries: AsyncIterator[KVEntry], key: str, timeout: float, out: Out) -> int:
    """Print each phase / status change of one execution until it ends; the exit status."""
    import anyio

    last: tuple[Any, ...] | None = None
    state: dict[str, Any] | None = None
    with anyio.move_on_after(timeout):
        async for entry in entries:
            if entry.operation != "PUT":
                continue
            decoded = _decode_state(entry.value)
            if decoded is None:
                continue
            state = decoded
            status = str(state.get("status") or "pending")
            sig = (state.get("phase"), status, state.get("iteration", 0))
            if sig != last:
                last = sig
                when = parse_time(state.get("updated_at")) or datetime.now(UTC)
                step = _last_step(state)
                out(
                    f"  {format_time(when, date=False)}  phase={_text(state.get('phase'))}"
                    f"  status={status}  iteration={state.get('iteration', 0)}"
                    + (f"  ({step})" if step else "")
                )
            if status in TERMINAL:
                break
    status = str(state.get("status")) if state else ""
    if status not in TERMINAL:
        now_at = f"still {status}" if state else "not created yet"
        print(
            f"error: {key} did not end within {timeout:g}s (--timeout); it is {now_at}",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    assert state is not None
    error = state.get("error") or ""
    created = parse_time(state.get("created_at"))
    ended = parse_time(state.get("completed_at")) or parse_time(state.get("updated_at"))
    took = (
        f", after {ended.timestamp() - created.timestamp():.1f}s"
        if created is not None and ended is not None
        else ""
    )
    out(
        f"{key} {status} (phase {_text(state.get('phase'))}{took})"
        + (f": {error}" if error else "")
    )
    return 0 if status == "completed" else EXIT_FAILED


def cmd_start(args: argparse.Namespace) -> int:
    import anyio

    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    return anyio.run(_start, args, _print)


# --------------------------------------------------------------------------- list


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
            results[key] = _decode_state(entry.value)

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
                _text(r["phase"]),
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

    return anyio.run(_list, args, _print)


# --------------------------------------------------------------------------- show


_BASE_FIELDS: frozenset[str] | None = None


def _base_fields() -> frozenset[str]:
    global _BASE_FIELDS
    if _BASE_FIELDS is None:
        from reactive.dsl.state import ExecutionState

        _BASE_FIELDS = frozenset(ExecutionState.__struct_fields__)
    return _BASE_FIELDS


def _value_lines(name: str, value: Any, width: int) -> list[str]:
    import msgspec

    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    lines = text.splitlines() or [""]
    pad = " " * (width + 4)
    return [f"  {name.ljust(width)}  {lines[0]}"] + [pad + line for line in lines[1:]]


def format_state(
    key: str, wf_id: str, state: dict[str, Any], now: float | None = None
) -> list[str]:
    """One execution, readable: a header, the workflow's own fields, the timeline as a table."""
    now = time.time() if now is None else now
    created = parse_time(state.get("created_at"))
    updated = parse_time(state.get("updated_at"))
    completed = parse_time(state.get("completed_at"))
    deadline = parse_time(state.get("deadline"))
    pending = "-"
    if state.get("pending_task_id"):
        pending = f"{state['pending_task_id']} (rule {state.get('pending_rule_id') or '?'})"
        since = parse_time(state.get("pending_since"))
        if since is not None:
            pending += f", waiting {age_of(since, now)}"
        task_deadline = parse_time(state.get("task_deadline"))
        if task_deadline is not None:
            pending += f", times out {format_time(task_deadline)}"

    def ago(t: datetime | None) -> str:
        return "-" if t is None else f"{format_time(t)} ({age_of(t, now)} ago)"

    if str(state.get("status")) in TERMINAL:
        # Ended: the workflow's deadline no longer applies, whatever the state still says.
        deadline_text = "- (the execution has ended)"
    elif deadline is None:
        deadline_text = "-"
    elif deadline.timestamp() >= now:
        deadline_text = f"{format_time(deadline)} (in {format_age(deadline.timestamp() - now)})"
    else:
        deadline_text = f"{format_time(deadline)} ({age_of(deadline, now)} ago)"
    header = [
        ("execution", key),
        ("workflow", wf_id),
        ("id", _text(state.get("id"))),
        ("phase", _text(state.get("phase"))),
        ("status", _text(state.get("status") or "pending")),
        ("iteration", str(state.get("iteration", 0))),
        ("error", _text(state.get("error"))),
        ("pending task", pending),
        ("created", ago(created)),
        ("updated", ago(updated)),
    ]
    if completed is not None:
        header.append(("completed", ago(completed)))
    header += [("deadline", deadline_text), ("age", age_of(created, now))]
    width = max(len(k) for k, _ in header)
    lines = [f"{k.ljust(width)}  {v}" for k, v in header]

    own = {k: v for k, v in state.items() if k not in _base_fields()}
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
                _text(e.get("rule_id")),
                trigger,
                _text(e.get("action")),
                _text(e.get("phase_after")),
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

    from reactive.errors import NotFoundError
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
        hits: list[tuple[WorkflowInfo, bytes]] = []
        for info in candidates:
            try:
                entry = await backend.kv_get(info.bucket, f"{info.key_prefix}{exec_id}")
            except NotFoundError:
                continue
            if entry is not None:
                hits.append((info, entry.value))
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
    state = _decode_state(value)
    if state is None:
        raise CLIError(f"{key}: the stored value is not a JSON object (see --json)")
    for line in format_state(key, info.id, state):
        out(line)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import anyio

    return anyio.run(_show, args, _print)


# --------------------------------------------------------------------------- watch


_WATCH_COLUMNS = (
    (12, "TIME (UTC)"),
    (14, "WORKFLOW"),
    (20, "EXECUTION"),
    (14, "PHASE"),
    (10, "STATUS"),
    (4, "ITER"),
)


def _watch_line(cells: list[str], last: str) -> str:
    text = " ".join(c.ljust(w) for (w, _), c in zip(_WATCH_COLUMNS, cells, strict=True))
    return f"{text} {last}".rstrip()


async def _watch(args: argparse.Namespace, out: Out) -> int:
    import anyio
    import msgspec

    from reactive.meta import WorkflowInfo

    url = resolve_url(args)
    async with connect(args, url) as backend:
        js = backend.nc.jetstream()
        found = await announced_workflows(backend, args.meta_bucket)
        if args.workflow and args.workflow not in found:
            print(
                f"workflow {args.workflow!r} is not announced yet; waiting for it "
                f"(announced: {', '.join(sorted(found)) or 'none'})",
                file=sys.stderr,
                flush=True,
            )
        elif not found:
            print(
                f"no workflow is announced in {args.meta_bucket} at {url} yet; waiting",
                file=sys.stderr,
                flush=True,
            )
        watching: set[str] = set()
        lines = 0
        done = anyio.Event()

        async def last_revision(bucket: str) -> int:
            """The bucket's last revision: only what changes after it is new (unless --replay)."""
            if args.replay:
                return 0
            try:
                stream = await js.stream_info(f"KV_{bucket}")
            except Exception:
                return 0
            return int(stream.state.last_seq or 0)

        # Where each workflow's news starts, before the header says we are watching.
        starts = {
            info.id: await last_revision(info.bucket)
            for info in found.values()
            if not args.workflow or info.id == args.workflow
        }

        async def follow(info: WorkflowInfo) -> None:
            nonlocal lines
            from reactive.errors import BackendError

            after = starts.get(info.id)
            if after is None:
                after = await last_revision(info.bucket)
            seen: dict[str, int] = {}
            while True:
                try:
                    async with backend.kv_watch(info.bucket, f"{info.key_prefix}*") as entries:
                        async for entry in entries:
                            if entry.revision <= after or seen.get(entry.key, 0) >= entry.revision:
                                continue
                            seen[entry.key] = entry.revision
                            exec_id = entry.key[len(info.key_prefix) :]
                            if entry.operation != "PUT":
                                cells = [
                                    format_time(datetime.now(UTC), date=False),
                                    info.id,
                                    exec_id,
                                    "-",
                                    "deleted",
                                    "-",
                                ]
                                out(_watch_line(cells, ""))
                            else:
                                state = _decode_state(entry.value) or {"status": "undecodable"}
                                when = parse_time(state.get("updated_at")) or datetime.now(UTC)
                                cells = [
                                    format_time(when, date=False),
                                    info.id,
                                    exec_id,
                                    _text(state.get("phase")),
                                    str(state.get("status") or "pending"),
                                    str(state.get("iteration", 0)),
                                ]
                                out(_watch_line(cells, _last_step(state)))
                            lines += 1
                            if args.count and lines >= args.count:
                                done.set()
                                return
                except BackendError as e:
                    print(
                        f"watch of {info.bucket} failed ({e}); retrying",
                        file=sys.stderr,
                        flush=True,
                    )
                    await anyio.sleep(1.0)

        out(_watch_line([h for _, h in _WATCH_COLUMNS], "RULE ACTION"))

        async def announcements(tg: Any) -> None:
            from reactive.errors import BackendError, NotFoundError

            def add(info: WorkflowInfo) -> None:
                if info.id in watching or (args.workflow and info.id != args.workflow):
                    return
                watching.add(info.id)
                tg.start_soon(follow, info)

            for info in found.values():
                add(info)
            while True:
                try:
                    async with backend.kv_watch(args.meta_bucket, "wf.*") as entries:
                        async for entry in entries:
                            if entry.operation != "PUT":
                                continue
                            try:
                                add(msgspec.json.decode(entry.value, type=WorkflowInfo))
                            except (msgspec.DecodeError, msgspec.ValidationError):
                                continue
                except NotFoundError:
                    await anyio.sleep(1.0)  # no engine has started yet: no meta bucket
                except BackendError:
                    await anyio.sleep(1.0)

        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:

                async def on_signal() -> None:
                    async for _ in signals:
                        done.set()
                        return

                async def stop_when_done() -> None:
                    await done.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(on_signal)
                tg.start_soon(stop_when_done)
                tg.start_soon(announcements, tg)
                if args.timeout:
                    with anyio.move_on_after(args.timeout):
                        await done.wait()
                    done.set()
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    import anyio

    return anyio.run(_watch, args, _print)


# --------------------------------------------------------------------------- parsers


def add_parsers(commands: Subcommands) -> None:
    start = commands.add_parser(
        "start",
        help="start an execution (publish its trigger or write its first state)",
        description=(
            "Start an execution of a workflow that a `serve` announces (by its id) or whose code "
            "you name (module:Workflow). A workflow started by a message (a message+state rule) "
            "gets the input published on that rule's subject; any other gets its first state, "
            "the input plus id, status running, created time and deadline. The input is checked "
            "first, against the JSON Schema the engine announced (or by the code named), and "
            "refused with every wrong field named. With --wait, print each phase and status "
            "change until the execution ends."
        ),
        epilog=START_EXIT_STATUSES,
    )
    start.add_argument(
        "workflow",
        metavar="WORKFLOW",
        help="an announced workflow id (e.g. plan-review) or module:Workflow / file.py:Workflow",
    )
    start.add_argument(
        "--input",
        default="{}",
        metavar="JSON",
        help="the start message or first state as JSON; @FILE reads a file, - reads stdin (default: {})",
    )
    start.add_argument(
        "--id",
        default=None,
        help=(
            "the execution id (default: a new one; for a message-started workflow, the id its "
            "start rule derives from the message: an --id that differs is refused, and one that "
            "only the code can check needs the code named)"
        ),
    )
    start.add_argument(
        "--wait", action="store_true", help="follow the execution until it ends; exit by how"
    )
    start.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --wait, give up after this long (exit 3; default: 60)",
    )
    add_connection_args(start)
    start.set_defaults(handler=cmd_start, error_status=EXIT_NOT_STARTED)

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
    add_connection_args(show)
    show.set_defaults(handler=cmd_show)

    watch = commands.add_parser(
        "watch",
        help="a live tail of transitions",
        description=(
            "Print one line per new revision of an execution's state: time, workflow, "
            "execution, phase, status, iteration and the rule that fired. Workflows announced "
            "later are picked up. Stop with Ctrl-C."
        ),
    )
    watch.add_argument("--workflow", "-w", default=None, metavar="W", help="only this workflow")
    watch.add_argument(
        "--replay", action="store_true", help="first print every execution's current state"
    )
    watch.add_argument(
        "--count", type=int, default=0, metavar="N", help="stop after N lines (default: never)"
    )
    watch.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="stop after this long (default: never)",
    )
    add_connection_args(watch)
    watch.set_defaults(handler=cmd_watch)
