"""The load side of the NATS scenarios: driver, observer, simulated worker, in the parent process.

* **Driver** (its own connection): starts executions by creating their first
  state, ``kv.create("bench3.<id>", {"phase": "a", "status": "running"})``,
  keeping ``concurrency`` executions in flight: the next one starts when the
  completion event of an earlier one arrives.
* **Observer** (its own connection): a KV watch over the bucket that stamps
  every revision with ``time.perf_counter()`` as it arrives. The latency of a
  transition is the time between the observer seeing the revision that
  triggered it and the observer seeing the revision the contender committed
  in response -- "KV change -> committed transition", both ends seen by the
  same independent watcher, so its own delivery delay cancels out.
* **Completion listener**: a core subscription on the completion subject; an
  execution counts as done when its completion event arrives.
* **Worker** (async workflow, its own connection): answers every request on
  the work subject by publishing the result to the request's
  ``callback_subject`` (a JetStream stream captures it) with ``js.publish``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats
import nats.js.errors
from common import WF_ID, Completion, Observed
from nats.aio.client import Client

_dec_obs = msgspec.json.Decoder(Observed)
_dec_done = msgspec.json.Decoder(Completion)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class _Exec:
    t_start: float = 0.0
    t_created: float = 0.0
    t_done: float = 0.0
    revs: list[tuple[int, float, str, str]] = field(default_factory=list)


class StallError(RuntimeError):
    pass


class Harness:
    """The load side; ``url`` is one server URL, or several joined by commas (a cluster).

    ``failover`` (a cluster that loses a node during the run): a create that fails (no
    stream leader yet, a timeout) is tried again (one already stored counts as created),
    and an execution also counts as done when the observer sees it completed, since a
    completion event (core NATS) sent while a connection moves to another node is lost.
    """

    def __init__(
        self,
        url: str,
        bucket: str,
        done_subject: str,
        work_subject: str = "",
        failover: bool = False,
    ) -> None:
        self.url = url
        self.failover = failover
        self.create_retries = 0
        self.bucket = bucket
        self.done_subject = done_subject
        self.work_subject = work_subject
        self._conns: list[Client] = []
        self._execs: dict[str, _Exec] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sem: asyncio.Semaphore | None = None
        self._remaining = 0
        self._all_done = asyncio.Event()
        self._progress = 0.0
        self._closing = False
        self.conn_errors: list[str] = []
        self.worker_requests = 0
        self.worker_replies = 0
        self.worker_errors: list[str] = []

    @property
    def remaining(self) -> int:
        """Executions of the current ``drive`` not done yet."""
        return self._remaining

    async def _on_error(self, e: Exception) -> None:
        if not self._closing:
            self.conn_errors.append(f"{type(e).__name__}: {e}")

    async def start(self) -> None:
        driver = await nats.connect(
            self.url.split(","), name="bench-driver", error_cb=self._on_error
        )
        observer = await nats.connect(
            self.url.split(","), name="bench-observer", error_cb=self._on_error
        )
        self._conns += [driver, observer]
        self._js = driver.jetstream()
        self._kv = await self._js.key_value(self.bucket)
        okv = await observer.jetstream().key_value(self.bucket)
        self._watcher = await okv.watch(">")
        self._spawn(self._observe())
        await driver.subscribe(self.done_subject, cb=self._on_done)
        if self.work_subject:
            worker = await nats.connect(
                self.url.split(","), name="bench-worker", error_cb=self._on_error
            )
            self._conns.append(worker)
            wjs = worker.jetstream()

            async def reply(msg: Any) -> None:
                req = json.loads(msg.data)
                subject = req.get("callback_subject") or (msg.headers or {}).get(
                    "Reactive-Callback-Subject"
                )
                task_id = req.get("task_id") or (msg.headers or {}).get("Reactive-Task-Id", "")
                body = json.dumps({"task_id": task_id, "verdict": "ok"}).encode()
                for attempt in range(5):  # a dependable worker: retry a failed publish
                    try:
                        await wjs.publish(subject, body)
                        self.worker_replies += 1
                        return
                    except Exception as e:
                        self.worker_errors.append(f"{type(e).__name__}: {e}")
                        await asyncio.sleep(0.05 * (attempt + 1))

            async def on_request(msg: Any) -> None:
                self.worker_requests += 1
                self._spawn(reply(msg))

            await worker.subscribe(self.work_subject, cb=on_request)
            await worker.flush()
        await driver.flush()

    async def close(self) -> None:
        self._closing = True
        for t in list(self._tasks):
            t.cancel()
        for nc in self._conns:
            try:
                await nc.close()
            except Exception:
                pass

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _observe(self) -> None:
        async for entry in self._watcher:
            now = time.perf_counter()
            if entry is None or entry.operation is not None or not entry.value:
                continue
            rec = self._execs.get(entry.key)
            if rec is None:
                continue
            st = _dec_obs.decode(entry.value)
            rec.revs.append((entry.revision, now, st.phase, st.status))
            self._progress = now
            if self.failover and st.status == "completed" and not rec.t_done:
                self._done(rec, now)

    async def _on_done(self, msg: Any) -> None:
        now = time.perf_counter()
        try:
            ev = _dec_done.decode(msg.data)
        except msgspec.DecodeError:
            return
        rec = self._execs.get(f"{WF_ID}.{ev.execution_id}")
        if rec is None or rec.t_done:
            return
        self._done(rec, now)

    def _done(self, rec: _Exec, now: float) -> None:
        rec.t_done = now
        self._progress = now
        self._remaining -= 1
        if self._sem is not None:
            self._sem.release()
        if self._remaining == 0:
            self._all_done.set()

    async def _create(self, key: str, data: bytes, rec: _Exec) -> None:
        rec.t_start = time.perf_counter()
        if not self.failover:
            await self._kv.create(key, data)
        else:
            for attempt in itertools.count():
                try:
                    await self._kv.create(key, data)
                    break
                except nats.js.errors.KeyWrongLastSequenceError:
                    break  # an earlier attempt was stored; its ack was lost
                except Exception:
                    if attempt >= 600:
                        raise
                    self.create_retries += 1
                    await asyncio.sleep(0.1)
        rec.t_created = time.perf_counter()

    async def drive(
        self,
        prefix: str,
        n: int,
        concurrency: int,
        *,
        expected_revs: int = 4,
        stall_timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Run ``n`` executions with ``concurrency`` in flight; return throughput and latencies."""
        self._sem = asyncio.Semaphore(concurrency)
        self._remaining = n
        self._all_done = asyncio.Event()
        keys = []
        t0 = time.perf_counter()
        self._progress = t0
        stalled: str | None = None

        async def feeder() -> None:
            assert self._sem is not None
            for i in range(n):
                await self._sem.acquire()
                eid = f"{prefix}{i:07d}"
                key = f"{WF_ID}.{eid}"
                rec = self._execs[key] = _Exec()
                keys.append(key)
                data = msgspec.json.encode(
                    {"id": eid, "workflow_id": WF_ID, "phase": "a", "status": "running"}
                )
                self._spawn(self._create(key, data, rec))

        feed = asyncio.ensure_future(feeder())
        while not self._all_done.is_set():
            try:
                await asyncio.wait_for(self._all_done.wait(), 1.0)
            except TimeoutError:
                if time.perf_counter() - self._progress > stall_timeout:
                    stalled = self._describe_stall(keys)
                    break
        feed.cancel()
        t_end = max((self._execs[k].t_done for k in keys), default=t0)
        if stalled:
            raise StallError(stalled)
        # The completion event can overtake the observer's view of the last revision.
        deadline = time.perf_counter() + 5.0
        while time.perf_counter() < deadline and any(
            len(self._execs[k].revs) < expected_revs for k in keys
        ):
            await asyncio.sleep(0.01)
        return self._stats(keys, t0, t_end)

    def _describe_stall(self, keys: list[str]) -> str:
        stuck = [k for k in keys if not self._execs[k].t_done]
        where: dict[str, int] = {}
        for k in stuck:
            revs = self._execs[k].revs
            last = f"{revs[-1][2]}/{revs[-1][3]}" if revs else "never observed"
            where[last] = where.get(last, 0) + 1
        worker = (
            f"; simulated worker: {self.worker_requests} requests, {self.worker_replies} replies, "
            f"errors {self.worker_errors[-3:]}"
            if self.work_subject
            else ""
        )
        return (
            f"no progress for the stall timeout: {len(keys) - len(stuck)} of {len(keys)} "
            f"started executions completed; the others' last observed phase/status: {where}"
            + worker
        )

    def _stats(self, keys: list[str], t0: float, t_end: float) -> dict[str, Any]:
        kv_lat: list[float] = []
        rt_lat: list[float] = []
        e2e: list[float] = []
        dones: list[float] = []
        transitions = 0
        for k in keys:
            rec = self._execs.pop(k)
            revs = sorted(rec.revs)
            e2e.append(rec.t_done - rec.t_start)
            dones.append(rec.t_done)
            for prev, cur in itertools.pairwise(revs):
                transitions += 1
                lat = cur[1] - prev[1]
                if prev[3] == "waiting":
                    rt_lat.append(lat)
                else:
                    kv_lat.append(lat)
        elapsed = t_end - t0
        n = len(keys)
        out = {
            "executions": n,
            "transitions": transitions,
            "elapsed_s": elapsed,
            "exec_per_s": n / elapsed if elapsed > 0 else math.nan,
            "trans_per_s": transitions / elapsed if elapsed > 0 else math.nan,
            "lat_p50_ms": percentile(kv_lat, 0.5) * 1e3,
            "lat_p99_ms": percentile(kv_lat, 0.99) * 1e3,
            "e2e_p50_ms": percentile(e2e, 0.5) * 1e3,
            "e2e_p99_ms": percentile(e2e, 0.99) * 1e3,
            "e2e_max_ms": max(e2e) * 1e3 if e2e else math.nan,
        }
        if self.failover:  # the longest time without a completion: the failover's pause
            done = sorted(t for t in (t0, *dones, t_end) if t)
            out["done_gap_max_s"] = max(b - a for a, b in itertools.pairwise(done))
        if rt_lat:
            out["rt_p50_ms"] = percentile(rt_lat, 0.5) * 1e3
            out["rt_p99_ms"] = percentile(rt_lat, 0.99) * 1e3
        return out


