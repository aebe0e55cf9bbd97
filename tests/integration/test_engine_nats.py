"""The engine's guarantees (DESIGN.md, sections 2 and 3) against a real nats-server.

Real time, short durations. Every test makes its own workflows (a fresh id, so
fresh buckets, subjects, durable consumers and meta keys) so tests sharing the
session's server do not see each other's messages.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg

from reactive import (
    Engine,
    ExecutionState,
    ManualClock,
    NatsBackend,
    RuleContext,
    Status,
    Workflow,
    definition_of,
    rule,
)
from reactive.backends.server import NatsServer
from reactive.conditions import phase_is
from reactive.errors import TransientBackendError
from reactive.runtime.events import TimerDue
from reactive.runtime.metrics import REGISTRY

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

WAIT = 30.0  # upper bound for anything that should happen "soon" (a hang, not a pace)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def uid(prefix: str) -> str:
    """A fresh workflow id (letters, digits and '-'): fresh buckets, subjects and consumers."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def metric(name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def eventually(
    check: Callable[[], Any | Awaitable[Any]], timeout: float = WAIT, what: str = ""
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        await anyio.sleep(0.05)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def body(msg: RawStreamMsg | Msg) -> Any:
    """A stored or received message's JSON payload."""
    return json.loads(msg.data or b"null")


SYNC = "Test-Sync"  # the header of the test's own markers (see Synced.sync)


class Synced:
    """A core subscription of the test's that can tell when it has caught up.

    ``sync()`` publishes a marker on the subscribed subject and waits for it.
    The server hands a subscription its messages in the order it routed them, so
    once the marker is in, every message the server routed before it is in too:
    any publish whose effect the test saw take effect first (a later write by the
    same connection, say). "Nothing more came" is shown that way, never by
    waiting a while.
    """

    def __init__(self, nc: Client, subject: str) -> None:
        self.nc = nc
        self.subject = subject
        self._synced: set[str] = set()

    def _is_marker(self, msg: Msg) -> bool:
        token = (msg.headers or {}).get(SYNC)
        if token is None:
            return False
        self._synced.add(token)
        return True

    async def sync(self) -> None:
        token = uuid.uuid4().hex
        await self.nc.publish(self.subject, b"{}", headers={SYNC: token})
        await eventually(lambda: token in self._synced, what=f"the sync marker on {self.subject}")


class Inbox(Synced):
    """A core NATS subscription that keeps every message it gets, in order."""

    def __init__(self, nc: Client, subject: str) -> None:
        super().__init__(nc, subject)
        self.messages: list[Msg] = []
        self._seen = 0
        self.on_message: Callable[[Msg], Awaitable[None]] | None = None

    @classmethod
    async def open(
        cls,
        nc: Client,
        subject: str,
        on_message: Callable[[Msg], Awaitable[None]] | None = None,
    ) -> Inbox:
        inbox = cls(nc, subject)
        inbox.on_message = on_message

        async def cb(msg: Msg) -> None:
            if inbox._is_marker(msg):
                return
            if inbox.on_message is not None:
                await inbox.on_message(msg)
            inbox.messages.append(msg)

        await nc.subscribe(subject, cb=cb)
        await nc.flush()
        return inbox

    def payloads(self) -> list[Any]:
        return [body(m) for m in self.messages]

    async def next(self, timeout: float = WAIT) -> Any:
        """The next message not returned yet, decoded from JSON."""
        await eventually(lambda: len(self.messages) > self._seen, timeout, "a message")
        self._seen += 1
        return json.loads(self.messages[self._seen - 1].data)


async def capture_stream(js: JetStreamContext, name: str, subjects: list[str]) -> None:
    """A stream that stores what is published on ``subjects`` (deduplicating by Nats-Msg-Id)."""
    await js.add_stream(name=name, subjects=subjects)


async def stream_messages(js: JetStreamContext, name: str, subject: str = "") -> list[RawStreamMsg]:
    """Every message stored in a stream (optionally only one subject), in order.

    The test's own sync markers (see Synced) are left out.
    """
    info = await js.stream_info(name)
    out: list[RawStreamMsg] = []
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(name, seq)
        except nats.js.errors.NotFoundError:
            continue
        if SYNC in (msg.headers or {}):
            continue
        if not subject or msg.subject == subject:
            out.append(msg)
    return out


async def consumer_settled(js: JetStreamContext, stream: str, durable: str) -> bool:
    """Every message of the consumer delivered and acknowledged (or terminated)."""
    info = await js.consumer_info(stream, durable)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


def durables(engine: Engine, workflow: type[Workflow]) -> list[tuple[str, str]]:
    """(stream, durable) of every stream subscription of a workflow."""
    wf_id = definition_of(workflow).id
    return [
        (sub.stream, sub.durable)
        for (w, _, _), sub in engine.registry.subscriptions.items()
        if w == wf_id and sub.stream
    ]


async def all_consumed(js: JetStreamContext, engine: Engine, workflow: type[Workflow]) -> None:
    for stream, durable in durables(engine, workflow):
        await eventually(
            functools.partial(consumer_settled, js, stream, durable), what=f"{durable} consumed"
        )


def callback_durable(workflow: type[Workflow]) -> str:
    return f"reactive_cb_{definition_of(workflow).id}".replace("-", "_")


async def effects_settled(engine: Engine, flow: type[Workflow], exec_ids: Iterable[str]) -> bool:
    """Every execution listed has ended, and every publish decided for it has gone out.

    The outbox of its terminal state has its delivery marker in the meta bucket
    (each earlier outbox was settled before the write that replaced it), and no
    claim of a rule that publishes without writing state is pending. A terminal
    execution decides nothing more: from then on what the streams hold for these
    executions is final, and a core subscriber has it all once it has synced.
    """
    d = definition_of(flow)
    for exec_id in exec_ids:
        st = await engine.get(flow, exec_id)
        if st is None or not st.status.is_terminal:
            return False
        if st.outbox_id:
            marker = await engine.backend.kv_get(
                engine.meta_bucket, f"out.{d.bucket}.{d.key(exec_id)}"
            )
            if marker is None or marker.value.decode() != st.outbox_id:
                return False
    return not await engine.backend.kv_keys(engine.meta_bucket, f"pend.{d.id}.>")


async def scheduled(engine: Engine, flow: type[Workflow], exec_id: str, kind: str) -> bool:
    """The server holds a timer of the execution (its schedule, or the message it stored
    when due, not yet evaluated), and the engine none: its only timer is the claim sweep."""
    d = definition_of(flow)
    js = engine.backend.nc.jetstream()  # type: ignore[attr-defined]
    tail = f"{d.id}.{kind}.{d.bucket}.{d.key(exec_id)}"
    for subject in (f"reactive.timer.at.{tail}", f"reactive.timer.due.{tail}"):
        try:
            await js.get_last_msg(engine.timer_stream, subject)
        except nats.js.errors.NotFoundError:
            continue
        return len(engine.timers) == 1
    return False


class SkippingClock:
    """The wall clock, which the test can also move forward at once.

    Real time flows as usual (grace periods, retries), and ``skip`` ends a long
    cooldown when the test says so: a cooldown far longer than any test run is
    never over by itself, however slow the machine.
    """

    def __init__(self) -> None:
        self.offset = 0.0
        self._skipped = anyio.Event()

    def now(self) -> float:
        return time.time() + self.offset

    async def sleep_until(self, deadline: float) -> None:
        while (delay := deadline - self.now()) > 0:
            skipped = self._skipped
            with anyio.move_on_after(delay):
                await skipped.wait()

    def skip(self, seconds: float) -> None:
        self.offset += seconds
        skipped, self._skipped = self._skipped, anyio.Event()
        skipped.set()


@asynccontextmanager
async def engine_on(
    url: str, workflows: Iterable[type[Workflow]], **options: Any
) -> AsyncIterator[Engine]:
    """An engine with a connection of its own, ready (every trigger set up) when yielded."""
    backend_options = options.pop("backend_options", {})
    backend = options.pop("backend", None) or NatsBackend(url, **backend_options)
    options.setdefault("workers", 8)
    options.setdefault("outbox_grace", 1.0)
    engine = Engine(backend, workflows, **options)
    try:
        async with engine:
            await eventually(lambda: engine.ready, what="engine ready")
            yield engine
    finally:
        await backend.close()


# ---------------------------------------------------------------------------
# 1. async callbacks end to end
# ---------------------------------------------------------------------------


class CbState(ExecutionState):
    value: str = ""
    answers: list[str] = []


class CbRequest(msgspec.Struct):
    value: str
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class CbResult(msgspec.Struct):
    task_id: str
    answer: str = ""


