"""A message of a subscription on its way to a worker: decoded once per message type, its
executions found by the rules' state keys, queued for the worker of its (first) execution,
or of its subject. Messages that cannot be routed (undecodable, an invalid execution id, a
state key that raises) are terminated and counted here, before they reach a worker."""

from __future__ import annotations

from typing import Any

from reactive.backends.base import InboundMessage
from reactive.codecs import decode
from reactive.dsl.schedule import scheduled_run
from reactive.errors import DecodeError, InvalidExecutionId
from reactive.runtime.core import Runtime, log
from reactive.runtime.events import MessageArrival
from reactive.runtime.registry import Subscription
from reactive.runtime.shards import Shards
from reactive.subjects import validate_execution_id

__all__ = ["route_message"]


async def route_message(
    rt: Runtime, shards: Shards, sub: Subscription, msg: InboundMessage
) -> None:
    """Decode a message once per message type and find its executions; then queue it
    for the worker of its (first) execution, or of its subject."""
    d = sub.bound.definition
    if msg.num_delivered > 1:
        rt.metric(rt.metrics.redeliveries, d.id).inc()
    decoded: dict[Any, Any] = {}
    try:
        for r in sub.rules:
            if r.message_type not in decoded:
                decoded[r.message_type] = (
                    scheduled_run(r.id, r.schedule, msg.time, msg.headers, rt.clock.now())
                    if r.schedule
                    else decode(r.message_type, msg.data)
                )
    except DecodeError as e:
        rt.metric(rt.metrics.poison_messages, d.id, "message").inc()
        log.warning("terminating undecodable message on %s for %s: %s", msg.subject, d.id, e)
        await rt.settle(msg, "term")
        return
    shard = msg.subject
    keyed: dict[str, str] = {}
    for r in sub.rules:
        if r.state_key is not None:
            try:
                exec_id = validate_execution_id(r.state_key(decoded[r.message_type]))
            except InvalidExecutionId as e:
                rt.metric(rt.metrics.invalid_ids, d.id).inc()
                log.warning("terminating message on %s for %s: %s", msg.subject, d.id, e)
                await rt.settle(msg, "term")
                return
            except Exception as e:
                rt.metric(rt.metrics.poison_messages, d.id, "state_key").inc()
                log.warning(
                    "terminating message on %s: state_key of %s.%s failed: %r",
                    msg.subject,
                    d.id,
                    r.id,
                    e,
                )
                await rt.settle(msg, "term")
                return
            keyed[r.id] = exec_id
            shard = d.key(exec_id)
    full = shards.enqueue(shard, MessageArrival(sub, msg, decoded, keyed))
    if full is not None:
        await full
