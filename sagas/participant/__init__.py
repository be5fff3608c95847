"""Helpers for writing participant services: idempotent command handlers and their replies.

    inventory = Participant("inventory")

    @inventory.command("ReserveInventory", business_errors=(OutOfStock,))
    async def reserve(command: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
        await tx.execute(...)            # the effect, in the same transaction as the dedup record
        return {"reservation_id": ...}

    @inventory.compensation("ReleaseInventory")
    async def release(command: CommandMessage, tx: AsyncConnection) -> dict[str, Any]: ...

    async with inventory.serve(broker=broker, database_url="sqlite+aiosqlite:///inventory.db"):
        ...

Guarantees:
- A command redelivered, or retried by the engine with a new attempt, returns the recorded reply without running
  the handler again: the dedup record is keyed by (saga, step, kind), not by message id, and is written in the
  same transaction as the handler's effect.
- A compensation that arrives before (or instead of) its command leaves a tombstone: the command, if it comes
  later, is answered with a failure and has no effect.
- A declared business exception becomes a failure reply (recorded: it is a definite answer); any other exception
  rolls the effect back and becomes a retryable reply (not recorded, so the retry runs the handler again).
- A compensation records only its success. The engine retries a failed compensation, and an operator's
  `sagas retry` sends it again after fixing the cause: the handler must run again, not answer the old failure.
- A batch is answered, replied and acknowledged as a whole; when any of it fails (the database, the broker), the
  same batch is tried again with backoff until it goes through (the dedup records make the second run answer
  what the first committed), so a reply is never left unsent while the worker runs.
- A message that is not a command it can read (the broker could not decode it, or the wire format is wrong) is a
  dead letter in the participant's own database, with the reason (`sagas dlq list --participant-db URL`), and is
  acknowledged: nothing a topic holds can stop the worker. Its loops (consumer, retention) run under a
  `Supervisor`: an unexpected failure is logged once and the loop restarted (`Participant.health()`).
- Dedup records and dead letters are purged after their horizons (`retention`, `dead_letter_retention`; see
  docs/operations.md for why a redelivery cannot arrive after the first).

The participant's tables have their own alembic migrations (`sagas db upgrade --participant-db URL`); the worker
applies them when it starts.
"""

from sagas.participant.dead_letters import ParticipantDeadLetters
from sagas.participant.service import (
    DEAD_LETTER_RETENTION,
    DEDUP_RETENTION,
    BusinessFailure,
    Handler,
    Participant,
    participant_database,
)
from sagas.participant.worker import ParticipantWorker

__all__ = [
    "DEAD_LETTER_RETENTION",
    "DEDUP_RETENTION",
    "BusinessFailure",
    "Handler",
    "Participant",
    "ParticipantDeadLetters",
    "ParticipantWorker",
    "participant_database",
]