def callback_workflow(task_timeout: float = 5.0, on_task_timeout: str = "fail") -> type[Workflow]:
    wid = uid("cb")

    class CallbackFlow(
        Workflow,
        id=wid,
        state=CbState,
        task_timeout=task_timeout,
        on_task_timeout=on_task_timeout,
        on_complete=f"{wid}.completed",
        on_fail=f"{wid}.failed",
        on_escalate=f"{wid}.escalated",
    ):
        @rule(watch_kv=True, when=phase_is("ask"), publish_async=f"{wid}.request")
        def ask(self, ctx: RuleContext[CbState, None]) -> CbRequest:
            return CbRequest(value=ctx.state.value)

        @ask.on_result
        def answered(self, ctx: RuleContext[CbState, None], result: CbResult) -> None:
            ctx.state.answers.append(result.answer)
            ctx.state.phase = "answered"

        @rule(watch_kv=True, when=phase_is("answered"), complete=True)
        def done(self, ctx: RuleContext[CbState, None]) -> None:
            pass

    return CallbackFlow


async def test_async_callback_parks_first_ignores_stale_and_duplicate_and_fails_on_error(
    nats_url: str, nc: Client
) -> None:
    flow = callback_workflow()
    d = definition_of(flow)
    js = nc.jetstream()
    kv_seen: dict[str, Any] = {}

    async def snapshot_state(msg: Msg) -> None:
        # What the execution's state says at the moment the worker gets the request.
        req = json.loads(msg.data)
        kv = await js.key_value(d.bucket)
        entry = await kv.get(d.key(req["execution_id"]))
        kv_seen[req["task_id"]] = json.loads(entry.value or b"{}")

    requests = await Inbox.open(nc, f"{d.id}.request", on_message=snapshot_state)
    failures = await Inbox.open(nc, d.on_fail)
    stale = {"workflow": d.id, "status": "stale"}

    async with engine_on(nats_url, [flow], ack_wait=30.0) as engine:
        await engine.start_execution(flow, "ok", CbState(phase="ask", value="v1"))
        req = await requests.next()
        assert req["value"] == "v1"
        assert req["execution_id"] == "ok"
        assert req["callback_subject"] == f"reactive.callback.{d.id}.ok"
        assert req["task_id"]
        parked = kv_seen[req["task_id"]]
        assert parked["status"] == "waiting"
        assert parked["pending_task_id"] == req["task_id"]
        assert parked["pending_rule_id"] == "ask"

        # A callback for another task id: acknowledged, ignored, still waiting.
        await js.publish(req["callback_subject"], dumps({"task_id": "other", "answer": "stale"}))
        await eventually(lambda: metric("reactive_callbacks_received_total", **stale) == 1)
        st = await engine.get(flow, "ok")
        assert st.status is Status.WAITING
        assert st.answers == []

        # The right one completes the execution.
        await js.publish(req["callback_subject"], dumps({"task_id": req["task_id"], "answer": "A"}))
        st = await engine.wait_for(flow, "ok", timeout=WAIT)
        assert st.status is Status.COMPLETED
        assert st.answers == ["A"]

        # The same callback again: acknowledged and ignored.
        await js.publish(req["callback_subject"], dumps({"task_id": req["task_id"], "answer": "B"}))
        await eventually(lambda: metric("reactive_callbacks_received_total", **stale) == 2)
        st = await engine.get(flow, "ok")
        assert st.answers == ["A"]
        assert [e.trigger_mode for e in st.timeline].count("callback") == 1

        # A callback reporting an error fails the execution, with its on_fail event.
        await engine.start_execution(flow, "bad", CbState(phase="ask", value="v2"))
        req = await requests.next()
        assert req["execution_id"] == "bad"
        await js.publish(
            req["callback_subject"], dumps({"task_id": req["task_id"], "error": "worker exploded"})
        )
        st = await engine.wait_for(flow, "bad", timeout=WAIT)
        assert st.status is Status.FAILED
        assert "worker exploded" in st.error
        event = await failures.next()
        assert event["execution_id"] == "bad"
        assert event["workflow_id"] == d.id
        assert "worker exploded" in event["error"]

        # Every callback was acknowledged: nothing waits for redelivery, and the four
        # were delivered once each (the server counts deliveries, redeliveries too).
        await eventually(lambda: consumer_settled(js, "REACTIVE_CALLBACKS", callback_durable(flow)))
        info = await js.consumer_info("REACTIVE_CALLBACKS", callback_durable(flow))
        assert info.delivered.consumer_seq == 4


@pytest.mark.parametrize("on_task_timeout", ["fail", "escalate"])
async def test_async_task_without_callback_times_out(
    nats_url: str, nc: Client, on_task_timeout: str
) -> None:
    flow = callback_workflow(task_timeout=1.0, on_task_timeout=on_task_timeout)
    d = definition_of(flow)
    requests = await Inbox.open(nc, f"{d.id}.request")
    events = await Inbox.open(nc, d.on_fail if on_task_timeout == "fail" else d.on_escalate)
    clock = ManualClock()  # the task timeout is the test's to reach, exactly
    async with engine_on(nats_url, [flow], clock=clock) as engine:
        await engine.start_execution(flow, "slow", CbState(phase="ask", value="v"))
        req = await requests.next()
        await eventually(lambda: scheduled(engine, flow, "slow", "task"), what="its task timer")
        parked = await engine.get(flow, "slow")
        assert parked.status is Status.WAITING and parked.pending_since is not None
        clock.advance(1.0)
        st = await engine.wait_for(flow, "slow", timeout=WAIT)
        expected = Status.FAILED if on_task_timeout == "fail" else Status.ESCALATED
        assert st.status is expected
        assert "got no callback" in st.error
        assert st.pending_task_id == ""
        # Ended by its timer, when the clock reached the task timeout.
        assert st.completed_at is not None
        waited = st.completed_at.timestamp() - parked.pending_since.timestamp()
        assert waited == pytest.approx(1.0, abs=1e-5)
        event = await events.next()
        assert event["execution_id"] == "slow"
        assert "got no callback" in event["error" if on_task_timeout == "fail" else "reason"]

        # The callback that comes too late changes nothing.
        await nc.jetstream().publish(
            req["callback_subject"], dumps({"task_id": req["task_id"], "answer": "late"})
        )
        await eventually(
            lambda: consumer_settled(nc.jetstream(), "REACTIVE_CALLBACKS", callback_durable(flow))
        )
        st = await engine.get(flow, "slow")
        assert st.status is expected
        assert st.answers == []


async def test_a_result_of_the_wrong_shape_fails_the_task_at_once(
    nats_url: str, nc: Client
) -> None:
    flow = callback_workflow(task_timeout=600.0)
    d = definition_of(flow)
    js = nc.jetstream()
    requests = await Inbox.open(nc, f"{d.id}.request")
    failures = await Inbox.open(nc, d.on_fail)
    async with engine_on(nats_url, [flow], ack_wait=30.0) as engine:
        await engine.start_execution(flow, "bad", CbState(phase="ask", value="v"))
        req = await requests.next()
        # "answer" must be a string.
        await js.publish(req["callback_subject"], dumps({"task_id": req["task_id"], "answer": 42}))
        st = await engine.wait_for(flow, "bad", timeout=WAIT)  # long before the 10-minute timeout
        assert st.status is Status.FAILED
        assert "does not decode" in st.error and "$.answer" in st.error, st.error
        assert (st.timeline[-1].action, st.timeline[-1].error) == ("invalid_result", st.error)
        event = await failures.next()
        assert (event["execution_id"], event["error"]) == ("bad", st.error)
        assert metric("reactive_callbacks_received_total", workflow=d.id, status="invalid") == 1
        assert metric("reactive_poison_messages_total", workflow=d.id) == 1
        # The callback was settled for good (terminated), not left to be redelivered.
        await eventually(lambda: consumer_settled(js, "REACTIVE_CALLBACKS", callback_durable(flow)))
        info = await js.consumer_info("REACTIVE_CALLBACKS", callback_durable(flow))
        assert info.num_redelivered == 0


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_permissions() -> str:
    """The nats-server authorization block the README recommends, as written there."""
    blocks = re.findall(r"```conf\n(.*?)```", README.read_text(), re.S)
    (block,) = [b for b in blocks if "authorization" in b]
    return block


