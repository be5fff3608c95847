"""A participant's dead letters: the messages on its command topic it could not read, kept in its own database.

A dead letter keeps a bounded prefix of the body (`PREFIX_BYTES`, 64 KiB by default) with the body's full size and
SHA-256, and at most `HEADER_BYTES` of headers: whoever can write to the topic cannot grow the database by more
than that per distinct message. Its id is the SHA-256 of the whole message, so the same bytes delivered again
(a redelivery, a flood of one message) stay one letter, refreshed. A letter kept whole can be replayed: published
again to its topic, for the participant to read once its cause is fixed (a newer participant that understands it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sagas.adapters.sql.migrate import PARTICIPANT, ensure_current
from sagas.adapters.sql.participant_tables import dead_letters_table, dedup_table
from sagas.engine.ports import Broker, BrokerMessage, DeadLetter
from sagas.errors import OperatorError

PREFIX_BYTES = 64 * 1024
"""How much of a dead letter's body is kept."""
HEADER_BYTES = 16 * 1024
"""How much of a dead letter's headers (names and base64 values) is kept."""
_MAX_NAME = 200
_MAX_REASON = 2000


@dataclass(frozen=True)
class Purged:
    dedup: int
    dead_letters: int


def _header_pairs(headers: Any) -> tuple[list[list[str]], bool]:
    """The headers as JSON-able ``[name, base64 value]`` pairs within `HEADER_BYTES`, and whether all were kept.
    Whatever an in-process publisher put there (not pairs, not bytes) is described, never raised on."""
    pairs: list[list[str]] = []
    budget = HEADER_BYTES
    complete = True
    try:
        items = list(headers)
    except TypeError:
        return [["?", base64.b64encode(repr(headers)[:200].encode()).decode("ascii")]], False
    for item in items:
        try:
            name, value = item
        except (TypeError, ValueError):
            name, value = "?", repr(item)[:200].encode()
            complete = False
        if not isinstance(name, str):
            name, complete = repr(name), False
        if not isinstance(value, bytes | bytearray | memoryview):
            value, complete = repr(value)[:200].encode(), False
        encoded = base64.b64encode(bytes(value)).decode("ascii")
        cost = min(len(name), _MAX_NAME) + len(encoded)
        if cost > budget:
            complete = False
            break
        budget -= cost
        pairs.append([name[:_MAX_NAME].replace("\x00", "\ufffd"), encoded])
        complete = complete and len(name) <= _MAX_NAME and "\x00" not in name
    return pairs, complete


def dead_letter_row(message: BrokerMessage, reason: str, at: float) -> dict[str, Any]:
    """The row that records `message` (read as far as it can be, without raising) as a dead letter."""
    value = message.value if isinstance(message.value, bytes) else repr(message.value).encode("utf-8", "replace")
    size = message.size or len(value)  # a broker that read only a prefix says the whole size
    headers, complete = _header_pairs(message.headers)
    topic = message.topic if isinstance(message.topic, str) else repr(message.topic)
    key = message.key if isinstance(message.key, str | None) else repr(message.key)
    whole = hashlib.sha256()
    for part in (topic, key or "", repr(headers)):
        whole.update(part.encode("utf-8", "replace") + b"\x00")
    whole.update(value)
    return {
        "id": whole.hexdigest(),
        "reason": (reason.replace("\x00", "\ufffd") or "unreadable")[:_MAX_REASON],
        "topic": topic[:300].replace("\x00", "\ufffd"),
        "key": None if key is None else key[:300].replace("\x00", "\ufffd"),
        "headers": headers,
        "value": value[:PREFIX_BYTES],
        "size": size,
        "sha256": hashlib.sha256(value).hexdigest() if size == len(value) else None,  # None: never read whole
        "complete": complete and size <= PREFIX_BYTES and len(value) == size and len(topic) <= 300
        and (key is None or len(key) <= 300),
        "at": at,
        "replayed_at": None,
    }


