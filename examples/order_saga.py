"""Order saga: reserve the stock, charge the customer, ship; release the stock when the
payment fails, takes too long, or the order is cancelled.

One execution per order (keyed by ``order_id``):

1. ``place``: an order arrives on ``orders.placed`` (message + state, from the
   ``ORDERS`` stream). An order placed again is ignored (``max_firings=1``).
2. ``reserve``: the inventory service reserves the stock
   (``publish_async="inventory.reserve"``). Out of stock: the order fails
   (``orders.failed``); nothing was taken, so nothing is given back.
3. ``charge``: the payment service charges the customer, who may have to confirm it
   (``timeout="45m"``). Declined (its answer), failed (``@charge.on_error``) or
   late (``@charge.on_timeout``): the execution moves to ``payment_declined``,
   where the compensation runs. While the charge is pending, ``remind``
   publishes ``orders.payment_reminder`` every 10 minutes (``every="10m"``).
4. ``release`` (the compensation): publishes ``inventory.release`` for the
   reservation, in the same transition that fails the order (or, after a
   cancellation, ends it as cancelled: ``orders.cancelled``).
5. ``ship``: the shipping service ships the reserved stock; ``done`` completes
   the order (``orders.completed``).

A cancellation (``python -m reactive cancel order-saga.<id>``) goes to
``@when_cancelled``: with stock reserved it releases it first; with none, the
order ends as cancelled at once.

The inventory, payment and shipping services are simulated by one
deterministic worker coroutine, ``services_worker``, written against the
backend interface (in memory or NATS).

Run it::

    python -m reactive demo examples/order_saga.py
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from reactive import (
    Engine,
    ExecutionState,
    RuleContext,
    Status,
    TaskFailure,
    Workflow,
    rule,
    when_cancelled,
)
from reactive.backends.base import Backend
from reactive.conditions import phase_in, phase_is

log = logging.getLogger("reactive.examples.order_saga")

PLACED = "orders.placed"
INVENTORY_RESERVE = "inventory.reserve"
INVENTORY_RELEASE = "inventory.release"
PAYMENTS = "payments.charge"
SHIPPING = "shipping.ship"
COMPLETED = "orders.completed"
FAILED = "orders.failed"
CANCELLED = "orders.cancelled"
REMINDER = "orders.payment_reminder"


# --------------------------------------------------------------------------- types


class Order(ExecutionState):
    """One order on its way from placed to shipped (or released)."""

    sku: str = ""
    quantity: int = 0
    amount_cents: int = 0
    reservation_id: str = ""  # set while stock is held for the order
    payment_id: str = ""
    decline_reason: str = ""
    tracking: str = ""


class OrderPlaced(msgspec.Struct):
    order_id: str
    sku: str
    quantity: int
    amount_cents: int


class ReserveStock(msgspec.Struct, kw_only=True):
    order_id: str
    sku: str
    quantity: int
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class Reservation(msgspec.Struct, kw_only=True):
    task_id: str
    reserved: bool
    reservation_id: str = ""
    reason: str = ""


class Charge(msgspec.Struct, kw_only=True):
    order_id: str
    amount_cents: int
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class Payment(msgspec.Struct, kw_only=True):
    task_id: str
    approved: bool
    payment_id: str = ""
    reason: str = ""


class Ship(msgspec.Struct, kw_only=True):
    order_id: str
    sku: str
    quantity: int
    reservation_id: str
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class Shipment(msgspec.Struct, kw_only=True):
    task_id: str
    tracking: str


class ReleaseStock(msgspec.Struct, kw_only=True):
    """The compensation: give the reserved stock back."""

    order_id: str
    reservation_id: str
    reason: str


# --------------------------------------------------------------------------- the workflow


class OrderSaga(
    Workflow,
    id="order-saga",
    state=Order,
    bucket="ORDER_SAGA",
    timeout="2h",
    task_timeout="5m",
    on_complete=COMPLETED,
    on_fail=FAILED,
    on_cancel=CANCELLED,
):
    """Reserve, charge, ship; a failed payment or a cancellation releases the reservation."""

    @rule(
        on_subject=PLACED,
        stream="ORDERS",
        state_key=lambda m: m.order_id,
        mutate=True,
        max_firings=1,
    )
    def place(self, ctx: RuleContext[Order, OrderPlaced]) -> None:
        st, m = ctx.state, ctx.message
        st.sku, st.quantity, st.amount_cents = m.sku, m.quantity, m.amount_cents
        st.phase = "reserving"

    @rule(watch_kv=True, when=phase_is("reserving"), publish_async=INVENTORY_RESERVE)
    def reserve(self, ctx: RuleContext[Order, None]) -> ReserveStock:
        st = ctx.state
        return ReserveStock(order_id=st.id, sku=st.sku, quantity=st.quantity)

    @reserve.on_result
    def reserved(self, ctx: RuleContext[Order, None], result: Reservation) -> None:
        st = ctx.state
        if result.reserved:
            st.reservation_id = result.reservation_id or f"res-{st.id}"
            st.phase = "charging"
        else:
            st.phase = "out_of_stock"
            st.fail(f"out of stock: {result.reason or st.sku}")

    @rule(watch_kv=True, when=phase_is("charging"), publish_async=PAYMENTS, timeout="45m")
    def charge(self, ctx: RuleContext[Order, None]) -> Charge:
        return Charge(order_id=ctx.state.id, amount_cents=ctx.state.amount_cents)

    @charge.on_error
    def charge_failed(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
        ctx.state.decline_reason = f"the payment service failed: {failure.message}"
        ctx.state.phase = "payment_declined"

    @charge.on_timeout
    def charge_late(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
        ctx.state.decline_reason = f"the payment service did not answer ({failure.message})"
        ctx.state.phase = "payment_declined"

    @rule(watch_kv=True, when=phase_is("charging"), every="10m", publish=REMINDER)
    def remind(self, ctx: RuleContext[Order, None]) -> dict[str, str]:
        """While the charge is pending: a reminder every 10 minutes."""
        return {"order_id": ctx.state.id}

    @charge.on_result
    def charged(self, ctx: RuleContext[Order, None], result: Payment) -> None:
        st = ctx.state
        if result.approved:
            st.payment_id = result.payment_id
            st.phase = "shipping"
        else:
            st.decline_reason = result.reason or "declined"
            st.phase = "payment_declined"

    @rule(
        watch_kv=True,
        when=phase_in("payment_declined", "cancelling"),
        publish=INVENTORY_RELEASE,
        mutate=True,
    )
    def release(self, ctx: RuleContext[Order, None]) -> ReleaseStock:
        """The compensation: release the stock, and end the order, in one transition."""
        st = ctx.state
        released = ReleaseStock(
            order_id=st.id, reservation_id=st.reservation_id, reason=st.decline_reason
        )
        st.reservation_id = ""
        if st.phase == "cancelling":
            st.phase = "released"
            st.cancel(st.decline_reason)
        else:
            st.phase = "released"
            st.fail(f"payment declined: {st.decline_reason}")
        return released

    @when_cancelled
    def cancelled(self, ctx: RuleContext[Order, None], reason: str) -> None:
        """Stock reserved: release it first (``release``). None: cancelled at once."""
        if ctx.state.reservation_id:
            ctx.state.decline_reason = reason
            ctx.state.phase = "cancelling"

    @rule(watch_kv=True, when=phase_is("shipping"), publish_async=SHIPPING)
    def ship(self, ctx: RuleContext[Order, None]) -> Ship:
        st = ctx.state
        return Ship(
            order_id=st.id, sku=st.sku, quantity=st.quantity, reservation_id=st.reservation_id
        )

    @ship.on_result
    def shipped(self, ctx: RuleContext[Order, None], result: Shipment) -> None:
        ctx.state.tracking = result.tracking
        ctx.state.phase = "shipped"

    @rule(watch_kv=True, when=phase_is("shipped"), complete=True)
    def done(self, ctx: RuleContext[Order, None]) -> None:
        """Shipped: the order completes (``orders.completed``)."""


WORKFLOWS: list[type[Workflow]] = [OrderSaga]


# --------------------------------------------------------------------------- the simulated services

#: Stock on hand per SKU, and the largest amount the payment service approves.
STOCK = {"mug": 10, "lamp": 2}
CREDIT_LIMIT_CENTS = 50_000


def reserve_stock(req: ReserveStock, stock: dict[str, int]) -> Reservation:
    """Take ``quantity`` of ``sku`` from ``stock`` if there is enough."""
    have = stock.get(req.sku, 0)
    if have < req.quantity:
        return Reservation(task_id=req.task_id, reserved=False, reason=f"{have} {req.sku} left")
    stock[req.sku] = have - req.quantity
    return Reservation(task_id=req.task_id, reserved=True, reservation_id=f"res-{req.order_id}")


def charge_card(req: Charge) -> Payment:
    """Approve amounts up to the credit limit."""
    if req.amount_cents > CREDIT_LIMIT_CENTS:
        return Payment(task_id=req.task_id, approved=False, reason="over the credit limit")
    return Payment(task_id=req.task_id, approved=True, payment_id=f"pay-{req.order_id}")


def ship_order(req: Ship) -> Shipment:
    return Shipment(task_id=req.task_id, tracking=f"trk-{req.order_id}")


async def services_worker(
    backend: Backend,
    *,
    stock: dict[str, int] | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve inventory, payment and shipping requests until cancelled; releases go back to ``stock``."""
    stock = dict(STOCK) if stock is None else stock
    answer: dict[str, tuple[type[Any], Callable[[Any], msgspec.Struct]]] = {
        INVENTORY_RESERVE: (ReserveStock, lambda r: reserve_stock(r, stock)),
        PAYMENTS: (Charge, charge_card),
        SHIPPING: (Ship, ship_order),
    }
    reserved: dict[str, tuple[str, int]] = {}
    async with anyio.create_task_group() as tg:
        for subject in (*answer, INVENTORY_RELEASE):
            await tg.start(_serve, backend, subject, answer, stock, reserved)
        task_status.started()


