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

__all__ = ["GaveUp", "failure_hints", "prepare", "setup_steps", "start_engine", "startup_failure"]

log = logging.getLogger("reactive.serve")

_FIRST_RETRY = 0.25  # seconds; doubled after each failure, up to _MAX_RETRY
# (What fails at start is mostly a cluster electing leaders, over in seconds: a retry
# each second finds the new leader within a second of its election.)
_MAX_RETRY = 1.0
# Each try of a step after the connection is cut short after _FIRST_TRY seconds (for
# _SHORT_TRIES seconds, then twice as long each time, up to the backend's own request
# timeout, for a server that is slow rather than leaderless): a request sent while a
# group has no leader gets no answer at all, so the try that finds the new leader is the
# one sent after its election, and a short try sends it sooner. (nats-server elects a
# leader 4-9 s after the last one's last heartbeat.) (A node killed as the engine
# started: the bucket's new leader came 3.6-6.6 s later, the start 1.1-3.2 s after it
# with the full 2 s of every try; `benchmarks/restart.py --cluster --kill-node`.)
_FIRST_TRY = 0.5
_SHORT_TRIES = 12.0
_AFTER_TIMEOUT = 0.05
_LASTING = 5  # tries in a row a trigger's start fails the same way before serve gives up  # seconds before the next try of a step whose try timed out


class GaveUp(Exception):
    """The startup deadline passed: what failed last (or the step it still waited for)."""

    def __init__(self, message: str, hints: list[str]) -> None:
        super().__init__(message)
        self.hints = hints


def setup_steps(
    backend: NatsBackend, engine: Engine, workflows: list[WorkflowDef], url: str
) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """What the engine needs from NATS before it starts, each step named, in order.

    The connection, the meta bucket, every bucket the workflows use: the calls the
    engine's own start makes, done here first so a transient failure is retried (they
    are idempotent and cached, so the engine's start repeats none of the slow ones). The
    streams are made by the triggers that consume them, each retrying on its own once the
    engine started (``Engine.start(wait=False)``).
    """
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        (f"connect to NATS at {url}", backend.start),
        ("check the server's version and features", backend.check_server),
        (f"ensure bucket {engine.meta_bucket}", lambda: backend.ensure_bucket(engine.meta_bucket)),
    ]
    buckets = {d.bucket: None for d in workflows}
    for d in workflows:
        for r in d.rules:
            if r.bucket:
                buckets[r.bucket] = None
    for bucket in buckets:
        steps.append((f"ensure bucket {bucket}", partial(backend.ensure_bucket, bucket)))
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
    steps: list[tuple[str, Callable[[], Awaitable[None]]]],
    url: str,
    timeout: float | None,
    try_timeout: float = 5.0,
) -> None:
    """Run the setup steps, retrying transient failures with backoff (each retry logged,
    naming what failed) until ``timeout`` seconds have passed; a failure that retrying cannot
    heal ends it at once. The connection and the server's check come first; the steps after
    them (buckets and streams, each its own group of servers in a cluster) run side by side.
    Each try of those is cut short after _FIRST_TRY seconds for _SHORT_TRIES seconds, then
    after twice as long each time, up to ``try_timeout`` (the backend's request timeout).
    Raises CLIError, or GaveUp when the time is up."""
    import anyio

    failing: dict[str, tuple[str, list[str]]] = {}  # step -> its last failure and hints
    waiting = [name for name, _ in steps]
    with anyio.move_on_after(timeout if timeout is not None else math.inf) as bounded:
        for step, run in steps[:2]:
            await _step(step, run, url, None, failing)
            waiting.remove(step)
        broken: list[CLIError] = []
        async with anyio.create_task_group() as tg:
            for step, run in steps[2:]:

                async def one(step: str = step, run: Callable[[], Awaitable[None]] = run) -> None:
                    try:
                        await _step(step, run, url, try_timeout, failing)
                    except CLIError as e:  # (retrying cannot heal it: the others stop too)
                        broken.append(e)
                        tg.cancel_scope.cancel()
                    else:
                        waiting.remove(step)

                tg.start_soon(one)
        if broken:
            raise broken[0]
    if bounded.cancelled_caught:
        for step in waiting:
            if step in failing:
                last, hints = failing[step]
                raise GaveUp(f"the last failure: {last}", hints)
        raise GaveUp(f"still waiting for: {waiting[0] if waiting else steps[-1][0]}", [])


async def _step(
    step: str,
    run: Callable[[], Awaitable[None]],
    url: str,
    try_timeout: float | None,
    failing: dict[str, tuple[str, list[str]]],
) -> None:
    """One setup step, tried until it succeeds (see ``prepare``); its failures go into
    ``failing``. ``try_timeout`` None: tries are not cut short (the connection)."""
    import time

    import anyio

    from reactive.errors import BackendError, TransientBackendError

    retry = 0
    delay = _FIRST_RETRY
    began = time.monotonic()
    cut = _FIRST_TRY
    while True:
        limit = None if try_timeout is None else min(cut, try_timeout)
        try:
            with anyio.fail_after(limit):
                await run()
            failing.pop(step, None)
            return
        except TimeoutError as e:  # (this try cut short: no answer yet)
            retry += 1
            last, hints = f"{step}: no answer in {limit:g}s", failure_hints(url, step, e)
            failing[step] = (last, hints)
            log.warning(
                "not started yet: %s%s; retrying retry=%d",
                last,
                f" ({hints[0]})" if hints else "",
                retry,
            )
            if time.monotonic() - began > _SHORT_TRIES:
                cut *= 2
            await anyio.sleep(_AFTER_TIMEOUT)
        except TransientBackendError as e:
            retry += 1
            last, hints = _failure_text(url, step, e), failure_hints(url, step, e)
            failing[step] = (last, hints)
            log.warning(
                "not started yet: %s%s; retrying retry=%d in=%gs",
                last,
                f" ({hints[0]})" if hints else "",
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


async def start_engine(engine: Any, url: str, timeout: float | None) -> None:
    """``engine.start(wait=False)``, retried with backoff while it fails for a transient
    reason (a request to a server that has just died, a cluster electing a leader) until
    ``timeout`` seconds have passed. Raises CLIError (GaveUp when the time is up). The
    triggers then start on their own (``startup_failure``)."""
    import time

    import anyio

    from reactive.errors import BackendError, TransientBackendError

    give_up = time.monotonic() + (timeout if timeout is not None else math.inf)
    delay = _FIRST_RETRY
    retry = 0
    while True:
        try:
            await engine.start(wait=False)
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


def startup_failure(engine: Any, url: str) -> CLIError | None:
    """A failure that keeps one of the engine's triggers from running and that retrying
    does not heal (a stream made otherwise than it needs), as serve ends with it: not
    transient, and _LASTING tries in a row. (On a cluster, what another engine has just
    made may be "not found" for a moment: one try is not enough to tell.)"""
    from reactive.errors import TransientBackendError

    for what, (error, tries) in engine.startup_failures.items():
        if not isinstance(error, TransientBackendError) and tries >= _LASTING:
            return CLIError(
                f"cannot start the {what} on {url}: {error}", failure_hints(url, what, error)
            )
    return None


def _failure_text(url: str, step: str, error: BaseException) -> str:
    if step.startswith("connect"):
        return f"cannot connect to NATS at {url}: {error.__cause__ or error}"
    return str(error)
