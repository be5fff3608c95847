"""The order/payment saga in the Python DSL: the same definition as `saga.yaml` (see its comments)."""

from __future__ import annotations

from sagas.definitions import literal, saga

ORDER_INPUT = {
    "type": "object",
    "required": ["customer_id", "items", "total", "currency"],
    "additionalProperties": False,
    "properties": {
        "customer_id": {"type": "string", "minLength": 1},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["sku", "quantity"],
                "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
            },
        },
        "total": {"type": "number", "exclusiveMinimum": 0},
        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
    },
}

order_payment = (
    saga("order_payment", version=1,
         description="Create an order, reserve its items, charge the customer and confirm the order.")
    .input_schema(ORDER_INPUT)
    .deadline("10m")
    .compensation_retry(max_attempts=10, initial_backoff="1s", max_backoff="5m")
    .step("create_order")
        .invoke("orders", "order.create", {
            "customer_id": "input.customer_id",
            "items": "input.items",
            "total": "input.total",
            "currency": "input.currency",
        })
        .with_compensation("order.reject", {"saga_id": "saga.id", "reason": literal("saga aborted")})
    .step("reserve_inventory")
        .invoke("inventory", "inventory.reserve", {
            "order_id": "steps.create_order.order_id",
            "items": "input.items[*].{sku: sku, quantity: quantity}",
        })
        .replies(failure=["inventory.insufficient_stock"])
        .timeout("10s")
        .with_compensation("inventory.release", {"order_id": "steps.create_order.order_id"})
    .step("charge_payment")
        .pivot()
        .invoke("payments", "payment.charge", {
            "order_id": "steps.create_order.order_id",
            "customer_id": "input.customer_id",
            "amount": "input.total",
            "currency": "input.currency",
            "idempotency_key": "saga.id",
        })
        .replies(failure=["payment.declined"])
        .timeout("20s")
        .retry(max_attempts=5, initial_backoff="500ms", max_backoff="10s")
    .step("confirm_order")
        .retriable()
        .invoke("orders", "order.approve", {
            "order_id": "steps.create_order.order_id",
            "payment_id": "steps.charge_payment.payment_id",
        })
        .retry(max_attempts=50, initial_backoff="1s", max_backoff="1m")
    .build()
)
