"""A participant's dedup records and per-command savepoints, inside the transaction of its handlers' effects.

On SQLite (``sqlite+aiosqlite``) these statements go to the driver's connection, one hop each to aiosqlite's
thread: through SQLAlchemy's adapter every statement costs three or four (cursor, execute, fetch, close), and a
batch of one command took eighteen hops between the event loop and that thread, most of a participant's CPU when
sagas run one at a time. It is the same connection, so the same transaction (the handler's ``tx``); only inside an
explicit transaction, as `participant_database` opens them. A batch of one command needs no savepoint at all
(`Ledger.savepoint(alone=True)`). Elsewhere (PostgreSQL, or an engine with the sqlite3 module's implicit
transactions) SQLAlchemy Core does it. Either way a record's ``data`` is the reply's JSON as the wire encoded it
(orjson), stored as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sagas.adapters.sql.participant_tables import dedup_table
from sagas.engine.state import Outcome

KEYS_PER_SELECT = 500
"""Bound parameters per statement: well under every database's limit (SQLite's is 32,766, asyncpg's 32,767)."""

_COLUMNS = ("key", "command_id", "outcome", "type", "data", "at", "reason")
_SELECT = "SELECT key, outcome, type, data, reason FROM participant_dedup WHERE key IN ({})"
_INSERT = f"INSERT INTO participant_dedup ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SAVEPOINT = "participant_command"
# The data bound as JSON text, stored as the wire wrote it whatever JSON serializer the engine handed to the worker
# has: cast by the database where JSON is a type (PostgreSQL); on SQLite JSON is text, and a CAST to it would be a
# cast to NUMERIC (SQLite's affinity for an unknown type name), so the text is bound as it is.
_VALUES: dict[str, Any] = {name: sa.bindparam(name) for name in _COLUMNS if name != "data"}
_insert = dedup_table.insert().values(
    _VALUES | {"data": sa.cast(sa.bindparam("data", type_=sa.Text), dedup_table.c.data.type)}
)
_insert_sqlite = dedup_table.insert().values(_VALUES | {"data": sa.bindparam("data", type_=sa.Text)})


@dataclass(frozen=True)
class Answer:
    """What a participant answers to a command, as it is replied and recorded. `body`: `data` encoded for the
    wire, when it already is (a handler's reply is encoded once, to check it can be sent)."""

    outcome: Outcome
    type: str
    data: dict[str, Any]
    reason: str | None = None
    body: bytes | None = None


@dataclass(frozen=True)
class Record:
    """A dedup record to write: `body` is the answer's data as JSON."""

    key: str
    command_id: str
    outcome: str
    type: str
    body: bytes
    at: float
    reason: str | None


class Savepoint(Protocol):
    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...


class _DriverSavepoint:
    def __init__(self, driver: Any) -> None:
        self._driver = driver

    async def commit(self) -> None:
        await self._driver.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")

    async def rollback(self) -> None:
        await self._driver.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
        await self._driver.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")


class _WholeTransaction:
    """The "savepoint" of a transaction that holds one command and nothing else: none is needed on success (two
    statements saved), and a failure rolls the whole transaction back and begins it again, empty, for the
    failure's record."""

    def __init__(self, driver: Any) -> None:
        self._driver = driver

    async def commit(self) -> None:
        return None

    async def rollback(self) -> None:
        await self._driver.execute("ROLLBACK")
        await self._driver.execute("BEGIN IMMEDIATE")


class Ledger:
    """The dedup statements of one transaction."""

    def __init__(self, tx: AsyncConnection, driver: Any | None) -> None:
        self.tx = tx
        self._driver = driver

    @classmethod
    async def of(cls, tx: AsyncConnection) -> Ledger:
        driver: Any = None
        if tx.dialect.name == "sqlite" and tx.dialect.driver == "aiosqlite":
            driver = (await tx.get_raw_connection()).driver_connection
            # Only inside an explicit transaction, as sagas opens them (`participant_database`: the driver in
            # autocommit mode, BEGIN IMMEDIATE issued on begin): under the sqlite3 module's implicit transactions a
            # RELEASE of the outermost savepoint would commit.
            if driver.isolation_level is not None or not driver.in_transaction:
                driver = None
        return cls(tx, driver)

    async def recorded(self, keys: list[str]) -> dict[str, Answer]:
        """The recorded answers of `keys` that have one."""
        found: dict[str, Answer] = {}
        for start in range(0, len(keys), KEYS_PER_SELECT):
            chunk = keys[start : start + KEYS_PER_SELECT]
            if self._driver is not None:
                rows = await self._driver.execute_fetchall(_SELECT.format(", ".join("?" * len(chunk))), chunk)
                for key, outcome, type_, data, reason in rows:
                    found[key] = Answer(Outcome(outcome), type_, _loads(data), reason)
                continue
            result = await self.tx.execute(sa.select(dedup_table).where(dedup_table.c.key.in_(chunk)))
            for row in result.mappings().all():
                found[row["key"]] = Answer(Outcome(row["outcome"]), row["type"], row["data"], row["reason"])
        return found

    async def record(self, records: list[Record]) -> None:
        """Insert `records` (one statement)."""
        if not records:
            return
        if self._driver is not None:
            await self._driver.executemany(_INSERT, [
                (r.key, r.command_id, r.outcome, r.type, r.body.decode(), r.at, r.reason) for r in records
            ])
            return
        await self.tx.execute(_insert_sqlite if self.tx.dialect.name == "sqlite" else _insert, [
            {"key": r.key, "command_id": r.command_id, "outcome": r.outcome, "type": r.type,
             "data": r.body.decode(), "at": r.at, "reason": r.reason}
            for r in records
        ])

    async def savepoint(self, *, alone: bool = False) -> Savepoint:
        """A savepoint around one command's handler: its effect is rolled back alone when it fails. `alone`: the
        transaction holds nothing but this command's work so far (its dedup read), so that rolling all of it back
        is the same (on SQLite, where it saves a hop each way; a batch of one is what one saga at a time makes)."""
        if self._driver is not None and alone:
            return _WholeTransaction(self._driver)
        if self._driver is not None:
            await self._driver.execute(f"SAVEPOINT {_SAVEPOINT}")
            return _DriverSavepoint(self._driver)
        return await self.tx.begin_nested()


def _loads(text: str | bytes) -> Any:
    """A record's data. Records of earlier releases were written by the stdlib's encoder, which may have written
    what orjson refuses to read (NaN, integers over 64 bits): those go to the stdlib."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
