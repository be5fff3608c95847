"""Records of `sagas.engine.ports` to table rows and back.

Rows to write are tuples of driver-ready values in the order of the `*_COLUMNS` beside them, with their JSON
values serialized already (`Encoded`), by pydantic's Rust serializer: a commit writes a few hundred rows and
building them is most of the store's Python time. On SQLite the tuples go to the driver as they are.

Message headers (values are bytes) are stored as a JSON object ``{"n": [names], "l": [value lengths], "v": values}``:
the values concatenated and read as Latin-1 (one character per byte, so any bytes round-trip exactly), or, when
they hold a NUL (which PostgreSQL's JSONB cannot store in a string), ``"b64"``: the concatenation in base64. It
costs a third of encoding each value on its own. Rows written before this format, a JSON list of
``[name, base64 value]`` pairs, still decode.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from pydantic_core import to_json
from sqlalchemy.engine import Row

from sagas.adapters.sql.connection import Encoded
from sagas.engine.ports import BrokerMessage, DeadLetter, HistoryRecord, InboxRecord, OutboxMessage
from sagas.engine.state import HistoryEntry, SagaInstance, TimerKind, TimerSpec, evolve

_instance_json = SagaInstance.__pydantic_serializer__.to_json


def _json(value: Any) -> Encoded:
    return Encoded(to_json(value).decode())


INSTANCE_COLUMNS = (
    "id", "definition", "definition_version", "status", "stage", "idempotency_key", "version", "created_at",
    "updated_at", "snapshot", "has_reason", "step_deadline", "step_timeouts",
)
NO_TIMEOUTS: tuple[float | None, str | None] = (None, None)


def instance_values(
    instance: SagaInstance, *, version: int, timeouts: tuple[float | None, str | None] = NO_TIMEOUTS
) -> tuple[Any, ...]:
    """The row of `instance` stored as `version` (its snapshot says that version too); `timeouts`: its
    `step_deadline` and `step_timeouts` (`deadlines.encode`)."""
    if instance.version != version:
        instance = evolve(instance, {"version": version})
    return (
        instance.id, instance.definition, instance.definition_version, str(instance.status), instance.stage,
        instance.idempotency_key, version, instance.created_at, instance.updated_at,
        Encoded(_instance_json(instance).decode()), instance.failure is not None, *timeouts,
    )


UPDATED_COLUMNS = ("status", "stage", "version", "updated_at", "snapshot", "has_reason")
"""What an update sets: a saga's id, definition, definition version, idempotency key and start time are fixed when
it starts (`machine.start`). Setting only these keeps SQLite from rewriting the entries of the indexes on the fixed
columns on every update (it rewrites an index whenever the SET names one of its columns, changed or not)."""
UPDATE_COLUMNS = (*UPDATED_COLUMNS, "b_id", "b_expected")
TIMEOUT_COLUMNS = ("step_deadline", "step_timeouts", "deadline_claimed_until")
"""Set as well by an update whose unit sets or cancels the saga's step timeouts (`deadlines.py`); the claim is
cleared."""
UPDATED_TIMEOUT_COLUMNS = (*UPDATED_COLUMNS, *TIMEOUT_COLUMNS)
UPDATE_TIMEOUT_COLUMNS = (*UPDATED_TIMEOUT_COLUMNS, "b_id", "b_expected")


def update_values(
    instance: SagaInstance, timeouts: tuple[float | None, str | None] | None = None
) -> tuple[Any, ...]:
    """The row updating `instance`, which carries the version it was read at, to the next version: the
    `UPDATED_COLUMNS` (with `timeouts`: the `TIMEOUT_COLUMNS` too), then the id and the version it was read at (the
    WHERE clause's `b_id` and `b_expected`)."""
    version = instance.version
    stored = evolve(instance, {"version": version + 1})
    snapshot = Encoded(_instance_json(stored).decode())
    has_reason = instance.failure is not None
    if timeouts is None:
        return (
            str(instance.status), instance.stage, version + 1, instance.updated_at, snapshot, has_reason, instance.id,
            version,
        )
    return (
        str(instance.status), instance.stage, version + 1, instance.updated_at, snapshot, has_reason, *timeouts,
        None, instance.id, version,
    )


def instance(snapshot: str) -> SagaInstance:
    return SagaInstance.model_validate_json(snapshot)


HISTORY_COLUMNS = ("saga_id", "at", "type", "step", "attempt", "detail")
_EMPTY = Encoded("{}")


def history_values(record: HistoryRecord) -> tuple[Any, ...]:
    entry = record.entry
    detail = entry.detail
    return (
        record.saga_id, entry.at, entry.type, entry.step, entry.attempt,
        Encoded(to_json(detail).decode()) if detail else _EMPTY,
    )


def history(row: Row[Any]) -> HistoryRecord:
    entry = HistoryEntry(at=row.at, type=row.type, step=row.step, attempt=row.attempt, detail=row.detail)
    return HistoryRecord(saga_id=row.saga_id, entry=entry, seq=row.id)


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> Encoded:
    if not headers:
        return _NO_HEADERS
    names, values = zip(*headers, strict=True)
    data = b"".join(values)
    lengths = list(map(len, values))
    if b"\x00" in data:
        return _json({"n": names, "l": lengths, "b64": base64.b64encode(data).decode("ascii")})
    return _json({"n": names, "l": lengths, "v": data.decode("latin-1")})


_NO_HEADERS = Encoded('{"n":[],"l":[],"v":""}')


def decode_headers(headers: dict[str, Any] | Sequence[Sequence[str]]) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(headers, dict):  # the former format: [[name, base64 value], ...]
        return tuple((name, base64.b64decode(value)) for name, value in headers)
    data = headers["v"].encode("latin-1") if "v" in headers else base64.b64decode(headers["b64"])
    decoded: list[tuple[str, bytes]] = []
    start = 0
    for name, length in zip(headers["n"], headers["l"], strict=True):
        decoded.append((name, data[start : start + length]))
        start += length
    return tuple(decoded)


def _message(row: Row[Any]) -> BrokerMessage:
    return BrokerMessage(topic=row.topic, value=bytes(row.value), key=row.key, headers=decode_headers(row.headers))


OUTBOX_COLUMNS = ("id", "saga_id", "topic", "key", "headers", "value", "created_at", "claimed_until")


def outbox_values(message: OutboxMessage, claimed_until: float | None) -> tuple[Any, ...]:
    broker_message = message.message
    return (
        message.id, message.saga_id, broker_message.topic, broker_message.key,
        encode_headers(broker_message.headers), broker_message.value, message.created_at, claimed_until,
    )


def outbox_message(row: Row[Any]) -> OutboxMessage:
    return OutboxMessage(id=row.id, saga_id=row.saga_id, message=_message(row), created_at=row.created_at)


INBOX_COLUMNS = ("message_id", "saga_id", "outcome", "at")


def inbox_values(record: InboxRecord) -> tuple[Any, ...]:
    return (record.message_id, record.saga_id, record.outcome, record.at)


TIMER_COLUMNS = ("id", "saga_id", "kind", "step", "attempt", "due_at", "claimed_until")


def timer_values(spec: TimerSpec) -> tuple[Any, ...]:
    return (spec.id, spec.saga_id, str(spec.timer), spec.step, spec.attempt, spec.due_at, None)


def timer(row: Row[Any]) -> TimerSpec:
    return TimerSpec(
        id=row.id,
        saga_id=row.saga_id,
        timer=TimerKind(row.kind),
        step=row.step,
        attempt=row.attempt,
        due_at=row.due_at,
    )


DEAD_LETTER_COLUMNS = (
    "id", "reason", "saga_id", "topic", "key", "headers", "value", "at", "replayed_at", "size", "sha256",
)


def dead_letter_values(letter: DeadLetter) -> tuple[Any, ...]:
    message = letter.message
    return (
        letter.id, letter.reason, letter.saga_id, message.topic, message.key, encode_headers(message.headers),
        message.value, letter.at, letter.replayed_at, letter.size, letter.sha256,
    )


def dead_letter(row: Row[Any]) -> DeadLetter:
    return DeadLetter(
        id=row.id,
        reason=row.reason,
        message=_message(row),
        at=row.at,
        saga_id=row.saga_id,
        replayed_at=row.replayed_at,
        size=row.size,
        sha256=row.sha256,
    )
