"""Bounded input and a lost connection, against a real nats-server.

An id or key too long for NATS subjects must not take the engine off the server;
a state larger than the server's max payload must end its execution; a connection
that nats-py gives up for good must be made again, with every trigger.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client
from test_engine_nats import (
    WAIT,
    Responder,
    all_consumed,
    dumps,
    durables,
    engine_on,
    eventually,
    metric,
    uid,
)

from reactive import Engine, ExecutionState, NatsBackend, RuleContext, Status, Workflow, rule
from reactive.conditions import phase_is
from reactive.errors import ConnectionLostError, TransientBackendError
from reactive.subjects import MAX_EXECUTION_ID_LENGTH, MAX_KEY_LENGTH

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

MB = 1024 * 1024


class Doc(ExecutionState):
    text: str = ""
    size: int = 0
    summary: str = ""


class Upload(msgspec.Struct):
    doc_id: str
    size: int = 0


class SummaryRequest(msgspec.Struct):
    text: str
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class Summary(msgspec.Struct):
    task_id: str
    summary: str


def docs_workflow() -> type[Workflow]:
    """Uploads (from a stream) grow a document to the size they ask; a worker summarizes it."""
    wid = uid("docs")

    class Docs(Workflow, id=wid, state=Doc, on_fail=f"{wid}.failed"):
        @rule(
            on_subject=f"{wid}.upload",
            stream=f"UP_{wid}",
            state_key=lambda m: m.doc_id,
            mutate=True,
        )
        def upload(self, ctx: RuleContext[Doc, Upload]) -> None:
            ctx.state.size = ctx.message.size
            ctx.state.phase = "uploaded"

        @rule(watch_kv=True, when=phase_is("uploaded"), mutate=True)
        def grow(self, ctx: RuleContext[Doc, None]) -> None:
            ctx.state.text = "x" * ctx.state.size
            ctx.state.phase = "grown"

        @rule(watch_kv=True, when=phase_is("grown"), publish_async=f"{wid}.summarize")
        def summarize(self, ctx: RuleContext[Doc, None]) -> SummaryRequest:
            return SummaryRequest(text=ctx.state.text)

        @summarize.on_result
        def summarized(self, ctx: RuleContext[Doc, None], result: Summary) -> None:
            ctx.state.summary = result.summary
            ctx.state.phase = "summarized"

        @rule(watch_kv=True, when=phase_is("summarized"), complete=True)
        def done(self, ctx: RuleContext[Doc, None]) -> None: ...

    return Docs


def watcher_workflow() -> tuple[type[Workflow], str]:
    """Publishes an alert for every key written to an entity bucket it only watches."""
    wid = uid("watch")
    bucket = f"ENT_{wid}"

    class Watcher(Workflow, id=wid):
        @rule(watch_kv="ent.>", bucket=bucket, publish=f"{wid}.alert")
        def alert(self, ctx: RuleContext[Any, None]) -> dict[str, str]:
            return {"key": ctx.key}

    return Watcher, bucket


async def summarizer(nc: Client, flow: type[Workflow]) -> Responder:
    wid = flow.__reactive__.id  # type: ignore[attr-defined]
    return await Responder(nc, f"{wid}.summarize", lambda req: {"summary": "ok"}).start()


async def test_too_long_execution_id_is_terminated_and_the_engine_stays_connected(
    nats_url: str, nc: Client
) -> None:
    flow = docs_workflow()
    d = flow.__reactive__  # type: ignore[attr-defined]
    js = nc.jetstream()
    await summarizer(nc, flow)
    async with engine_on(nats_url, [flow], ack_wait=30.0) as engine:
        conn = engine.backend.nc  # type: ignore[attr-defined]
        before = metric("reactive_invalid_execution_ids_total", workflow=d.id)
        await js.publish(f"{d.id}.upload", dumps({"doc_id": "d" * 4096, "size": 1}))
        await js.publish(
            f"{d.id}.upload", dumps({"doc_id": "d" * (MAX_EXECUTION_ID_LENGTH + 1), "size": 1})
        )
        longest = "d" * MAX_EXECUTION_ID_LENGTH
        await js.publish(f"{d.id}.upload", dumps({"doc_id": longest, "size": 1}))
        st = await engine.wait_for(flow, longest, timeout=WAIT)
        assert st.status is Status.COMPLETED
        await all_consumed(js, engine, flow)
        assert metric("reactive_invalid_execution_ids_total", workflow=d.id) == before + 2
        ((stream, durable),) = durables(engine, flow)
        info = await js.consumer_info(stream, durable)
        assert info.num_redelivered == 0
        # The same connection throughout: nothing closed it.
        assert engine.backend.nc is conn  # type: ignore[attr-defined]
        assert conn.is_connected and conn.stats["reconnects"] == 0
        assert [s.id for s in await engine.executions(flow)] == [longest]


async def test_too_long_watched_key_is_skipped_and_counted_and_the_engine_keeps_its_connection(
    nats_url: str, nc: Client
) -> None:
    flow, bucket = watcher_workflow()
    wid = flow.__reactive__.id  # type: ignore[attr-defined]
    js = nc.jetstream()
    alerts: list[str] = []

    async def on_alert(msg: Any) -> None:
        alerts.append(msg.data.decode())

    await nc.subscribe(f"{wid}.alert", cb=on_alert)
    long_key = "ent." + "k" * (MAX_KEY_LENGTH + 500)
    # (The second engine resumes from the changes not acknowledged: the long key was
    # skipped and acknowledged, so it is counted once.)
    for attempt in range(2):
        async with engine_on(nats_url, [flow]) as engine:
            conn = engine.backend.nc  # type: ignore[attr-defined]
            kv = await js.key_value(bucket)
            if attempt == 0:
                await kv.put(long_key, b"{}")
                await kv.put("ent.ok", b"{}")
            await eventually(
                lambda: metric("reactive_invalid_keys_total", bucket=bucket) >= 1,
                what="the long key counted",
            )
            await eventually(lambda: len(alerts) >= 1, what="the alert for ent.ok")
            # (Acknowledged before the engine stops: one stopped in the middle of it would
            # hand the change back, and the next engine would alert again.)
            await eventually(lambda: engine.idle, what="the engine done with what it took")
            assert engine.backend.nc is conn and conn.is_connected  # type: ignore[attr-defined]
            assert conn.stats["reconnects"] == 0
    await nc.flush()
    assert [msgspec.json.decode(a)["key"] for a in alerts] == ["ent.ok"]


async def test_state_larger_than_the_max_payload_fails_the_execution_and_the_rest_goes_on(
    nats_url: str, nc: Client
) -> None:
    flow = docs_workflow()
    d = flow.__reactive__  # type: ignore[attr-defined]
    js = nc.jetstream()
    worker = await summarizer(nc, flow)
    failed: list[dict[str, Any]] = []

    async def on_failed(msg: Any) -> None:
        failed.append(msgspec.json.decode(msg.data))

    await nc.subscribe(d.on_fail, cb=on_failed)
    async with engine_on(nats_url, [flow]) as engine:
        assert nc.max_payload == MB
        await js.publish(f"{d.id}.upload", dumps({"doc_id": "huge", "size": 2 * MB}))
        await js.publish(f"{d.id}.upload", dumps({"doc_id": "twice", "size": 700_000}))
        # 480 kB in the state and again in its request: fits, as JSON.
        await js.publish(f"{d.id}.upload", dumps({"doc_id": "big", "size": 480_000}))
        huge = await engine.wait_for(flow, "huge", timeout=WAIT)
        assert huge.status is Status.FAILED and "larger than" in huge.error
        assert (huge.phase, huge.text) == ("uploaded", "")
        twice = await engine.wait_for(flow, "twice", timeout=WAIT)
        assert twice.status is Status.FAILED and twice.phase == "grown"
        big = await engine.wait_for(flow, "big", timeout=WAIT)
        assert big.status is Status.COMPLETED
        assert [len(r["text"]) for r in worker.requests] == [480_000]
        await eventually(lambda: len(failed) == 2, what="two failure events")
        assert sorted(e["execution_id"] for e in failed) == ["huge", "twice"]
        assert (
            metric("reactive_executions_failed_total", workflow=d.id, reason="state_too_large") == 2
        )
        assert engine.backend.nc.stats["reconnects"] == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["protocol error", "closed"])
async def test_a_connection_closed_for_good_is_made_again_with_every_trigger(
    nats_url: str, nc: Client, how: str
) -> None:
    flow = docs_workflow()
    d = flow.__reactive__  # type: ignore[attr-defined]
    js = nc.jetstream()
    await summarizer(nc, flow)
    async with engine_on(nats_url, [flow]) as engine:
        await js.publish(f"{d.id}.upload", dumps({"doc_id": "before", "size": 1}))
        assert (await engine.wait_for(flow, "before", timeout=WAIT)).status is Status.COMPLETED
        old = engine.backend.nc  # type: ignore[attr-defined]
        if how == "protocol error":
            # A control line longer than the server takes: it closes the connection, and
            # nats-py gives it up for good (what a 4 KB execution id used to cause).
            await old.publish("x." * 2100 + "y", b"")
        else:
            await old.close()
        await eventually(lambda: old.is_closed, what="the old connection closed")

        def renewed() -> bool:
            try:
                new = engine.backend.nc  # type: ignore[attr-defined]
            except TransientBackendError:  # closed, not renewed yet
                return False
            return bool(new is not old and new.is_connected)

        await eventually(renewed, what="a new connection")
        # The stream consumer, the KV watch and the callback consumer all work again.
        await js.publish(f"{d.id}.upload", dumps({"doc_id": "after", "size": 1}))
        st = await engine.wait_for(flow, "after", timeout=WAIT)
        assert st.status is Status.COMPLETED
        assert [e.rule_id for e in st.timeline] == [
            "upload",
            "grow",
            "summarize",
            "summarize",
            "done",
        ]


async def test_an_engine_on_a_given_connection_that_closes_stops_with_the_error(
    nats_url: str,
) -> None:
    flow = docs_workflow()
    conn = await nats.connect(nats_url)
    engine = Engine(NatsBackend(nc=conn), [flow])
    with pytest.raises(BaseExceptionGroup) as info:
        async with engine:
            await eventually(lambda: engine.ready, what="engine ready")
            await conn.close()
            with anyio.fail_after(WAIT):
                await anyio.sleep_forever()  # ended by the engine's failure
    assert info.group_contains(ConnectionLostError)
