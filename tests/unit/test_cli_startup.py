"""serve's start of the engine: a transient failure (a request to a node that has just died,
a cluster electing its leader) is retried until --startup-timeout, anything else ends it."""

from __future__ import annotations

import pytest

from reactive.cli.common import CLIError
from reactive.cli.startup import GaveUp, start_engine
from reactive.errors import BackendError, TransientBackendError

pytestmark = pytest.mark.anyio


class Engine:
    """Fails its first ``failing`` starts with ``error``."""

    def __init__(self, failing: int, error: Exception) -> None:
        self.failing = failing
        self.error = error
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        if self.starts <= self.failing:
            raise self.error


async def test_a_transient_failure_of_the_start_is_retried() -> None:
    engine = Engine(2, TransientBackendError("put REACTIVE_META/wf.x: TimeoutError"))
    await start_engine(engine, "nats://x", timeout=60.0)
    assert engine.starts == 3


async def test_the_start_gives_up_after_the_startup_timeout_and_on_a_lasting_failure() -> None:
    engine = Engine(1000, TransientBackendError("no responders"))
    with pytest.raises(GaveUp, match="no responders"):
        await start_engine(engine, "nats://x", timeout=0.0)
    assert engine.starts == 1
    broken = Engine(1, BackendError("stream REACTIVE_TIMERS exists with limits retention"))
    with pytest.raises(CLIError, match="cannot start the workflows on nats://x: stream"):
        await start_engine(broken, "nats://x", timeout=60.0)
    assert broken.starts == 1