async def test_task_ids_are_unguessable_and_the_readme_permissions_keep_workers_to_their_callbacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "nats-server.conf"
    conf.write_text(readme_permissions())
    monkeypatch.setenv("ENGINE_PASSWORD", "engine-pw")
    monkeypatch.setenv("REVIEWER_PASSWORD", "reviewer-pw")
    server = NatsServer(data_dir=tmp_path / "store", extra_args=["-c", str(conf)])
    server.start()

    class PlanReview(Workflow, id="plan-review", state=CbState):
        @rule(watch_kv=True, when=phase_is("ask"), publish_async="reviewer.input")
        def ask(self, ctx: RuleContext[CbState, None]) -> CbRequest:
            return CbRequest(value=ctx.state.value)

        @ask.on_result
        def answered(self, ctx: RuleContext[CbState, None], result: CbResult) -> None:
            ctx.state.answers.append(result.answer)
            ctx.state.phase = "answered"

        @rule(watch_kv=True, when=phase_is("answered"), complete=True)
        def done(self, ctx: RuleContext[CbState, None]) -> None: ...

    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    stale = {"workflow": "plan-review", "status": "stale"}
    stale_before = metric("reactive_callbacks_received_total", **stale)
    engine_backend = NatsBackend(
        server.url, connect_options={"user": "engine", "password": "engine-pw"}
    )
    try:
        worker = await nats.connect(
            server.url, user="reviewer", password="reviewer-pw", error_cb=on_error
        )
        try:
            requests = await Inbox.open(worker, "reviewer.input")
            async with engine_on(server.url, [PlanReview], backend=engine_backend) as engine:
                await engine.start_execution(PlanReview, "p1", CbState(phase="ask", value="v"))
                req = await requests.next()
                # What can be known of a task (execution, rule, revision), then 96 random bits.
                assert re.fullmatch(r"p1-ask-\d+-[0-9a-f]{24}", req["task_id"]), req["task_id"]
                guessed = req["task_id"].rsplit("-", 1)[0]
                await worker.publish(
                    req["callback_subject"], dumps({"task_id": guessed, "answer": "forged"})
                )
                await eventually(
                    lambda: (
                        metric("reactive_callbacks_received_total", **stale) == stale_before + 1
                    ),
                    what="the forged callback ignored as stale",
                )
                assert (await engine.get(PlanReview, "p1")).status is Status.WAITING
                # Another workflow's callback subjects are closed to this worker.
                await worker.publish(
                    "reactive.callback.other-flow.p1", dumps({"task_id": "t", "answer": "x"})
                )
                await eventually(
                    lambda: any(
                        "permissions violation" in e.lower() and "other-flow" in e for e in errors
                    ),
                    what="a permissions violation for another workflow's callback subject",
                )
                # The real answer goes through.
                await worker.publish(
                    req["callback_subject"], dumps({"task_id": req["task_id"], "answer": "real"})
                )
                st = await engine.wait_for(PlanReview, "p1", timeout=WAIT)
                assert (st.status, st.answers) == (Status.COMPLETED, ["real"])
        finally:
            await worker.close()
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# 2. cooldown and max firings: durable, across a restart and two processes
# ---------------------------------------------------------------------------

# Longer than any test run: a cooldown ends only when the test skips its clock past it.
COOLDOWN = 3600.0


class Ping(msgspec.Struct):
    id: str
    n: int = 0


class LimState(ExecutionState):
    hits: int = 0
    capped: int = 0


def limits_workflow() -> type[Workflow]:
    """Rules with a cooldown or max firings, writing state or not; alerts carry their time."""
    wid = uid("lim")
    inbound = f"IN_{wid}"

    class Limits(Workflow, id=wid, state=LimState):
        # Writes state: its firings are counted in the state.
        @rule(
            on_subject=f"{wid}.ping",
            stream=inbound,
            state_key=lambda m: m.id,
            mutate=True,
            cooldown=COOLDOWN,
        )
        def hit(self, ctx: RuleContext[LimState, Ping]) -> None:
            ctx.state.hits += 1

        @rule(
            on_subject=f"{wid}.cap",
            stream=inbound,
            state_key=lambda m: m.id,
            mutate=True,
            max_firings=2,
        )
        def cap(self, ctx: RuleContext[LimState, Ping]) -> None:
            ctx.state.capped += 1

        # Do not write state: their firings are counted in the meta bucket.
        @rule(
            on_subject=f"{wid}.note",
            stream=inbound,
            state_key=lambda m: m.id,
            publish=f"{wid}.out.note",
            max_firings=2,
        )
        def note(self, ctx: RuleContext[LimState, Ping]) -> dict[str, Any]:
            return {"id": ctx.message.id, "n": ctx.message.n}

        @rule(
            watch_kv=True,
            when=lambda ctx: ctx.state.hits > 0,
            publish=f"{wid}.out.alert",
            cooldown=COOLDOWN,
        )
        def alert(self, ctx: RuleContext[LimState, None]) -> dict[str, Any]:
            return {"id": ctx.execution_id, "rev": ctx.revision, "at": ctx.now}

    return Limits


async def test_cooldown_and_max_firings_survive_restart_and_hold_across_two_engines(
    nats_url: str, nc: Client
) -> None:
    flow = limits_workflow()
    d = definition_of(flow)
    js = nc.jetstream()
    out = f"OUT_{d.id}"
    await capture_stream(js, out, [f"{d.id}.out.>"])
    clock = SkippingClock()  # shared by every engine, as the wall clock is

    async def send(kind: str, exec_id: str, times: int) -> None:
        for n in range(times):
            await js.publish(f"{d.id}.{kind}", dumps({"id": exec_id, "n": n}))

    async def notes(exec_id: str) -> int:
        msgs = await stream_messages(js, out, f"{d.id}.out.note")
        return len([m for m in msgs if body(m)["id"] == exec_id])

    # One engine: three pings within the cooldown fire once; max firings 2 of 3.
    async with engine_on(nats_url, [flow], clock=clock) as a:
        for kind in ("ping", "cap", "note"):
            await send(kind, "e1", 3)
        await all_consumed(js, a, flow)
        st = await a.get(flow, "e1")
        assert (st.hits, st.capped) == (1, 2)
        assert await notes("e1") == 2
        first_hit = st.firings["hit"].last_at

    # A new engine (new connection, empty memory) still knows both limits.
    async with engine_on(nats_url, [flow], clock=clock, backend_options={"fetch_batch": 1}) as b:
        for kind in ("ping", "cap", "note"):
            await send(kind, "e1", 1)
        await all_consumed(js, b, flow)
        st = await b.get(flow, "e1")
        assert (st.hits, st.capped) == (1, 2)
        assert await notes("e1") == 2

        # Once the cooldown is over the rule fires again (and so does the alert, whose
        # cooldown began with its first firing, on the revision the ping writes).
        async def alert_times() -> list[float]:
            msgs = await stream_messages(js, out, f"{d.id}.out.alert")
            return [body(m)["at"] for m in msgs if body(m)["id"] == "e1"]

        first_alert = min(await eventually(alert_times, what="the first alert for e1"))
        clock.skip(max(first_hit, first_alert) + COOLDOWN - clock.now())
        await send("ping", "e1", 1)
        await all_consumed(js, b, flow)
        st = await b.get(flow, "e1")
        assert st.hits == 2

        # Two engines at once, sharing the consumers (one message each at a time).
        async with engine_on(
            nats_url, [flow], clock=clock, backend_options={"fetch_batch": 1}
        ) as c:
            for kind in ("ping", "cap", "note"):
                await send(kind, "e2", 8)
            await all_consumed(js, c, flow)
            st = await c.get(flow, "e2")
            assert (st.hits, st.capped) == (1, 2)
            assert await notes("e2") == 2
            assert [e.rule_id for e in st.timeline].count("hit") == 1
            assert [e.rule_id for e in st.timeline].count("cap") == 2

            # The KV-triggered alert (no state written) fired at most once per cooldown,
            # and at least twice for e1 (before and after its cooldown).
            async def alerts(exec_id: str) -> list[RawStreamMsg]:
                msgs = await stream_messages(js, out, f"{d.id}.out.alert")
                return [m for m in msgs if body(m)["id"] == exec_id]

            await eventually(lambda: _at_least(alerts("e1"), 2), what="two alerts for e1")
            await eventually(lambda: _at_least(alerts("e2"), 1), what="an alert for e2")
            for exec_id in ("e1", "e2"):
                found = await alerts(exec_id)
                revs = [body(m)["rev"] for m in found]
                assert len(revs) == len(set(revs)), f"an alert fired twice for one revision: {revs}"
                times = [body(m)["at"] for m in found]  # on the engines' clock
                gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
                assert all(g >= COOLDOWN - 1 for g in gaps), gaps


async def _at_least(found: Awaitable[list[Any]], n: int) -> bool:
    return len(await found) >= n


class AlarmState(ExecutionState):
    alerts: int = 0


def alarm_workflow(scope: str, cooldown: float) -> type[Workflow]:
    """An alert that writes state and a notice that only publishes, with ``cooldown`` in ``scope``."""
    wid = uid(f"alarm-{scope}")

    class Alarms(Workflow, id=wid, state=AlarmState):
        @rule(
            watch_kv=True,
            when=phase_is("hot"),
            mutate=True,
            cooldown=cooldown,
            cooldown_scope=scope,  # type: ignore[arg-type]
        )
        def alert(self, ctx: RuleContext[AlarmState, None]) -> None:
            ctx.state.alerts += 1
            ctx.state.phase = "alerted"

        @rule(
            watch_kv=True,
            when=phase_is("alerted"),
            publish=f"{wid}.notice",
            cooldown=cooldown,
            cooldown_scope=scope,  # type: ignore[arg-type]
        )
        def notice(self, ctx: RuleContext[AlarmState, None]) -> dict[str, Any]:
            return {"id": ctx.execution_id}

    return Alarms


