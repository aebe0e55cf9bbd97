"""``demo [EXAMPLE_FILE]``: run an example on an embedded nats-server and print its timelines."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from reactive.cli.common import CLIError

__all__ = ["DEFAULT_EXAMPLE", "DemoError", "add_parser", "cmd_demo", "load_example"]

DEFAULT_EXAMPLE = "examples/plan_review.py"


class DemoError(CLIError):
    """A problem worth one clear line on stderr (exit status 1), not a traceback."""


# --------------------------------------------------------------------------- loading examples


def load_example(path: str | Path) -> ModuleType:
    """Import a Python file as a module (registered in ``sys.modules``) and return it.

    It must define ``WORKFLOWS`` (a list of workflow classes) and
    ``async def run_demo(backend, engine, out)``.
    """
    file = Path(path)
    if not file.is_file():
        raise DemoError(f"example file not found: {file} (looked in {Path.cwd()})")
    stem = re.sub(r"\W", "_", file.stem)
    name = f"reactive_example_{stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise DemoError(f"cannot import {file}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    # msgspec and the workflow class pass resolve annotations through sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        raise
    workflows = getattr(module, "WORKFLOWS", None)
    run_demo = getattr(module, "run_demo", None)
    if not isinstance(workflows, list | tuple) or not workflows:
        raise DemoError(f"{file} defines no WORKFLOWS (a list of workflow classes)")
    if run_demo is None or not inspect.iscoroutinefunction(run_demo):
        raise DemoError(f"{file} defines no 'async def run_demo(backend, engine, out)'")
    return module


# --------------------------------------------------------------------------- demo


async def run_example_on_nats(
    module: ModuleType,
    url: str,
    out: Callable[[str], None],
    *,
    timeout: float,
) -> None:
    """Connect to ``url``, run the example's workflows on an Engine, call its run_demo, shut down."""
    import anyio

    from reactive import Engine, NatsBackend

    backend = NatsBackend(url, initial_connect_attempts=3)
    try:
        with anyio.move_on_after(timeout) as scope:
            async with Engine(backend, module.WORKFLOWS) as engine:
                await module.run_demo(backend, engine, out)
        if scope.cancelled_caught:
            raise DemoError(f"the demo did not finish within {timeout:g}s (--timeout)")
    except TimeoutError as e:
        raise DemoError(f"the demo timed out waiting for its executions: {e or 'timeout'}") from e
    finally:
        with anyio.move_on_after(5.0, shield=True):
            await backend.close()


def cmd_demo(args: argparse.Namespace) -> int:
    import anyio

    from reactive import NatsServer

    out: Callable[[str], None] = print
    module = load_example(args.example)
    started = time.monotonic()
    server: Any = None
    try:
        url = args.nats_url
        if url is None:
            server = NatsServer()  # a temporary data dir, removed on stop
            try:
                server.start()
            except Exception as e:
                raise DemoError(f"could not start the embedded nats-server: {e}") from e
            url = server.url
            out(f"embedded nats-server (JetStream) listening on {url}")
        else:
            out(f"using nats-server at {url}")
        out(f"running {args.example}: {', '.join(w.__name__ for w in module.WORKFLOWS)}")
        out("")
        anyio.run(lambda: run_example_on_nats(module, url, out, timeout=args.timeout))
    finally:
        if server is not None:
            server.stop()
    out("")
    out(f"demo finished in {time.monotonic() - started:.1f}s")
    return 0


def add_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run an example on an embedded nats-server and print its timelines",
        description=(
            "Start an embedded nats-server with JetStream (temporary data), run the "
            "example's workflows on an engine, drive its demo executions and print "
            "their timelines. The example file defines WORKFLOWS and "
            "'async def run_demo(backend, engine, out)'."
        ),
    )
    demo.add_argument(
        "example",
        nargs="?",
        default=DEFAULT_EXAMPLE,
        metavar="EXAMPLE_FILE",
        help=f"the example to run, relative to the current directory (default: {DEFAULT_EXAMPLE})",
    )
    demo.add_argument(
        "--nats-url", default=None, help="use this nats-server instead of starting one"
    )
    demo.add_argument(
        "--timeout", type=float, default=60.0, help="give up after this many seconds (default: 60)"
    )
    demo.set_defaults(handler=cmd_demo)
