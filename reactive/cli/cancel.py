"""``cancel``: ask the engines to cancel an execution, from NATS without the code.

The request travels as an engine's ``Engine.cancel`` does: on the workflow's callback
subject (``<callback prefix>.<workflow>.<execution>``, captured by the callback stream),
so whichever engine serves the workflow applies it, with the workflow's cancellation
handler. Exit statuses: 0 sent (with ``--wait``: the execution has ended), 1 not sent
(the execution does not exist or has ended, the workflow is not announced, NATS is not
reachable) or, with ``--wait``, still running after ``--timeout``; 2 a usage error.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from reactive.cli.common import (
    TERMINAL,
    Out,
    UsageError,
    add_connection_args,
    announced_workflows,
    connect,
    decode_state,
    print_line,
    resolve_url,
    unknown_workflow_error,
)

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_parser", "cmd_cancel"]


async def _cancel(args: argparse.Namespace, out: Out) -> int:
    import anyio

    from reactive.cli.executions import send_cancel
    from reactive.subjects import is_valid_execution_id

    wf_id, dot, exec_id = args.id.partition(".")
    if not dot or not is_valid_execution_id(wf_id) or not is_valid_execution_id(exec_id):
        raise UsageError(f"{args.id!r} is not workflow-id.execution-id")
    url = resolve_url(args)
    async with connect(args, url) as backend:
        found = await announced_workflows(backend, args.meta_bucket)
        if wf_id not in found:
            raise unknown_workflow_error(wf_id, list(found), args.meta_bucket)
        info = found[wf_id]
        key = f"{info.key_prefix}{exec_id}"
        await send_cancel(backend, info, exec_id, args.reason)
        out(f"cancellation of {args.id} sent (reason: {args.reason})")
        if not args.wait:
            return 0
        give_up = time.monotonic() + args.timeout
        while time.monotonic() < give_up:
            entry = await backend.kv_get(info.bucket, key)
            state = decode_state(entry.value) if entry is not None else None
            status = state.get("status") if state else None
            if status in TERMINAL:
                out(f"{args.id} {status}")
                return 0
            await anyio.sleep(0.1)
        out(f"{args.id} still running after {args.timeout:g}s (a compensation may take longer)")
        return 1


def cmd_cancel(args: argparse.Namespace) -> int:
    import anyio

    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    return anyio.run(_cancel, args, print_line)


def add_parser(commands: Subcommands) -> None:
    cancel = commands.add_parser(
        "cancel",
        help="cancel an execution (its compensation runs, where the workflow has one)",
        description=(
            "Ask the engines serving the workflow to cancel an execution: its "
            "@when_cancelled handler runs, or it ends as cancelled. Exit statuses: 0 sent "
            "(--wait: ended), 1 not sent (no such execution, ended already, the workflow not "
            "announced, NATS unreachable) or, with --wait, still running after --timeout; "
            "2 usage."
        ),
    )
    cancel.add_argument("id", metavar="ID", help="workflow-id.execution-id")
    cancel.add_argument("--reason", default="cancelled", help="why (kept in the state's error)")
    cancel.add_argument("--wait", action="store_true", help="wait until the execution has ended")
    cancel.add_argument(
        "--timeout", type=float, default=30.0, help="with --wait, how long (default: 30)"
    )
    add_connection_args(cancel)
    cancel.set_defaults(handler=cmd_cancel)
