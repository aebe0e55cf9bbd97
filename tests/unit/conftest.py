"""Shared fixtures for the unit tests: async tests run on asyncio; metrics start at zero."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from reactive.runtime.metrics import EngineMetrics


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def metrics() -> EngineMetrics:
    """Engine metrics on a registry of their own, so counts start at zero in every test."""
    return EngineMetrics(CollectorRegistry())