async def record(tx: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert dead letters in the caller's transaction; one already there (the same bytes) is refreshed: its
    reason and time updated, live again if it had been replayed."""
    if not rows:
        return
    dialect = postgresql if tx.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(dead_letters_table)
    statement = statement.on_conflict_do_update(
        index_elements=[dead_letters_table.c.id],
        set_={"reason": statement.excluded.reason, "at": statement.excluded.at, "replayed_at": None},
    )
    unique = {row["id"]: row for row in rows}  # one statement may not touch a row twice (PostgreSQL)
    await tx.execute(statement, list(unique.values()))


async def purge(db: AsyncEngine, *, dedup_before: float | None, dead_letters_before: float | None) -> Purged:
    """Delete dedup records older than `dedup_before` and dead letters older than `dead_letters_before`."""
    dedup = letters = 0
    async with db.begin() as tx:
        if dedup_before is not None:
            dedup = (await tx.execute(sa.delete(dedup_table).where(dedup_table.c.at < dedup_before))).rowcount
        if dead_letters_before is not None:
            table = dead_letters_table
            letters = (await tx.execute(sa.delete(table).where(table.c.at < dead_letters_before))).rowcount
    return Purged(dedup, letters)


def _letter(row: sa.RowMapping) -> DeadLetter:
    headers = []
    for name, value in row["headers"]:
        try:
            headers.append((name, base64.b64decode(value, validate=True)))
        except (binascii.Error, ValueError):
            headers.append((name, value.encode()))
    message = BrokerMessage(topic=row["topic"], value=bytes(row["value"]), key=row["key"], headers=tuple(headers))
    return DeadLetter(id=row["id"], reason=row["reason"], message=message, at=row["at"],
                      replayed_at=row["replayed_at"], size=row["size"], sha256=row["sha256"])


class ParticipantDeadLetters:
    """List, show and replay the dead letters of a participant's database (what `sagas dlq ... --participant-db`
    calls). Migrates the database first, as the worker would."""

    def __init__(self, db: AsyncEngine) -> None:
        self.db = db

    async def initialize(self) -> None:
        async with self.db.begin() as tx:
            await tx.run_sync(ensure_current, PARTICIPANT)

    async def list(self, *, limit: int = 100, include_replayed: bool = False) -> list[DeadLetter]:
        """Newest first."""
        table = dead_letters_table
        statement = sa.select(table)
        if not include_replayed:
            statement = statement.where(table.c.replayed_at.is_(None))
        statement = statement.order_by(table.c.at.desc(), table.c.id).limit(limit)
        async with self.db.connect() as conn:
            return [_letter(row) for row in (await conn.execute(statement)).mappings()]

    async def get(self, dead_letter_id: str) -> DeadLetter:
        found = await self._row(dead_letter_id)
        return _letter(found)

    async def _row(self, dead_letter_id: str) -> sa.RowMapping:
        table = dead_letters_table
        async with self.db.connect() as conn:
            found = (await conn.execute(sa.select(table).where(table.c.id == dead_letter_id))).mappings().first()
        if found is None:
            raise OperatorError(f"no participant dead letter {dead_letter_id!r}")
        return found

    async def replay(self, dead_letter_id: str, broker: Broker) -> str:
        """Publish the letter again to its topic (the participant reads it afresh) and mark it replayed."""
        row = await self._row(dead_letter_id)
        if row["replayed_at"] is not None:
            raise OperatorError(f"participant dead letter {dead_letter_id!r} was replayed already")
        if not row["complete"]:
            raise OperatorError(
                f"participant dead letter {dead_letter_id!r} keeps only a prefix of its message ({row['size']} bytes"
                f" in all): it cannot be replayed faithfully"
            )
        # Marked before it is published: the participant may read it again (and, if it still cannot, refresh the
        # letter and clear the mark) before a mark made afterwards would land on it.
        table = dead_letters_table
        async with self.db.begin() as tx:
            await tx.execute(sa.update(table).where(table.c.id == dead_letter_id).values(replayed_at=time.time()))
        try:
            await broker.publish([_letter(row).message])
        except BaseException:
            async with self.db.begin() as tx:
                await tx.execute(sa.update(table).where(table.c.id == dead_letter_id).values(replayed_at=None))
            raise
        return f"published again to {row['topic']}"
