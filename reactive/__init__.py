"""reactive: a reactive workflow engine for Python on NATS JetStream.

Workflows are classes whose methods carry ``@rule`` decorators; state lives in
NATS KV, written by compare-and-set.

This module is the table of contents of what users write and run. Beside it:

* ``reactive.conditions``: the ``@rule(when=...)`` helpers (``phase_is``, ``has_message``, ...);
* ``reactive.testing``: ``TestEngine``, the engine in memory for tests, and
  ``reactive.testing.strategies`` for property-based tests;
* ``reactive.compiled``: what a workflow class compiles to (``WorkflowDef``, ``RuleDef``,
  ``TriggerMode``, ``ActionType``), for tools;
* ``python -m reactive``: the command line (``serve``, ``start``, ``list``, ``show``, ...).
"""

from __future__ import annotations

import msgspec as _msgspec

# --- writing a workflow: the class, its rules, its state, what a rule sees and does
from reactive.dsl.context import RuleContext
from reactive.dsl.mutators import chain, increment_iteration, set_error, transition
from reactive.dsl.rules import on_max_iterations, rule, when_cancelled
from reactive.dsl.schedule import Schedule, ScheduledRun
from reactive.dsl.state import (
    CallbackFields,
    ExecutionState,
    LimitReached,
    Retry,
    Status,
    TaskFailure,
    TimelineEntry,
)
from reactive.dsl.workflow import Workflow, definition_of

# isort: split
# --- what an execution publishes when it ends (on_complete, on_fail, on_escalate)
from reactive.dsl.state import (
    WorkflowCancellationEvent,
    WorkflowCompletionEvent,
    WorkflowEscalationEvent,
    WorkflowFailureEvent,
)

# isort: split
# --- running workflows: the engine, where state and messages live, its clock
from reactive.backends.memory import MemoryBackend
from reactive.backends.nats import NatsBackend
from reactive.backends.server import NatsServer
from reactive.clock import Clock, ManualClock, SystemClock
from reactive.runtime.engine import Engine

# isort: split
# --- errors: one root, ReactiveError
from reactive.errors import (
    BackendError,
    ConflictError,
    DecodeError,
    DefinitionError,
    InvalidExecutionId,
    NotFoundError,
    ReactiveError,
    TimedOutError,
    TransientBackendError,
)

__all__ = [  # writing a workflow
    "CallbackFields",
    "ExecutionState",
    "LimitReached",
    "Retry",
    "RuleContext",
    "Schedule",
    "ScheduledRun",
    "Status",
    "TaskFailure",
    "TimelineEntry",
    "Workflow",
    "chain",
    "definition_of",
    "increment_iteration",
    "on_max_iterations",
    "rule",
    "set_error",
    "transition",
    "when_cancelled",
]
__all__ += [  # lifecycle events
    "WorkflowCancellationEvent",
    "WorkflowCompletionEvent",
    "WorkflowEscalationEvent",
    "WorkflowFailureEvent",
]
__all__ += [  # running workflows
    "Clock",
    "Engine",
    "ManualClock",
    "MemoryBackend",
    "NatsBackend",
    "NatsServer",
    "SystemClock",
]
__all__ += [  # errors
    "BackendError",
    "ConflictError",
    "DecodeError",
    "DefinitionError",
    "InvalidExecutionId",
    "NotFoundError",
    "ReactiveError",
    "TimedOutError",
    "TransientBackendError",
]

__version__ = "0.1.0"

# Show public names as reactive.X in tracebacks and docs (httpx's habit). msgspec
# structs keep their module: msgspec resolves their annotations there.
for _name in __all__:
    _obj = globals()[_name]
    if (isinstance(_obj, type) and not issubclass(_obj, _msgspec.Struct)) or (
        callable(_obj) and not isinstance(_obj, type)
    ):
        try:
            _obj.__module__ = "reactive"
        except (AttributeError, TypeError):
            pass
del _name, _obj
