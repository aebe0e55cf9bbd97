"""A failed or late task handled by the workflow, against a real nats-server: a worker's
error reaches ``on_error``, and a task that gets no answer reaches ``on_timeout`` after
the rule's own timeout (a message schedule in NATS), each compensating."""

from __future__ import annotations

import sys
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client
from test_engine_nats import Responder, all_consumed, engine_on, eventually, metric, uid

from reactive import (
    ExecutionState,
    Retry,
    RuleContext,
    Status,
    TaskFailure,
    Workflow,
    rule,
    when_cancelled,
)
from reactive.conditions import phase_in, phase_is
from reactive.dsl.workflow import definition_of

pytestmark = pytest.mark.anyio


class Order(ExecutionState):
    why: str = ""


class Charged(msgspec.Struct):
    receipt: str
    task_id: str = ""


def saga(timeout: str) -> type[Workflow]:
    wid = uid("saga")

    class Saga(Workflow, id=wid, state=Order, task_timeout="1h"):
        @rule(
            watch_kv=True,
            when=phase_is("charging"),
            publish_async=f"{wid}.charge",
            timeout=timeout,
        )
        def charge(self, ctx: RuleContext[Order, None]) -> dict[str, str]:
            return {"order": ctx.execution_id}

        @charge.on_result
        def charged(self, ctx: RuleContext[Order, None], result: Charged) -> None:
            ctx.state.phase = "charged"

        @charge.on_error
        def declined(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
            ctx.state.phase, ctx.state.why = "releasing", f"{failure.kind}: {failure.message}"

        @charge.on_timeout
        def too_slow(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
            ctx.state.phase, ctx.state.why = "releasing", f"{failure.kind}: {failure.message}"

        @rule(watch_kv=True, when=phase_is("releasing"), mutate=True)
        def release(self, ctx: RuleContext[Order, None]) -> None:
            ctx.state.phase = "released"

        @rule(watch_kv=True, when=phase_in("charged", "released"), complete=True)
        def done(self, ctx: RuleContext[Order, None]) -> None: ...

    return Saga


async def run(nats_url: str, nc: Client, flow: type[Workflow], orders: list[str]) -> list[Order]:
    wid = definition_of(flow).id

    def answer(req: dict[str, Any]) -> dict[str, Any] | None:
        if req["order"] == "declined":
            return {"error": "card declined"}
        if req["order"] == "paid":
            return {"receipt": "r1"}
        return None  # "silent": no answer, the rule's timeout comes

    await Responder(nc, f"{wid}.charge", answer).start()
    async with engine_on(nats_url, [flow]) as engine:
        for order in orders:
            await engine.start_execution(flow, order, Order(phase="charging"))
        return [await engine.wait_for(flow, order, timeout=20) for order in orders]


async def test_a_workers_error_reaches_on_error_on_nats(nats_url: str, nc: Client) -> None:
    # (The rule's timeout is an hour: the answers come first, however slow the machine.)
    declined, paid = await run(nats_url, nc, saga("1h"), ["declined", "paid"])
    assert (declined.status, declined.phase) == (Status.COMPLETED, "released")
    assert declined.why == "error: card declined"
    assert (paid.status, paid.phase) == (Status.COMPLETED, "charged")


async def test_a_task_with_no_answer_reaches_on_timeout_on_nats(nats_url: str, nc: Client) -> None:
    # The rule's own timeout (1 s; the workflow's is an hour) is a schedule in NATS.
    [silent] = await run(nats_url, nc, saga("1s"), ["silent"])
    assert (silent.status, silent.phase) == (Status.COMPLETED, "released")
    assert silent.why == "timeout: no callback within 1s"


class Signal(msgspec.Struct):
    order: str
    note: str = ""


async def test_a_signal_for_an_unknown_execution_is_terminated_not_created_on_nats(
    nats_url: str, nc: Client
) -> None:
    wid = uid("signals")

    class Signals(Workflow, id=wid, state=Order):
        @rule(
            on_subject=f"{wid}.note",
            stream=f"IN_{wid}",
            state_key=lambda m: m.order,
            mutate=True,
            create=False,
        )
        def note(self, ctx: RuleContext[Order, Signal]) -> None:
            ctx.state.why = ctx.message.note

    js = nc.jetstream()
    async with engine_on(nats_url, [Signals]) as engine:
        await js.publish(f"{wid}.note", msgspec.json.encode(Signal(order="ghost", note="x")))
        await eventually(
            lambda: metric("reactive_unknown_executions_total", workflow=wid) >= 1,
            what="the signal counted",
        )
        await all_consumed(js, engine, Signals)
        assert await engine.get(Signals, "ghost") is None
        # An execution that exists gets it.
        await engine.start_execution(Signals, "o1", Order(phase="open"))
        await js.publish(f"{wid}.note", msgspec.json.encode(Signal(order="o1", note="hello")))
        st = await engine.wait_for(Signals, "o1", lambda s: s.why == "hello", timeout=20)
        assert st.why == "hello"


async def test_a_failed_task_is_retried_after_its_backoff_on_nats(
    nats_url: str, nc: Client
) -> None:
    wid = uid("retry")

    class Retrying(Workflow, id=wid, state=Order, task_timeout="1h"):
        @rule(
            watch_kv=True,
            when=phase_is("charging"),
            publish_async=f"{wid}.charge",
            retry=Retry(attempts=3, backoff="1s"),
        )
        def charge(self, ctx: RuleContext[Order, None]) -> dict[str, str]:
            return {"order": ctx.execution_id}

        @charge.on_result
        def charged(self, ctx: RuleContext[Order, None], result: Charged) -> None:
            ctx.state.phase = "charged"

        @rule(watch_kv=True, when=phase_is("charged"), complete=True)
        def done(self, ctx: RuleContext[Order, None]) -> None: ...

    seen: list[str] = []

    def answer(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req["task_id"])
        return {"error": "busy"} if len(seen) == 1 else {"receipt": "r1"}

    await Responder(nc, f"{wid}.charge", answer).start()
    async with engine_on(nats_url, [Retrying]) as engine:
        await engine.start_execution(Retrying, "o1", Order(phase="charging"))
        st = await engine.wait_for(Retrying, "o1", timeout=20)
    assert (st.status, st.phase) == (Status.COMPLETED, "charged")
    assert len(seen) == 2 and seen[0] != seen[1]  # a new task for the second attempt
    assert [e.action for e in st.timeline][:4] == [
        "publish_async",
        "retry_later",
        "retry",
        "callback",
    ]


async def test_cancel_from_the_command_line_runs_the_compensation_on_nats(
    nats_url: str, nc: Client
) -> None:
    wid = uid("cancel")

    class Cancellable(Workflow, id=wid, state=Order, on_cancel=f"{wid}.cancelled"):
        @rule(watch_kv=True, when=phase_is("charging"), publish_async=f"{wid}.charge")
        def charge(self, ctx: RuleContext[Order, None]) -> dict[str, str]:
            return {"order": ctx.execution_id}

        @charge.on_result
        def charged(self, ctx: RuleContext[Order, None], result: Charged) -> None:
            ctx.state.phase = "charged"

        @when_cancelled
        def compensate(self, ctx: RuleContext[Order, None], reason: str) -> None:
            ctx.state.phase, ctx.state.why = "releasing", reason

        @rule(watch_kv=True, when=phase_is("releasing"), mutate=True)
        def release(self, ctx: RuleContext[Order, None]) -> None:
            ctx.state.cancel(ctx.state.why)

    events: list[bytes] = []

    async def on_event(msg: Any) -> None:
        events.append(msg.data)

    await nc.subscribe(f"{wid}.cancelled", cb=on_event)
    await Responder(nc, f"{wid}.charge", lambda req: None).start()  # (never answers)
    async with engine_on(nats_url, [Cancellable]) as engine:
        await engine.start_execution(Cancellable, "c1", Order(phase="charging"))
        await engine.wait_for(Cancellable, "c1", lambda s: s.status is Status.WAITING)
        done = await anyio.run_process(
            [sys.executable, "-m", "reactive", "cancel", f"{wid}.c1", "--reason", "changed",
             "--wait", "--timeout", "5", "--nats-url", nats_url],
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        assert b"cancelled" in done.stdout
        st = await engine.get(Cancellable, "c1")
        again = await anyio.run_process(
            [sys.executable, "-m", "reactive", "cancel", f"{wid}.c1", "--nats-url", nats_url],
            check=False,
        )
    assert (st.status, st.error, st.phase) == (Status.CANCELLED, "changed", "releasing")
    assert [e.action for e in st.timeline][-2:] == ["on_cancel", "mutate"]
    await eventually(lambda: len(events) == 1, what="the cancellation event")
    assert msgspec.json.decode(events[0])["reason"] == "changed"
    assert again.returncode == 1 and b"has ended already" in again.stderr


async def test_timer_rules_fire_from_schedules_on_nats(nats_url: str, nc: Client) -> None:
    wid = uid("timers")

    class Timed(Workflow, id=wid, state=Order):
        @rule(watch_kv=True, when=phase_is("awaiting"), every="1s", publish=f"{wid}.remind")
        def remind(self, ctx: RuleContext[Order, None]) -> dict[str, str]:
            return {"order": ctx.execution_id}

        @rule(watch_kv=True, when=phase_is("awaiting"), after="3s", mutate=True)
        def give_up(self, ctx: RuleContext[Order, None]) -> None:
            ctx.state.phase = "abandoned"

        @rule(watch_kv=True, when=phase_is("abandoned"), complete=True)
        def done(self, ctx: RuleContext[Order, None]) -> None: ...

    reminders: list[bytes] = []

    async def on_reminder(msg: Any) -> None:
        reminders.append(msg.data)

    await nc.subscribe(f"{wid}.remind", cb=on_reminder)
    async with engine_on(nats_url, [Timed]) as engine:
        await engine.start_execution(Timed, "o1", Order(phase="awaiting"))
        st = await engine.wait_for(Timed, "o1", timeout=20)
    assert (st.status, st.phase) == (Status.COMPLETED, "abandoned")
    # Ticks at 1 s, 2 s and 3 s at most (an evaluation that comes late takes the tick it
    # is at, not every one it missed), at least one (a tick's reminder goes out before
    # the rule that gives up writes, in the same evaluation); none after it ended.
    await nc.flush()
    assert 1 <= len(reminders) <= 3


async def test_show_lists_the_timers_due_of_an_execution(nats_url: str, nc: Client) -> None:
    wid = uid("shown")

    class Shown(Workflow, id=wid, state=Order, timeout="2h"):
        @rule(watch_kv=True, when=phase_is("charging"), publish_async=f"{wid}.charge")
        def charge(self, ctx: RuleContext[Order, None]) -> dict[str, str]:
            return {"order": ctx.execution_id}

        @charge.on_result
        def charged(self, ctx: RuleContext[Order, None], result: Charged) -> None:
            ctx.state.phase = "charged"

    async with engine_on(nats_url, [Shown]) as engine:
        await engine.start_execution(Shown, "s1", Order(phase="charging"))
        st = await engine.wait_for(Shown, "s1", lambda s: s.status is Status.WAITING)
        assert st.deadline is not None and st.task_deadline is not None

        async def shown() -> str:
            done = await anyio.run_process(
                [sys.executable, "-m", "reactive", "show", f"{wid}.s1", "--nats-url", nats_url],
                check=False,
            )
            assert done.returncode == 0, done.stderr.decode()
            return done.stdout.decode()

        # (Its timers are published after its write: the listing has both once they are.)
        text = await eventually(lambda: _both(shown()), what="both timers listed")
    line = next(x for x in text.splitlines() if x.startswith("timers due"))
    assert "deadline " in line and "task " in line


async def _both(text: Any) -> str:
    found = await text
    line = next((x for x in found.splitlines() if x.startswith("timers due")), "")
    return found if "deadline " in line and "task " in line else ""
