"""Hypothesis strategies and a stateful machine for property-based tests of rule sets.

Hypothesis is a test dependency: import this module from tests only.

Strategies:

* ``values(tp)``: values of any type msgspec can encode and decode (structs,
  enums, literals, unions, collections, constrained ``Annotated`` types...),
  drawn so that they survive a JSON round trip.
* ``messages(MsgType, **overrides)``: message structs; ``overrides`` fix or
  draw single fields.
* ``states(StateType, phases=..., **overrides)``: execution states with the
  base fields kept consistent (status from ``Status``, ``iteration >= 0``, the
  pending task set exactly when waiting, ``completed_at`` exactly when terminal).
* ``events(Workflow, execution_ids=..., phases=..., max_advance=...)``: trigger
  events derived from a workflow's compiled definition: messages on each
  message rule's subject, callbacks for pending tasks, clock advances, and
  outside writes of state. Each is a small frozen dataclass with
  ``async apply(test_engine)``.

The machine: ``workflow_test(*workflows, invariants=[...])`` is a property test
(a ``unittest.TestCase`` pytest collects); ``workflow_machine(*workflows,
**options)`` (or subclass ``WorkflowMachine`` and set ``workflows``) gives the
``hypothesis.stateful.RuleBasedStateMachine`` behind it, which runs a
``TestEngine`` and, after every step, checks the engine's invariants on every
execution (see ``WorkflowMachine``), and yours: functions of an ``Execution``
(its state, timeline and the messages it published)::

    from reactive.testing.strategies import Execution, workflow_test

    def released_when_declined(execution: Execution) -> None:
        if "payment_declined" in execution.phases:
            assert execution.sent("inventory.release")

    TestOrders = workflow_test(OrderSaga, invariants=[released_when_declined])

Each example reports what it reached (rules fired, results handled, phases
visited, how executions ended) to Hypothesis's statistics (``pytest
--hypothesis-show-statistics``); a run that passes warns (``UnreachedWarning``)
of the rules, phases and terminal statuses no example reached.
"""

from __future__ import annotations

from reactive.testing._coverage import Coverage, UnreachedWarning
from reactive.testing._events import (
    DEFAULT_EXECUTION_IDS as DEFAULT_EXECUTION_IDS,  # events()' default, kept importable
)
from reactive.testing._events import (
    Advance,
    BadMessage,
    Callback,
    Cancel,
    Event,
    Message,
    Restart,
    WriteKey,
    WriteState,
    events,
    phases_of,
)
from reactive.testing._invariants import Execution
from reactive.testing._machine import (
    WorkflowMachine,
    machine_settings,
    workflow_machine,
    workflow_test,
)
from reactive.testing._states import execution_ids, states
from reactive.testing._values import messages, values

__all__ = [
    "Advance",
    "BadMessage",
    "Callback",
    "Cancel",
    "Coverage",
    "Event",
    "Execution",
    "Message",
    "Restart",
    "UnreachedWarning",
    "WorkflowMachine",
    "WriteKey",
    "WriteState",
    "events",
    "execution_ids",
    "machine_settings",
    "messages",
    "phases_of",
    "states",
    "values",
    "workflow_machine",
    "workflow_test",
]

# Shown as reactive.testing.strategies.X, where users import them from. The event
# dataclasses, Execution and Coverage keep their module: dataclasses and Hypothesis resolve their
# annotations there.
for _obj in (
    UnreachedWarning,
    WorkflowMachine,
    events,
    execution_ids,
    machine_settings,
    messages,
    phases_of,
    states,
    values,
    workflow_machine,
    workflow_test,
):
    _obj.__module__ = __name__
del _obj
