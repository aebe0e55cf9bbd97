"""``graph TARGET`` (a Mermaid flowchart of the rules) and ``validate TARGET`` (the definition
checks; with ``--lint``, the rule-set lint of ``reactive.lint``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

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
                continue
            n = len(d.rules)
            print(f"ok: {d.id} ({n} rule{'s' if n != 1 else ''})")
            if args.lint:
                failures += _lint(wf, d.id, args.explore)
    if failures:
        raise CLIError(f"{failures} problem{'s' if failures != 1 else ''} found", [])
    return 0


def _lint(workflow: Any, workflow_id: str, explore: int) -> int:
    """Print the lint's findings for one workflow; how many there are."""
    from reactive.lint import hypothesis_installed, lint

    explored = explore and hypothesis_installed()
    how = (
        f"static analysis and {explore} examples of the property machine"
        if explored
        else "static analysis only"
        + ("" if not explore else " (exploration needs Hypothesis: pip install hypothesis)")
    )
    findings = lint(workflow, explore=explore if explored else 0)
    if not findings:
        print(f"lint: {workflow_id}: clean ({how})")
        return 0
    print(
        f"lint: {workflow_id}: {len(findings)} finding{'s' if len(findings) != 1 else ''} ({how})"
    )
    for f in findings:
        where = f"rule {f.rule!r}" if f.rule else f"phase {f.phase!r}"
        print(f"  - {where}: {f.kind}: {f.reason} [{f.source}]")
    return len(findings)


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
        help="check workflow definitions (and, with --lint, their rules); exit 1 with the reasons",
        description=(
            "Import the targets and run the definition checks (the class pass of every "
            "workflow: triggers, conditions, actions, subjects, types), then what serve does "
            "with them (instantiate, index the rules). Prints 'ok: <id> (<n> rules)' per "
            "workflow, or the reasons, and exits 1 if any is broken. With --lint, also the "
            "rule-set lint: rules that can never fire, phases no rule enters, phases from "
            "which no end is reachable, conditions always false in the phases that reach "
            "them, async rules whose result can leave an execution stuck; from the "
            "definitions and the rules' code, and, where that cannot decide, from a run of "
            "the property machine (--explore examples; needs Hypothesis). Exits 1 when it "
            "finds anything."
        ),
    )
    validate.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="module:Workflow or path/to/file.py:Workflow (a module or file alone: all its workflows)",
    )
    validate.add_argument(
        "--lint",
        action="store_true",
        help="also lint the rules (exit 1 with the findings, each with its rule and reason)",
    )
    validate.add_argument(
        "--explore",
        type=int,
        default=200,
        metavar="N",
        help="examples of the property machine the lint runs (default 200; 0: static only)",
    )
    validate.set_defaults(handler=cmd_validate)
