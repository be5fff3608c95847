"""The participant services of the order saga: orders, inventory and payments.

Each keeps its own tables (in its own database) and uses `sagas.participant.Participant`, so a redelivered or
retried command never applies its effect twice. Failures are deterministic, for the demo and the tests:
- inventory refuses an order when a SKU's stock runs out (`inventory.insufficient_stock`);
- payments declines totals above 500 (`payment.declined`).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sagas.engine.wire import CommandMessage
from sagas.participant import BusinessFailure, Participant

DECLINE_ABOVE = 500
INITIAL_STOCK = {"apple": 1_000_000, "pear": 1_000_000, "truffle": 40}

# ---- orders -------------------------------------------------------------------------------------------

orders_tables = sa.MetaData()
orders_table = sa.Table(
    "orders", orders_tables,
    sa.Column("order_id", sa.String(64), primary_key=True),
    sa.Column("saga_id", sa.String(64), nullable=False, unique=True),
    sa.Column("customer_id", sa.String(64), nullable=False),
    sa.Column("total", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
)
orders = Participant("orders", metadata=orders_tables)


@orders.command("order.create")
async def create_order(command: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
    order_id = f"ord-{command.saga_id}"
    await tx.execute(orders_table.insert().values(order_id=order_id, saga_id=command.saga_id, status="PENDING",
                                                  customer_id=command.data["customer_id"], total=command.data["total"]))
    return {"order_id": order_id}


@orders.compensation("order.reject")
async def reject_order(command: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
    # Keyed by saga id: this also runs when the create reply never came (or the order never existed).
    await tx.execute(orders_table.update().where(orders_table.c.saga_id == command.data["saga_id"])
                     .values(status="REJECTED"))
    return {}


@orders.command("order.approve")
async def approve_order(command: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
    await tx.execute(orders_table.update().where(orders_table.c.order_id == command.data["order_id"])
                     .values(status="APPROVED"))
    return {"status": "APPROVED"}


# ---- inventory ----------------------------------------------------------------------------------------

inventory_tables = sa.MetaData()
stock_table = sa.Table(
    "stock", inventory_tables,
    sa.Column("sku", sa.String(64), primary_key=True),
    sa.Column("available", sa.Integer, nullable=False),
)
reservations_table = sa.Table(
    "reservations", inventory_tables,
    sa.Column("order_id", sa.String(64), primary_key=True),
    sa.Column("items", sa.JSON, nullable=False),
    sa.Column("released", sa.Boolean, nullable=False, default=False),
)
inventory = Participant("inventory", metadata=inventory_tables)


async def _stock(tx: AsyncConnection, sku: str) -> int:
    available = (await tx.execute(sa.select(stock_table.c.available).where(stock_table.c.sku == sku))).scalar()
    if available is None:
        available = INITIAL_STOCK.get(sku, 0)
        await tx.execute(stock_table.insert().values(sku=sku, available=available))
    return int(available)


@inventory.command("inventory.reserve")
async def reserve(command: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
    items = command.data["items"]
    for item in items:
        if await _stock(tx, item["sku"]) < item["quantity"]:
            raise BusinessFailure(f"not enough {item['sku']}", {"sku": item["sku"]},
                                  type="inventory.insufficient_stock")
    for item in items:
        await tx.execute(stock_table.update().where(stock_table.c.sku == item["sku"])
                         .values(available=stock_table.c.available - item["quantity"]))
    await tx.execute(reservations_table.insert().values(order_id=command.data["order_id"], items=items,
                                                        released=False))
    return {"reserved": sum(i["quantity"] for i in items)}


@inventory.compensation("inventory.release")
async def release(command: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
    row = (await tx.execute(sa.select(reservations_table).where(
        reservations_table.c.order_id == command.data["order_id"]))).mappings().first()
    if row is None or row["released"]:
        return {"released": 0}  # nothing was reserved (the reserve never ran or was refused)
    for item in row["items"]:
        await tx.execute(stock_table.update().where(stock_table.c.sku == item["sku"])
                         .values(available=stock_table.c.available + item["quantity"]))
    await tx.execute(reservations_table.update().where(reservations_table.c.order_id == row["order_id"])
                     .values(released=True))
    return {"released": sum(i["quantity"] for i in row["items"])}


# ---- payments -----------------------------------------------------------------------------------------

payments_tables = sa.MetaData()
charges_table = sa.Table(
    "charges", payments_tables,
    sa.Column("payment_id", sa.String(64), primary_key=True),
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("amount", sa.Float, nullable=False),
)
payments = Participant("payments", metadata=payments_tables)


@payments.command("payment.charge")
async def charge(command: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
    if command.data["amount"] > DECLINE_ABOVE:
        raise BusinessFailure("card declined", {"limit": DECLINE_ABOVE}, type="payment.declined")
    payment_id = f"pay-{command.saga_id}"
    await tx.execute(charges_table.insert().values(payment_id=payment_id, order_id=command.data["order_id"],
                                                   amount=command.data["amount"]))
    return {"payment_id": payment_id}


ALL = (orders, inventory, payments)
