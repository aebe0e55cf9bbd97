"""The engine evaluates a state it has just committed right away (Engine._follow), and skips
that revision when the watch brings it back: every revision is still evaluated exactly
once, whoever wrote it, however long the chain, and with several workflows on one key."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from anyio.abc import TaskStatus

from reactive import Engine, ExecutionState, MemoryBackend, RuleContext, Status, Workflow, rule
from reactive.conditions import condition
from reactive.runtime.inbox import Inbox
from reactive.runtime.shards import CHAIN_LIMIT as _CHAIN_LIMIT
from reactive.testing import TestEngine

pytestmark = pytest.mark.anyio


class Steps(ExecutionState):
    step: int = 0
    target: int = 3
    outside: str = ""


def counting(seen: Counter[int]) -> Any:
    @condition
    def record(ctx: RuleContext[Any, Any]) -> bool:
        seen[ctx.revision] += 1
        return False

    return record


def may_advance(st: Steps) -> bool:
    # Past step 5 only once told from outside (when the target is beyond 50).
    return st.step < st.target and (st.target < 50 or st.step < 5 or st.outside == "go")


def stepper(seen: Counter[int], workflow_id: str, bucket: str = "follow") -> type[Workflow]:
    class Stepper(Workflow, id=workflow_id, state=Steps, bucket=bucket):
        @rule(watch_kv=True, when=counting(seen), publish="never")
        def watch_every_revision(self, ctx: RuleContext[Steps, None]) -> None:
            return None

        @rule(watch_kv=True, when=lambda ctx: may_advance(ctx.state), mutate=True)
        def advance(self, ctx: RuleContext[Steps, None]) -> None:
            ctx.state.step += 1

        @rule(watch_kv=True, when=lambda ctx: ctx.state.step >= ctx.state.target, complete=True)
        def finish(self, ctx: RuleContext[Steps, None]) -> None:
            return None

    return Stepper


class Written:
    """Every revision written to the bucket, seen by a watcher of its own."""

    def __init__(self) -> None:
        self.by_key: dict[str, list[int]] = {}

    def __getitem__(self, key: str) -> list[int]:
        return self.by_key.get(key, [])

    async def run(
        self,
        backend: MemoryBackend,
        bucket: str,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        await backend.ensure_bucket(bucket)
        async with backend.kv_watch(bucket, ">") as entries:
            task_status.started()  # watching: every revision from here on is seen
            async for e in entries:
                self.by_key.setdefault(e.key, []).append(e.revision)


@asynccontextmanager
async def recording(te: TestEngine, bucket: str = "follow") -> AsyncIterator[Written]:
    written = Written()
    async with anyio.create_task_group() as tg:
        await tg.start(written.run, te.backend, bucket)
        yield written
        await te.settle()
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("target", [1, 3, _CHAIN_LIMIT + 5, 3 * _CHAIN_LIMIT])
async def test_every_committed_revision_is_evaluated_exactly_once(target: int) -> None:
    seen: Counter[int] = Counter()
    wf = stepper(seen, "stepper")
    async with TestEngine(wf) as te, recording(te) as rec:
        await te.start(wf, "e1", Steps(target=target))
        te.assert_status(wf, "e1", "completed")
        assert te.state(wf, "e1").step == target
        written = rec["stepper.e1"]
        # start + one write per step + the completing write; the completed one is not evaluated.
        assert len(written) == target + 2
        assert seen == Counter(written[:-1])


async def test_a_revision_written_from_outside_between_chains_is_evaluated() -> None:
    seen: Counter[int] = Counter()
    wf = stepper(seen, "outside")
    async with TestEngine(wf) as te, recording(te) as rec:
        await te.start(wf, "e1", Steps(target=2))
        te.assert_status(wf, "e1", "completed")
        await te.start(wf, "e2", Steps(target=60))
        assert te.state(wf, "e2").step == 5  # waiting to be told
        state = te.state(wf, "e2")
        state.outside = "go"
        await te.trigger_kv(wf, "e2", state)
        te.assert_status(wf, "e2", "completed")
        assert te.state(wf, "e2").step == 60
        for key in ("outside.e1", "outside.e2"):
            written = rec[key]
            assert written
            assert all(seen[r] == 1 for r in written[:-1]), (key, written, seen)


async def test_every_workflow_watching_the_key_sees_each_revision_once() -> None:
    seen_a: Counter[int] = Counter()
    seen_b: Counter[int] = Counter()
    writer = stepper(seen_a, "shared")

    class Observer(Workflow, id="observer", state=Steps, bucket="follow"):
        @rule(watch_kv="shared.*", when=counting(seen_b), publish="never")
        def observe(self, ctx: RuleContext[Steps, None]) -> None:
            return None

    async with TestEngine(writer, Observer) as te, recording(te) as rec:
        await te.start(writer, "e1", Steps(target=_CHAIN_LIMIT + 2))
        te.assert_status(writer, "e1", "completed")
        written = rec["shared.e1"]
        assert seen_a == Counter(written[:-1])
        # Both read the same status: neither evaluates the completed revision.
        assert seen_b == Counter(written[:-1])


async def test_a_restarted_engine_evaluates_the_latest_revision_again() -> None:
    seen: Counter[int] = Counter()
    wf = stepper(seen, "restart")
    backend = MemoryBackend()
    async with TestEngine(wf, backend=backend) as te:
        await te.start(wf, "e1", Steps(target=2))
        await te.restart()
        te.assert_status(wf, "e1", "completed")


# --------------------------------------------------------------------------- the inbox


async def test_inbox_is_fifo_and_refuses_beyond_its_capacity() -> None:
    inbox: Inbox[int] = Inbox(3)
    assert [inbox.put_nowait(i) for i in range(4)] == [True, True, True, False]
    assert len(inbox) == 3
    assert [inbox.get_nowait() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(IndexError):
        inbox.get_nowait()
    with pytest.raises(ValueError, match="at least one"):
        Inbox(0)


async def test_inbox_get_waits_for_an_item_and_put_waits_for_room() -> None:
    inbox: Inbox[str] = Inbox(1)
    got: list[str] = []

    async def consumer() -> None:
        for _ in range(3):
            got.append(await inbox.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        await anyio.wait_all_tasks_blocked()  # the consumer waits in get()
        assert got == []
        await inbox.put("a")
        await inbox.put("b")  # waits until the consumer took "a" if it has not yet
        await inbox.put("c")
    assert got == ["a", "b", "c"]
    assert len(inbox) == 0


async def test_a_backlog_beyond_the_inboxes_waits_for_room_and_loses_nothing() -> None:
    # 200 executions written before the engine starts: its replay meets full inboxes
    # (2 workers, 16 places each) and must wait for room, not drop or duplicate.
    seen: Counter[int] = Counter()
    wf = stepper(seen, "backlog")
    backend = MemoryBackend()
    await backend.ensure_bucket("follow")
    for i in range(200):
        state = Steps(id=f"e{i}", workflow_id="backlog", status=Status.RUNNING, target=2)
        await backend.kv_create("follow", f"backlog.e{i}", msgspec.json.encode(state))
    engine = Engine(backend, [wf], workers=2, queue_limit=32)
    async with engine:
        with anyio.fail_after(10):
            while not all(
                (entry := backend.peek("follow", f"backlog.e{i}")) is not None
                and msgspec.json.decode(entry.value, type=Steps).status is Status.COMPLETED
                for i in range(200)
            ):
                await anyio.sleep(0.01)
        assert engine.shards.backlogged  # the full-inbox path ran
    states = [
        msgspec.json.decode(backend.peek("follow", f"backlog.e{i}").value, type=Steps)
        for i in range(200)
    ]
    assert all(st.step == 2 and len(st.timeline) == 3 for st in states)
    assert all(n == 1 for n in seen.values())  # each revision evaluated once


async def test_inbox_get_after_a_cancelled_get_still_wakes() -> None:
    # A cancelled get leaves its waiter spent; the next get must wait on a fresh one.
    inbox: Inbox[str] = Inbox(4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(inbox.get)
        await anyio.wait_all_tasks_blocked()  # it waits...
        tg.cancel_scope.cancel()  # ...and is given up
    got: list[str] = []

    async def consumer() -> None:
        got.append(await inbox.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        await anyio.wait_all_tasks_blocked()  # the next get waits
        assert inbox.put_nowait("x")
    assert got == ["x"]


# --------------------------------------------------------------------------- callbacks


class Asked(ExecutionState):
    question: str = ""
    answer: str = ""
    note: str = ""


class Question(msgspec.Struct):
    question: str


class Answer(msgspec.Struct):
    task_id: str = ""
    answer: str = ""


class AskOnce(Workflow, id="ask-once", state=Asked, bucket="follow"):
    @rule(watch_kv=True, when=lambda ctx: not ctx.state.answer, publish_async="follow.ask")
    def ask(self, ctx: RuleContext[Asked, None]) -> Question:
        return Question(question=ctx.state.question)

    @ask.on_result
    def answered(self, ctx: RuleContext[Asked, None], result: Answer) -> None:
        ctx.state.answer = result.answer


class Asking(AskOnce, id="asking", on_complete="asking.done", task_timeout="1m"):
    @rule(watch_kv=True, when=lambda ctx: bool(ctx.state.answer), complete=True)
    def done(self, ctx: RuleContext[Asked, None]) -> None:
        return None


async def test_a_callback_applies_to_the_latest_state_not_the_one_this_engine_parked() -> None:
    async with TestEngine(Asking) as te:
        await te.start(Asking, "q1", Asked(question="why"))
        parked = te.state(Asking, "q1")
        assert parked.status is Status.WAITING
        # Someone else changes the waiting state (same task) after this engine parked it.
        parked.note = "edited elsewhere"
        await te.trigger_kv(Asking, "q1", parked)
        await te.callback(Asking, "q1", Answer(answer="because"))
        st = te.state(Asking, "q1")
        assert (st.status, st.answer, st.note) == (Status.COMPLETED, "because", "edited elsewhere")
        te.assert_published("follow.ask", count=1)
        te.assert_published("asking.done", count=1)


async def test_a_callback_for_a_task_replaced_elsewhere_is_stale_and_nothing_is_resent() -> None:
    async with TestEngine(Asking) as te:
        await te.start(Asking, "q1", Asked(question="why"))
        old_task = te.state(Asking, "q1").pending_task_id
        # Someone else settles the execution after this engine parked it.
        st = te.state(Asking, "q1")
        st.clear_pending_task()
        st.answer = "settled elsewhere"
        st.fail("given up elsewhere")
        await te.trigger_kv(Asking, "q1", st)
        await te.callback(Asking, "q1", Answer(answer="late"), task_id=old_task)
        st = te.state(Asking, "q1")
        assert (st.status, st.answer) == (Status.FAILED, "settled elsewhere")
        te.assert_published("follow.ask", count=1)  # the parked state's request is not resent
        te.assert_not_published("asking.done")


# --------------------------------------------------------------------------- waiting executions


class Slow(AskOnce, id="slow", timeout="3h", task_timeout="2h"):
    pass


async def test_waiting_executions_hold_no_timer_in_the_engine_and_their_timers_still_fire() -> None:
    async with TestEngine(Slow) as te:
        for i in range(50):
            await te.start(Slow, f"s{i}", Asked(question="?"))
        assert all(st.status is Status.WAITING for st in te.executions(Slow))
        # 50 executions waiting hours: the engine holds no timer for any of them (its one
        # timer is the claim sweep); their deadlines and task timeouts wait in the backend.
        assert len(te.engine.timers) == 1
        schedules = te.backend.peek_stream("REACTIVE_TIMERS", "reactive.timer.at.>")
        assert sorted(subject.split(".")[4] for subject, _, _ in schedules) == sorted(
            ["deadline", "task"] * 50
        )
        await te.callback(Slow, "s0", Answer(answer="quick"))
        await te.advance(2 * 3600 + 1)
        states = {st.id: st for st in te.executions(Slow)}
        assert states["s0"].status is Status.RUNNING and states["s0"].answer == "quick"
        assert all(states[f"s{i}"].status is Status.FAILED for i in range(1, 50))
        assert all("no callback" in states[f"s{i}"].error for i in range(1, 50))
        assert len(te.engine.timers) == 1
        # s0 still has its workflow deadline, an hour later.
        await te.advance(3600)
        assert te.state(Slow, "s0").status is Status.TIMED_OUT
        # Every timer fired and, once evaluated, left the work queue.
        assert te.backend.peek_stream("REACTIVE_TIMERS") == []
