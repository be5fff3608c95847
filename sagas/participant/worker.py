"""`ParticipantWorker`: the running loops of one participant (consumer, retention) under a `Supervisor`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from sagas.adapters.sql.connection import is_retriable
from sagas.adapters.sql.migrate import PARTICIPANT, ensure_current
from sagas.adapters.sql.participant_tables import dedup_table
from sagas.definitions.schema import has_nul
from sagas.engine.ports import Broker, BrokerMessage, Consumer, Delivery
from sagas.engine.state import MessageKind, Outcome
from sagas.engine.supervise import LoopHealth, Supervisor, probe_all
from sagas.engine.wire import (
    MAX_REASON_CHARS,
    CommandMessage,
    MalformedMessage,
    decode_command,
    encode_body,
    encode_reply,
)
from sagas.errors import SagaError
from sagas.participant import dead_letters
from sagas.participant.dedup import Answer, Ledger, Record
from sagas.participant.service import BusinessFailure

if TYPE_CHECKING:
    from sagas.adapters.tracing import ParticipantTracing
    from sagas.participant.service import Participant

log = structlog.get_logger("sagas.participant")

RETRY_BACKOFF_MIN = 0.1
RETRY_BACKOFF_MAX = 5.0
"""Seconds between tries of a batch that failed (doubling from the first to the second)."""

_MAX_REPLY_TYPE: int = getattr(dedup_table.c.type.type, "length", None) or 0
"""A failure's reply type must fit the dedup record to be recorded."""


