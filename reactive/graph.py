"""Draw a workflow's rules as a Mermaid flowchart, so a person can look rather than read.

Phases become nodes where the rules name them: in their conditions
(``phase_is``, ``phase_in``) and in their mutations (``ctx.state.phase = "x"``,
``set_phase("x")``, ``complete("x")``, ``transition("x")`` — found by reading the
methods' source). Triggers and actions become edges.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Callable
from typing import Any

from reactive.compiled import ActionType, TriggerMode, WorkflowDef
from reactive.dsl.workflow import Workflow, definition_of

__all__ = ["highlight_path", "mermaid", "path_taken", "phases_set_by", "statuses_set_by"]

_STATUS_CALLS = {
    "complete": "completed",
    "fail": "failed",
    "escalate": "escalated",
    "time_out": "timed_out",
    "cancel": "cancelled",
}


def phases_set_by(fn: Callable[..., Any] | None) -> set[str]:
    """The phase names a method (or mutator) assigns, read from its source; empty if unknown."""
    if fn is None:
        return set()
    closure = getattr(fn, "__closure__", None) or ()
    found: set[str] = set()
    # transition("x") and friends keep the phase in their closure.
    if getattr(fn, "__name__", "") == "_transition":
        for cell in closure:
            if isinstance(cell.cell_contents, str):
                found.add(cell.cell_contents)
        return found
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return found

    def strings(node: ast.AST) -> set[str]:
        return {
            n.value
            for n in ast.walk(node)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }

    def is_phase(t: ast.AST) -> bool:
        return isinstance(t, ast.Attribute) and t.attr == "phase"

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(is_phase(t) for t in targets) and node.value:
                found |= strings(node.value)
            for t in targets:
                # ``st.phase, st.why = "refund", reason``: the value in the phase's place.
                if isinstance(t, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    for target, value in zip(t.elts, node.value.elts, strict=False):
                        if is_phase(target):
                            found |= strings(value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if name in ("set_phase", "complete", "transition") and node.args:
                found |= strings(node.args[0])
    return found


def statuses_set_by(fn: Callable[..., Any] | None) -> set[str]:
    """Terminal statuses a method sets by calling ``complete``/``fail``/``escalate``/``time_out``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))  # type: ignore[arg-type]
    except (OSError, TypeError, SyntaxError, IndentationError):
        return set()
    return {
        _STATUS_CALLS[n.func.attr]
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr in _STATUS_CALLS
    }


