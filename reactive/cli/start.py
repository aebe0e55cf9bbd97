"""``start``: start an execution, its input checked first, and with ``--wait`` follow it to its end.

The workflow is found through what engines announce at ``wf.<id>`` in the meta bucket
(or through its code, given ``module:Workflow``); a message-started workflow gets the
input published on its start subject, any other its first state written.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reactive.cli.common import (
    TERMINAL,
    LoadError,
    Out,
    UsageError,
    add_connection_args,
    announced_workflows,
    connect,
    decode_state,
    format_time,
    last_step,
    or_dash,
    parse_time,
    print_line,
    resolve_url,
    unknown_workflow_error,
)

if TYPE_CHECKING:
    from reactive.backends.base import KVEntry
    from reactive.compiled import WorkflowDef
    from reactive.meta import WorkflowInfo

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["START_EXIT_STATUSES", "add_parser", "cmd_start"]

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


def _decoded(kind: Any, raw: bytes, what: str) -> Any:
    """The input decoded as the code does; a UsageError naming ``what`` if it does not fit."""
    from reactive.codecs import decode
    from reactive.errors import DecodeError

    try:
        return decode(kind, raw)
    except DecodeError as e:
        raise UsageError(f"the input is not a valid {what}: {e}; nothing was started") from e


async def _start(args: argparse.Namespace, out: Out) -> int:
    from reactive.cli.executions import check_start, start_action
    from reactive.cli.loading import is_target
    from reactive.codecs import encode_json
    from reactive.errors import InvalidExecutionId
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

        value = raw
        if info.start_subject:
            # Started by a message: publish the input where the start rule listens.
            if d is not None:
                from reactive.compiled import TriggerMode

                starter = next(r for r in d.rules if r.mode is TriggerMode.MESSAGE_AND_STATE)
                message = _decoded(starter.message_type, raw, f"message for {starter.id}")
                assert starter.state_key is not None
                try:
                    derived: str | None = validate_execution_id(starter.state_key(message))
                except Exception as e:
                    raise UsageError(
                        f"the start rule {starter.id} derives no valid execution id from the input: {e}"
                    ) from e
            else:
                derived, _ = check_start(info, raw, None)
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
        elif d is not None:
            # Started by its first state: write it, initialized as Engine.start_execution does.
            exec_id = exec_id or uuid.uuid4().hex[:12]
            state = _decoded(d.state_type, raw, f"{d.state_type.__name__} state")
            state.initialize(exec_id, d.id, time.time(), d.timeout)
            value = encode_json(state)
        else:
            exec_id, value = check_start(info, raw, exec_id)
        where, action = start_action(backend, info, exec_id, value, args.meta_bucket)

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
            decoded = decode_state(entry.value)
            if decoded is None:
                continue
            state = decoded
            status = str(state.get("status") or "pending")
            sig = (state.get("phase"), status, state.get("iteration", 0))
            if sig != last:
                last = sig
                when = parse_time(state.get("updated_at")) or datetime.now(UTC)
                step = last_step(state)
                out(
                    f"  {format_time(when, date=False)}  phase={or_dash(state.get('phase'))}"
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
        f"{key} {status} (phase {or_dash(state.get('phase'))}{took})"
        + (f": {error}" if error else "")
    )
    return 0 if status == "completed" else EXIT_FAILED


def cmd_start(args: argparse.Namespace) -> int:
    import anyio

    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    return anyio.run(_start, args, print_line)


def add_parser(commands: Subcommands) -> None:
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
