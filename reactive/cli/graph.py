"""``graph TARGET`` (a Mermaid flowchart of the rules) and ``validate TARGET`` (the definition checks)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from reactive.cli.common import CLIError, LoadError

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_parsers", "cmd_graph", "cmd_validate"]


def cmd_graph(args: argparse.Namespace) -> int:
    from reactive.cli.loading import load_targets
    from reactive.dsl.workflow import definition_of
    from reactive.graph import mermaid

    workflows = load_targets(args.targets)
    chunks = []
    for wf in workflows:
        d = definition_of(wf)
        text = mermaid(d, direction=args.direction)
        if len(workflows) > 1:
            text = f"%% workflow {d.id}\n{text}"
        if args.format == "markdown":
            text = f"```mermaid\n{text}```\n"
        chunks.append(text)
    print("\n".join(chunks), end="")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from reactive.cli.loading import load_workflows
    from reactive.dsl.workflow import definition_of
    from reactive.errors import ReactiveError
    from reactive.graph import mermaid
    from reactive.meta import describe_workflow
    from reactive.runtime.registry import Registry

    failures = 0
    registry = Registry()
    for target in args.targets:
        try:
            workflows = load_workflows(target)
        except LoadError as e:
            failures += 1
            print(f"invalid: {e}")
            for reason in e.reasons:
                print(f"  - {reason}")
            continue
        for wf in workflows:
            d = definition_of(wf)
            reasons: list[str] = []
            try:
                # What serve does with it: instantiate, index its rules, announce, draw.
                registry.add(wf)
                describe_workflow(d)
                mermaid(d)
            except ReactiveError as e:
                reasons.append(str(e))
            except Exception as e:
                reasons.append(f"{type(e).__name__}: {e}")
            if reasons:
                failures += 1
                print(f"invalid: {target}: workflow {d.id}")
                for reason in reasons:
                    print(f"  - {reason}")
            else:
                n = len(d.rules)
                print(f"ok: {d.id} ({n} rule{'s' if n != 1 else ''})")
    if failures:
        raise CLIError(f"{failures} problem{'s' if failures != 1 else ''} found", [])
    return 0


def add_parsers(commands: Subcommands) -> None:
    graph = commands.add_parser(
        "graph",
        help="draw a workflow's rules as a Mermaid flowchart",
        description=(
            "Print the workflow's rules as a Mermaid flowchart: phases (from the rules' "
            "conditions and mutations) as nodes, triggers and actions as edges. Paste it into "
            "Markdown (GitHub renders ```mermaid blocks) or https://mermaid.live."
        ),
    )
    graph.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="module:Workflow or path/to/file.py:Workflow (a module or file alone: all its workflows)",
    )
    graph.add_argument(
        "--format",
        choices=("mermaid", "markdown"),
        default="mermaid",
        help="mermaid: the flowchart; markdown: inside a ```mermaid block (default: mermaid)",
    )
    graph.add_argument(
        "--direction",
        choices=("TB", "LR"),
        default="TB",
        help="top to bottom (fits a page) or left to right (default: TB)",
    )
    graph.set_defaults(handler=cmd_graph)

    validate = commands.add_parser(
        "validate",
        help="check workflow definitions; exit 1 with the reasons if one is broken",
        description=(
            "Import the targets and run the definition checks (the class pass of every "
            "workflow: triggers, conditions, actions, subjects, types), then what serve does "
            "with them (instantiate, index the rules). Prints 'ok: <id> (<n> rules)' per "
            "workflow, or the reasons, and exits 1 if any is broken."
        ),
    )
    validate.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="module:Workflow or path/to/file.py:Workflow (a module or file alone: all its workflows)",
    )
    validate.set_defaults(handler=cmd_validate)