def _id(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _label(text: str) -> str:
    return text.replace('"', "'")


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def mermaid(workflow: type[Workflow] | Workflow | WorkflowDef, direction: str = "TB") -> str:
    """The workflow as a Mermaid ``flowchart`` (text to paste into Markdown); ``direction`` TB or LR."""
    d = workflow if isinstance(workflow, WorkflowDef) else definition_of(workflow)
    cls = d.cls
    lines = [f"flowchart {direction}"]
    nodes: dict[str, str] = {}

    def node(key: str, decl: str) -> str:
        nid = _id(key)
        if nid not in nodes:
            nodes[nid] = decl.format(id=nid)
            lines.append("    " + nodes[nid])
        return nid

    def phase(p: str) -> str:
        return node(f"phase_{p}", f'{{id}}(["{_label(p) or "(no phase)"}"])')

    def terminal(status: str) -> str:
        return node(f"status_{status}", f'{{id}}((("{status}")))')

    any_phase = None
    edges: list[str] = []
    for r in d.rules:
        method = getattr(cls, r.method_name, None)
        fn = getattr(method, "fn", method)
        sets = phases_set_by(fn) | phases_set_by(r.mutator)
        ends = statuses_set_by(fn) - {"completed"} if r.action is not ActionType.COMPLETE else set()
        sources: list[str]
        if r.mode is TriggerMode.STATE:
            if r.phases:
                sources = [phase(p) for p in sorted(r.phases)]
            else:
                if any_phase is None:
                    any_phase = node("any_phase", '{id}(["any phase"])')
                sources = [any_phase]
        elif r.schedule:
            sources = [node(f"sched_{r.id}", f'{{id}}>"schedule {_label(r.schedule)}"]')]
        else:
            sources = [node(f"msg_{r.subject}", f'{{id}}>"{_label(r.subject)}"]')]
        action = r.action.value
        if r.child:
            action = f"child {r.child}"
        elif r.action in (ActionType.PUBLISH, ActionType.PUBLISH_ASYNC) or (
            r.action is ActionType.COMPLETE and r.publish_subject
        ):
            action += f" {r.publish_subject}"
        extras = []
        if r.cooldown:
            extras.append(
                f"cooldown {r.cooldown:g}s" + (" for the workflow" if r.shared_cooldown else "")
            )
        if r.max_firings:
            extras.append(f"max {r.max_firings}")
        label = f"{r.id}: {action}" + (f" ({', '.join(extras)})" if extras else "")
        targets: list[str]
        if r.action is ActionType.COMPLETE:
            targets = [terminal("completed")]
        elif r.action is ActionType.PUBLISH_ASYNC:
            waits_for = f"child {r.child}" if r.child else r.publish_subject
            wait = node(f"wait_{r.id}", "{id}{{{{" + f'"waiting: {_label(waits_for)}"' + "}}}}")
            targets = [wait]
            handler = getattr(cls, r.result_handler_name or "", None)
            handler_name = f"result: {r.result_handler_name}"
            after = phases_set_by(handler) or set()
            for p in sorted(after):
                edges.append(f'    {wait} -- "{_label(handler_name)}" --> {phase(p)}')
            for e in sorted(statuses_set_by(handler)):
                edges.append(f'    {wait} -- "{_label(handler_name)}" --> {terminal(e)}')
            if not after:
                edges.append(f'    {wait} -- "{_label(handler_name)}" --> {sources[0]}')
            timeout = _duration(r.task_timeout or d.task_timeout)
            if r.retry is not None:
                edges.append(
                    f'    {wait} -. "{_label(f"retry: {r.retry.attempts} attempts, backoff {_duration(r.retry.backoff)}")}" .-> {wait}'
                )
            for kind, name, fallback in (
                ("error", r.error_handler_name, "failed"),
                (
                    f"no result in {timeout}",
                    r.timeout_handler_name,
                    "failed" if d.on_task_timeout == "fail" else "escalated",
                ),
            ):
                handler = getattr(cls, name or "", None)
                if handler is None:
                    edges.append(f'    {wait} -. "{_label(kind)}" .-> {terminal(fallback)}')
                    continue
                edge = _label(f"{kind}: {name}")
                outcomes = [phase(p) for p in sorted(phases_set_by(handler))]
                outcomes += [terminal(e) for e in sorted(statuses_set_by(handler))]
                for target in outcomes or [sources[0]]:
                    edges.append(f'    {wait} -. "{edge}" .-> {target}')
        elif sets or ends:
            targets = [phase(p) for p in sorted(sets)] + [terminal(e) for e in sorted(ends)]
        elif r.writes_state:
            targets = sources if r.mode is TriggerMode.STATE else [phase("")]
        else:
            out = node(f"out_{r.publish_subject}", f'{{id}}[/"{_label(r.publish_subject)}"/]')
            targets = [out]
        for s in sources:
            for t in targets:
                edges.append(f'    {s} -- "{_label(label)}" --> {t}')
    if d.max_iterations or d.timeout or d.cancel_handler_name:
        anywhere = any_phase or node("any_phase", '{id}(["any phase"])')
        if d.max_iterations:
            limit = f"iteration > {d.max_iterations}"
            handler = getattr(cls, d.limit_handler_name or "", None)
            outcomes = [phase(p) for p in sorted(phases_set_by(handler))] if handler else []
            outcomes += [terminal(e) for e in sorted(statuses_set_by(handler))] if handler else []
            edge = f"{limit}: {d.limit_handler_name}" if handler else limit
            for target in outcomes or [terminal("escalated")]:
                edges.append(f'    {anywhere} -. "{_label(edge)}" .-> {target}')
        handler = getattr(cls, d.cancel_handler_name or "", None)
        if handler is not None:
            edge = _label(f"cancel: {d.cancel_handler_name}")
            outcomes = [phase(p) for p in sorted(phases_set_by(handler))]
            for target in outcomes or [terminal("cancelled")]:
                edges.append(f'    {anywhere} -. "{edge}" .-> {target}')
        if d.timeout:
            edges.append(
                f'    {anywhere} -. "timeout {_duration(d.timeout)}" .-> {terminal("timed_out")}'
            )
    for status, subject in (
        ("completed", d.on_complete),
        ("failed", d.on_fail),
        ("escalated", d.on_escalate),
        ("timed_out", d.on_fail),
        ("cancelled", d.on_cancel),
    ):
        if subject and _id(f"status_{status}") in nodes:
            event = node(f"event_{subject}", f'{{id}}[/"{_label(subject)}"/]')
            edges.append(f"    {terminal(status)} -.-> {event}")
    lines.extend(edges)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- one execution's path

_EDGE = re.compile(r'^\s*(\w+) (?:-- "(.*)" -->|-\. "(.*)" \.->|-\.->) (\w+)\s*$')
_LIFECYCLE = {"deadline": "timeout ", "task_timeout": "no result in", "cancel": "cancel"}
_TERMINAL_STATUSES = ("completed", "failed", "escalated", "timed_out", "cancelled")
TAKEN_CLASS = "taken"


def path_taken(
    graph: str, timeline: list[dict[str, Any]], status: str
) -> tuple[set[int], set[str]]:
    """The edges (their order in ``graph``, as Mermaid's ``linkStyle`` counts them) and the
    nodes an execution went through, from its timeline (plain JSON) and its status."""
    edges: list[tuple[str, str, str]] = []  # (source, label, target)
    for line in graph.splitlines():
        m = _EDGE.match(line)
        if m:
            edges.append((m.group(1), m.group(2) or m.group(3) or "", m.group(4)))
    taken: set[int] = set()
    nodes: set[str] = set()
    phase = None
    for entry in timeline:
        if not isinstance(entry, dict):
            continue
        rule_id = str(entry.get("rule_id") or "")
        after = _id(f"phase_{entry.get('phase_after') or ''}")
        before = _id(f"phase_{phase}") if phase is not None else None
        mode = str(entry.get("trigger_mode") or "")
        if mode == "callback":
            wanted = [
                i for i, (s, _, t) in enumerate(edges) if s == _id(f"wait_{rule_id}") and t == after
            ]
        elif rule_id in _LIFECYCLE:
            wanted = [i for i, (_, lb, _) in enumerate(edges) if lb.startswith(_LIFECYCLE[rule_id])]
        else:
            mine = [i for i, (_, lb, _) in enumerate(edges) if lb.startswith(f"{rule_id}:")]
            exact = [i for i in mine if edges[i][0] in (before, "any_phase") or before is None]
            wanted = [i for i in exact or mine if edges[i][2] in (after, _id(f"wait_{rule_id}"))]
            wanted = wanted or exact or mine
        for i in wanted:
            taken.add(i)
            nodes.update((edges[i][0], edges[i][2]))
        phase = str(entry.get("phase_after") or "")
    if status in _TERMINAL_STATUSES:
        end = _id(f"status_{status}")
        nodes.add(end)
        taken.update(i for i, (s, _, _) in enumerate(edges) if s == end)
    nodes = {n for n in nodes if n}
    return taken, nodes


def highlight_path(graph: str, timeline: list[dict[str, Any]], status: str) -> str:
    """``graph`` (a workflow's Mermaid flowchart) with the path an execution took drawn on it:
    its edges thicker and coloured, its nodes of the class ``taken``."""
    if not graph.strip():
        return graph
    taken, nodes = path_taken(graph, timeline, status)
    defined = {m.group(1) for m in re.finditer(r"^\s+(\w+)[\[({>]", graph, re.MULTILINE)}
    lines = [graph.rstrip("\n")]
    end = _id(f"status_{status}")
    if status in _TERMINAL_STATUSES and end not in defined:
        # An end the graph does not draw (a cancellation with no handler): drawn from the
        # last phase the execution was in.
        lines.append(f'    {end}((("{status}")))')
        last = next((e for e in reversed(timeline) if isinstance(e, dict)), {})
        source = _id(f"phase_{last.get('phase_after') or ''}")
        if source in defined:
            lines.append(f'    {source} -. "{status}" .-> {end}')
            taken.add(sum(1 for line in graph.splitlines() if _EDGE.match(line)))
    lines.append(f"    classDef {TAKEN_CLASS} fill:#fde68a,stroke:#b45309,stroke-width:3px")
    if nodes:
        lines.append(f"    class {','.join(sorted(nodes))} {TAKEN_CLASS}")
    if taken:
        ids = ",".join(str(i) for i in sorted(taken))
        lines.append(f"    linkStyle {ids} stroke:#d97706,stroke-width:4px")
    return "\n".join(lines) + "\n"
