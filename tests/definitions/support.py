"""Paths and texts shared by the definition tests."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLES = {name: REPO / "samples" / name for name in ("order_payment", "travel_booking")}
MALFORMED = Path(__file__).parent / "malformed"

VALID_YAML = """\
name: shop
version: 1
steps:
  - name: reserve
    participant: inventory
    command: inventory.reserve
    payload:
      sku: input.sku
    compensation:
      command: inventory.release
      payload:
        reservation: steps.reserve.id
  - name: charge
    participant: payments
    command: payment.charge
    kind: pivot
    payload:
      amount: input.amount
      reservation: steps.reserve.id
"""