@pytest.mark.parametrize(
    ("scope", "cooldown"),
    # An execution's cooldown never holds another: a long one shows it (all fire at once).
    # A workflow's holds every other execution: a short one lets the test see them all.
    [("execution", 600.0), ("workflow", 0.5)],
)
async def test_cooldown_scope_execution_or_workflow_on_two_engines(
    nats_url: str, nc: Client, scope: str, cooldown: float
) -> None:
    flow = alarm_workflow(scope, cooldown)
    d = definition_of(flow)
    js = nc.jetstream()
    ids = [f"e{i}" for i in range(4)]
    notices = await Inbox.open(nc, f"{d.id}.notice")
    async with engine_on(nats_url, [flow]) as a, engine_on(nats_url, [flow]):
        kv = await js.key_value(d.bucket)
        for i in ids:
            await kv.put(
                d.key(i), dumps({"id": i, "workflow_id": d.id, "status": "running", "phase": "hot"})
            )
        await eventually(lambda: _all_alerted(a, flow, ids), what="every execution alerted")
        await eventually(lambda: len(notices.messages) >= len(ids), what="every notice")
        states = [await a.get(flow, i) for i in ids]
        meta = await js.key_value("REACTIVE_META")
        claims = [
            json.loads((await meta.get(f"fire.{d.id}.notice.{d.bucket}.{d.key(i)}")).value or b"")
            for i in ids
        ]
    # Each execution alerted once and got one notice.
    assert [st.alerts for st in states] == [1] * len(ids)
    assert sorted(n["id"] for n in notices.payloads()) == ids
    if scope == "workflow":
        # One at a time across the executions and both engines, a cooldown apart
        # (as the engine compares: the later at or after the earlier plus the cooldown).
        for times in (
            sorted(st.firings["alert"].last_at for st in states),
            sorted(c["last_at"] for c in claims),
        ):
            assert all(b >= a + cooldown for a, b in itertools.pairwise(times)), times


async def _all_alerted(engine: Engine, flow: type[Workflow], ids: list[str]) -> bool:
    for i in ids:
        st = await engine.get(flow, i)
        if st is None or st.phase != "alerted":
            return False
    return True


# ---------------------------------------------------------------------------
# a plan review, answered by a worker
# ---------------------------------------------------------------------------


class Review(ExecutionState):
    plan: str = ""
    verdicts: list[str] = []


class PlanSubmitted(msgspec.Struct):
    plan_id: str
    plan: str


class ReviewRequest(msgspec.Struct):
    plan: str
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class ReviewResult(msgspec.Struct):
    task_id: str
    verdict: str


def review_workflow(max_iterations: int = 3, task_timeout: float = 30.0) -> type[Workflow]:
    wid = uid("rev")

    class PlanReview(
        Workflow,
        id=wid,
        state=Review,
        max_iterations=max_iterations,
        task_timeout=task_timeout,
        on_complete=f"{wid}.events.approved",
        on_fail=f"{wid}.events.failed",
        on_escalate=f"{wid}.events.escalated",
    ):
        @rule(
            on_subject=f"{wid}.submitted",
            stream=f"IN_{wid}",
            state_key=lambda m: m.plan_id,
            mutate=True,
        )
        def accept(self, ctx: RuleContext[Review, PlanSubmitted]) -> None:
            ctx.state.plan = ctx.message.plan
            ctx.state.phase = "submitted"

        @rule(watch_kv=True, when=phase_is("submitted"), publish_async=f"{wid}.review")
        def request_review(self, ctx: RuleContext[Review, None]) -> ReviewRequest:
            return ReviewRequest(plan=ctx.state.plan)

        @request_review.on_result
        def reviewed(self, ctx: RuleContext[Review, None], result: ReviewResult) -> None:
            ctx.state.verdicts.append(result.verdict)
            ctx.state.phase = "approved" if result.verdict == "approved" else "revise"

        @rule(watch_kv=True, when=phase_is("revise"), mutate=True)
        def revise(self, ctx: RuleContext[Review, None]) -> None:
            ctx.state.iteration += 1
            ctx.state.phase = "submitted"

        @rule(watch_kv=True, when=phase_is("approved"), complete=True)
        def done(self, ctx: RuleContext[Review, None]) -> None:
            pass

    return PlanReview


class Responder(Synced):
    """A worker: answers every request on a subject by publishing to its callback_subject.

    ``answer(request)`` returns the result body (``task_id`` is added) or None for
    no answer. With ``twice`` every answer is sent two times.
    """

    def __init__(
        self,
        nc: Client,
        subject: str,
        answer: Callable[[dict[str, Any]], dict[str, Any] | None],
        *,
        twice: bool = False,
    ) -> None:
        super().__init__(nc, subject)
        self.answer = answer
        self.twice = twice
        self.requests: list[dict[str, Any]] = []
        self.held: list[dict[str, Any]] | None = None

    def hold(self) -> None:
        """Keep the requests that come from now on, unanswered, until release()."""
        self.held = []

    async def release(self) -> None:
        """Answer the held requests, and every request from now on."""
        held, self.held = self.held or [], None
        for req in held:
            body = self.answer(req)
            if body is not None:
                await self.reply(req, body)

    async def start(self) -> Responder:
        await self.nc.subscribe(self.subject, cb=self._on_request)
        await self.nc.flush()
        return self

    async def _on_request(self, msg: Msg) -> None:
        if self._is_marker(msg):
            return
        req = json.loads(msg.data)
        self.requests.append(req)
        if self.held is not None:
            self.held.append(req)
            return
        body = self.answer(req)
        if body is None:
            return
        await self.reply(req, body)

    async def reply(self, req: Mapping[str, Any], body: dict[str, Any]) -> None:
        body = {"task_id": req["task_id"], **body}
        for _ in range(2 if self.twice else 1):
            await publish_retrying(self.nc.jetstream(), req["callback_subject"], dumps(body))

    def count(self, exec_id: str) -> int:
        return sum(1 for r in self.requests if r["execution_id"] == exec_id)


async def publish_retrying(js: JetStreamContext, subject: str, data: bytes) -> None:
    """A JetStream publish, retried while the server is away."""
    with anyio.fail_after(WAIT):
        while True:
            try:
                await js.publish(subject, data, timeout=1.0)
                return
            except (nats.errors.Error, TimeoutError):
                await anyio.sleep(0.1)


# ---------------------------------------------------------------------------
# 3. max iterations
# ---------------------------------------------------------------------------


async def test_max_iterations_escalates_with_on_escalate_event(nats_url: str, nc: Client) -> None:
    flow = review_workflow(max_iterations=2)
    d = definition_of(flow)
    js = nc.jetstream()
    await capture_stream(js, f"EV_{d.id}", [f"{d.id}.events.>"])
    reviewer = await Responder(nc, f"{d.id}.review", lambda req: {"verdict": "revise"}).start()
    escalations = await Inbox.open(nc, d.on_escalate)
    async with engine_on(nats_url, [flow]) as engine:
        await js.publish(f"{d.id}.submitted", dumps({"plan_id": "p1", "plan": "draft"}))
        st = await engine.wait_for(flow, "p1", timeout=WAIT)
        assert st.status is Status.ESCALATED
        assert st.iteration == 2
        assert "max iterations (2)" in st.error
        # Reviews at iterations 0, 1 and 2; the revise that would make it 3 escalated instead.
        assert st.verdicts == ["revise"] * 3
        event = await escalations.next()
        assert event["execution_id"] == "p1"
        assert event["workflow_id"] == d.id
        assert "max iterations (2)" in event["reason"]
        # Everything p1 decided has gone out: its one event, and no other.
        await eventually(lambda: effects_settled(engine, flow, ["p1"]), what="p1's effects out")
        stored = await stream_messages(js, f"EV_{d.id}")
        assert [m.subject for m in stored] == [d.on_escalate]
        await reviewer.sync()
        assert reviewer.count("p1") == 3


# ---------------------------------------------------------------------------
# 4. timeouts
# ---------------------------------------------------------------------------


def idle_workflow(timeout: float) -> type[Workflow]:
    wid = uid("idle")

    class Idle(
        Workflow, id=wid, state=ExecutionState, timeout=timeout, on_fail=f"{wid}.events.failed"
    ):
        @rule(watch_kv=True, when=phase_is("never"), mutate=True)
        def never(self, ctx: RuleContext[ExecutionState, None]) -> None:
            ctx.state.phase = "moved"

    return Idle


