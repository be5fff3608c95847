"""Participants and definitions shared by the engine tests: every effect lands in a ledger table so tests can
count how many times each step's effect and compensation really ran."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from sagas.definitions.model import SagaDefinition
from sagas.engine.wire import CommandMessage
from sagas.participant import BusinessFailure, Participant, ParticipantWorker

ledger_metadata = sa.MetaData()
ledger = sa.Table(
    "ledger",
    ledger_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("saga_id", sa.String(100)),
    sa.Column("step", sa.String(100)),
    sa.Column("kind", sa.String(20)),
    sa.Column("type", sa.String(100)),
    # No unique constraint on purpose: a duplicate effect must show up as a second row.
)

Behaviour = Callable[[CommandMessage], dict[str, Any] | None]


def ledger_participant(name: str, commands: dict[str, Behaviour | None]) -> Participant:
    """A participant whose handlers record their effect in the ledger, then do what `commands` says."""
    participant = Participant(name, metadata=ledger_metadata)
    for command_type, behaviour in commands.items():
        compensation = command_type.startswith("Undo")

        async def handler(
            command: CommandMessage, tx: AsyncConnection, behaviour: Behaviour | None = behaviour
        ) -> dict[str, Any] | None:
            await tx.execute(ledger.insert().values(saga_id=command.saga_id, step=command.step,
                                                    kind=str(command.kind), type=command.type))
            return behaviour(command) if behaviour is not None else {"by": command.type}

        if compensation:
            participant.compensation(command_type)(handler)
        else:
            participant.command(command_type)(handler)
    return participant


def decline_if(predicate: Callable[[dict[str, Any]], bool], data: dict[str, Any] | None = None) -> Behaviour:
    def behaviour(command: CommandMessage) -> dict[str, Any] | None:
        if predicate(command.data):
            raise BusinessFailure("declined", {"why": "test"})
        return data or {"ok": True}

    return behaviour


async def ledger_rows(worker: ParticipantWorker) -> list[tuple[str, str, str, str]]:
    async with worker.db.connect() as conn:
        rows = (await conn.execute(sa.select(ledger.c.saga_id, ledger.c.step, ledger.c.kind, ledger.c.type)
                                   .order_by(ledger.c.id))).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def three_steps(*, version: int = 1, timeout: float = 30.0, deadline: float | None = None,
                max_attempts: int = 3, comp_attempts: int = 3) -> SagaDefinition:
    """reserve (inventory) → charge (payment) → ship (shipping); all compensatable."""
    retry = {"max_attempts": max_attempts, "initial_backoff": 1.0, "multiplier": 2.0, "max_backoff": 10.0,
             "jitter": 0.0}

    def step(name: str, participant: str, command: str, undo: str) -> dict[str, Any]:
        return {"name": name, "participant": participant, "command": command, "timeout": timeout, "retry": retry,
                "payload": {"order": "input.order_id", "amount": "input.amount"},
                "compensation": {"command": undo, "payload": {"order": "input.order_id"}}}

    return SagaDefinition.model_validate({
        "name": "order", "version": version, "deadline": deadline,
        "compensation_retry": {"max_attempts": comp_attempts, "initial_backoff": 1.0, "max_backoff": 5.0,
                               "jitter": 0.0},
        "steps": [step("reserve", "inventory", "Reserve", "UndoReserve"),
                  step("charge", "payment", "Charge", "UndoCharge"),
                  step("ship", "shipping", "Ship", "UndoShip")],
    })


@contextlib.asynccontextmanager
async def postgres_schema(pg_url: str) -> AsyncIterator[Callable[[], AsyncEngine]]:
    """A schema of its own on the shared PostgreSQL (dropped afterwards); yields a maker of engines that use it."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(pg_url)
    async with admin.begin() as conn:
        await conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield lambda: create_async_engine(pg_url, connect_args={"server_settings": {"search_path": schema}})
    finally:
        async with admin.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()
