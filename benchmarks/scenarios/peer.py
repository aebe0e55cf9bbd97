"""Contender "peer": the benchmark workflows hand-rolled on FastStream's NATS broker.

What a FastStream user would naturally write to drive the same transitions
with compare-and-set into the same KV bucket:

* one ``@broker.subscriber(<pattern>, kv_watch=KvWatch(bucket))`` handler; the
  state is a pydantic model that FastStream decodes from the entry's value; the
  handler applies the transition and calls ``kv.update(key, value,
  last=revision)`` on the bucket from ``broker.key_value``; the final
  transition publishes the completion event with ``broker.publish``;
* for the async workflow, the request is published with ``broker.publish`` and
  the callbacks are consumed by a JetStream pull subscriber
  (``stream=JStream(...)``, ``pull_sub=PullSub(batch_size=64)``, durable,
  ``max_workers=32`` so callbacks are handled concurrently, as the engine does);
  FastStream acks after the handler returns.

FastStream 0.7's KV-watch subscriber handles one entry at a time
(``KeyValueWatchSubscriber`` awaits each handler before reading the next entry;
``max_workers`` does not apply to it), so the peer's KV side is sequential.
FastStream's per-message access log is switched off (``logger=None``), as the
engine's per-transition INFO log is (no handler configured).
"""

import argparse
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import common
import nats.js.errors
from faststream.nats import JStream, KvWatch, NatsBroker, PullSub
from faststream.nats.annotations import NatsKvMessage, NatsMessage
from pydantic import BaseModel

_TERMINAL = frozenset({"completed", "failed", "escalated", "timed_out"})


class PState(BaseModel):
    id: str = ""
    workflow_id: str = ""
    phase: str = ""
    status: str = "pending"
    pending_task_id: str = ""
    verdict: str = ""


class Result(BaseModel):
    task_id: str
    verdict: str = ""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--workflow", choices=["kv", "async"], default="kv")
    p.add_argument("--done-subject", required=True)
    p.add_argument("--work-subject", default="")
    p.add_argument("--cb-stream", default="PEER_CALLBACKS")
    p.add_argument("--cb-prefix", default="peer.callback")
    p.add_argument("--profile", default=None)
    return p.parse_args()


def main() -> None:
    args = parse()
    broker = NatsBroker(args.url, logger=None)
    kvs: dict[str, Any] = {}

    @broker.subscriber(f"{common.WF_ID}.*", kv_watch=KvWatch(args.bucket, declare=False))
    async def on_state(state: PState, msg: NatsKvMessage) -> None:
        entry = msg.raw_message
        if state.status in _TERMINAL or state.status == "waiting":
            return
        done = request = False
        if args.workflow == "kv":
            if state.phase == "a":
                state.phase = "b"
            elif state.phase == "b":
                state.phase = "c"
            elif state.phase == "c":
                state.phase, state.status, done = "done", "completed", True
            else:
                return
        else:
            if state.phase == "a":
                state.status = "waiting"
                state.pending_task_id = f"{state.id}-request-{entry.revision}"
                request = True
            elif state.phase == "b":
                state.phase, state.status, done = "done", "completed", True
            else:
                return
        if state.status not in ("waiting", "completed"):
            state.status = "running"
        try:
            await kvs["kv"].update(entry.key, state.model_dump_json().encode(), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return
        if done:
            await broker.publish(
                {
                    "execution_id": state.id,
                    "workflow_id": common.WF_ID,
                    "status": state.status,
                    "phase": state.phase,
                },
                args.done_subject,
            )
        elif request:
            await broker.publish(
                {
                    "execution": state.id,
                    "task_id": state.pending_task_id,
                    "callback_subject": f"{args.cb_prefix}.{state.id}",
                    "execution_id": state.id,
                },
                args.work_subject,
            )

    if args.workflow == "async":

        @broker.subscriber(
            f"{args.cb_prefix}.*",
            stream=JStream(args.cb_stream, subjects=[f"{args.cb_prefix}.>"]),
            durable="peer_cb",
            pull_sub=PullSub(batch_size=64, timeout=1.0),
            max_workers=32,
        )
        async def on_result(result: Result, msg: NatsMessage) -> None:
            exec_id = msg.raw_message.subject[len(args.cb_prefix) + 1 :]
            key = f"{common.WF_ID}.{exec_id}"
            kv = kvs["kv"]
            for _ in range(10):
                entry = await kv.get(key)
                state = PState.model_validate_json(entry.value)
                if state.status != "waiting" or state.pending_task_id != result.task_id:
                    return
                state.status, state.phase, state.pending_task_id = "running", "b", ""
                state.verdict = result.verdict
                try:
                    await kv.update(key, state.model_dump_json().encode(), last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
                return

    @contextlib.asynccontextmanager
    async def start() -> AsyncIterator[dict[str, Any]]:
        await broker.connect()
        kvs["kv"] = await broker.key_value(args.bucket, declare=False)
        await broker.start()
        try:
            yield {}
        finally:
            await broker.stop()

    common.run(lambda: common.serve(start, profile=args.profile))


if __name__ == "__main__":
    main()
