"""``EngineHost``: TestEngines on an asyncio event loop in the caller's own thread.

A Hypothesis state machine is synchronous; the engine is async. Running the
engine in a thread of its own (an anyio blocking portal) costs two thread
hand-offs per call, several per step. Here the loop runs in the caller's
thread instead: each call runs it until the call's coroutine returns, and in
between the engine's tasks simply wait, as they would for the next message.

The loop is made once per thread and reused by every host of that thread (one
example after another); a host leaves it as it found it: no task of its own.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from reactive.testing._engine import TestEngine

__all__ = ["EngineHost"]

T = TypeVar("T")


async def _hold(te: TestEngine, started: asyncio.Future[None], stop: asyncio.Future[None]) -> None:
    """Enter ``te`` (its task group lives in this task) and stay in it until ``stop``."""
    async with te:
        started.set_result(None)
        await stop


_loops = threading.local()


def _thread_loop() -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop | None = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = _loops.loop = asyncio.new_event_loop()
        atexit.register(_close_loop, loop)
    return loop


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    if not loop.is_closed() and not loop.is_running():
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class EngineHost:
    """An event loop of the caller's thread and the TestEngines running on it."""

    def __init__(self) -> None:
        self.loop = _thread_loop()
        self._closed = False
        # Per engine: the task that holds it open, and what tells that task to leave.
        self._held: dict[int, tuple[asyncio.Task[None], asyncio.Future[None]]] = {}

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop (the engines run meanwhile) and return its result."""
        result = self.loop.run_until_complete(fn(*args))
        self._check_engines()
        return result

    def start(self, te: TestEngine) -> TestEngine:
        """Start ``te`` (``async with te``, held open until ``stop``) and return it settled."""
        started: asyncio.Future[None] = self.loop.create_future()
        stop: asyncio.Future[None] = self.loop.create_future()
        task = self.loop.create_task(_hold(te, started, stop))
        self._held[id(te)] = (task, stop)
        self.loop.run_until_complete(asyncio.wait([started, task], return_when="FIRST_COMPLETED"))
        if task.done():  # it failed to start
            del self._held[id(te)]
            task.result()
        return te

    def stop(self, te: TestEngine) -> None:
        """Stop ``te`` (leave its ``async with``); re-raises what ended it, if it crashed."""
        held = self._held.pop(id(te), None)
        if held is None:
            return
        task, stop = held
        if not stop.done():
            stop.set_result(None)
        self.loop.run_until_complete(asyncio.wait([task]))
        task.result()

    def _check_engines(self) -> None:
        for key, (task, _) in list(self._held.items()):
            if task.done():
                del self._held[key]
                task.result()  # raises what ended it
                raise RuntimeError("a TestEngine stopped by itself")

    def close(self) -> None:
        """Stop every engine still running, and leave the loop with no task of ours."""
        if self._closed:
            return
        self._closed = True
        loop = self.loop
        if loop.is_closed():
            return
        for _task, stop in self._held.values():
            if not stop.done():
                stop.set_result(None)
        tasks = [task for task, _ in self._held.values()]
        self._held.clear()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks))
        rest = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in rest:
            t.cancel()
        if rest:
            loop.run_until_complete(asyncio.wait(rest))
