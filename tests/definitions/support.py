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


def bounded_yaml(over: str | None = None, *, version: int | None = None) -> str:
    """A definition with every bounded text field at its limit (`LIMITED_FIELDS`), the field `over` one character
    past it, and `version` (default: the largest allowed)."""
    from sagas.definitions import limits

    def text(field: str, limit: int, first: str) -> str:
        return first + "x" * (limit - 1 + (field == over))

    return f"""\
name: {text("name", limits.NAME_CHARS, "n")}
version: {limits.VERSION_MAX if version is None else version}
steps:
  - name: {text("steps[0].name", limits.NAME_CHARS, "a")}
    participant: {text("steps[0].participant", limits.NAME_CHARS, "p")}
    command: {text("steps[0].command", limits.COMMAND_TYPE_CHARS, "c")}
    topic: {text("steps[0].topic", limits.TOPIC_CHARS, "t")}
    success: [{text("steps[0].success[0]", limits.REPLY_TYPE_CHARS, "s")}]
    failure: [{text("steps[0].failure[0]", limits.REPLY_TYPE_CHARS, "f")}]
    compensation:
      command: {text("steps[0].compensation.command", limits.COMMAND_TYPE_CHARS, "u")}
  - name: {text("steps[1].name", limits.NAME_CHARS, "g")}
    parallel:
      - name: {text("steps[1].parallel[0].name", limits.NAME_CHARS, "b")}
        participant: inventory
        command: inventory.reserve
        compensation: {{command: inventory.release}}
      - name: short
        participant: inventory
        command: inventory.hold
        compensation: {{command: inventory.unhold}}
"""


LIMITED_FIELDS = {
    "name": "NAME_CHARS",
    "steps[0].name": "NAME_CHARS",
    "steps[0].participant": "NAME_CHARS",
    "steps[0].command": "COMMAND_TYPE_CHARS",
    "steps[0].topic": "TOPIC_CHARS",
    "steps[0].success[0]": "REPLY_TYPE_CHARS",
    "steps[0].failure[0]": "REPLY_TYPE_CHARS",
    "steps[0].compensation.command": "COMMAND_TYPE_CHARS",
    "steps[1].name": "NAME_CHARS",
    "steps[1].parallel[0].name": "NAME_CHARS",
}
"""Every bounded text field of `bounded_yaml`, with the name of its limit in `sagas.definitions.limits`."""
