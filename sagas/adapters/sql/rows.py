"""Records of `sagas.adapters.ports` to table rows and back.

Rows to write carry their JSON values serialized already (`Encoded`): snapshots by pydantic, straight to
text, which is the hottest path of a commit; on SQLite the rows go to the driver as they are.
Message headers are stored as JSON lists of ``[name, base64 value]``: header values are bytes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Row

from sagas.adapters.ports import BrokerMessage, DeadLetter, HistoryRecord, InboxRecord, OutboxMessage
from sagas.adapters.sql.connection import Encoded
from sagas.engine.state import HistoryEntry, SagaInstance, SagaStatus, TimerKind, TimerSpec


def _json(value: Any) -> Encoded:
    return Encoded(json.dumps(value, separators=(",", ":")))


def instance_row(instance: SagaInstance, *, version: int) -> dict[str, Any]:
    return {
        "id": instance.id,
        "definition": instance.definition,
        "definition_version": instance.definition_version,
        "status": SagaStatus(instance.status).value,
        "stage": instance.stage,
        "idempotency_key": instance.idempotency_key,
        "version": version,
        "created_at": instance.created_at,
        "updated_at": instance.updated_at,
        "snapshot": Encoded(instance.model_copy(update={"version": version}).model_dump_json()),
    }


def instance(snapshot: str) -> SagaInstance:
    return SagaInstance.model_validate_json(snapshot)


def history_row(record: HistoryRecord) -> dict[str, Any]:
    entry = record.entry
    return {
        "saga_id": record.saga_id,
        "at": entry.at,
        "type": entry.type,
        "step": entry.step,
        "attempt": entry.attempt,
        "detail": _json(entry.detail),
    }


def history(row: Row[Any]) -> HistoryRecord:
    entry = HistoryEntry(at=row.at, type=row.type, step=row.step, attempt=row.attempt, detail=row.detail)
    return HistoryRecord(saga_id=row.saga_id, entry=entry, seq=row.id)


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> list[list[str]]:
    return [[name, base64.b64encode(value).decode("ascii")] for name, value in headers]


def decode_headers(headers: Sequence[Sequence[str]]) -> tuple[tuple[str, bytes], ...]:
    return tuple((name, base64.b64decode(value)) for name, value in headers)


def _message(row: Row[Any]) -> BrokerMessage:
    return BrokerMessage(topic=row.topic, value=bytes(row.value), key=row.key, headers=decode_headers(row.headers))


def outbox_row(message: OutboxMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "saga_id": message.saga_id,
        "topic": message.message.topic,
        "key": message.message.key,
        "headers": _json(encode_headers(message.message.headers)),
        "value": message.message.value,
        "created_at": message.created_at,
    }


def outbox_message(row: Row[Any]) -> OutboxMessage:
    return OutboxMessage(id=row.id, saga_id=row.saga_id, message=_message(row), created_at=row.created_at)


def inbox_row(record: InboxRecord) -> dict[str, Any]:
    return {
        "message_id": record.message_id,
        "saga_id": record.saga_id,
        "outcome": record.outcome,
        "at": record.at,
    }


def timer_row(spec: TimerSpec) -> dict[str, Any]:
    return {
        "id": spec.id,
        "saga_id": spec.saga_id,
        "kind": TimerKind(spec.timer).value,
        "step": spec.step,
        "attempt": spec.attempt,
        "due_at": spec.due_at,
        "claimed_until": None,
    }


def timer(row: Row[Any]) -> TimerSpec:
    return TimerSpec(
        id=row.id,
        saga_id=row.saga_id,
        timer=TimerKind(row.kind),
        step=row.step,
        attempt=row.attempt,
        due_at=row.due_at,
    )


def dead_letter_row(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "reason": letter.reason,
        "saga_id": letter.saga_id,
        "topic": letter.message.topic,
        "key": letter.message.key,
        "headers": _json(encode_headers(letter.message.headers)),
        "value": letter.message.value,
        "at": letter.at,
        "replayed_at": letter.replayed_at,
    }


def dead_letter(row: Row[Any]) -> DeadLetter:
    return DeadLetter(
        id=row.id,
        reason=row.reason,
        message=_message(row),
        at=row.at,
        saga_id=row.saga_id,
        replayed_at=row.replayed_at,
    )
