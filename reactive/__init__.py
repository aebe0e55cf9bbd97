"""reactive: a reactive workflow engine for Python on NATS JetStream.

Workflows are classes whose methods carry ``@rule`` decorators; state lives in
NATS KV, written by compare-and-set.
"""

from __future__ import annotations

import msgspec as _msgspec

from reactive.backends.memory import MemoryBackend
from reactive.backends.nats import NatsBackend
from reactive.backends.server import NatsServer
from reactive.clock import Clock, ManualClock, SystemClock
from reactive.dsl.context import RuleContext
from reactive.dsl.definition import ActionType, RuleDef, TriggerMode, WorkflowDef
from reactive.dsl.mutators import chain, increment_iteration, set_error, transition
from reactive.dsl.rules import rule
from reactive.dsl.state import (
    CallbackFields,
    ExecutionState,
    Status,
    TimelineEntry,
    WorkflowCompletionEvent,
    WorkflowEscalationEvent,
    WorkflowFailureEvent,
)
from reactive.dsl.workflow import Workflow, definition_of
from reactive.errors import (
    BackendError,
    ConflictError,
    DecodeError,
    DefinitionError,
    InvalidExecutionId,
    NotFoundError,
    ReactiveError,
    TransientBackendError,
)
from reactive.runtime.engine import Engine

__all__ = [
    "ActionType",
    "BackendError",
    "CallbackFields",
    "Clock",
    "ConflictError",
    "DecodeError",
    "DefinitionError",
    "Engine",
    "ExecutionState",
    "InvalidExecutionId",
    "ManualClock",
    "MemoryBackend",
    "NatsBackend",
    "NatsServer",
    "NotFoundError",
    "ReactiveError",
    "RuleContext",
    "RuleDef",
    "Status",
    "SystemClock",
    "TimelineEntry",
    "TransientBackendError",
    "TriggerMode",
    "Workflow",
    "WorkflowCompletionEvent",
    "WorkflowDef",
    "WorkflowEscalationEvent",
    "WorkflowFailureEvent",
    "chain",
    "definition_of",
    "increment_iteration",
    "rule",
    "set_error",
    "transition",
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