async def test_timeout_fires_with_no_other_event(nats_url: str, nc: Client) -> None:
    flow = idle_workflow(timeout=1.0)
    d = definition_of(flow)
    failures = await Inbox.open(nc, d.on_fail)
    clock = ManualClock()
    async with engine_on(nats_url, [flow], clock=clock) as engine:
        started = await engine.start_execution(flow, "t1", ExecutionState(phase="idle"))
        assert started.deadline is not None
        # Its deadline is a schedule on the server (the engine holds none); time reaches it.
        await eventually(lambda: scheduled(engine, flow, "t1", "deadline"), what="its deadline")
        clock.advance(1.0)
        st = await engine.wait_for(flow, "t1", timeout=WAIT)
        assert st.status is Status.TIMED_OUT
        assert st.completed_at is not None
        assert st.completed_at.timestamp() == pytest.approx(started.deadline.timestamp(), abs=1e-5)
        event = await failures.next()
        assert event["execution_id"] == "t1"
        assert event["error"] == "execution timed out"
        assert event["phase"] == "idle"


@asynccontextmanager
async def engines_recording_timers(
    url: str, flow: type[Workflow], n: int
) -> AsyncIterator[tuple[list[Engine], list[tuple[str, str]]]]:
    """``n`` engines on ``flow``, and each timer from NATS they evaluate: (instance id, key).

    The record is in place before they start, so no timer comes unseen."""
    seen: list[tuple[str, str]] = []
    engines = [Engine(NatsBackend(url), [flow], workers=8, outbox_grace=1.0) for _ in range(n)]
    for engine in engines:
        on_timer = engine.shards.handlers[TimerDue]

        async def recording(
            ev: TimerDue, fresh: Any, engine: Engine = engine, on_timer: Any = on_timer
        ) -> None:
            if ev.msg is not None:
                seen.append((engine.instance_id, ev.key))
            await on_timer(ev, fresh)

        engine.shards.handlers[TimerDue] = recording
    async with contextlib.AsyncExitStack() as stack:
        for engine in engines:
            stack.push_async_callback(engine.backend.close)
            await stack.enter_async_context(engine)
        await eventually(lambda: all(e.ready for e in engines), what="engines ready")
        yield engines, seen


class DeafToTimers(NatsBackend):
    """An engine's backend that never takes a fired timer: the engine sets timers, and is
    as good as dead for them (however long the test takes to stop it)."""

    def consume(
        self, stream: str, durable: str, filter_subject: str, **kwargs: Any
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Any]]:
        if stream == "REACTIVE_TIMERS":
            return _nothing_ever()
        return super().consume(stream, durable, filter_subject, **kwargs)


@asynccontextmanager
async def _nothing_ever() -> AsyncIterator[AsyncIterator[Any]]:
    async def never() -> AsyncIterator[Any]:
        await anyio.sleep_forever()
        yield  # pragma: no cover

    yield never()


async def test_a_deadline_fires_once_in_another_engine_when_the_one_that_set_it_is_gone(
    nats_url: str, nc: Client
) -> None:
    flow = idle_workflow(timeout=1.0)
    d = definition_of(flow)
    js = nc.jetstream()
    ids = [f"d{i}" for i in range(3)]
    async with engine_on(nats_url, [flow], backend=DeafToTimers(nats_url)) as a:
        for exec_id in ids:
            await a.start_execution(flow, exec_id, ExecutionState(phase="idle"))
        # Each deadline is a schedule on the server; the engine holds no timer for it.
        for exec_id in ids:
            assert await scheduled(a, flow, exec_id, "deadline")
    # The engine that set them is gone. Two others run (they started after it, or
    # their start replayed the bucket before the deadlines: either way the timers come).
    async with engines_recording_timers(nats_url, flow, 2) as (engines, seen):
        b = engines[0]
        for exec_id in ids:
            st = await b.wait_for(flow, exec_id, timeout=WAIT)
            assert st.status is Status.TIMED_OUT
            assert [e.rule_id for e in st.timeline].count("deadline") == 1
        # Each fired once, evaluated by one of the two: the server delivered the
        # workflow's timers three times in all, and has none left to deliver again.
        await eventually(lambda: len(seen) >= 3, what="the three timers evaluated")
        durable = f"reactive_timer_{d.id}".replace("-", "_")
        await eventually(lambda: consumer_settled(js, "REACTIVE_TIMERS", durable))
        info = await js.consumer_info("REACTIVE_TIMERS", durable)
        assert info.delivered.consumer_seq == 3
        assert sorted(key for _, key in seen) == sorted(d.key(i) for i in ids)
        assert all(len(e.timers) == 1 for e in engines)


class TickState(ExecutionState):
    ticks: list[float] = []


def ticking_workflow(cooldown: float) -> type[Workflow]:
    wid = uid("tick")

    class Ticking(Workflow, id=wid, state=TickState):
        # Its condition stays true: only the end of its cooldown makes it fire again.
        @rule(
            watch_kv=True, when=lambda ctx: len(ctx.state.ticks) < 3, mutate=True, cooldown=cooldown
        )
        def tick(self, ctx: RuleContext[TickState, None]) -> None:
            ctx.state.ticks.append(ctx.now)

    return Ticking


async def test_the_end_of_a_cooldown_wakes_the_rule_it_held(nats_url: str, nc: Client) -> None:
    flow = ticking_workflow(cooldown=0.5)
    async with engine_on(nats_url, [flow]) as engine:
        await engine.start_execution(flow, "c1", TickState())
        st = await engine.wait_for(flow, "c1", lambda s: len(s.ticks) == 3, timeout=WAIT)
        gaps = [later - earlier for earlier, later in itertools.pairwise(st.ticks)]
        assert all(g >= 0.5 for g in gaps), gaps
        assert len(engine.timers) == 1  # the cooldown's end was a schedule in NATS


async def test_a_timer_the_server_fires_early_waits_for_the_engines_clock(
    nats_url: str, nc: Client
) -> None:
    flow = idle_workflow(timeout=1.0)
    clock = SkippingClock()
    clock.offset = -3600.0  # the engine's clock an hour behind the server's
    async with engine_on(nats_url, [flow], clock=clock) as engine:
        started = await engine.start_execution(flow, "e1", ExecutionState(phase="idle"))
        assert started.deadline is not None
        # For the server the deadline has long passed: it fires at once, and the engine
        # hands it back until its own clock has come to the deadline.
        st = await engine.wait_for(flow, "e1", timeout=WAIT)
        assert st.status is Status.TIMED_OUT
        assert st.completed_at is not None
        assert st.completed_at >= started.deadline


async def test_timeout_while_engine_down_is_enforced_on_start(nats_url: str, nc: Client) -> None:
    flow = idle_workflow(timeout=1.0)
    d = definition_of(flow)
    js = nc.jetstream()
    await capture_stream(js, f"EV_{d.id}", [f"{d.id}.events.>"])
    clock = ManualClock()
    async with engine_on(nats_url, [flow], clock=clock) as a:
        started = await a.start_execution(flow, "t2", ExecutionState(phase="idle"))
    assert started.deadline is not None
    # The deadline passes while no engine runs: nobody times it out.
    clock.advance(1.3)
    kv = await js.key_value(d.bucket)
    assert json.loads((await kv.get(d.key("t2"))).value or b"")["status"] == "running"
    async with engine_on(nats_url, [flow], clock=clock) as b:
        st = await b.wait_for(flow, "t2", timeout=WAIT)
        assert st.status is Status.TIMED_OUT
        # Timed out by the new engine as it started, the clock still where it stopped.
        assert st.completed_at is not None
        assert st.completed_at.timestamp() == pytest.approx(clock.now(), abs=1e-5)
        await eventually(lambda: effects_settled(b, flow, ["t2"]), what="t2's effects out")
        stored = await stream_messages(js, f"EV_{d.id}")
        assert len(stored) == 1
        event = body(stored[0])
        assert (event["execution_id"], event["error"]) == ("t2", "execution timed out")


# ---------------------------------------------------------------------------
# 5. lifecycle events
# ---------------------------------------------------------------------------


def paths_workflow() -> type[Workflow]:
    wid = uid("life")

    class Paths(
        Workflow,
        id=wid,
        state=ExecutionState,
        max_iterations=1,
        on_complete=f"{wid}.events.completed",
        on_fail=f"{wid}.events.failed",
        on_escalate=f"{wid}.events.escalated",
    ):
        @rule(watch_kv=True, when=phase_is("finish"), complete=True)
        def finish(self, ctx: RuleContext[ExecutionState, None]) -> None:
            ctx.state.phase = "finished"

        @rule(watch_kv=True, when=phase_is("crash"), mutate=True)
        def crash(self, ctx: RuleContext[ExecutionState, None]) -> None:
            raise RuntimeError("kaboom")

        @rule(watch_kv=True, when=phase_is("loop"), mutate=True)
        def loop(self, ctx: RuleContext[ExecutionState, None]) -> None:
            ctx.state.iteration += 1

    return Paths


