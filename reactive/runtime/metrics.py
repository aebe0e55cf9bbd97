"""Prometheus metrics with the reference's names and labels, plus what an operator needs."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.values import MutexValue

__all__ = ["METRICS", "REGISTRY", "EngineMetrics", "fast_child"]

REGISTRY = CollectorRegistry(auto_describe=True)
_DURATION_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400, 86400)
_FAST_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5)


class EngineMetrics:
    """Counters, gauges and histograms of one process; labels carry workflow and rule ids."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        r = registry
        self.rule_evaluations = Counter(
            "reactive_rule_evaluations",
            "Rule evaluations",
            ["workflow", "rule", "fired"],
            registry=r,
        )
        self.action_dispatches = Counter(
            "reactive_action_dispatches",
            "Actions dispatched",
            ["workflow", "rule", "action"],
            registry=r,
        )
        self.executions_created = Counter(
            "reactive_executions_created", "Executions started", ["workflow"], registry=r
        )
        self.executions_completed = Counter(
            "reactive_executions_completed", "Executions completed", ["workflow"], registry=r
        )
        self.executions_failed = Counter(
            "reactive_executions_failed", "Executions failed", ["workflow", "reason"], registry=r
        )
        self.executions_escalated = Counter(
            "reactive_executions_escalated",
            "Executions escalated",
            ["workflow", "reason"],
            registry=r,
        )
        self.executions_timed_out = Counter(
            "reactive_executions_timed_out", "Executions timed out", ["workflow"], registry=r
        )
        self.executions_cancelled = Counter(
            "reactive_executions_cancelled", "Executions cancelled", ["workflow"], registry=r
        )
        self.execution_duration = Histogram(
            "reactive_execution_duration_seconds",
            "Time from start to a terminal state",
            ["workflow", "status"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.callbacks_received = Counter(
            "reactive_callbacks_received",
            "Async callbacks received",
            ["workflow", "rule", "status"],
            registry=r,
        )
        self.callback_latency = Histogram(
            "reactive_callback_latency_seconds",
            "Time from an async request to its callback",
            ["workflow", "rule"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.pending_callbacks = Gauge(
            "reactive_pending_callbacks",
            "Async tasks parked by this process awaiting a callback",
            ["workflow"],
            registry=r,
        )
        self.unknown_executions = Counter(
            "reactive_unknown_executions",
            "Messages terminated: for executions that do not exist, whose rules may not start them",
            ["workflow"],
            registry=r,
        )
        self.partitions_held = Gauge(
            "reactive_partitions_held",
            "Partitions of a workflow's watched bucket this process holds now",
            ["workflow", "bucket"],
            registry=r,
        )
        self.partition_members = Gauge(
            "reactive_partition_members",
            "Processes sharing a workflow's partitions of a bucket, as last counted",
            ["workflow", "bucket"],
            registry=r,
        )
        self.rule_duration = Histogram(
            "reactive_rule_duration_seconds",
            "Time to evaluate and dispatch a firing rule",
            ["workflow", "rule"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.poison_messages = Counter(
            "reactive_poison_messages",
            "Messages that could not be decoded, terminated",
            ["workflow", "kind"],
            registry=r,
        )
        self.state_decode_errors = Counter(
            "reactive_state_decode_errors",
            "State values that could not be decoded",
            ["workflow"],
            registry=r,
        )
        self.cas_conflicts = Counter(
            "reactive_cas_conflicts", "Compare-and-set writes that lost", ["workflow"], registry=r
        )
        self.redeliveries = Counter(
            "reactive_redeliveries", "Messages seen more than once", ["workflow"], registry=r
        )
        self.dispatch_errors = Counter(
            "reactive_dispatch_errors",
            "Errors while evaluating or dispatching",
            ["workflow", "rule"],
            registry=r,
        )
        self.invalid_ids = Counter(
            "reactive_invalid_execution_ids",
            "Messages refused for an invalid execution id",
            ["workflow"],
            registry=r,
        )
        self.invalid_keys = Counter(
            "reactive_invalid_keys",
            "Revisions of a watched bucket skipped for a key longer than the engine handles",
            ["bucket"],
            registry=r,
        )


METRICS = EngineMetrics()


# ---------------------------------------------------------------------------
# Lock-free handles for the hot path
# ---------------------------------------------------------------------------
#
# prometheus_client takes a lock for every increment; the engine counts several
# things per event (each rule evaluation, each dispatch, each rule's duration), all
# from its one event-loop thread. These handles write the same values without
# the lock: a scrape (another thread) reads a float the GIL hands over whole, and
# there is one writer. Multiprocess values (PROMETHEUS_MULTIPROC_DIR) are left to
# prometheus_client.


class _FastCounter:
    __slots__ = ("_value",)

    def __init__(self, value: MutexValue) -> None:
        self._value = value

    def inc(self, amount: float = 1.0) -> None:
        self._value._value += amount


class _FastGauge(_FastCounter):
    __slots__ = ()

    def dec(self, amount: float = 1.0) -> None:
        self._value._value -= amount


class _FastHistogram:
    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        self._bounds: list[float] = list(child._upper_bounds)
        self._buckets: list[MutexValue] = list(child._buckets)
        self._sum: MutexValue = child._sum

    def observe(self, amount: float) -> None:
        self._sum._value += amount
        i = bisect_left(self._bounds, amount)  # the first bound >= amount (the last is +Inf)
        if i < len(self._buckets):
            self._buckets[i]._value += 1


def fast_child(metric: Any, child: Any) -> Any:
    """A handle on ``child`` (a labelled child of ``metric``) with the same inc/dec/observe, lock-free."""
    if isinstance(metric, Histogram):
        if all(type(b) is MutexValue for b in (*child._buckets, child._sum)):
            return _FastHistogram(child)
    elif isinstance(metric, (Counter, Gauge)) and type(child._value) is MutexValue:
        return _FastGauge(child._value) if isinstance(metric, Gauge) else _FastCounter(child._value)
    return child
