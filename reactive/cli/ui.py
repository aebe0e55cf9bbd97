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
    async with connect(args, url) as backend, anyio.create_task_group() as tg:
        tg.start_soon(set_on_signal, stop)
        print(f"web view on {server.url}/ (NATS at {url})", flush=True)
        await server.run(backend, args.meta_bucket, stop)
        tg.cancel_scope.cancel()
    return 0


async def set_on_signal(event: Any) -> None:
    """Set ``event`` at the first SIGINT or SIGTERM."""
    import anyio

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            event.set()
            break


def cmd_ui(args: argparse.Namespace) -> int:
    import anyio

    server = ui_server(args.host, args.port, args)
    try:
        return anyio.run(_ui, args, server)
    finally:
        server.close()


def add_ui_args(
    parser: argparse.ArgumentParser, title: str, flags: tuple[str, str], port: int | None
) -> None:
    """The web view's options, for ``ui`` (``--host``/``--port``) and ``serve``
    (``--ui-host``/``--ui-port``, off unless given)."""
    group = parser.add_argument_group(title)
    host_flag, port_flag = flags
    group.add_argument(
        host_flag, default="127.0.0.1", help="its address (default: %(default)s, this machine)"
    )
    port_help = f"its port (default: {port})" if port else "serve it on this port (default: off)"
    group.add_argument(port_flag, type=int, default=port, help=f"{port_help}; 0: any free port")
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


_DESCRIPTION = (
    "Serve the web view: the announced workflows, their executions (filtered, paged, live) "
    "and one execution's state, timeline, pending task, timers and path on its rule graph. "
    "Needs no workflow code. Loopback by default; cancel and start only with "
    "--allow-actions (and --ui-token beyond loopback)."
)


def add_parser(commands: Subcommands) -> None:
    ui = commands.add_parser("ui", help="serve the web view", description=_DESCRIPTION)
    add_ui_args(ui, "web view", ("--host", "--port"), DEFAULT_UI_PORT)
    add_connection_args(ui)
    ui.set_defaults(handler=cmd_ui)