async def _serve(
    backend: Backend,
    subject: str,
    answer: dict[str, tuple[type[Any], Callable[[Any], msgspec.Struct]]],
    stock: dict[str, int],
    reserved: dict[str, tuple[str, int]],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async with backend.subscribe(subject, queue="order-services") as requests:
        task_status.started()
        async for msg in requests:
            if subject == INVENTORY_RELEASE:
                release = msgspec.json.decode(msg.data, type=ReleaseStock)
                sku, quantity = reserved.pop(release.reservation_id, ("", 0))
                if sku:
                    stock[sku] = stock.get(sku, 0) + quantity
                continue
            request_type, act = answer[subject]
            try:
                request = msgspec.json.decode(msg.data, type=request_type)
            except msgspec.DecodeError as e:
                log.warning("%s: ignoring an undecodable request: %s", subject, e)
                continue
            result = act(request)
            if isinstance(result, Reservation) and result.reserved:
                reserved[result.reservation_id] = (request.sku, request.quantity)
            reply_to = request.callback_subject or msg.headers.get("Reactive-Callback-Subject", "")
            if reply_to:
                await backend.publish(reply_to, msgspec.json.encode(result))


# --------------------------------------------------------------------------- the demo

DEMO_ORDERS = [
    OrderPlaced(order_id="o-100", sku="mug", quantity=2, amount_cents=2_400),
    OrderPlaced(order_id="o-101", sku="lamp", quantity=5, amount_cents=9_000),
    OrderPlaced(order_id="o-102", sku="mug", quantity=1, amount_cents=75_000),
]

EXPECTED = {
    "o-100": Status.COMPLETED,  # reserved, charged, shipped
    "o-101": Status.FAILED,  # out of stock: nothing to release
    "o-102": Status.FAILED,  # payment declined: the reservation is released
}


async def run_demo(
    backend: Backend,
    engine: Engine,
    out: Callable[[str], None] = print,
    *,
    timeout: float = 20.0,
) -> None:
    """Place the demo orders on a running engine, wait for each to end, print their timelines."""
    await engine.wait_ready(timeout)
    events: list[tuple[str, dict[str, Any]]] = []
    async with anyio.create_task_group() as tg:
        await tg.start(services_worker, backend)
        await tg.start(collect_events, backend, [COMPLETED, FAILED, INVENTORY_RELEASE], events)
        for order in DEMO_ORDERS:
            out(
                f"order {order.order_id}: {order.quantity} x {order.sku}, {order.amount_cents} cents"
            )
            await engine.publish(PLACED, order)
        states = [
            await engine.wait_for(OrderSaga, o.order_id, timeout=timeout) for o in DEMO_ORDERS
        ]
        with anyio.move_on_after(5.0):
            while len(events) < len(states) + 1:  # the lifecycle events and one release
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    for st in states:
        out("")
        for line in format_timeline(st):
            out(line)
    out("")
    out("events:")
    for subject, event in events:
        detail = event.get("error") or event.get("reservation_id") or event.get("final_phase", "")
        out(
            f"  {subject:<18} {event.get('execution_id') or event.get('order_id', '?'):<8} {detail}"
        )


# --------------------------------------------------------------------------- helpers (each example has its own copy)


async def collect_events(
    backend: Backend,
    subjects: list[str],
    into: list[tuple[str, dict[str, Any]]],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Append every message on ``subjects`` to ``into`` as (subject, decoded JSON) until cancelled."""
    async with anyio.create_task_group() as tg:
        for subject in subjects:
            await tg.start(_collect_one, backend, subject, into)
        task_status.started()


async def _collect_one(
    backend: Backend,
    subject: str,
    into: list[tuple[str, dict[str, Any]]],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async with backend.subscribe(subject) as messages:
        task_status.started()
        async for msg in messages:
            into.append((msg.subject, msgspec.json.decode(msg.data)))


def format_timeline(state: ExecutionState) -> list[str]:
    """An execution's history as aligned text lines: a header, then one line per entry."""
    head = (
        f"{state.workflow_id}/{state.id}: {state.status.value}"
        f"  phase={state.phase or '-'}  iteration={state.iteration}"
    )
    if state.error:
        head += f"  error={state.error!r}"
    lines = [
        head,
        f"  {'time (UTC)':<12}  {'rule':<10} {'trigger':<30} {'action':<14} {'phase':<17}",
    ]
    for e in state.timeline:
        trigger = e.trigger_mode or "-"
        if e.trigger_mode.startswith("message") and e.trigger_info:
            trigger += f" {e.trigger_info}"
        lines.append(
            f"  {e.timestamp:%H:%M:%S}.{e.timestamp.microsecond // 1000:03d}  {e.rule_id:<10} "
            f"{trigger[:30]:<30} {e.action or '-':<14} {e.phase or '-':<17}"
        )
    return lines
