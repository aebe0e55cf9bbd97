"""The web view's index of executions: built once from the KV, kept live by a watch.

One watch of the meta bucket (``wf.*``) finds the announced workflows; one watch of each
workflow's bucket (``<workflow>.*``) replays every execution's latest state, then every
change. Each state is decoded to its :class:`~reactive.cli.executions.Head` only (the
timeline is skipped), and kept in memory: per workflow, the counts by status and phase,
and the executions ordered by creation time, so that a page of the list is a slice and a
filtered page one pass over the rows, never a read of NATS.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import msgspec

from reactive._events import new_event
from reactive.cli.executions import Head, read_head

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from reactive.backends.base import Backend, KVEntry
    from reactive.meta import WorkflowInfo

__all__ = ["FAILED", "RATE_WINDOW", "ExecutionIndex", "Page", "Row"]

log = logging.getLogger("reactive.ui")

#: The window of the recent transition and failure rates, in seconds.
RATE_WINDOW = 300.0
FAILED = frozenset({"failed", "escalated", "timed_out"})
_RETRY = 2.0  # a bucket that is not there yet is looked for again this often


class Row:
    """One execution as the list shows it."""

    __slots__ = ("created", "exec_id", "head", "revision", "workflow")

    def __init__(self, workflow: str, exec_id: str, head: Head, revision: int) -> None:
        self.workflow = workflow
        self.exec_id = exec_id
        self.head = head
        self.revision = revision
        created = head.created_at or head.updated_at
        self.created = created.timestamp() if created is not None else 0.0

    @property
    def key(self) -> str:
        return f"{self.workflow}.{self.exec_id}"


@dataclass
class Page:
    """A page of the list: its rows, how many match in all, where it starts."""

    rows: list[Row]
    total: int
    offset: int


@dataclass
class _Workflow:
    info: WorkflowInfo
    rows: dict[str, Row] = field(default_factory=dict)
    order: list[tuple[float, str]] = field(default_factory=list)  # (created, id), oldest first
    statuses: Counter[str] = field(default_factory=Counter)
    phases: Counter[str] = field(default_factory=Counter)
    # (when, whether it failed) of the transitions seen within RATE_WINDOW
    recent: deque[tuple[float, bool]] = field(default_factory=deque)


class ExecutionIndex:
    """Every announced workflow's executions, in memory, live. ``run`` keeps it up to date."""

    def __init__(
        self,
        backend: Backend,
        meta_bucket: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.meta_bucket = meta_bucket
        self.clock = clock
        self._workflows: dict[str, _Workflow] = {}
        self._watched: set[tuple[str, str, str]] = set()  # (workflow, bucket, prefix)
        self._changed = new_event()
        self.version = 0

    # -- reading ------------------------------------------------------------------

    @property
    def workflows(self) -> dict[str, WorkflowInfo]:
        return {wf_id: w.info for wf_id, w in sorted(self._workflows.items())}

    def __len__(self) -> int:
        return sum(len(w.rows) for w in self._workflows.values())

    def get(self, workflow: str, exec_id: str) -> Row | None:
        w = self._workflows.get(workflow)
        return w.rows.get(exec_id) if w is not None else None

    def statuses(self, workflow: str) -> Counter[str]:
        w = self._workflows.get(workflow)
        return Counter(w.statuses) if w is not None else Counter()

    def phases(self, workflow: str | None = None) -> list[str]:
        found: set[str] = set()
        for wf_id, w in self._workflows.items():
            if workflow is None or wf_id == workflow:
                found.update(p for p, n in w.phases.items() if n > 0)
        return sorted(found)

    def rates(self, workflow: str) -> tuple[int, int]:
        """Transitions and failures seen within the last RATE_WINDOW seconds."""
        w = self._workflows.get(workflow)
        if w is None:
            return 0, 0
        since = self.clock() - RATE_WINDOW
        while w.recent and w.recent[0][0] < since:
            w.recent.popleft()
        return len(w.recent), sum(1 for at, failed in w.recent if failed and at >= since)

    def query(
        self,
        workflow: str | None = None,
        statuses: frozenset[str] | None = None,
        phase: str | None = None,
        search: str = "",
        offset: int = 0,
        limit: int = 50,
    ) -> Page:
        """The executions that match, newest first: ``limit`` of them from ``offset``."""
        chosen = [w for wf_id, w in sorted(self._workflows.items()) if workflow in (None, wf_id)]
        if statuses is None and phase is None and not search and len(chosen) <= 1:
            if not chosen:
                return Page([], 0, offset)
            w = chosen[0]
            n = len(w.order)
            picked = w.order[max(0, n - offset - limit) : max(0, n - offset)]
            return Page([w.rows[i] for _, i in reversed(picked)], n, offset)
        rows: list[Row] = []
        total = 0
        end = offset + limit
        for row in self._newest_first(chosen):
            head = row.head
            if statuses is not None and head.status not in statuses:
                continue
            if phase is not None and head.phase != phase:
                continue
            if search and search not in row.exec_id:
                continue
            if offset <= total < end:
                rows.append(row)
            total += 1
        return Page(rows, total, offset)

    @staticmethod
    def _newest_first(chosen: list[_Workflow]) -> Iterator[Row]:
        if len(chosen) == 1:
            w = chosen[0]
            for _, exec_id in reversed(w.order):
                yield w.rows[exec_id]
            return
        merged = sorted(
            ((c, wi, i) for wi, w in enumerate(chosen) for c, i in w.order), reverse=True
        )
        for _, wi, exec_id in merged:
            yield chosen[wi].rows[exec_id]

    async def wait_changed(self, version: int) -> int:
        """Wait until the index is newer than ``version``; its version then."""
        while self.version <= version:
            await self._changed.wait()
        return self.version

    # -- keeping it up to date ------------------------------------------------------

    def _bump(self) -> None:
        self.version += 1
        changed, self._changed = self._changed, new_event()
        changed.set()

    def announce(self, info: WorkflowInfo) -> bool:
        """Take a workflow's announcement; True if its executions are to be watched anew."""
        w = self._workflows.get(info.id)
        if w is None:
            self._workflows[info.id] = _Workflow(info)
        else:
            w.info = info
        self._bump()
        target = (info.id, info.bucket, info.key_prefix)
        if target in self._watched:
            return False
        self._watched.add(target)
        return True

    def apply(self, workflow: str, entry: KVEntry) -> None:
        """One revision of an execution's state (or its deletion)."""
        w = self._workflows.get(workflow)
        if w is None:
            return
        exec_id = entry.key[len(w.info.key_prefix) :]
        old = w.rows.get(exec_id)
        if old is not None and entry.revision <= old.revision:
            return  # a replay after a lost watch: seen already
        if old is not None:
            self._drop(w, old)
        if entry.operation == "PUT":
            head = read_head(entry.value) or Head(status="undecodable")
            row = Row(workflow, exec_id, head, entry.revision)
            w.rows[exec_id] = row
            bisect.insort(w.order, (row.created, exec_id))
            w.statuses[head.status] += 1
            w.phases[head.phase] += 1
            updated = head.updated_at.timestamp() if head.updated_at is not None else 0.0
            if updated >= self.clock() - RATE_WINDOW:
                failed = head.status in FAILED and (old is None or old.head.status not in FAILED)
                w.recent.append((updated, failed))
        self._bump()

    def _drop(self, w: _Workflow, row: Row) -> None:
        del w.rows[row.exec_id]
        at = bisect.bisect_left(w.order, (row.created, row.exec_id))
        if at < len(w.order) and w.order[at] == (row.created, row.exec_id):
            del w.order[at]
        w.statuses[row.head.status] -= 1
        w.phases[row.head.phase] -= 1

    async def run(self) -> None:
        """Watch the announcements and every announced workflow's bucket, until cancelled."""
        async with anyio.create_task_group() as tg:
            await self._announcements(tg)

    async def _announcements(self, tg: TaskGroup) -> None:
        from reactive.errors import BackendError
        from reactive.meta import WorkflowInfo

        while True:
            try:
                async with self.backend.kv_watch(self.meta_bucket, "wf.*") as entries:
                    async for entry in entries:
                        if entry.operation != "PUT":
                            continue
                        try:
                            info = msgspec.json.decode(entry.value, type=WorkflowInfo)
                        except (msgspec.DecodeError, msgspec.ValidationError):
                            continue
                        if self.announce(info):
                            tg.start_soon(self._executions, info)
            except BackendError as e:
                log.debug("no announcements in %s yet: %s", self.meta_bucket, e)
            await anyio.sleep(_RETRY)

    async def _executions(self, info: WorkflowInfo) -> None:
        from reactive.errors import BackendError

        while True:
            try:
                async with self.backend.kv_watch(info.bucket, f"{info.key_prefix}*") as entries:
                    async for entry in entries:
                        self.apply(info.id, entry)
            except BackendError as e:
                log.debug("no executions of %s in %s yet: %s", info.id, info.bucket, e)
            await anyio.sleep(_RETRY)