def _rfc3339(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp()


async def test_lifecycle_events_on_complete_fail_escalate_with_reference_fields(
    nats_url: str, nc: Client
) -> None:
    flow = paths_workflow()
    d = definition_of(flow)
    js = nc.jetstream()
    await capture_stream(js, f"EV_{d.id}", [f"{d.id}.events.>"])
    async with engine_on(nats_url, [flow]) as engine:
        before = time.time()
        for exec_id, phase in (("c", "finish"), ("f", "crash"), ("e", "loop")):
            await engine.start_execution(flow, exec_id, ExecutionState(phase=phase))
        for exec_id in ("c", "f", "e"):
            await engine.wait_for(flow, exec_id, timeout=WAIT)
        ids = ("c", "f", "e")
        await eventually(lambda: effects_settled(engine, flow, ids), what="every event out")
        stored = await stream_messages(js, f"EV_{d.id}")
    by_subject = {m.subject: m for m in stored}
    assert len(stored) == 3 and len(by_subject) == 3, [m.subject for m in stored]

    done = body(by_subject[d.on_complete])
    assert set(done) == {"execution_id", "workflow_id", "status", "final_phase", "completed_at"}
    assert (done["execution_id"], done["workflow_id"]) == ("c", d.id)
    assert (done["status"], done["final_phase"]) == ("completed", "finished")
    assert before - 1 <= _rfc3339(done["completed_at"]) <= time.time()

    failed = body(by_subject[d.on_fail])
    assert set(failed) == {"execution_id", "workflow_id", "phase", "error", "failed_at"}
    assert (failed["execution_id"], failed["workflow_id"], failed["phase"]) == ("f", d.id, "crash")
    assert "kaboom" in failed["error"]
    assert before - 1 <= _rfc3339(failed["failed_at"]) <= time.time()

    escalated = body(by_subject[d.on_escalate])
    assert set(escalated) == {"execution_id", "workflow_id", "phase", "reason", "escalated_at"}
    assert (escalated["execution_id"], escalated["workflow_id"]) == ("e", d.id)
    assert escalated["phase"] == "loop"
    assert "max iterations (1)" in escalated["reason"]
    assert before - 1 <= _rfc3339(escalated["escalated_at"]) <= time.time()
    for m in stored:
        assert m.headers and m.headers.get("Nats-Msg-Id")


# ---------------------------------------------------------------------------
# 6. no publish lost when the engine dies right after a commit
# ---------------------------------------------------------------------------


class EngineDied(BaseException):
    """The process dies: not an Exception, so nothing in the engine catches it."""


class TakeTurns:
    """Holds each of ``n`` consumers after its first message until every one has had one.

    So each of several engines sharing a durable consumer provably takes part,
    however fast the others are.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.took: set[int] = set()
        self.everyone = anyio.Event()

    async def first(self, who: object) -> None:
        self.took.add(id(who))
        if len(self.took) >= self.n:
            self.everyone.set()
        await self.everyone.wait()


class DyingBackend:
    """A NatsBackend whose first publish on ``crash_subject`` kills the engine.

    With ``after_send`` the message goes out first (the engine dies before it
    can write its delivery marker); without, it never goes out. Every publish
    that goes through is recorded, and the subject of every message consumed
    from a stream; with ``turns`` the first consumed waits for the others' first.
    """

    def __init__(
        self,
        inner: NatsBackend,
        crash_subject: str | None = None,
        after_send: bool = False,
        turns: TakeTurns | None = None,
    ) -> None:
        self.inner = inner
        self.crash_subject = crash_subject
        self.after_send = after_send
        self.turns = turns
        self.crashed_at: float | None = None
        self.sent: list[tuple[str, str | None, float]] = []
        self.consumed: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @asynccontextmanager
    async def consume(
        self, stream: str, durable: str, filter_subject: str, **kwargs: Any
    ) -> AsyncIterator[AsyncIterator[Any]]:
        async with self.inner.consume(stream, durable, filter_subject, **kwargs) as msgs:
            yield self._recorded(msgs)

    async def _recorded(self, msgs: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for msg in msgs:
            self.consumed.append(msg.subject)
            if self.turns is not None and len(self.consumed) == 1:
                await self.turns.first(self)
            yield msg

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> None:
        crash = subject == self.crash_subject and self.crashed_at is None
        if not crash or self.after_send:
            await self.inner.publish(subject, data, headers=headers, msg_id=msg_id)
            self.sent.append((subject, msg_id, time.time()))
        if crash:
            self.crashed_at = time.time()
            raise EngineDied(f"died publishing {subject}")


def outbox_workflow() -> type[Workflow]:
    wid = uid("out")

    class Outbox(Workflow, id=wid, state=ExecutionState, on_complete=f"{wid}.out.done"):
        # Writes state and publishes: the publish travels in the state's outbox.
        @rule(watch_kv=True, when=phase_is("go"), publish=f"{wid}.out.announce", mutate=True)
        def announce(self, ctx: RuleContext[ExecutionState, None]) -> dict[str, Any]:
            ctx.state.phase = "announced"
            return {"id": ctx.execution_id}

        # Publishes without writing state: the publish travels in its meta-bucket claim.
        @rule(watch_kv=True, when=phase_is("announced"), publish=f"{wid}.out.notice")
        def notice(self, ctx: RuleContext[ExecutionState, None]) -> dict[str, Any]:
            return {"id": ctx.execution_id, "rev": ctx.revision}

        # Completes: its on_complete event travels in the state's outbox.
        @rule(watch_kv=True, when=phase_is("announced"), complete=True)
        def finish(self, ctx: RuleContext[ExecutionState, None]) -> None:
            pass

    return Outbox


GRACE = 0.5


@pytest.mark.parametrize(
    ("crash_on", "after_send"),
    [
        ("announce", False),
        ("announce", True),
        ("done", False),
        ("done", True),
        ("notice", False),
        ("notice", True),
    ],
)
async def test_publish_decided_by_a_commit_survives_engine_death(
    nats_url: str, nc: Client, crash_on: str, after_send: bool
) -> None:
    flow = outbox_workflow()
    d = definition_of(flow)
    js = nc.jetstream()
    out = f"OUT_{d.id}"
    await capture_stream(js, out, [f"{d.id}.out.>"])
    subject = f"{d.id}.out.{crash_on}"

    dying = DyingBackend(NatsBackend(nats_url), subject, after_send)

    async def doomed_engine() -> None:
        # The engine's task group dies with EngineDied, taking this task with it.
        async with engine_on(nats_url, [flow], backend=dying, outbox_grace=GRACE) as a:
            await a.start_execution(flow, "x", ExecutionState(phase="go"))
            await anyio.sleep(WAIT)

    with pytest.raises(BaseExceptionGroup) as died:
        async with anyio.create_task_group() as tg:
            tg.start_soon(doomed_engine)
    assert died.value.subgroup(EngineDied) is not None
    assert dying.crashed_at is not None
    stored = [m.subject for m in await stream_messages(js, out)]
    assert stored.count(subject) == (1 if after_send else 0)
    # When the dead engine wrote what it did not deliver (the state with its outbox,
    # or the claim of the rule that only publishes): another's grace counts from then.
    if crash_on == "notice":
        meta = await js.key_value("REACTIVE_META")
        claim = await meta.get(f"fire.{d.id}.notice.{d.bucket}.{d.key('x')}")
        written = json.loads(claim.value or b"{}")["pending_at"]
    else:
        state = await (await js.key_value(d.bucket)).get(d.key("x"))
        written = _rfc3339(json.loads(state.value or b"{}")["updated_at"])

    spy = DyingBackend(NatsBackend(nats_url))
    async with engine_on(nats_url, [flow], backend=spy, outbox_grace=GRACE) as b:
        st = await b.wait_for(flow, "x", timeout=WAIT)
        assert st.status is Status.COMPLETED
        # The new engine delivered what the dead one left: nothing of x is pending.
        await eventually(lambda: effects_settled(b, flow, ["x"]), what="x's effects out")
        stored_msgs = await stream_messages(js, out)

    # Every publish the workflow decided is in the stream exactly once. (``notice``,
    # which only publishes, fires before ``finish`` writes the completion on the
    # same revision, so it is decided whichever publish the engine died on.)
    decided = ["announce", "notice", "done"]
    assert sorted(str(m.subject) for m in stored_msgs) == sorted(f"{d.id}.out.{s}" for s in decided)
    # The new engine delivered it, once the writer's grace was over; a repeat of
    # one that had gone out carried the same Nats-Msg-Id and the stream dropped it.
    redelivered = [(mid, at) for s, mid, at in spy.sent if s == subject]
    assert redelivered
    if crash_on != "notice" or not after_send:
        assert len(redelivered) == 1
    for mid, at in redelivered:
        assert at >= written + GRACE - 0.001
        stored_msg = next(m for m in stored_msgs if m.subject == subject)
        assert stored_msg.headers is not None
        assert stored_msg.headers["Nats-Msg-Id"] == mid


# ---------------------------------------------------------------------------
# 7. two engine processes, one workflow set
# ---------------------------------------------------------------------------


class Job(ExecutionState):
    n: int = 0
    answers: list[str] = []


class JobStart(msgspec.Struct):
    id: str
    n: int


class JobRequest(msgspec.Struct):
    n: int
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class JobResult(msgspec.Struct):
    task_id: str
    answer: str


class Gate:
    """A condition the test opens: while closed, ``ids`` stay at ``phase``.

    Their state at ``phase`` is committed, and the rule that would move them on does
    not fire on it: they are between two transitions for as long as the test wants.
    """

    def __init__(self, ids: Iterable[str], phase: str) -> None:
        self.ids = frozenset(ids)
        self.phase = phase
        self.opened = False

    def __call__(self, ctx: RuleContext[Any, Any]) -> bool:
        return self.opened or not (ctx.execution_id in self.ids and ctx.state.phase == self.phase)

    def open(self) -> None:
        self.opened = True


def jobs_workflow(steps: int = 0, gate: Gate | None = None) -> type[Workflow]:
    """start message -> accepted -> (``steps`` mutations) -> async work -> worked -> completed.

    A ``gate`` holds the steps of its executions at its phase until it is opened.
    """
    wid = uid("jobs")

    def stepping(ctx: RuleContext[Job, None]) -> bool:
        return ctx.state.phase.startswith("step") and (gate is None or gate(ctx))

    class Jobs(Workflow, id=wid, state=Job, on_complete=f"{wid}.events.completed"):
        @rule(on_subject=f"{wid}.start", stream=f"IN_{wid}", state_key=lambda m: m.id, mutate=True)
        def accept(self, ctx: RuleContext[Job, JobStart]) -> None:
            ctx.state.n = ctx.message.n
            ctx.state.phase = "step0"

        @rule(watch_kv=True, when=stepping, mutate=True)
        def step(self, ctx: RuleContext[Job, None]) -> None:
            done = int(ctx.state.phase[4:])
            ctx.state.phase = "accepted" if done >= steps else f"step{done + 1}"

        @rule(watch_kv=True, when=phase_is("accepted"), publish_async=f"{wid}.work")
        def work(self, ctx: RuleContext[Job, None]) -> JobRequest:
            return JobRequest(n=ctx.state.n)

        @work.on_result
        def worked(self, ctx: RuleContext[Job, None], result: JobResult) -> None:
            ctx.state.answers.append(result.answer)
            ctx.state.phase = "worked"

        @rule(watch_kv=True, when=phase_is("worked"), complete=True)
        def finish(self, ctx: RuleContext[Job, None]) -> None:
            pass

        # Publishes on every revision without writing state.
        @rule(watch_kv=True, publish=f"{wid}.audit")
        def audit(self, ctx: RuleContext[Job, None]) -> dict[str, Any]:
            return {"id": ctx.execution_id, "rev": ctx.revision, "phase": ctx.state.phase}

    return Jobs


def transitions(st: ExecutionState) -> list[tuple[str, str]]:
    """(rule, trigger) of each timeline entry; a KV rule evaluated on a timer (say, at
    the end of another rule's outbox grace) counts as triggered by the KV change."""
    return [(e.rule_id, "kv" if e.trigger_mode == "timer" else e.trigger_mode) for e in st.timeline]


def job_timeline(steps: int) -> list[tuple[str, str]]:
    """(rule, trigger mode) of every transition an execution of jobs_workflow(steps) makes, once."""
    return [
        ("accept", "message+state"),
        *[("step", "kv")] * (steps + 1),
        ("work", "kv"),
        ("work", "callback"),
        ("finish", "kv"),
    ]


async def test_two_engines_every_transition_and_effect_happens_once(
    nats_url: str, nc: Client
) -> None:
    flow = jobs_workflow(steps=1)
    d = definition_of(flow)
    js = nc.jetstream()
    n = 30
    ids = [f"j{i}" for i in range(n)]
    await capture_stream(js, f"EV_{d.id}", [f"{d.id}.events.>", f"{d.id}.audit"])
    completions = await Inbox.open(nc, d.on_complete)
    audits = await Inbox.open(nc, f"{d.id}.audit")
    # The worker answers every request twice: the second copy must change nothing.
    worker = await Responder(
        nc, f"{d.id}.work", lambda req: {"answer": f"a{req['n']}"}, twice=True
    ).start()
    # Each engine holds its first start message until the other has one too.
    turns = TakeTurns(2)
    spies = [DyingBackend(NatsBackend(nats_url, fetch_batch=4), turns=turns) for _ in range(2)]
    async with (
        engine_on(nats_url, [flow], backend=spies[0], ack_wait=30.0) as a,
        engine_on(nats_url, [flow], backend=spies[1], ack_wait=30.0),
    ):
        for i, exec_id in enumerate(ids):
            await js.publish(f"{d.id}.start", dumps({"id": exec_id, "n": i}))
        states = [await a.wait_for(flow, exec_id, timeout=WAIT) for exec_id in ids]
        await all_consumed(js, a, flow)
        await eventually(lambda: consumer_settled(js, "REACTIVE_CALLBACKS", callback_durable(flow)))
        # Every effect decided has gone out, and every core subscriber has caught up:
        # a doubled effect would be in by now.
        await eventually(lambda: effects_settled(a, flow, ids), what="every effect out")
        for subscriber in (completions, audits, worker):
            await subscriber.sync()
        stored = await stream_messages(js, f"EV_{d.id}")

    # Both processes did part of the work: each took start messages.
    assert all(f"{d.id}.start" in spy.consumed for spy in spies)
    for i, st in enumerate(states):
        assert st.status is Status.COMPLETED, st.id
        assert transitions(st) == job_timeline(1), st.id
        assert st.answers == [f"a{i}"], st.id
    # One request per execution, and each duplicate callback was ignored.
    assert sorted(r["execution_id"] for r in worker.requests) == sorted(ids)
    assert metric("reactive_callbacks_received_total", workflow=d.id, status="stale") == n
    assert metric("reactive_callbacks_received_total", workflow=d.id, status="ok") == n
    assert metric("reactive_executions_created_total", workflow=d.id) == n
    assert metric("reactive_executions_completed_total", workflow=d.id) == n

    # One on_complete event per execution: in the stream, and on the wire.
    events = [body(m)["execution_id"] for m in stored if m.subject == d.on_complete]
    assert sorted(events) == sorted(ids)
    assert sorted(e["execution_id"] for e in completions.payloads()) == sorted(ids)

    # The KV-triggered publish-only rule fired once per revision, not once per process.
    stored_audits = [body(m) for m in stored if m.subject == f"{d.id}.audit"]
    wire_audits = audits.payloads()
    pairs = [(a["id"], a["rev"]) for a in wire_audits]
    assert len(pairs) == len(set(pairs)), "an audit was published twice for one revision"
    assert sorted(pairs) == sorted((a["id"], a["rev"]) for a in stored_audits)
    for exec_id in ids:
        phases = [a["phase"] for a in wire_audits if a["id"] == exec_id]
        assert phases, exec_id
        assert set(phases) <= {"step0", "step1", "accepted", "worked"}, (exec_id, phases)
        assert len(phases) <= 5, (exec_id, phases)  # the non-terminal revisions

    # The start messages went to one shared durable consumer, each delivered once.
    ((stream, durable),) = durables(a, flow)
    info = await js.consumer_info(stream, durable)
    assert (info.delivered.consumer_seq, info.num_redelivered) == (n, 0)
    assert (await js.stream_info(stream)).state.consumer_count == 1


class Note(msgspec.Struct):
    id: str


def overlap_workflow(calls: list[tuple[str, str]]) -> type[Workflow]:
    """Two message-only rules on overlapping core subjects; each call is recorded in ``calls``."""
    wid = uid("overlap")

    class Overlap(Workflow, id=wid):
        @rule(on_subject=f"{wid}.in.*", message=Note, publish=f"{wid}.out.star")
        def star(self, ctx: RuleContext[None, Note]) -> dict[str, str]:
            calls.append(("star", ctx.message.id))
            return {"id": ctx.message.id}

        @rule(on_subject=f"{wid}.in.>", message=Note, publish=f"{wid}.out.tail")
        def tail(self, ctx: RuleContext[None, Note]) -> dict[str, str]:
            calls.append(("tail", ctx.message.id))
            return {"id": ctx.message.id}

    return Overlap


async def test_rules_on_overlapping_core_subjects_each_get_every_message_once(
    nats_url: str, nc: Client
) -> None:
    calls: list[tuple[str, str]] = []
    flow = overlap_workflow(calls)
    d = definition_of(flow)
    sent = [f"m{i}" for i in range(10)]

    def handled(rule_id: str) -> list[str]:
        return sorted(m for r, m in calls if r == rule_id)

    def every_rule_had_all() -> bool:
        return all(set(handled(r)) == set(sent) for r in ("star", "tail"))

    # One engine: both rules get all ten messages.
    async with engine_on(nats_url, [flow]):
        for m in sent:
            await nc.publish(f"{d.id}.in.x", dumps({"id": m}))
        await eventually(every_rule_had_all, what="every message to both rules")
    assert handled("star") == handled("tail") == sorted(sent)

    # Two engines of the workflow set: still every message to both rules, once per rule.
    calls.clear()
    async with engine_on(nats_url, [flow]), engine_on(nats_url, [flow]):
        for m in sent:
            await nc.publish(f"{d.id}.in.x", dumps({"id": m}))
        await eventually(every_rule_had_all, what="every message to both rules")
    assert handled("star") == handled("tail") == sorted(sent)


# ---------------------------------------------------------------------------
# 8. restart: a new engine picks up every execution where the old one left it
# ---------------------------------------------------------------------------


async def test_engine_restart_mid_workflow_every_execution_completes(
    nats_url: str, nc: Client
) -> None:
    steps = 8
    n = 20
    ids = [f"r{i}" for i in range(n)]
    # A quarter of the executions are held by a gate at step3, between two
    # transitions; the worker holds every request, so no execution can end before
    # the stop, and each whose request came is waiting for its callback.
    held = ids[::4]
    gate = Gate(held, "step3")
    flow = jobs_workflow(steps=steps, gate=gate)
    d = definition_of(flow)
    js = nc.jetstream()
    worker = await Responder(nc, f"{d.id}.work", lambda req: {"answer": f"a{req['n']}"}).start()
    worker.hold()

    async def states() -> dict[str, dict[str, Any]]:
        kv = await js.key_value(d.bucket)
        found = {}
        for exec_id in ids:
            try:
                entry = await kv.get(d.key(exec_id))
            except nats.js.errors.KeyNotFoundError:
                continue
            found[exec_id] = json.loads(entry.value or b"{}")
        return found

    async def held_at_the_gate() -> bool:
        found = await states()
        return all(exec_id in found and found[exec_id]["phase"] == "step3" for exec_id in held)

    async with engine_on(nats_url, [flow], outbox_grace=0.5) as a:
        for i, exec_id in enumerate(ids):
            await js.publish(f"{d.id}.start", dumps({"id": exec_id, "n": i}))
        # Stop once every start message is consumed, the held ones are at the gate,
        # and a few others wait for their callback; the rest are wherever they are.
        await all_consumed(js, a, flow)
        await eventually(held_at_the_gate, what="the held executions at the gate")
        await eventually(lambda: len(worker.requests) >= 3, what="three requests")
    at_stop = await states()
    assert sorted(at_stop) == sorted(ids)
    assert not any(Status(st["status"]).is_terminal for st in at_stop.values())
    for exec_id in held:
        assert (at_stop[exec_id]["phase"], at_stop[exec_id]["status"]) == ("step3", "running")
    asked = {r["execution_id"] for r in worker.requests}
    assert asked and not asked & set(held)
    for exec_id in asked:
        assert at_stop[exec_id]["status"] == "waiting", exec_id

    # Callbacks for the waiting ones arrive while no engine runs; a new engine
    # takes them, and carries the others on from the changes the first one had not
    # acknowledged. The held ones' step3 was evaluated (the gate held them): with the
    # gate open, each is written again as it is, a change the new engine takes up.
    await worker.release()
    gate.open()
    kv = await js.key_value(d.bucket)
    for exec_id in held:
        entry = await kv.get(d.key(exec_id))
        await kv.update(d.key(exec_id), entry.value or b"", entry.revision)
    async with engine_on(nats_url, [flow], outbox_grace=0.5) as b:
        final = [await b.wait_for(flow, exec_id, timeout=WAIT) for exec_id in ids]
    for i, st in enumerate(final):
        assert st.status is Status.COMPLETED, st.id
        assert transitions(st) == job_timeline(steps), st.id
        assert st.answers == [f"a{i}"], st.id
    assert {r["execution_id"] for r in worker.requests} == set(ids)


# ---------------------------------------------------------------------------
# 9. bad input
# ---------------------------------------------------------------------------


async def test_bad_input_is_terminated_counted_and_does_not_block_the_rest(
    nats_url: str, nc: Client
) -> None:
    flow = jobs_workflow()
    d = definition_of(flow)
    js = nc.jetstream()
    await Responder(nc, f"{d.id}.work", lambda req: {"answer": "ok"}).start()
    async with engine_on(nats_url, [flow], ack_wait=30.0) as engine:
        kv = await js.key_value(d.bucket)
        # An execution whose state cannot be decoded, and one of the wrong shape.
        broken = {
            "broken": b"\x00 not json",
            "shapeless": dumps({"status": "no-such-status", "answers": 7}),
        }
        revisions = {k: await kv.put(d.key(k), v) for k, v in broken.items()}
        # An undecodable callback.
        await js.publish(f"reactive.callback.{d.id}.good", b"{{{")
        start = f"{d.id}.start"
        await js.publish(start, b"not json at all")  # undecodable
        await js.publish(start, dumps({"id": "good"}))  # the wrong shape: no n
        await js.publish(start, dumps({"id": "has.dot", "n": 1}))  # an invalid execution id
        await js.publish(start, dumps({"id": "broken", "n": 1}))  # its state is undecodable
        await js.publish(start, dumps({"id": "good", "n": 2}))  # fine
        st = await engine.wait_for(flow, "good", timeout=WAIT)
        assert st.status is Status.COMPLETED
        assert st.n == 2
        await all_consumed(js, engine, flow)
        await eventually(lambda: consumer_settled(js, "REACTIVE_CALLBACKS", callback_durable(flow)))

        # Each bad message was counted once and terminated: none waits for an
        # acknowledgement and none was delivered again.
        assert metric("reactive_poison_messages_total", workflow=d.id, kind="message") == 2
        assert metric("reactive_poison_messages_total", workflow=d.id, kind="callback") == 1
        assert metric("reactive_invalid_execution_ids_total", workflow=d.id) == 1
        ((stream, durable),) = durables(engine, flow)
        info = await js.consumer_info(stream, durable)
        assert (info.delivered.consumer_seq, info.num_redelivered, info.num_ack_pending) == (
            5,
            0,
            0,
        )
        cb_info = await js.consumer_info("REACTIVE_CALLBACKS", callback_durable(flow))
        # The undecodable callback and good's: each delivered once.
        assert (cb_info.delivered.consumer_seq, cb_info.num_ack_pending) == (2, 0)

        # Undecodable states are counted and left exactly as they were.
        assert metric("reactive_state_decode_errors_total", workflow=d.id) >= 3
        for k, v in broken.items():
            entry = await kv.get(d.key(k))
            assert (entry.value, entry.revision) == (v, revisions[k])
        keys = await engine.backend.kv_keys(d.bucket)
        assert sorted(keys) == sorted(d.key(k) for k in ("good", *broken))


# ---------------------------------------------------------------------------
# 10. the nats-server restarts mid-workflow
# ---------------------------------------------------------------------------


async def test_nats_server_restart_mid_workflow_executions_complete(
    restartable_nats_server: NatsServer,
) -> None:
    server = restartable_nats_server
    flow = jobs_workflow(steps=2)
    d = definition_of(flow)
    conn = await nats.connect(server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        js = conn.jetstream()
        worker = await Responder(conn, f"{d.id}.work", lambda r: {"answer": f"a{r['n']}"}).start()
        worker.hold()
        before = [f"b{i}" for i in range(10)]
        after = [f"c{i}" for i in range(10)]
        n_of = {exec_id: i for i, exec_id in enumerate(before + after)}
        async with engine_on(server.url, [flow], outbox_grace=0.5) as engine:
            for exec_id in before:
                await js.publish(f"{d.id}.start", dumps({"id": exec_id, "n": n_of[exec_id]}))
            await eventually(lambda: len(worker.requests) == len(before), what="all waiting")

            pid = server.pid
            await anyio.to_thread.run_sync(server.restart)
            assert server.pid != pid
            await eventually(lambda: conn.is_connected, what="the test's client reconnected")
            await conn.flush()
            # Callbacks for the executions that waited across the restart, and new
            # executions started by messages: the engine's callback consumer, message
            # consumer and KV watch must all have come back.
            await worker.release()
            for exec_id in after:
                await publish_retrying(
                    js, f"{d.id}.start", dumps({"id": exec_id, "n": n_of[exec_id]})
                )

            async def all_completed() -> bool:
                try:
                    states = [await engine.get(flow, e) for e in before + after]
                except TransientBackendError:
                    return False
                return all(st is not None and st.status.is_terminal for st in states)

            await eventually(all_completed, timeout=20.0, what="every execution completed")
            states = [await engine.get(flow, e) for e in before + after]
        for st in states:
            assert st.status is Status.COMPLETED, st.id
            assert transitions(st) == job_timeline(2), st.id
            assert st.answers == [f"a{n_of[st.id]}"], st.id
    finally:
        await conn.close()