async def prepare_at_rest(
    url: str, bucket: str, meta_bucket: str, n: int, done_subject: str, work_subject: str
) -> float:
    """Write ``n`` executions at rest as the engine leaves them: half completed, half waiting.

    Completed ones carry their (delivered) outbox and the outbox marker in the
    meta bucket; waiting ones a pending task due in an hour. Returns seconds taken.
    """
    from datetime import UTC, datetime, timedelta

    from workflows import BenchState

    from reactive import Status, TimelineEntry
    from reactive.dsl.state import Firing, OutboxMessage

    t0 = time.perf_counter()
    nc = await nats.connect(url)
    js = nc.jetstream()
    now = datetime.now(UTC)
    ts = now.timestamp()
    enc = msgspec.json.Encoder()

    def build(i: int) -> tuple[str, bytes, str, bytes]:
        eid = f"rest{i:07d}"
        key = f"{WF_ID}.{eid}"
        if i % 2 == 0:
            event = enc.encode(
                {
                    "execution_id": eid,
                    "workflow_id": WF_ID,
                    "status": "completed",
                    "phase": "done",
                    "completed_at": now.isoformat(),
                }
            )
            outbox_id = f"{WF_ID}:{eid}:completed"
            st = BenchState(
                id=eid,
                workflow_id=WF_ID,
                phase="done",
                status=Status.COMPLETED,
                verdict="ok",
                created_at=now,
                updated_at=now,
                completed_at=now,
                timeline=[
                    TimelineEntry(
                        timestamp=now,
                        rule_id="request",
                        trigger_mode="kv",
                        trigger_info=key,
                        action="publish_async",
                        phase="a",
                    ),
                    TimelineEntry(
                        timestamp=now,
                        rule_id="request",
                        trigger_mode="callback",
                        trigger_info="cb",
                        action="callback",
                        phase="b",
                    ),
                    TimelineEntry(
                        timestamp=now,
                        rule_id="finish",
                        trigger_mode="kv",
                        trigger_info=key,
                        action="complete",
                        phase="done",
                    ),
                ],
                firings={
                    "request": Firing(count=1, last_at=ts, last_trigger="r1"),
                    "finish": Firing(count=1, last_at=ts, last_trigger="r3"),
                },
                outbox=[OutboxMessage(subject=done_subject, data=event, msg_id=outbox_id)],
                outbox_id=outbox_id,
                owner="previous-engine",
            )
        else:
            task_id = f"{eid}-request-1"
            outbox_id = f"{WF_ID}:{eid}:1"
            req = enc.encode(
                {
                    "execution": eid,
                    "task_id": task_id,
                    "callback_subject": f"cb.{eid}",
                    "execution_id": eid,
                }
            )
            st = BenchState(
                id=eid,
                workflow_id=WF_ID,
                phase="a",
                status=Status.WAITING,
                pending_task_id=task_id,
                pending_rule_id="request",
                created_at=now,
                updated_at=now,
                task_deadline=now + timedelta(hours=1),
                pending_since=now,
                timeline=[
                    TimelineEntry(
                        timestamp=now,
                        rule_id="request",
                        trigger_mode="kv",
                        trigger_info=key,
                        action="publish_async",
                        phase="a",
                    ),
                ],
                firings={"request": Firing(count=1, last_at=ts, last_trigger="r1")},
                outbox=[
                    OutboxMessage(
                        subject=work_subject,
                        data=req,
                        msg_id=f"{WF_ID}:{eid}:1:0:request",
                        headers={"Reactive-Task-Id": task_id},
                    )
                ],
                outbox_id=outbox_id,
                owner="previous-engine",
            )
        return key, enc.encode(st), f"out.{bucket}.{key}", outbox_id.encode()

    # Publish straight to the buckets' subjects (the KV streams store them) without
    # waiting for each ack, then wait until both streams hold everything.
    for i in range(n):
        key, value, meta_key, meta_value = build(i)
        await nc.publish(f"$KV.{bucket}.{key}", value)
        await nc.publish(f"$KV.{meta_bucket}.{meta_key}", meta_value)
        if i % 1000 == 999:
            await nc.flush()
    await nc.flush()
    deadline = time.perf_counter() + 300
    while time.perf_counter() < deadline:
        a = await js.stream_info(f"KV_{bucket}")
        b = await js.stream_info(f"KV_{meta_bucket}")
        if a.state.messages >= n and b.state.messages >= n:
            break
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError(f"at-rest setup: only {a.state.messages} of {n} states stored")
    await nc.close()
    return time.perf_counter() - t0
