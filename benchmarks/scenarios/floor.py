"""Contender "floor": the NATS work the engine does for the benchmark workflows, hand-written on nats-py.

No engine, no framework: one KV watch over the bucket, and per entry: decode
(msgspec JSON), apply the phase transition, ``kv.update(key, value,
last=revision)`` (compare-and-set), and on the final transition publish the
completion event. Entries are handled concurrently (one task per entry; an
execution has at most one write in flight, so per-key order holds). A lost
compare-and-set is dropped: the newer revision arrives on the watch.

The async workflow adds what the engine does for ``publish_async``: park the
execution (status waiting, task id) by compare-and-set, publish the request
with the callback fields, consume callbacks from a durable pull consumer on a
JetStream stream (fetch batches of 64, like the engine's backend), and per
callback: get the state, check the task id, compare-and-set the result, ack.

What the engine does besides (not done here): a second decode of the state for
the write, the timeline / firings / outbox bookkeeping in the state, the
outbox-delivered marker (one KV put per completed or parked execution into
the meta bucket), metrics and logging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import common
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.js import api

_TERMINAL = frozenset({"completed", "failed", "escalated", "timed_out"})


class FState(msgspec.Struct, omit_defaults=True):
    id: str = ""
    workflow_id: str = ""
    phase: str = ""
    status: str = "pending"
    pending_task_id: str = ""
    verdict: str = ""


class Event(msgspec.Struct):
    execution_id: str
    workflow_id: str
    status: str
    phase: str


class Request(msgspec.Struct):
    execution: str
    task_id: str
    callback_subject: str
    execution_id: str


class Result(msgspec.Struct):
    task_id: str
    verdict: str = ""


_dec = msgspec.json.Decoder(FState)
_dec_result = msgspec.json.Decoder(Result)
_enc = msgspec.json.Encoder()


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--workflow", choices=["kv", "async"], default="kv")
    p.add_argument("--done-subject", required=True)
    p.add_argument("--work-subject", default="")
    p.add_argument("--cb-stream", default="FLOOR_CALLBACKS")
    p.add_argument("--cb-prefix", default="floor.callback")
    p.add_argument("--profile", default=None)
    return p.parse_args()


def main() -> None:
    args = parse()
    tasks: set[asyncio.Task[Any]] = set()

    def done(t: asyncio.Task[Any]) -> None:
        tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            common.log(f"floor: task failed: {t.exception()!r}")

    def spawn(coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        tasks.add(t)
        t.add_done_callback(done)

    @contextlib.asynccontextmanager
    async def start() -> AsyncIterator[dict[str, Any]]:
        nc = await nats.connect(args.url)
        js = nc.jetstream()
        kv = await js.key_value(args.bucket)

        async def transition(key: str, value: bytes, revision: int) -> None:
            st = _dec.decode(value)
            if st.status in _TERMINAL or st.status == "waiting":
                return
            done = False
            request = False
            if args.workflow == "kv":
                if st.phase == "a":
                    st.phase = "b"
                elif st.phase == "b":
                    st.phase = "c"
                elif st.phase == "c":
                    st.phase, st.status, done = "done", "completed", True
                else:
                    return
            else:
                if st.phase == "a":
                    st.status = "waiting"
                    st.pending_task_id = f"{st.id}-request-{revision}"
                    request = True
                elif st.phase == "b":
                    st.phase, st.status, done = "done", "completed", True
                else:
                    return
            if st.status != "waiting" and not done:
                st.status = "running"
            try:
                await kv.update(key, _enc.encode(st), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return  # a newer revision won; the watch brings it
            if done:
                event = Event(
                    execution_id=st.id, workflow_id=common.WF_ID, status=st.status, phase=st.phase
                )
                await nc.publish(args.done_subject, _enc.encode(event))
            elif request:
                req = Request(
                    execution=st.id,
                    task_id=st.pending_task_id,
                    callback_subject=f"{args.cb_prefix}.{st.id}",
                    execution_id=st.id,
                )
                await nc.publish(args.work_subject, _enc.encode(req))

        async def watch_loop() -> None:
            watcher = await kv.watch(">")
            async for entry in watcher:
                if entry is None or entry.operation is not None or not entry.value:
                    continue  # end-of-replay marker, delete, purge
                spawn(transition(entry.key, entry.value, entry.revision))

        async def callback(msg: Any) -> None:
            exec_id = msg.subject[len(args.cb_prefix) + 1 :]
            key = f"{common.WF_ID}.{exec_id}"
            result = _dec_result.decode(msg.data)
            for _ in range(10):
                entry = await kv.get(key)
                st = _dec.decode(entry.value)
                if st.status != "waiting" or st.pending_task_id != result.task_id:
                    break  # stale or duplicate
                st.status, st.phase, st.pending_task_id = "running", "b", ""
                st.verdict = result.verdict
                try:
                    await kv.update(key, _enc.encode(st), last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
                break
            await msg.ack()

        async def callback_loop() -> None:
            await js.add_stream(name=args.cb_stream, subjects=[f"{args.cb_prefix}.>"])
            psub = await js.pull_subscribe(
                f"{args.cb_prefix}.>",
                durable="floor_cb",
                stream=args.cb_stream,
                config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, max_deliver=-1),
            )
            ready.set()
            while True:
                try:
                    msgs = await psub.fetch(64, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                except Exception as e:  # keep consuming, as any real consumer must
                    common.log(f"floor: fetch failed: {e!r}")
                    await asyncio.sleep(0.05)
                    continue
                for m in msgs:
                    spawn(callback(m))

        ready = asyncio.Event()
        loops = [asyncio.ensure_future(watch_loop())]
        loops[0].add_done_callback(done)
        if args.workflow == "async":
            loops.append(asyncio.ensure_future(callback_loop()))
            loops[1].add_done_callback(done)
            await ready.wait()
        try:
            yield {}
        finally:
            for t in loops:
                t.cancel()
            for t in list(tasks):
                t.cancel()
            with contextlib.suppress(Exception):
                await nc.close()

    common.run(lambda: common.serve(start, profile=args.profile))


if __name__ == "__main__":
    main()
