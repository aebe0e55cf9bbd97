"""The registry: workflows, their bound methods, and the indexes that route events to rules."""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reactive.dsl.definition import RuleDef, TriggerMode, WorkflowDef
from reactive.dsl.workflow import Workflow, definition_of
from reactive.errors import ReactiveError
from reactive.subjects import PatternIndex

__all__ = ["BoundWorkflow", "Registry", "Subscription"]


@dataclass(eq=False)
class BoundWorkflow:
    """A definition with the instance whose methods its rules call."""

    definition: WorkflowDef
    instance: Any
    methods: dict[str, Callable[..., Any]] = field(default_factory=dict)
    handlers: dict[str, Callable[..., Any]] = field(default_factory=dict)
    # A failed task's handler and a timed-out task's, per async rule that has one.
    on_error: dict[str, Callable[..., Any]] = field(default_factory=dict)
    on_timeout: dict[str, Callable[..., Any]] = field(default_factory=dict)
    # The workflow's max-iterations and cancellation handlers, if it has them.
    on_limit: Callable[..., Any] | None = None
    on_cancel: Callable[..., Any] | None = None
    # The engine's metric handles per rule, by the rule's index (filled as rules are used).
    evaluated: list[Any] = field(default_factory=list)
    dispatched: list[Any] = field(default_factory=list)


@dataclass(eq=False)
class Subscription:
    """The message rules of one workflow on one subject (and stream)."""

    bound: BoundWorkflow
    subject: str
    stream: str | None
    rules: list[RuleDef]

    @property
    def scheduled(self) -> bool:
        """A scheduled rule's runs, stored on the engine's timer stream."""
        return bool(self.rules[0].schedule)

    @property
    def durable(self) -> str:
        return f"reactive_{self.bound.definition.id}_{self._digest}".replace("-", "_")

    @property
    def queue(self) -> str:
        """The core subscription's queue group: one per workflow and subject.

        Engines serving the workflow share it, so each message reaches one of them;
        it names the subject because NATS forms one group of every subscription with
        that queue name, whatever its subject: rules on overlapping subjects (``a.*``
        and ``a.>``) in one group would split the messages between them.
        """
        return f"reactive.{self.bound.definition.id}.{self._digest}"

    @property
    def _digest(self) -> str:
        return hashlib.sha1(self.subject.encode()).hexdigest()[:10]


class Registry:
    """Registered workflows and the indexes the runtime routes with."""

    def __init__(self) -> None:
        self.workflows: dict[str, BoundWorkflow] = {}
        self._kv: dict[str, PatternIndex[tuple[BoundWorkflow, RuleDef]]] = {}
        self.subscriptions: dict[tuple[str, str, str | None], Subscription] = {}
        # match_kv's answers by (bucket, key): an execution's key is matched once per
        # event, several events per execution. Emptied when a workflow is added or it is full.
        self._matches: dict[tuple[str, str], list[tuple[BoundWorkflow, list[RuleDef]]]] = {}
        # The distinct answers, by the ids of what they hold (emptied with _matches).
        self._answers: dict[tuple[Any, ...], list[tuple[BoundWorkflow, list[RuleDef]]]] = {}

    def add(self, workflow: type[Workflow] | Workflow) -> BoundWorkflow:
        definition = definition_of(workflow)
        if definition.id in self.workflows:
            raise ReactiveError(f"workflow {definition.id!r} is already registered")
        instance = workflow() if isinstance(workflow, type) else workflow
        bound = BoundWorkflow(definition, instance)
        slots = max((r.index for r in definition.rules), default=-1) + 1
        bound.evaluated = [None] * slots
        bound.dispatched = [None] * slots
        if definition.limit_handler_name:
            bound.on_limit = getattr(instance, definition.limit_handler_name)
        if definition.cancel_handler_name:
            bound.on_cancel = getattr(instance, definition.cancel_handler_name)
        for r in definition.rules:
            bound.methods[r.id] = getattr(instance, r.method_name)
            if r.result_handler_name:
                bound.handlers[r.id] = getattr(instance, r.result_handler_name)
            if r.error_handler_name:
                bound.on_error[r.id] = getattr(instance, r.error_handler_name)
            if r.timeout_handler_name:
                bound.on_timeout[r.id] = getattr(instance, r.timeout_handler_name)
        self.workflows[definition.id] = bound
        self.forget_matches()
        for r in definition.rules:
            if r.mode is TriggerMode.STATE:
                self._kv.setdefault(r.bucket, PatternIndex()).add(r.pattern, (bound, r))
            else:
                key = (definition.id, r.subject, r.stream)
                sub = self.subscriptions.get(key)
                if sub is None:
                    sub = self.subscriptions[key] = Subscription(bound, r.subject, r.stream, [])
                sub.rules.append(r)
        return bound

    def get(self, workflow: str | type[Workflow] | Workflow) -> BoundWorkflow:
        wf_id = workflow if isinstance(workflow, str) else definition_of(workflow).id
        try:
            return self.workflows[wf_id]
        except KeyError:
            raise ReactiveError(f"workflow {wf_id!r} is not registered") from None

    def forget_matches(self) -> None:
        """Empty the cache of match_kv's answers."""
        self._matches = {}
        self._answers = {}

    def match_kv(self, bucket: str, key: str) -> list[tuple[BoundWorkflow, list[RuleDef]]]:
        """The workflows with rules watching ``key``, each with those rules in definition order.

        The answer is shared between calls: callers must not change it.
        """
        k = (bucket, key)
        found = self._matches.get(k)
        if found is None:
            if len(self._matches) >= _MATCHES_MAX:
                self.forget_matches()
            found = self._match_kv(bucket, key)
            # Keys of one workflow mostly match the same rules: one shared answer for
            # them all, instead of three new objects cached per key.
            # (A rule belongs to one workflow: the rules' ids tell the answers apart.)
            ids = (
                tuple(map(id, found[0][1]))
                if len(found) == 1
                else tuple(id(r) for _, rules in found for r in rules)
            )
            shared = self._answers.setdefault(ids, found)
            found = self._matches[k] = shared
        return found

    def _match_kv(self, bucket: str, key: str) -> list[tuple[BoundWorkflow, list[RuleDef]]]:
        index = self._kv.get(bucket)
        if index is None:
            return []
        hits = index.match(key)
        if not hits:
            return []
        if len(hits) == 1:
            return [(hits[0][0], [hits[0][1]])]
        grouped: dict[int, tuple[BoundWorkflow, list[RuleDef]]] = {}
        for bound, r in hits:
            entry = grouped.get(id(bound))
            if entry is None:
                grouped[id(bound)] = (bound, [r])
            else:
                entry[1].append(r)
        out = list(grouped.values())
        for _, rules in out:
            rules.sort(key=_by_index)
        return out


_MATCHES_MAX = 10_000
_by_index = operator.attrgetter("index")
