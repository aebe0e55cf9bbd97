"""``TestEngine``: the real engine on the in-memory backend and a manual clock, with assertions and waits."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import anyio
import msgspec
from anyio.abc import TaskGroup

from reactive.backends.memory import MemoryBackend, PublishedMessage
from reactive.clock import ManualClock
from reactive.codecs import decode, encode
from reactive.dsl.state import ExecutionState, Status
from reactive.dsl.workflow import Workflow, definition_of
from reactive.runtime.engine import Engine
from reactive.subjects import matches_pattern

__all__ = ["PublishedMessage", "TestEngine"]

T = TypeVar("T")
WorkflowRef = type[Workflow] | Workflow | str


class TestEngine:
    """The engine on the in-memory backend with a manual clock, plus assertions.

    Every ``trigger_*``, ``start``, ``callback`` and ``advance`` returns once the
    engine has settled: every event it caused has been processed.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        *workflows: type[Workflow] | Workflow,
        clock: ManualClock | None = None,
        backend: MemoryBackend | None = None,
        settle_timeout: float = 10.0,
        **engine_options: Any,
    ) -> None:
        self.clock = clock or ManualClock()
        self.backend = backend or MemoryBackend(clock=self.clock)
        engine_options.setdefault("workers", 4)
        engine_options.setdefault("outbox_grace", 5.0)
        self._workflows = workflows
        self._engine_options = engine_options
        self.engine = Engine(self.backend, workflows, clock=self.clock, **engine_options)
        self.settle_timeout = settle_timeout
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        self._responders_busy = 0

    async def __aenter__(self) -> TestEngine:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            await self.engine.start()
            stack.push_async_callback(lambda: self.engine.stop())
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        await self.settle()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        if self._stack is not None:
            await self._stack.__aexit__(None, None, None)
        self._stack = None
        self._tg = None

    # ------------------------------------------------------------------ driving

    async def settle(self) -> None:
        """Wait until no event is queued, in flight or undelivered anywhere.

        Raises TimeoutError after ``settle_timeout`` seconds (of real time) without rest.
        """
        give_up = time.monotonic() + self.settle_timeout
        quiet = 0
        while quiet < 8:
            await anyio.sleep(0)
            if (
                self.engine.idle
                and self.backend.idle()
                and self._responders_busy == 0
                and self.engine.ready
            ):
                if nothing_else_ready():
                    return
                quiet += 1
            else:
                quiet = 0
                if time.monotonic() > give_up:
                    raise TimeoutError(f"not at rest after {self.settle_timeout}s")

    async def restart(self, *, down_for: float = 0.0) -> Engine:
        """Stop the engine and start a new one (new instance id, empty memory) on the same backend.

        ``down_for`` moves the clock while no engine runs, so deadlines can pass
        in between. Returns the new engine.
        """
        await self.engine.stop()
        if down_for:
            self.clock.advance(down_for)
        options = {k: v for k, v in self._engine_options.items() if k != "instance_id"}
        self.engine = Engine(self.backend, self._workflows, clock=self.clock, **options)
        await self.engine.start()
        await self.settle()
        return self.engine

    async def advance(self, seconds: float) -> None:
        """Move the clock forward (firing deadlines, timeouts, cooldown ends) and settle."""
        # Move in steps so that timers due in between fire in order, as they would in real
        # time: the backend's message schedules (an execution's time) and the engine's own.
        due = self._next_due()
        target = self.clock.now() + seconds
        while due is not None and due < target:
            self.clock.advance(max(due - self.clock.now(), 0.0))
            await self.settle()
            due = self._next_due()
            if due is not None and due <= self.clock.now():
                break
        self.clock.advance(max(target - self.clock.now(), 0.0))
        await self.settle()

    def _next_due(self) -> float | None:
        dues = (self.engine.timers.next_due(), self.backend.next_schedule())
        return min((d for d in dues if d is not None), default=None)

    async def start(
        self, workflow: WorkflowRef, execution_id: str, state: ExecutionState | None = None
    ) -> ExecutionState:
        """Create an execution (as ``Engine.start_execution``) and settle."""
        st = await self.engine.start_execution(workflow, execution_id, state)
        await self.settle()
        return st

    async def trigger_kv(
        self,
        workflow: WorkflowRef,
        execution_id: str,
        state: ExecutionState | bytes | dict[str, Any],
    ) -> int:
        """Write an execution's state directly (as an outside writer would) and settle. Returns the revision."""
        d = self.engine.registry.get(workflow).definition
        rev = await self.backend.kv_put(d.bucket, d.key(execution_id), encode(state))
        await self.settle()
        return rev

    async def put(self, bucket: str, key: str, value: Any) -> int:
        """Write any key of any bucket (an entity-state bucket, say) and settle."""
        await self.backend.ensure_bucket(bucket)
        rev = await self.backend.kv_put(bucket, key, encode(value))
        await self.settle()
        return rev

    async def trigger_message(
        self,
        subject: str,
        payload: Any,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish a message (a struct, dict, bytes or str) and settle."""
        await self.backend.publish(subject, encode(payload), msg_id=msg_id, headers=headers)
        await self.settle()

    async def cancel(self, workflow: WorkflowRef, execution_id: str, reason: str = "") -> None:
        """Cancel an execution (``Engine.cancel``) and settle."""
        await self.engine.cancel(workflow, execution_id, reason or "cancelled")
        await self.settle()

    async def callback(
        self,
        workflow: WorkflowRef,
        execution_id: str,
        result: Any = None,
        *,
        task_id: str | None = None,
        error: str | None = None,
    ) -> None:
        """Deliver an async task's result (or ``error``) as a worker would, and settle.

        ``task_id`` defaults to the execution's pending task; it is added to a
        dict or struct result that lacks it.
        """
        d = self.engine.registry.get(workflow).definition
        if task_id is None:
            st = self.state(workflow, execution_id)
            task_id = st.pending_task_id if st is not None else ""
        body: dict[str, Any] = {}
        if result is not None:
            body = msgspec.to_builtins(result) if not isinstance(result, dict) else dict(result)
        if not body.get("task_id"):  # missing, or a struct's empty default
            body["task_id"] = task_id
        if error is not None:
            body["error"] = error
        subject = f"{self.engine.callback_prefix}.{d.id}.{execution_id}"
        await self.backend.publish(subject, msgspec.json.encode(body))
        await self.settle()

    def respond(
        self,
        subject: str,
        handler: Callable[[dict[str, Any]], Any | Awaitable[Any]],
    ) -> None:
        """Answer every async request published on ``subject`` like a worker.

        ``handler`` gets the request as a dict (with ``task_id``,
        ``callback_subject`` and ``execution_id``) and returns the result (a
        struct or dict; ``task_id`` is added if missing) or raises to report an
        error. Returning None sends no callback (a worker that never answers).
        """
        assert self._tg is not None, "use respond() inside 'async with TestEngine(...)'"
        self._tg.start_soon(self._responder, subject, handler)

    async def _responder(self, subject: str, handler: Callable[[dict[str, Any]], Any]) -> None:
        async with self.backend.subscribe(subject) as messages:
            async for msg in messages:
                self._responders_busy += 1
                try:
                    request = msgspec.json.decode(msg.data)
                    task_id = msg.headers.get("Reactive-Task-Id") or request.get("task_id", "")
                    callback_subject = msg.headers.get("Reactive-Callback-Subject") or request.get(
                        "callback_subject"
                    )
                    body: dict[str, Any]
                    try:
                        result = handler(request)
                        if inspect.isawaitable(result):
                            result = await result
                        if result is None:
                            continue
                        body = (
                            msgspec.to_builtins(result)
                            if not isinstance(result, dict)
                            else dict(result)
                        )
                        if not body.get("task_id"):  # missing, or a struct's empty default
                            body["task_id"] = task_id
                    except Exception as e:
                        body = {"task_id": task_id, "error": f"{type(e).__name__}: {e}"}
                    await self.backend.publish(callback_subject, msgspec.json.encode(body))
                finally:
                    self._responders_busy -= 1

    # ------------------------------------------------------------------ reading

    def state(self, workflow: WorkflowRef, execution_id: str) -> Any:
        """The execution's current state (typed), or None."""
        d = self.engine.registry.get(workflow).definition
        entry = self.backend.peek(d.bucket, d.key(execution_id))
        if entry is None:
            return None
        return decode(d.state_type, entry.value)

    def executions(self, workflow: WorkflowRef) -> list[Any]:
        """Every execution of the workflow, by key."""
        d = self.engine.registry.get(workflow).definition
        out = []
        for key in self.backend.peek_keys(d.bucket, f"{d.id}.*"):
            st = self.state(workflow, d.execution_id_for(key))
            if st is not None:
                out.append(st)
        return out

    def published(self, subject: str, type: type[T] | None = None) -> list[Any]:
        """Payloads published on ``subject`` (a pattern), decoded into ``type`` (default: JSON as dicts).

        Duplicates a stream dropped are left out.
        """
        out = []
        for m in self.backend.published:
            if m.duplicate or not matches_pattern(m.subject, subject):
                continue
            out.append(
                decode(type, m.data)
                if type is not None
                else msgspec.json.decode(m.data)
                if m.data
                else None
            )
        return out

    def published_messages(self, subject: str = ">") -> list[PublishedMessage]:
        """Every publish on ``subject`` (a pattern), raw, including dropped duplicates."""
        return [m for m in self.backend.published if matches_pattern(m.subject, subject)]

    # ------------------------------------------------------------------ assertions

    def _must(self, workflow: WorkflowRef, execution_id: str) -> Any:
        st = self.state(workflow, execution_id)
        if st is None:
            raise AssertionError(f"no execution {execution_id!r} of {_wf_id(workflow)}")
        return st

    def assert_phase(self, workflow: WorkflowRef, execution_id: str, phase: str) -> None:
        st = self._must(workflow, execution_id)
        assert st.phase == phase, (
            f"{execution_id}: phase is {st.phase!r}, expected {phase!r} (status {st.status.value})"
        )

    def assert_status(self, workflow: WorkflowRef, execution_id: str, status: Status | str) -> None:
        st = self._must(workflow, execution_id)
        expected = Status(status)
        assert st.status is expected, (
            f"{execution_id}: status is {st.status.value!r}, expected {expected.value!r} "
            f"(phase {st.phase!r}, error {st.error!r})"
        )

    def assert_iteration(self, workflow: WorkflowRef, execution_id: str, iteration: int) -> None:
        st = self._must(workflow, execution_id)
        assert st.iteration == iteration, (
            f"{execution_id}: iteration is {st.iteration}, expected {iteration}"
        )

    def assert_state(
        self, workflow: WorkflowRef, execution_id: str, check: Callable[[Any], bool]
    ) -> None:
        st = self._must(workflow, execution_id)
        assert check(st), (
            f"{execution_id}: state does not satisfy {getattr(check, '__name__', check)}: {st!r}"
        )

    def assert_no_execution(self, workflow: WorkflowRef, execution_id: str) -> None:
        assert self.state(workflow, execution_id) is None, f"{execution_id} exists"

    def assert_published(
        self, subject: str, *, count: int | None = None, where: Callable[[Any], bool] | None = None
    ) -> list[Any]:
        """Assert something was published on ``subject`` (exactly ``count`` times if given); returns the payloads."""
        msgs = self.published(subject)
        if where is not None:
            msgs = [m for m in msgs if where(m)]
        if count is None:
            assert msgs, f"nothing published on {subject!r}; published: {_subjects(self.backend)}"
        else:
            assert len(msgs) == count, (
                f"{len(msgs)} published on {subject!r}, expected {count}; published: {_subjects(self.backend)}"
            )
        return msgs

    def assert_not_published(self, subject: str) -> None:
        msgs = self.published(subject)
        assert not msgs, f"{len(msgs)} published on {subject!r}: {msgs!r}"

    def assert_payload(self, subject: str, expected: Any, *, index: int = -1) -> None:
        """Assert the ``index``-th payload on ``subject`` (default the last) equals ``expected``."""
        msgs = self.published(
            subject, type(expected) if isinstance(expected, msgspec.Struct) else None
        )
        assert msgs, f"nothing published on {subject!r}"
        assert msgs[index] == expected, (
            f"payload on {subject!r} is {msgs[index]!r}, expected {expected!r}"
        )

    # ------------------------------------------------------------------ waits

    async def wait_for(
        self,
        check: Callable[[], bool],
        *,
        timeout: float = 5.0,
        advance: float = 0.0,
        what: str = "condition",
    ) -> None:
        """Settle until ``check()`` holds, moving the clock by ``advance`` each round (real-time ``timeout``)."""
        with anyio.fail_after(timeout):
            while True:
                await self.settle()
                if check():
                    return
                if advance:
                    await self.advance(advance)
                else:
                    await anyio.sleep(0.001)

    async def wait_for_status(
        self,
        workflow: WorkflowRef,
        execution_id: str,
        status: Status | str,
        *,
        timeout: float = 5.0,
        advance: float = 0.0,
    ) -> Any:
        want = Status(status)

        def check() -> bool:
            st = self.state(workflow, execution_id)
            return st is not None and st.status is want

        await self.wait_for(check, timeout=timeout, advance=advance, what=f"status {want.value}")
        return self.state(workflow, execution_id)

    async def wait_for_phase(
        self,
        workflow: WorkflowRef,
        execution_id: str,
        phase: str,
        *,
        timeout: float = 5.0,
        advance: float = 0.0,
    ) -> Any:
        def check() -> bool:
            st = self.state(workflow, execution_id)
            return st is not None and st.phase == phase

        await self.wait_for(check, timeout=timeout, advance=advance, what=f"phase {phase}")
        return self.state(workflow, execution_id)

    async def wait_for_publish(
        self, subject: str, *, count: int = 1, timeout: float = 5.0, advance: float = 0.0
    ) -> list[Any]:
        await self.wait_for(
            lambda: len(self.published(subject)) >= count, timeout=timeout, advance=advance
        )
        return self.published(subject)


def nothing_else_ready() -> bool:
    """Whether no other task of the running asyncio loop can run now (False when unknown).

    Every task is then waiting: for a message, a change, a timer of the (manual) clock.
    With nothing in flight anywhere, that is rest; without this check, rest is assumed
    after eight loop turns in a row that found nothing in flight. (CPython's asyncio
    loops keep the callbacks to run next in ``_ready``; other loops fall back.)
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        return False
    ready = getattr(loop, "_ready", None)
    return ready is not None and not ready


def _wf_id(workflow: WorkflowRef) -> str:
    return workflow if isinstance(workflow, str) else definition_of(workflow).id


def _subjects(backend: MemoryBackend) -> list[str]:
    """Every subject something was published on (for assertion messages)."""
    return sorted({m.subject for m in backend.published})
