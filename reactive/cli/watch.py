"""``watch``: a live tail of transitions, one line per new revision of an execution's state.

Workflows announced later (``wf.<id>`` in the meta bucket) are picked up as they come.
"""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from reactive.cli.common import (
    Out,
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
)

if TYPE_CHECKING:
    from reactive.meta import WorkflowInfo

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_parser", "cmd_watch"]


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
                                state = decode_state(entry.value) or {"status": "undecodable"}
                                when = parse_time(state.get("updated_at")) or datetime.now(UTC)
                                cells = [
                                    format_time(when, date=False),
                                    info.id,
                                    exec_id,
                                    or_dash(state.get("phase")),
                                    str(state.get("status") or "pending"),
                                    str(state.get("iteration", 0)),
                                ]
                                out(_watch_line(cells, last_step(state)))
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

    return anyio.run(_watch, args, print_line)


def add_parser(commands: Subcommands) -> None:
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
