"""A workflow for the command-line tests whose execution id only its code knows.

``Pair`` is started by a message on ``pairs.park``; its start rule derives the id from two
fields (``lot-slot``), so ``start pair --id ...`` cannot be checked without the code. It
parks and never ends: a ``start --wait`` on it runs into its ``--timeout``.
"""

from __future__ import annotations

import msgspec

from reactive import ExecutionState, RuleContext, Workflow, rule


class Parked(ExecutionState):
    lot: str = ""


class Park(msgspec.Struct):
    lot: str
    slot: int


class Pair(Workflow, id="pair", state=Parked, bucket="CLI_PAIRS"):
    """Parks, and waits for nothing."""

    @rule(
        on_subject="pairs.park",
        stream="CLI_PAIRS_IN",
        state_key=lambda m: f"{m.lot}-{m.slot}",
        mutate=True,
    )
    def park(self, ctx: RuleContext[Parked, Park]) -> None:
        ctx.state.lot = ctx.message.lot
        ctx.state.phase = "parked"
