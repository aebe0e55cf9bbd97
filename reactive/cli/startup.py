"""serve's start: what the engine needs from NATS, each step named, retried with backoff while it is transient."""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from reactive.cli.common import (
    CLIError,
    unreachable_error,
)

if TYPE_CHECKING:
    from reactive import Engine, NatsBackend
    from reactive.compiled import WorkflowDef

__all__ = ["GaveUp", "failure_hints", "prepare", "setup_steps"]

log = logging.getLogger("reactive.serve")

_FIRST_RETRY = 0.25  # seconds; doubled after each failure, up to _MAX_RETRY
# (What fails at start is mostly a cluster electing leaders, over in seconds: a retry
# each second finds the new leader within a second of its election.)
_MAX_RETRY = 1.0


class GaveUp(Exception):
    """The startup deadline passed: what failed last (or the step it still waited for)."""

    def __init__(self, message: str, hints: list[str]) -> None:
        super().__init__(message)
        self.hints = hints


def setup_steps(
    backend: NatsBackend, engine: Engine, workflows: list[WorkflowDef], url: str
) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """What the engine needs from NATS before it starts, each step named, in order.

    The connection, the meta bucket, every bucket and stream the workflows use: the calls
    the engine's own start makes, done here first so a transient failure is retried (they
    are idempotent and cached, so the engine's start repeats none of the slow ones).
    """
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        (f"connect to NATS at {url}", backend.start),
        ("check the server's version and features", backend.check_server),
        (f"ensure bucket {engine.meta_bucket}", lambda: backend.ensure_bucket(engine.meta_bucket)),
    ]
    buckets = {d.bucket: None for d in workflows}
    streams: dict[str, list[str]] = {}
    for d in workflows:
        for r in d.rules:
            if r.bucket:
                buckets[r.bucket] = None
            if r.stream and r.subject:
                streams.setdefault(r.stream, []).append(r.subject)
        if d.has_async:
            streams.setdefault(engine.callback_stream, []).append(f"{engine.callback_prefix}.>")
    for bucket in buckets:
        steps.append((f"ensure bucket {bucket}", partial(backend.ensure_bucket, bucket)))
    for stream, subjects in streams.items():
        wanted = list(dict.fromkeys(subjects))
        steps.append((f"ensure stream {stream}", partial(backend.ensure_stream, stream, wanted)))
    return steps


def failure_hints(url: str, step: str, error: BaseException) -> list[str]:
    """What to check, for the failure that really happened (not a guess about JetStream)."""
    import nats.js.errors

    from reactive.backends.nats._features import MIN_SERVER_VERSION
    from reactive.errors import ServerFeatureError

    cause = error.__cause__ or error
    text = f"{error} {cause}".lower()
    # nats-py reports "no responders" to a JetStream request as a 503 without a code.
    no_responders = isinstance(cause, nats.js.errors.ServiceUnavailableError) and not cause.code
    if isinstance(error, ServerFeatureError):
        return [
            "serve needs nats-server "
            + ".".join(map(str, MIN_SERVER_VERSION))
            + " or later; the embedded one (serve with no --nats-url) has it"
        ]
    if step.startswith("check") and "jetstream is not enabled" in text:
        return [
            f"the server at {url} runs without JetStream: start it with -js "
            "(or a jetstream block in its config)"
        ]
    if step.startswith("connect"):
        if isinstance(cause, ssl.SSLError) or "authoriz" in text or "authentic" in text:
            return unreachable_error(url, cause).reasons
        return [
            f"is a nats-server running and reachable at {url}? check --nats-url "
            "(serve with no URL runs an embedded one)"
        ]
    if no_responders or "no responders" in text:
        return [
            f"nothing answers JetStream requests at {url}: is JetStream enabled on the server "
            "(nats-server -js, or a jetstream block in its config)?"
        ]
    if "not enabled" in text:
        return [f"JetStream is not enabled for this account at {url}: enable it for the account"]
    if isinstance(cause, TimeoutError) or "timeout" in text:
        return [
            f"JetStream at {url} did not answer in time: a cluster still electing its leader, "
            "or short of a quorum of its servers, does that (`nats server report jetstream` "
            "shows it); the server itself is reachable"
        ]
    if "unavailable" in text:
        return [
            f"JetStream at {url} says it is unavailable for now: a cluster without a leader "
            "or a quorum says so"
        ]
    return []


async def prepare(
    steps: list[tuple[str, Callable[[], Awaitable[None]]]], url: str, timeout: float | None
) -> None:
    """Run the setup steps, retrying transient failures with backoff (each retry logged,
    naming what failed) until ``timeout`` seconds have passed; a failure that retrying cannot
    heal ends it at once. Raises CLIError, or GaveUp when the time is up."""
    import anyio

    from reactive.errors import BackendError, TransientBackendError

    last = ""
    last_hints: list[str] = []
    last_step = steps[0][0]
    with anyio.move_on_after(timeout if timeout is not None else math.inf) as bounded:
        for step, run in steps:
            last_step, last, last_hints = step, "", []
            retry = 0
            delay = _FIRST_RETRY
            while True:
                try:
                    await run()
                    break
                except TransientBackendError as e:
                    retry += 1
                    last, last_hints = _failure_text(url, step, e), failure_hints(url, step, e)
                    log.warning(
                        "not started yet: %s%s; retrying retry=%d in=%gs",
                        last,
                        f" ({last_hints[0]})" if last_hints else "",
                        retry,
                        delay,
                    )
                    await anyio.sleep(delay)
                    delay = min(delay * 2, _MAX_RETRY)
                except BackendError as e:
                    raise CLIError(
                        f"cannot start on {url}: {_failure_text(url, step, e)}",
                        failure_hints(url, step, e),
                    ) from e
    if bounded.cancelled_caught:
        if last:  # (of the step it was at)
            raise GaveUp(f"the last failure: {last}", last_hints)
        raise GaveUp(f"still waiting for: {last_step}", [])


async def start_engine(engine: Any, url: str, timeout: float | None) -> None:
    """``engine.start()``, retried with backoff while it fails for a transient reason (a
    request to a server that has just died, a cluster electing a leader) until ``timeout``
    seconds have passed. Raises CLIError (GaveUp when the time is up)."""
    import time

    import anyio

    from reactive.errors import BackendError, TransientBackendError

    give_up = time.monotonic() + (timeout if timeout is not None else math.inf)
    delay = _FIRST_RETRY
    retry = 0
    while True:
        try:
            await engine.start()
            return
        except TransientBackendError as e:
            if time.monotonic() + delay > give_up:
                raise GaveUp(f"the last failure: {e}", failure_hints(url, "start", e)) from e
            retry += 1
            log.warning("not started yet: %s; retrying retry=%d in=%gs", e, retry, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY)
        except BackendError as e:
            raise CLIError(
                f"cannot start the workflows on {url}: {e}", failure_hints(url, "start", e)
            ) from e


def _failure_text(url: str, step: str, error: BaseException) -> str:
    if step.startswith("connect"):
        return f"cannot connect to NATS at {url}: {error.__cause__ or error}"
    return str(error)
