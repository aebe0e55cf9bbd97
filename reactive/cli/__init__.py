"""The command line: ``python -m reactive <command> ...`` (also installed as ``reactive``).

Commands (each has its own ``--help``):

* ``serve TARGET...``: run workflows (``module:Workflow``, ``path/file.py:Workflow``)
  on an engine; an embedded nats-server unless given a URL; ``/metrics`` and
  ``/healthz``; a clean stop on SIGINT / SIGTERM.
* ``start WORKFLOW --input JSON [--id ID] [--wait]``: start an execution, the input
  checked first (exit 2 for a usage error, 1 for a failed execution: see its --help).
* ``cancel WORKFLOW.ID [--reason R] [--wait]``: cancel an execution (its compensation
  runs, where the workflow has one).
* ``list [--workflow W] [--status S]``: executions as a table.
* ``show ID``: one execution's state and timeline.
* ``watch [--workflow W]``: a live tail of transitions.
* ``ui [--host H --port N] [--allow-actions] [--ui-token T]``: the web view (workflows,
  executions, live), with no workflow code; ``serve --ui-port N`` serves it too.
* ``graph TARGET [--format mermaid]``: a workflow's rules as a Mermaid flowchart.
* ``validate TARGET``: the definition checks (with ``--lint``, the rule-set lint); exit 1
  with the reasons.
* ``demo [EXAMPLE_FILE]``: run an example on an embedded nats-server.

Where the commands find NATS: ``--nats-url``, else ``$REACTIVE_NATS_URL``, else
the URL a running ``serve`` wrote into ``<data-dir>/nats.url`` (default data
dir ``.reactive-data``), else ``nats://127.0.0.1:4222``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from reactive.cli.common import CLIError, UsageError, quiet_tls_chatter
from reactive.cli.demo import DemoError, load_example

__all__ = ["CLIError", "DemoError", "UsageError", "build_parser", "load_example", "main"]


def build_parser() -> argparse.ArgumentParser:
    from reactive.cli import cancel, demo, graph, listing, serve, start, ui, watch

    parser = argparse.ArgumentParser(
        prog="python -m reactive",
        description="reactive: a reactive workflow engine on NATS JetStream.",
        epilog="Run `python -m reactive COMMAND --help` for a command's options.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log more (and show tracebacks of errors)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    serve.add_parser(commands)
    start.add_parser(commands)
    cancel.add_parser(commands)
    listing.add_parsers(commands)
    watch.add_parser(commands)
    graph.add_parsers(commands)
    ui.add_parser(commands)
    demo.add_parser(commands)
    return parser


def _cli_error(exc: BaseException) -> CLIError | None:
    """The CLIError in ``exc``, also inside (nested) exception groups."""
    if isinstance(exc, CLIError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _cli_error(inner)
            if found is not None:
                return found
    return None


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-exception groups, which task groups add."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _report(error: CLIError) -> None:
    print(f"error: {error}", file=sys.stderr)
    for reason in error.reasons:
        print(f"  - {reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The entry point of ``python -m reactive`` and the ``reactive`` script. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command != "serve":  # serve configures its own (structured) logging
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if not args.verbose:
            # Connection attempts are reported once, as an error, by the command.
            logging.getLogger("reactive.backends.nats").setLevel(logging.ERROR)
            logging.getLogger("nats").setLevel(logging.CRITICAL)
            quiet_tls_chatter()
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        error = _cli_error(e)
        # A command may have an exit status of its own for what failed (start: 4).
        failed = int(getattr(args, "error_status", 1))
        if error is not None:
            if args.verbose and error.__cause__ is not None:
                logging.getLogger("reactive").error("caused by", exc_info=error.__cause__)
            _report(error)
            return error.exit_code if isinstance(error, UsageError) else failed
        if not isinstance(e, Exception):
            raise
        if args.verbose:
            logging.getLogger("reactive").exception("%s failed", args.command)
        leaf = _leaf(e)
        print(f"error: {args.command} failed: {type(leaf).__name__}: {leaf}", file=sys.stderr)
        return failed
