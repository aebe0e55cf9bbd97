"""The order saga with a planted bug, and the invariant that catches it (tests and benchmarks).

``ForgetfulSaga`` fails an order whose payment is declined without releasing its
reservation: the compensation is skipped. ``released_when_declined`` is the
property the saga promises: an execution that went through ``payment_declined``
published a release of its stock.
"""

from __future__ import annotations

import sys
from pathlib import Path

from reactive import RuleContext
from reactive.__main__ import load_example
from reactive.testing.strategies import Execution

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
saga = sys.modules.get("reactive_example_order_saga") or load_example(EXAMPLES / "order_saga.py")


class ForgetfulSaga(saga.OrderSaga, id="order-saga"):
    """The saga whose declined payment skips the compensation (the planted bug)."""

    def charged(self, ctx: RuleContext[saga.Order, None], result: saga.Payment) -> None:
        st = ctx.state
        if result.approved:
            st.payment_id = result.payment_id
            st.phase = "shipping"
        else:
            st.phase = "payment_declined"
            st.fail("payment declined")  # the bug: fails at once, the stock stays reserved


def released_when_declined(execution: Execution) -> None:
    """A declined payment releases the reservation (the saga's promise)."""
    if "payment_declined" in execution.phases:
        assert execution.sent(saga.INVENTORY_RELEASE), (
            f"{execution.id}: its payment was declined but its stock was never released"
        )
