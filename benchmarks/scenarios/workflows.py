"""The benchmark workflows in the reactive DSL (used by the engine, in-memory and scaling runs).

* ``kv_workflow``: phase a -> b -> c -> done, three KV-driven rules, each
  ``when=phase_is(...)``; the last one completes the execution, which publishes
  the completion event on ``on_complete``.
* ``async_workflow``: phase a fires ``publish_async`` (the execution is parked,
  status waiting, and the request goes out); the result handler sets phase b;
  phase b completes (completion event on ``on_complete``).

``noise`` adds that many KV rules whose patterns never match a benchmark key
(half exact keys under the workflow's own first token, half wildcards under
another first token), to measure what non-matching rules cost per event.
``extra_conditions`` adds that many rules whose (cheap) condition is evaluated
on every event and never passes; ``counter`` counts condition evaluations.
"""

from __future__ import annotations

import types
from typing import Any

import msgspec
from common import WF_ID

from reactive import ExecutionState, RuleContext, Workflow, rule
from reactive.conditions import phase_is


class BenchState(ExecutionState):
    payload: str = ""
    verdict: str = ""


class WorkRequest(msgspec.Struct):
    execution: str
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class WorkResult(msgspec.Struct):
    task_id: str
    verdict: str = ""


def _a_to_b(self: Any, ctx: RuleContext[BenchState, None]) -> None:
    ctx.state.phase = "b"


def _b_to_c(self: Any, ctx: RuleContext[BenchState, None]) -> None:
    ctx.state.phase = "c"


def _finish(self: Any, ctx: RuleContext[BenchState, None]) -> None:
    ctx.state.phase = "done"


def _request(self: Any, ctx: RuleContext[BenchState, None]) -> WorkRequest:
    return WorkRequest(execution=ctx.state.id)


def _on_result(self: Any, ctx: RuleContext[BenchState, None], result: WorkResult) -> None:
    ctx.state.verdict = result.verdict
    ctx.state.phase = "b"


def _noop(self: Any, ctx: RuleContext[BenchState, None]) -> None:
    return None


class Counter:
    def __init__(self) -> None:
        self.n = 0


def _counting_never(counter: Counter) -> Any:
    def never(ctx: RuleContext[Any, Any]) -> bool:
        counter.n += 1
        return ctx.state.phase == "never"

    return never


def _add_noise(ns: dict[str, Any], noise: int) -> None:
    for i in range(noise):
        pattern = f"{WF_ID}.nomatch{i}" if i % 2 == 0 else f"other{i}.*"
        ns[f"noise_{i}"] = rule(watch_kv=pattern, when=phase_is("never"), mutate=True)(_noop)


def _add_conditions(ns: dict[str, Any], n: int, counter: Counter | None) -> None:
    c = counter or Counter()
    for i in range(n):
        # publish= rules do not write state, so every one of them is evaluated on every event.
        ns[f"cond_{i}"] = rule(watch_kv=True, when=_counting_never(c), publish="never.fires")(_noop)


def kv_workflow(
    bucket: str,
    done_subject: str,
    *,
    noise: int = 0,
    extra_conditions: int = 0,
    counter: Counter | None = None,
) -> type[Workflow]:
    ns: dict[str, Any] = {}
    if counter is not None:
        base = _counting_never(counter)

        def counted(phase: str) -> Any:
            cond = phase_is(phase)

            def check(ctx: RuleContext[Any, Any]) -> bool:
                base(ctx)  # count it (never true)
                return bool(cond(ctx))

            return check

        when_a, when_b, when_c = counted("a"), counted("b"), counted("c")
    else:
        when_a, when_b, when_c = phase_is("a"), phase_is("b"), phase_is("c")
    ns["a_to_b"] = rule(watch_kv=True, when=when_a, mutate=True)(_a_to_b)
    ns["b_to_c"] = rule(watch_kv=True, when=when_b, mutate=True)(_b_to_c)
    ns["finish"] = rule(watch_kv=True, when=when_c, complete=True)(_finish)
    _add_conditions(ns, extra_conditions, counter)
    _add_noise(ns, noise)
    return types.new_class(
        "Bench3",
        (Workflow,),
        {"id": WF_ID, "state": BenchState, "bucket": bucket, "on_complete": done_subject},
        lambda body: body.update(ns),
    )


def async_workflow(
    bucket: str, done_subject: str, work_subject: str, *, task_timeout: str = "10m"
) -> type[Workflow]:
    ns: dict[str, Any] = {}
    request = rule(watch_kv=True, when=phase_is("a"), publish_async=work_subject)(_request)
    request.on_result(_on_result)
    ns["request"] = request
    ns["_on_result"] = _on_result
    ns["finish"] = rule(watch_kv=True, when=phase_is("b"), complete=True)(_finish)
    return types.new_class(
        "BenchAsync",
        (Workflow,),
        {
            "id": WF_ID,
            "state": BenchState,
            "bucket": bucket,
            "on_complete": done_subject,
            "task_timeout": task_timeout,
        },
        lambda body: body.update(ns),
    )
