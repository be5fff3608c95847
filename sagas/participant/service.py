"""`Participant`: a service's command handlers, registered by command type, and how it is served."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sagas.adapters import normalize_db_url
from sagas.adapters.sql.connection import open_async_engine
from sagas.engine.ports import Broker
from sagas.engine.state import MessageKind
from sagas.engine.supervise import LoopHealth
from sagas.engine.wire import CommandMessage

if TYPE_CHECKING:
    from sagas.adapters.tracing import ParticipantTracing
    from sagas.participant.worker import ParticipantWorker

Handler = Callable[[CommandMessage, AsyncConnection], Awaitable[dict[str, Any] | None]]

DEDUP_RETENTION = 30 * 24 * 3600.0
"""Seconds a dedup record is kept (30 days): longer than a command can be redelivered or retried (see the
participant section of docs/operations.md for the reasoning and when to raise it)."""
DEAD_LETTER_RETENTION = 90 * 24 * 3600.0
"""Seconds a participant's dead letter is kept (90 days): time for an operator to look, fix and replay."""


class BusinessFailure(Exception):
    """Raise from a handler to answer with a business failure: definite, not retried, nothing to undo."""

    def __init__(self, reason: str, data: dict[str, Any] | None = None, *, type: str | None = None) -> None:
        """`type`: the reply type, when the step declares its own failure types (default '<command>.failed')."""
        self.reason = reason
        self.data = data or {}
        self.type = type
        super().__init__(reason)


@dataclass(frozen=True)
class Registration:
    handler: Handler
    kind: MessageKind
    business_errors: tuple[type[BaseException], ...]


class Participant:
    """A participant service: command handlers, deduplicated in the participant's own database."""

    def __init__(
        self, name: str, *, topic: str | None = None, group: str | None = None, metadata: sa.MetaData | None = None
    ) -> None:
        """`metadata`: the participant's own tables, created beside the dedup table when the worker starts."""
        self.name = name
        self.metadata = metadata
        self.topic = topic or f"{name}.commands"
        self.group = group or f"{name}-participant"
        self.handlers: dict[str, Registration] = {}
        self.stats = {"handled": 0, "deduplicated": 0, "failed": 0, "retryable": 0, "malformed": 0}
        self._workers: list[ParticipantWorker] = []

    def command(
        self, command_type: str, *, business_errors: Sequence[type[BaseException]] = ()
    ) -> Callable[[Handler], Handler]:
        return self._register(command_type, MessageKind.COMMAND, business_errors)

    def compensation(self, command_type: str) -> Callable[[Handler], Handler]:
        return self._register(command_type, MessageKind.COMPENSATION, ())

    def _register(
        self, command_type: str, kind: MessageKind, business_errors: Sequence[type[BaseException]]
    ) -> Callable[[Handler], Handler]:
        def decorate(handler: Handler) -> Handler:
            self.handlers[command_type] = Registration(handler, kind, (BusinessFailure, *business_errors))
            return handler

        return decorate

    @contextlib.asynccontextmanager
    async def serve(
        self,
        *,
        broker: Broker,
        database_url: str = "sqlite+aiosqlite:///:memory:",
        batch_max: int = 256,
        retention: float | None = DEDUP_RETENTION,
        dead_letter_retention: float | None = DEAD_LETTER_RETENTION,
        retention_interval: float = 600.0,
        http: str | None = None,
        tracing: ParticipantTracing | bool | None = None,
    ) -> AsyncIterator[ParticipantWorker]:
        """Run a worker until the block ends. `retention` / `dead_letter_retention`: seconds after which dedup
        records / dead letters are purged (None keeps them), checked every `retention_interval` seconds.
        `http`: ``HOST:PORT`` to serve /metrics, /healthz and /readyz on while it runs (needs the http extra);
        `tracing`: a span per command, child of the engine's: a `sagas.adapters.tracing.ParticipantTracing`, or
        True / False, or None (the default) to follow the standard OTEL_* environment (off unless
        ``OTEL_TRACES_EXPORTER`` names an exporter; see `sagas.adapters.otel`)."""
        from sagas.participant.worker import ParticipantWorker

        setup = None
        if tracing is None or isinstance(tracing, bool):
            from sagas.adapters.otel import configure_tracing, messaging_system

            setup = configure_tracing(tracing, service_name=self.name)
            tracing = None
            if setup is not None:
                from sagas.adapters.tracing import ParticipantTracing

                tracing = ParticipantTracing(tracer_provider=setup.provider, messaging_system=messaging_system(broker),
                                             ratio=setup.ratio)

        worker = ParticipantWorker(
            self, broker, participant_database(database_url), batch_max=batch_max, retention=retention,
            dead_letter_retention=dead_letter_retention, retention_interval=retention_interval,
        )
        worker.tracing = tracing
        await worker.start()
        self._workers.append(worker)
        server = None
        try:
            if http is not None:
                from sagas.web.server import participant_server

                server = await participant_server(worker, http)
                worker.http_url = server.url
            yield worker
        finally:
            if server is not None:
                await server.stop()
            self._workers.remove(worker)
            await worker.stop()
            if setup is not None:
                await asyncio.to_thread(setup.shutdown)  # flushes the spans still batched

    def health(self) -> dict[str, LoopHealth]:
        """The loops of the workers serving now (consumer, retention), by name; with several workers, by
        ``<n>:<name>``. What a health check reads."""
        if len(self._workers) == 1:
            return self._workers[0].health()
        return {f"{n}:{name}": h for n, w in enumerate(self._workers) for name, h in w.health().items()}

    @property
    def healthy(self) -> bool:
        """Served, every loop runs, and none failed repeatedly within the last minute."""
        return bool(self._workers) and all(w.healthy for w in self._workers)


def participant_database(url: str) -> AsyncEngine:
    """An async engine for a participant's own database (a plain path is a SQLite file), opened the way every
    sagas database is (`sagas.adapters.sql.connection`): on SQLite WAL, ``synchronous=NORMAL``, the common busy
    timeout, and ``BEGIN IMMEDIATE`` so that processes sharing the file queue for the write lock instead of
    deadlocking."""
    url = normalize_db_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        # No rollback when a connection goes back to the pool: every use ends its transaction itself (`begin()`
        # commits or rolls back, `connect()` rolls back on close), and that rollback is one more hop to the
        # driver's thread per batch. Elsewhere the pool's reset stays, a guard for a connection given back
        # mid-transaction (a cancellation during a statement).
        return open_async_engine(url, pool_reset_on_return=None)
    return open_async_engine(url)
