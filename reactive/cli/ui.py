"""``ui``: the web view alone, against any NATS server, with no workflow code.

It reads what engines announce in the meta bucket, like ``list`` and ``show``. Loopback
by default; cancel and start are off unless ``--allow-actions``, and need ``--ui-token``
when the view is bound beyond loopback. SIGINT and SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import TYPE_CHECKING, Any

from reactive.cli.common import CLIError, add_connection_args, connect, resolve_url

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["DEFAULT_UI_PORT", "add_parser", "add_ui_args", "cmd_ui", "ui_server"]

DEFAULT_UI_PORT = 8642
UI_TOKEN_ENV = "REACTIVE_UI_TOKEN"
MISSING = (
    "the web view needs Starlette, uvicorn and Jinja2: pip install 'reactive[ui]' "
    "(they are not installed: {error})"
)


def ui_server(host: str, port: int, args: argparse.Namespace) -> Any:
    """The web view's server, its socket bound (a reactive.ui.server.UIServer); a clear
    CLIError if the ``ui`` extra is missing, the port is taken, or actions would be exposed
    without a token."""
    try:
        from reactive.ui.server import UIServer, bind, check_exposure
    except ImportError as e:
        raise CLIError(MISSING.format(error=e)) from None
    check_exposure(host, args.allow_actions, args.ui_token)
    return UIServer(
        bind(host, port),
        allow_actions=args.allow_actions,
        token=args.ui_token or None,
        timer_stream=args.timer_stream,
    )


async def _ui(args: argparse.Namespace, server: Any) -> int:
    import anyio

    url = resolve_url(args)
    stop = anyio.Event()
    async with connect(args, url) as backend:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:

                async def on_signals() -> None:
                    async for _ in signals:
                        stop.set()
                        return

                tg.start_soon(on_signals)
                print(f"web view on {server.url}/ (NATS at {url})", flush=True)
                await server.run(backend, args.meta_bucket, stop)
                tg.cancel_scope.cancel()
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import anyio

    server = ui_server(args.host, args.port, args)
    try:
        return anyio.run(_ui, args, server)
    finally:
        server.close()


def add_ui_args(group: argparse._ArgumentGroup) -> None:
    """The options the web view shares between ``ui`` and ``serve``."""
    group.add_argument(
        "--allow-actions",
        action="store_true",
        help="let the view cancel and start executions (off by default)",
    )
    group.add_argument(
        "--ui-token",
        metavar="TOKEN",
        default=os.environ.get(UI_TOKEN_ENV),
        help=(
            f"the token every action asks for (${UI_TOKEN_ENV}); needed with --allow-actions "
            "when the view is bound beyond loopback"
        ),
    )
    group.add_argument(
        "--timer-stream",
        default="REACTIVE_TIMERS",
        metavar="STREAM",
        help="where the engines keep the timers, for an execution's timers due (default: %(default)s)",
    )


def add_parser(commands: Subcommands) -> None:
    ui = commands.add_parser(
        "ui",
        help="serve the web view (workflows, executions, live) against a NATS server",
        description=(
            "Serve the web view: the announced workflows, their executions (filtered, paged, "
            "live) and one execution's state, timeline, pending task, timers and path on its "
            "rule graph. Needs no workflow code. Loopback by default; cancel and start only "
            "with --allow-actions (and --ui-token beyond loopback)."
        ),
    )
    web = ui.add_argument_group("web view")
    web.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)"
    )
    web.add_argument(
        "--port",
        type=int,
        default=DEFAULT_UI_PORT,
        help="the port (default: %(default)s; 0: any free one)",
    )
    add_ui_args(web)
    add_connection_args(ui)
    ui.set_defaults(handler=cmd_ui)