class ParticipantWorker:
    """The running loops of one participant. The consumer fetches a batch, handles it in one transaction,
    replies and acknowledges; the retention loop purges old dedup records and dead letters. Both run under a
    `Supervisor`: an unexpected failure is logged once with its cause and the loop restarted with capped backoff
    (the batch in hand is answered first), counted in `health()`."""

    def __init__(
        self,
        participant: Participant,
        broker: Broker,
        db: AsyncEngine,
        *,
        batch_max: int,
        retention: float | None = None,
        dead_letter_retention: float | None = None,
        retention_interval: float = 600.0,
    ) -> None:
        self.participant = participant
        self.broker = broker
        self.db = db
        self.batch_max = batch_max
        self.retention = retention
        self.dead_letter_retention = dead_letter_retention
        self.retention_interval = retention_interval
        self._consumer: Consumer | None = None
        self._in_hand: list[Delivery] = []
        """Deliveries fetched and not yet acknowledged: answered first by a restarted consumer loop (a consumer
        does not hand them out again while it lives)."""
        self._loops = Supervisor(f"participant {participant.name}", backoff_max=RETRY_BACKOFF_MAX)
        # One transaction of this worker at a time: an in-memory database has a single connection, which the
        # consumer and the retention loop must not use at once.
        self._db_lock = asyncio.Lock()
        self.http_url: str | None = None
        """Where `Participant.serve(http=...)` serves /metrics, /healthz and /readyz."""
        self.tracing: ParticipantTracing | None = None
        """Spans of each command's handling (`Participant.serve(tracing=...)`)."""

    async def start(self) -> None:
        async with self.db.begin() as conn:
            await conn.run_sync(ensure_current, PARTICIPANT)
            if self.participant.metadata is not None:
                await conn.run_sync(self.participant.metadata.create_all)
        await self.broker.start()
        self._consumer = await self.broker.subscribe([self.participant.topic], self.participant.group)
        self._loops.spawn("consumer", self._loop)
        if self.retention is not None or self.dead_letter_retention is not None:
            self._loops.spawn("retention", self._retention_loop)

    async def stop(self) -> None:
        await self._loops.cancel_all()
        if self._consumer is not None:
            await self._consumer.close()
        await self.db.dispose()

    def health(self) -> dict[str, LoopHealth]:
        """The worker's loops: restarts, last error, whether each runs."""
        return self._loops.health()

    @property
    def healthy(self) -> bool:
        """Every loop runs, and none failed repeatedly within the last minute."""
        return self._loops.running and self._loops.healthy

    async def ready(self, timeout: float = 2.0) -> dict[str, str | None]:
        """Whether the participant's database and the broker answer (None), or why not."""
        return await probe_all({"database": _DatabaseProbe(self.db), "broker": self.broker}, timeout)

    async def _loop(self) -> None:
        assert self._consumer is not None
        if self._in_hand:  # what the previous run of this loop fetched and did not finish
            await self._answer(self._consumer, self._in_hand)
            self._in_hand = []
        while True:
            try:
                deliveries = await self._consumer.fetch(self.batch_max, timeout=0.5)
            except SagaError as exc:
                # A broker outage must not end the worker: it would stop answering without a word.
                log.error("participant fetch failed; retrying", participant=self.participant.name, error=str(exc))
                await asyncio.sleep(0.5)
                continue
            if deliveries:
                self._in_hand = list(deliveries)
                await self._answer(self._consumer, deliveries)
                self._in_hand = []

    async def _retention_loop(self) -> None:
        while True:
            # Sleep first: a worker that starts has just migrated, and a test or tool that reads an in-memory
            # database (one shared connection) right after the start must not meet a purge on it.
            await asyncio.sleep(self.retention_interval)
            now = time.time()
            try:
                purged = await self.purge_now(now)
            except Exception as exc:
                if not _transient(exc):
                    raise
                log.warning("participant retention failed; will retry", participant=self.participant.name,
                            error=repr(exc))
            else:
                if purged.dedup or purged.dead_letters:
                    log.info("participant retention clean-up", participant=self.participant.name,
                             dedup=purged.dedup, dead_letters=purged.dead_letters)

    async def purge_now(self, at: float | None = None) -> dead_letters.Purged:
        """Run one retention clean-up as of `at` (now by default)."""
        now = time.time() if at is None else at
        async with self._db_lock:
            return await dead_letters.purge(
                self.db,
                dedup_before=None if self.retention is None else now - self.retention,
                dead_letters_before=None if self.dead_letter_retention is None else now - self.dead_letter_retention,
            )

    async def _answer(self, consumer: Consumer, deliveries: Sequence[Delivery]) -> None:
        """Handle, reply to and acknowledge one batch, trying again until it goes through.

        A consumer does not deliver again what it handed out while it lives (only its group's next member does,
        after a restart or a rebalance), so giving up on a batch would leave its replies unsent until the engine's
        step timeout, or for ever. Handling again is safe: the dedup records answer what a committed run did.
        Replies already published are not published again; an acknowledgement that fails is tried on its own.
        A failure that is not an outage (the database refusing a value, a bug) would fail every try: the batch is
        then handled command by command, and a command that fails on its own is answered as retryable.
        """
        delay = RETRY_BACKOFF_MIN
        replies: list[BrokerMessage] | None = None
        apart = False
        while True:
            try:
                if replies is None:
                    answered = await (self._handle_apart(deliveries) if apart else self.handle(deliveries))
                    if answered:
                        await self.broker.publish(answered)
                    replies = answered
                await consumer.commit(deliveries)
                return
            except Exception as exc:
                if replies is None and not _transient(exc) and not apart:
                    log.error("participant batch failed; handling its commands one by one",
                              participant=self.participant.name, commands=len(deliveries), error=repr(exc))
                    apart = True
                    continue
                log.warning("participant batch failed; retrying", participant=self.participant.name,
                            stage="acknowledge" if replies is not None else "handle and reply",
                            commands=len(deliveries), error=repr(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX)

    async def _handle_apart(self, deliveries: Sequence[Delivery]) -> list[BrokerMessage]:
        """Each command in its own transaction, its reply published on its own. One that fails on its own, not
        for an outage (a value the database refuses, a reply the broker refuses, a bug), gets a retryable answer
        instead (not recorded, its effect rolled back): the engine's retry policy decides what follows. Returns
        nothing left to publish."""
        for delivery in deliveries:
            try:
                replies = await self.handle([delivery])
                if replies:
                    await self.broker.publish(replies)
            except Exception as exc:
                if _transient(exc):
                    raise
                try:
                    command = None if _unreadable(delivery.message) else decode_command(delivery.message)
                except Exception:
                    command = None
                if command is None:  # its dead letter could not be written: say so rather than hold back the rest
                    log.error("malformed command could not be dead-lettered; dropped",
                              participant=self.participant.name, error=repr(exc))
                    continue
                self.participant.stats["retryable"] += 1
                log.error("command failed on its own; replying retryable", participant=self.participant.name,
                          saga_id=command.saga_id, step=command.step, attempt=command.attempt,
                          message_id=command.id, error=repr(exc))
                await self.broker.publish([encode_reply(
                    command, outcome=Outcome.RETRY, type=f"{command.type}.retry", data={},
                    source=self.participant.name, at=time.time(), reason=f"participant failed: {exc!r}"[:300],
                )])
        return []

    async def handle(self, deliveries: Sequence[Delivery]) -> list[BrokerMessage]:
        """Handle a batch in one transaction (a savepoint per command); return the replies to publish. What is
        not a readable command becomes a dead letter in the same transaction."""
        async with self._db_lock:
            return await self._handle(deliveries)

    async def _handle(self, deliveries: Sequence[Delivery]) -> list[BrokerMessage]:
        commands: list[CommandMessage] = []
        spans: list[Any] = []  # with tracing: each command's span, in the order of `commands`
        letters: list[dict[str, Any]] = []
        now = time.time()
        for delivery in deliveries:
            reason = _unreadable(delivery.message)
            if reason is None:
                try:
                    commands.append(decode_command(delivery.message))
                    if self.tracing is not None:
                        spans.append(self.tracing.begin(self.participant.name, delivery.message, commands[-1]))
                    continue
                except MalformedMessage as exc:
                    reason = str(exc)
                except Exception as exc:  # the wire module's own error only, in principle; never stop for one
                    reason = f"cannot decode: {exc!r}"
            self.participant.stats["malformed"] += 1
            letters.append(dead_letters.dead_letter_row(delivery.message, reason, now))
            log.warning("malformed command dead-lettered", participant=self.participant.name,
                        reason=reason[:300], dead_letter=letters[-1]["id"])
        if not commands:
            if letters:
                async with self.db.begin() as tx:
                    await dead_letters.record(tx, letters)
            return []
        answers: list[tuple[CommandMessage, Answer]] = []
        async with self.db.begin() as tx:
            await dead_letters.record(tx, letters)
            ledger = await Ledger.of(tx)
            keys = sorted({c.idempotency_key for c in commands} | {_compensation_key(c) for c in commands})
            recorded = await ledger.recorded(keys)
            records: list[Record] = []
            at = time.time()
            for command in commands:
                answer = recorded.get(command.idempotency_key)
                if answer is not None:
                    self.participant.stats["deduplicated"] += 1
                else:
                    alone = len(commands) == 1 and not letters
                    if spans and self.tracing is not None:
                        with self.tracing.current(spans[len(answers)]):
                            answer = await self._run(command, ledger, recorded, alone=alone)
                    else:
                        answer = await self._run(command, ledger, recorded, alone=alone)
                    if answer.outcome == Outcome.SUCCESS or (
                        answer.outcome == Outcome.FAILURE and command.kind == MessageKind.COMMAND
                    ):
                        recorded[command.idempotency_key] = answer
                        body = answer.body if answer.body is not None else encode_body(answer.data)
                        records.append(Record(command.idempotency_key, command.id, str(answer.outcome), answer.type,
                                              body, at, answer.reason))
                answers.append((command, answer))
            # One statement for the batch, still in the transaction of the effects (and `recorded` already answers
            # repeats within the batch).
            await ledger.record(records)
        now = time.time()
        replies = [
            encode_reply(command, outcome=a.outcome, type=a.type, data=a.data, source=self.participant.name, at=now,
                         reason=a.reason, body=a.body)
            for command, a in answers
        ]
        if spans and self.tracing is not None:
            replies = [self.tracing.reply(span, reply, str(a.outcome))
                       for span, reply, (_, a) in zip(spans, replies, answers, strict=True)]
        return replies

    async def _run(
        self, command: CommandMessage, ledger: Ledger, recorded: dict[str, Answer], *, alone: bool = False
    ) -> Answer:
        registration = self.participant.handlers.get(command.type)
        if registration is None:
            self.participant.stats["failed"] += 1
            return Answer(Outcome.FAILURE, f"{command.type}.failed", {}, f"no handler for {command.type!r}")
        if command.kind == MessageKind.COMMAND and _compensation_key(command) in recorded:
            # The compensation overtook the command: the saga has given up on this step, so it must not take effect.
            return Answer(Outcome.FAILURE, f"{command.type}.failed", {}, "already compensated")
        savepoint = await ledger.savepoint(alone=alone)
        try:
            data = await registration.handler(command, ledger.tx) or {}
            body = encode_body(data)  # a reply that cannot be sent must roll the effect back, not fail after commit
        except registration.business_errors as exc:
            await savepoint.rollback()
            reason = exc.reason if isinstance(exc, BusinessFailure) else str(exc)
            extra = exc.data if isinstance(exc, BusinessFailure) else {}
            reply_type = (exc.type if isinstance(exc, BusinessFailure) else None) or f"{command.type}.failed"
            if len(reply_type) > _MAX_REPLY_TYPE or "\x00" in reply_type or has_nul(extra):
                # Recorded, it could not be stored (PostgreSQL): a bug of the handler, not a business answer.
                self.participant.stats["retryable"] += 1
                return Answer(Outcome.RETRY, f"{command.type}.retry", {},
                              f"the handler's failure cannot be recorded (reply type {reply_type[:50]!r}...)")
            self.participant.stats["failed"] += 1
            return Answer(Outcome.FAILURE, reply_type, extra, reason.replace("\x00", "\ufffd")[:MAX_REASON_CHARS])
        except Exception as exc:
            await savepoint.rollback()
            self.participant.stats["retryable"] += 1
            log.warning("handler raised; replying retryable", participant=self.participant.name,
                        saga_id=command.saga_id, step=command.step, attempt=command.attempt,
                        message_id=command.id, error=repr(exc))
            return Answer(Outcome.RETRY, f"{command.type}.retry", {}, repr(exc)[:300])
        await savepoint.commit()
        self.participant.stats["handled"] += 1
        return Answer(Outcome.SUCCESS, f"{command.type}.succeeded", data, body=body)


def _unreadable(message: BrokerMessage) -> str | None:
    """Why the broker could not decode `message` (it says so in `malformed`), or None."""
    if message.malformed is not None:
        return message.malformed or "the broker could not decode this message"
    if not isinstance(message.value, bytes):
        return f"message value is {type(message.value).__name__}, not bytes"
    return None


def _transient(exc: BaseException) -> bool:
    """A failure that may pass by itself (the database or the broker unreachable, a lock): try the same again.
    The database's errors are told apart as the engine's store tells them (`is_retriable`)."""
    if isinstance(exc, SagaError):
        return bool(getattr(exc, "retriable", False))
    return is_retriable(exc)


def _compensation_key(command: CommandMessage) -> str:
    """The dedup key of the compensation of the same step: its presence is the tombstone."""
    return f"{command.saga_id}/{command.step}/{MessageKind.COMPENSATION}"


@dataclass(frozen=True)
class _DatabaseProbe:
    db: AsyncEngine

    async def probe(self) -> None:
        async with self.db.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
