"""DESIGN §3 semantics on the in-memory engine: order, one writer per revision, terminal states,
publish-only rules, deletes, message + state, message-only rules, starting executions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from reactive import (
    ConflictError,
    ExecutionState,
    RuleContext,
    Status,
    Workflow,
    definition_of,
    rule,
    transition,
)
from reactive.conditions import always, condition, phase_is
from reactive.testing import TestEngine

pytestmark = pytest.mark.anyio

TERMINAL = [Status.COMPLETED, Status.FAILED, Status.ESCALATED, Status.TIMED_OUT]


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def revision(te: TestEngine, workflow: Any, execution_id: str) -> int:
    d = definition_of(workflow)
    entry = te.backend.peek(d.bucket, d.key(execution_id))
    assert entry is not None
    return entry.revision


class Step(ExecutionState):
    b_done: bool = False
    notes: list[str] = []


class Ping(msgspec.Struct):
    id: str
    text: str = ""


# --------------------------------------------------------------------------- order


async def test_rules_are_evaluated_and_fire_in_definition_order() -> None:
    evaluated: list[tuple[str, int]] = []

    def seen(name: str) -> Any:
        @condition
        def check(ctx: RuleContext[Any, Any]) -> bool:
            evaluated.append((name, ctx.revision))
            return ctx.state.phase == ""

        return check

    class Ordered(Workflow, id="ordered"):
        @rule(watch_kv=True, when=seen("zulu"), publish="ordered.zulu")
        def zulu(self, ctx: RuleContext[ExecutionState, None]) -> dict[str, str]:
            return {}

        @rule(watch_kv=True, when=seen("alpha"), publish="ordered.alpha")
        def alpha(self, ctx: RuleContext[ExecutionState, None]) -> dict[str, str]:
            return {}

        @rule(watch_kv=True, when=seen("mike"), publish="ordered.mike")
        def mike(self, ctx: RuleContext[ExecutionState, None]) -> dict[str, str]:
            return {}

    async with TestEngine(Ordered) as te:
        await te.start(Ordered, "e1")
        rev = revision(te, Ordered, "e1")
        assert evaluated == [("zulu", rev), ("alpha", rev), ("mike", rev)]
        assert [m.subject for m in te.published_messages("ordered.*")] == [
            "ordered.zulu",
            "ordered.alpha",
            "ordered.mike",
        ]


class OneWriter(Workflow, id="one-writer", state=Step):
    """Two writers pass on the first revision; a publish-only rule reports what it saw."""

    @rule(watch_kv=True, when=phase_is(""), mutate=True)
    def a(self, ctx: RuleContext[Step, None]) -> None:
        ctx.state.phase = "a"
        ctx.state.notes.append("a")

    @rule(watch_kv=True, when=lambda ctx: not ctx.state.b_done, mutate=True)
    def b(self, ctx: RuleContext[Step, None]) -> None:
        ctx.state.b_done = True
        ctx.state.notes.append("b")

    @rule(watch_kv=True, publish="one.seen")
    def report(self, ctx: RuleContext[Step, None]) -> dict[str, Any]:
        return {"rev": ctx.revision, "phase": ctx.state.phase, "b": ctx.state.b_done}

    @rule(watch_kv=True, when=phase_is("a"), publish="one.phase-a")
    def sees_a(self, ctx: RuleContext[Step, None]) -> dict[str, Any]:
        return {"rev": ctx.revision}


async def test_only_the_first_passing_state_writer_fires_per_revision() -> None:
    async with TestEngine(OneWriter) as te:
        await te.start(OneWriter, "e1")
        st = te.state(OneWriter, "e1")
        # a fired on the first revision, b (which also passed there) on the one a wrote.
        assert [e.rule_id for e in st.timeline] == ["a", "b"]
        assert st.notes == ["a", "b"]
        assert (st.phase, st.b_done) == ("a", True)
        seen = te.published("one.seen")
        assert [(s["phase"], s["b"]) for s in seen] == [("", False), ("a", False), ("a", True)]
        revs = [s["rev"] for s in seen]
        assert revs == sorted(set(revs)), "one evaluation per revision"
        assert revs[-1] == revision(te, OneWriter, "e1")


async def test_every_passing_non_writing_rule_fires_alongside_the_writer() -> None:
    async with TestEngine(OneWriter) as te:
        await te.start(OneWriter, "e1")
        # 'report' fired on each of the three revisions, including the two where a writer fired.
        te.assert_published("one.seen", count=3)


async def test_conditions_see_the_triggering_revision_not_another_rules_mutation() -> None:
    async with TestEngine(OneWriter) as te:
        await te.start(OneWriter, "e1")
        seen = te.published("one.seen")
        first_rev = seen[0]["rev"]
        # 'a' set phase "a" on the first revision, but 'report' (after it) still saw phase "".
        assert seen[0]["phase"] == ""
        # 'sees_a' (phase_is("a")) did not pass on the first revision, only once a's write came back.
        sees_a = te.published("one.phase-a")
        assert [s["rev"] for s in sees_a] == [seen[1]["rev"], seen[2]["rev"]]
        assert first_rev not in [s["rev"] for s in sees_a]


class TwoMessageWriters(Workflow, id="two-writers", state=Step):
    @rule(on_subject="two.in", state_key=lambda m: m.id, mutate=True)
    def first(self, ctx: RuleContext[Step, Ping]) -> None:
        ctx.state.notes.append(f"first saw {ctx.state.phase or '-'}")
        ctx.state.phase = "first"

    @rule(on_subject="two.in", state_key=lambda m: m.id, mutate=True)
    def second(self, ctx: RuleContext[Step, Ping]) -> None:
        ctx.state.notes.append(f"second saw {ctx.state.phase or '-'}")
        ctx.state.phase = "second"

    @rule(on_subject="two.in", state_key=lambda m: m.id, publish="two.seen")
    def report(self, ctx: RuleContext[Step, Ping]) -> dict[str, Any]:
        return {"phase": ctx.state.phase}


async def test_message_writers_after_the_first_are_evaluated_on_the_revision_it_wrote() -> None:
    async with TestEngine(TwoMessageWriters) as te:
        await te.trigger_message("two.in", Ping(id="e1"))
        st = te.state(TwoMessageWriters, "e1")
        assert st.notes == ["first saw -", "second saw first"]
        assert [e.rule_id for e in st.timeline] == ["first", "second"]
        # The publish-only rule fired once for the message, on the revision it triggered.
        assert te.published("two.seen") == [{"phase": ""}]
        await te.trigger_message("two.in", Ping(id="e1"))
        st = te.state(TwoMessageWriters, "e1")
        assert st.notes[2:] == ["first saw second", "second saw first"]
        assert te.published("two.seen") == [{"phase": ""}, {"phase": "second"}]


async def test_mutator_runs_before_the_method() -> None:
    class Mutated(Workflow, id="mutated", state=Step):
        @rule(watch_kv=True, when=phase_is(""), mutate=transition("moved"))
        def move(self, ctx: RuleContext[Step, None]) -> None:
            ctx.state.notes.append(f"method saw {ctx.state.phase}")

    async with TestEngine(Mutated) as te:
        await te.start(Mutated, "e1")
        st = te.state(Mutated, "e1")
        assert st.phase == "moved"
        assert st.notes == ["method saw moved"]
        assert [(e.rule_id, e.phase, e.action) for e in st.timeline] == [
            ("move", "moved", "mutate")
        ]


# --------------------------------------------------------------------------- terminal states


class Absorb(Workflow, id="absorb", state=Step):
    @rule(on_subject="absorb.in", state_key=lambda m: m.id, mutate=True)
    def on_message(self, ctx: RuleContext[Step, Ping]) -> None:
        ctx.state.notes.append("message")

    @rule(on_subject="absorb.in", state_key=lambda m: m.id, publish="absorb.message-seen")
    def message_publish(self, ctx: RuleContext[Step, Ping]) -> dict[str, str]:
        return {}

    @rule(watch_kv=True, when=always, mutate=True)
    def on_state(self, ctx: RuleContext[Step, None]) -> None:
        ctx.state.notes.append("state")

    @rule(watch_kv=True, when=always, publish="absorb.state-seen")
    def state_publish(self, ctx: RuleContext[Step, None]) -> dict[str, str]:
        return {}


@pytest.mark.parametrize("status", TERMINAL, ids=str)
async def test_no_rule_fires_for_a_terminal_execution(status: Status) -> None:
    async with TestEngine(Absorb) as te:
        terminal = Step(
            id="e1",
            workflow_id="absorb",
            status=status,
            phase="end",
            created_at=utc(te.clock.now()),
        )
        rev = await te.trigger_kv(Absorb, "e1", terminal)
        await te.trigger_message("absorb.in", Ping(id="e1"))
        await te.advance(3600)
        st = te.state(Absorb, "e1")
        assert (st.status, st.notes, st.timeline) == (status, [], [])
        assert revision(te, Absorb, "e1") == rev, "nothing wrote the terminal state"
        te.assert_not_published("absorb.message-seen")
        te.assert_not_published("absorb.state-seen")


async def test_rules_stop_firing_once_a_complete_rule_fired() -> None:
    class Finish(Workflow, id="finish", state=Step, on_complete="finish.done"):
        @rule(watch_kv=True, when=phase_is(""), mutate=True)
        def go(self, ctx: RuleContext[Step, None]) -> None:
            ctx.state.phase = "ready"

        @rule(watch_kv=True, when=phase_is("ready"), complete=True)
        def end(self, ctx: RuleContext[Step, None]) -> None:
            ctx.state.phase = "ended"

        @rule(watch_kv=True, publish="finish.seen")
        def seen(self, ctx: RuleContext[Step, None]) -> dict[str, Any]:
            return {"status": ctx.state.status.value}

        @rule(watch_kv=True, when=phase_is("ended"), mutate=True)
        def after(self, ctx: RuleContext[Step, None]) -> None:
            ctx.state.notes.append("after")

    async with TestEngine(Finish) as te:
        await te.start(Finish, "e1")
        st = te.state(Finish, "e1")
        assert (st.status, st.phase, st.notes) == (Status.COMPLETED, "ended", [])
        assert [e.rule_id for e in st.timeline] == ["go", "end"]
        assert te.published("finish.seen") == [{"status": "running"}, {"status": "running"}]
        te.assert_published("finish.done", count=1)


# --------------------------------------------------------------------------- publish-only rules


class Notify(Workflow, id="notify"):
    @rule(watch_kv=True, publish="notify.changed")
    def changed(self, ctx: RuleContext[ExecutionState, None]) -> dict[str, Any]:
        return {"rev": ctx.revision, "phase": ctx.state.phase}

    @rule(watch_kv=True, on_deletes=True, publish="notify.deleted")
    def deleted(self, ctx: RuleContext[None, None]) -> dict[str, Any]:
        return {"key": ctx.key, "state": ctx.state}


class NotifyNoDeletes(Workflow, id="quiet"):
    @rule(watch_kv=True, publish="quiet.changed")
    def changed(self, ctx: RuleContext[ExecutionState, None]) -> dict[str, Any]:
        return {"rev": ctx.revision}

    @rule(watch_kv=True, when=phase_is(""), mutate=True)
    def write(self, ctx: RuleContext[ExecutionState, None]) -> None:
        ctx.state.phase = "written"


def running(execution_id: str, workflow_id: str, phase: str = "") -> ExecutionState:
    return ExecutionState(
        id=execution_id, workflow_id=workflow_id, status=Status.RUNNING, phase=phase
    )


async def test_publish_only_rule_fires_once_per_revision_and_does_not_write_state() -> None:
    async with TestEngine(Notify) as te:
        rev1 = await te.trigger_kv(Notify, "e1", running("e1", "notify", "one"))
        assert revision(te, Notify, "e1") == rev1
        rev2 = await te.trigger_kv(
            Notify, "e1", running("e1", "notify", "one")
        )  # same value, new revision
        assert revision(te, Notify, "e1") == rev2
        assert te.published("notify.changed") == [
            {"rev": rev1, "phase": "one"},
            {"rev": rev2, "phase": "one"},
        ]
        assert te.state(Notify, "e1").timeline == []
        # The watch replays the latest revision to a new engine: it has fired for it already.
        async with TestEngine(Notify, backend=te.backend, clock=te.clock) as again:
            await again.settle()
        assert len(te.published("notify.changed")) == 2


async def test_kv_delete_fires_only_rules_that_ask_for_deletes() -> None:
    async with TestEngine(Notify) as te:
        await te.trigger_kv(Notify, "e1", running("e1", "notify"))
        await te.backend.kv_delete("NOTIFY", "notify.e1")
        await te.settle()
        te.assert_published("notify.changed", count=1)
        assert te.published("notify.deleted") == [{"key": "notify.e1", "state": None}]
        te.assert_no_execution(Notify, "e1")


async def test_kv_delete_fires_nothing_and_does_not_recreate_the_key() -> None:
    async with TestEngine(NotifyNoDeletes) as te:
        await te.trigger_kv(NotifyNoDeletes, "e1", running("e1", "quiet"))
        te.assert_phase(NotifyNoDeletes, "e1", "written")
        published = len(te.published_messages())
        await te.backend.kv_delete("QUIET", "quiet.e1")
        await te.settle()
        await te.advance(60)
        assert len(te.published_messages()) == published
        te.assert_no_execution(NotifyNoDeletes, "e1")


# --------------------------------------------------------------------------- messages


class Orders(Workflow, id="orders", state=Step, timeout="1h"):
    @rule(on_subject="orders.in", state_key=lambda m: m.id, mutate=True)
    def accept(self, ctx: RuleContext[Step, Ping]) -> None:
        ctx.state.notes.append(ctx.message.text)
        ctx.state.phase = "accepted"

    @rule(
        on_subject="orders.ping",
        message=Ping,
        when=lambda ctx: ctx.message.text != "skip",
        publish="orders.pong",
    )
    def pong(self, ctx: RuleContext[None, Ping]) -> dict[str, Any]:
        return {"id": ctx.message.id, "text": ctx.message.text.upper(), "state": ctx.state}


async def test_message_with_a_missing_state_key_starts_a_new_execution() -> None:
    async with TestEngine(Orders) as te:
        now = te.clock.now()
        await te.trigger_message("orders.in", Ping(id="o1", text="first"))
        st = te.state(Orders, "o1")
        assert st is not None
        assert (st.id, st.workflow_id, st.status) == ("o1", "orders", Status.RUNNING)
        assert st.created_at == utc(now)
        assert st.deadline == utc(now + 3600)
        assert (st.phase, st.notes) == ("accepted", ["first"])
        assert [(e.rule_id, e.trigger_mode, e.trigger_info) for e in st.timeline] == [
            ("accept", "message+state", "orders.in")
        ]


async def test_message_for_an_existing_execution_keeps_its_identity() -> None:
    async with TestEngine(Orders) as te:
        start = te.clock.now()
        await te.trigger_message("orders.in", Ping(id="o1", text="first"))
        await te.advance(60)
        await te.trigger_message("orders.in", Ping(id="o1", text="second"))
        st = te.state(Orders, "o1")
        assert st.notes == ["first", "second"]
        assert st.created_at == utc(start)
        assert st.deadline == utc(start + 3600)
        assert len(te.executions(Orders)) == 1


async def test_message_only_rule_fires_with_the_message_and_no_state() -> None:
    async with TestEngine(Orders) as te:
        await te.trigger_message("orders.ping", Ping(id="p1", text="hi"))
        await te.trigger_message("orders.ping", Ping(id="p2", text="skip"))
        await te.trigger_message("orders.ping", Ping(id="p3", text="yo"))
        assert te.published("orders.pong") == [
            {"id": "p1", "text": "HI", "state": None},
            {"id": "p3", "text": "YO", "state": None},
        ]
        assert te.executions(Orders) == []


# --------------------------------------------------------------------------- starting executions


class Started(Workflow, id="started", state=Step, timeout="10m"):
    @rule(watch_kv=True, when=phase_is(""), mutate=True)
    def first(self, ctx: RuleContext[Step, None]) -> None:
        ctx.state.phase = "one"


async def test_start_execution_initializes_and_rules_fire() -> None:
    async with TestEngine(Started) as te:
        now = te.clock.now()
        returned = await te.start(Started, "s1", Step(notes=["given"]))
        assert (returned.id, returned.status) == ("s1", Status.RUNNING)
        st = te.state(Started, "s1")
        assert (st.id, st.workflow_id, st.status, st.phase) == (
            "s1",
            "started",
            Status.RUNNING,
            "one",
        )
        assert st.notes == ["given"]
        assert st.created_at == utc(now)
        assert st.deadline == utc(now + 600)


async def test_start_execution_refuses_an_existing_id_and_a_wrong_state_type() -> None:
    async with TestEngine(Started) as te:
        await te.start(Started, "s1")
        with pytest.raises(ConflictError):
            await te.engine.start_execution(Started, "s1")
        with pytest.raises(TypeError):
            await te.engine.start_execution(Started, "s2", ExecutionState())
        te.assert_no_execution(Started, "s2")


class Passive(Workflow, id="passive", state=Step, timeout="10m"):
    @rule(watch_kv=True, when=phase_is("never"), mutate=True)
    def never_fires(self, ctx: RuleContext[Step, None]) -> None: ...


async def test_external_pending_state_is_initialized_with_a_persisted_deadline() -> None:
    async with TestEngine(Passive) as te:
        now = te.clock.now()
        rev = await te.trigger_kv(Passive, "x1", Step(notes=["outside"]))
        st = te.state(Passive, "x1")
        assert revision(te, Passive, "x1") > rev, "the initialization was written"
        assert (st.id, st.workflow_id, st.status) == ("x1", "passive", Status.RUNNING)
        assert st.created_at == utc(now)
        assert st.deadline == utc(now + 600)
        assert st.notes == ["outside"]


async def test_external_pending_state_is_initialized_before_a_writer_runs() -> None:
    class Untimed(Workflow, id="untimed", state=Step):
        @rule(watch_kv=True, when=phase_is(""), mutate=True)
        def first(self, ctx: RuleContext[Step, None]) -> None:
            ctx.state.notes.append(ctx.state.status.value)
            ctx.state.phase = "one"

    async with TestEngine(Untimed) as te:
        await te.trigger_kv(Untimed, "x1", Step())
        st = te.state(Untimed, "x1")
        assert (st.id, st.workflow_id, st.status, st.phase) == (
            "x1",
            "untimed",
            Status.RUNNING,
            "one",
        )
        assert st.notes == ["running"]
        assert st.created_at == utc(te.clock.now())
        assert st.deadline is None


async def test_one_partitioned_consumer_per_bucket_however_many_rules_watch_it() -> None:
    from reactive import MemoryBackend
    from reactive.runtime.engine import Engine

    namespace: dict[str, object] = {}
    for i in range(50):

        def make(i: int = i) -> object:
            @rule(watch_kv=f"many.k{i}", publish=f"many.out{i}")
            def fire(self: object, ctx: RuleContext[ExecutionState, None]) -> dict[str, int]:
                return {"i": i}

            return fire

        namespace[f"r{i}"] = make()
    Many = type("Many", (Workflow,), namespace, id="many")
    backend = MemoryBackend()
    opened: list[tuple[str, str]] = []
    original = backend.consume_partitions

    def counting(bucket: str, partitions: int, *, group: str = "", **kwargs):  # type: ignore[no-untyped-def]
        opened.append((bucket, group))
        return original(bucket, partitions, group=group, **kwargs)

    backend.consume_partitions = counting  # type: ignore[method-assign]
    async with Engine(backend, [Many]) as engine:
        await engine.wait_ready()
    assert opened == [("MANY", "many")]


class Late(ExecutionState):
    seen: int = 0


class LateMsg(msgspec.Struct):
    id: str


class LateWorkflow(Workflow, id="late", state=Late):
    @rule(watch_kv=True, when=phase_is("new"), mutate=True)
    def take(self, ctx: RuleContext[Late, None]) -> None:
        ctx.state.phase = "taken"

    @rule(on_subject="late.poke", state_key=lambda m: m.id, mutate=True)
    def poke(self, ctx: RuleContext[Late, LateMsg]) -> None:
        ctx.state.seen += 1


async def test_a_workflow_registered_after_start_gets_its_triggers_and_the_replay() -> None:
    async with TestEngine() as te:
        # State written before the workflow is registered: the replay must bring it.
        await te.put("LATE", "late.a", Late(phase="new"))
        await te.engine.register(LateWorkflow)
        await te.settle()
        te.assert_phase(LateWorkflow, "a", "taken")
        await te.trigger_message("late.poke", LateMsg(id="a"))
        te.assert_state(LateWorkflow, "a", lambda s: s.seen == 1)


# --------------------------------------------------------------------------- overlapping core subjects


class Overlap(Workflow, id="overlap", state=Step):
    @rule(on_subject="overlap.in.*", message=Ping, publish="overlap.star")
    def star(self, ctx: RuleContext[None, Ping]) -> dict[str, Any]:
        return {"id": ctx.message.id}

    @rule(on_subject="overlap.in.>", message=Ping, publish="overlap.tail")
    def tail(self, ctx: RuleContext[None, Ping]) -> dict[str, Any]:
        return {"id": ctx.message.id}


async def test_rules_on_overlapping_core_subjects_each_get_every_message() -> None:
    async with TestEngine(Overlap) as te:
        for i in range(10):
            await te.trigger_message("overlap.in.x", Ping(id=f"m{i}"))
        expected = [{"id": f"m{i}"} for i in range(10)]
        assert te.published("overlap.star") == expected
        assert te.published("overlap.tail") == expected
