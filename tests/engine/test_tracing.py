"""OpenTelemetry traces: one trace per saga through `sagas.participant` participants, parented through the
ce_traceparent header, continued by a restarted engine; recorded with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sagas.adapters import open_broker
from sagas.adapters.sql import SqlStore
from sagas.adapters.tracing import EngineTracing, ParticipantTracing, saga_context, sampled
from sagas.engine.ports import BrokerMessage, Delivery, HistoryRecord, UnitOfWork
from sagas.engine.runtime import Engine
from sagas.engine.state import HistoryEntry, MessageKind, OutgoingCommand, message_id
from sagas.engine.wire import CommandMessage
from sagas.logs import add_trace_ids
from sagas.participant import Participant
from tests.engine.support import ledger_participant, three_steps


@pytest.fixture
def spans() -> Any:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@contextlib.asynccontextmanager
async def serving(participant: Participant, url: str, provider: TracerProvider) -> AsyncIterator[Any]:
    broker = open_broker("db://", db_url=url)
    try:
        async with participant.serve(broker=broker, tracing=ParticipantTracing(tracer_provider=provider,
                                                                               messaging_system="sagas.db")) as w:
            yield w
    finally:
        await broker.close()


def engine(store: SqlStore, url: str, provider: TracerProvider) -> Engine:
    return Engine(store=store, broker=open_broker("db://", db_url=url), definitions=[three_steps()],
                  observer=EngineTracing(tracer_provider=provider, messaging_system="sagas.db"))


async def wait_for(store: SqlStore, saga_id: str, predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        instance = (await store.load([saga_id]))[saga_id]
        if predicate(instance):
            return
        assert time.monotonic() < deadline, instance
        await asyncio.sleep(0.05)


async def test_one_trace_per_saga_across_participants_and_an_engine_restart(
    tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A three-step saga whose engine is restarted while the second step's participant is down yields one trace:
    a PRODUCER `send <topic>` span per step attempt covering its round trip (from both engines; the one in flight at
    the restart ended by `close` as interrupted), each participant's CONSUMER `process <topic>` span its child,
    and the reply the second engine got for the first engine's command handled in a CONSUMER span
    of its own, linked to the participant's; messaging attributes and the saga's id, step, attempt and kind on
    each."""
    provider, exporter = spans
    url = f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
    store = SqlStore(url)
    inventory = ledger_participant("inventory", {"Reserve": None, "UndoReserve": None})
    payment = ledger_participant("payment", {"Charge": None, "UndoCharge": None})
    shipping = ledger_participant("shipping", {"Ship": None, "UndoShip": None})
    try:
        async with serving(inventory, url, provider), serving(shipping, url, provider):
            first = engine(store, url, provider)
            async with first:
                saga_id = await first.start_saga("order", {"order_id": "o-1", "amount": 5})
                await wait_for(store, saga_id, lambda i: i.steps["charge"].status == "running")
            first.observer.close()  # type: ignore[attr-defined]
            # Engine restarted; payment comes up only now and answers the command the first engine sent.
            second = engine(store, url, provider)
            async with second, serving(payment, url, provider):
                assert (await second.wait(saga_id, timeout=30)).status == "completed"
            second.observer.close()  # type: ignore[attr-defined]
    finally:
        await store.close()

    finished: list[ReadableSpan] = list(exporter.get_finished_spans())
    mine = [s for s in finished if s.attributes and s.attributes.get("sagas.saga.id") == saga_id]
    root = trace.get_current_span(saga_context(saga_id)).get_span_context()
    assert {s.context.trace_id for s in mine} == {root.trace_id}
    assert len(mine) == 7  # three sends, three participant handlings, the reply the second engine did not send
    producers = {s.attributes["sagas.step"]: s for s in mine if s.kind is SpanKind.PRODUCER}
    assert set(producers) == {"reserve", "charge", "ship"}
    for step, topic in (("reserve", "inventory.commands"), ("charge", "payment.commands"),
                        ("ship", "shipping.commands")):
        span = producers[step]
        assert span.name == f"send {topic}"
        assert span.parent is not None
        assert span.parent.span_id == root.span_id
        assert span.attributes["messaging.system"] == "sagas.db"
        assert span.attributes["messaging.destination.name"] == topic
        assert span.attributes["messaging.operation.type"] == "send"
        assert span.attributes["sagas.attempt"] == 1
        assert span.attributes["sagas.kind"] == "command"
    assert producers["reserve"].attributes["sagas.outcome"] == "success"
    assert producers["charge"].attributes["sagas.outcome"] == "interrupted"  # in flight when the first engine stopped
    assert producers["ship"].attributes["sagas.outcome"] == "success"
    consumers = {s.attributes["sagas.step"]: s for s in mine
                 if s.kind is SpanKind.CONSUMER and s.name.endswith(".commands")}
    assert set(consumers) == {"charge", "reserve", "ship"}
    for step, span in consumers.items():
        assert span.parent is not None
        assert span.parent.span_id == producers[step].context.span_id  # the participant's span is the send's child
        assert span.attributes["messaging.operation.type"] == "process"
        assert span.attributes["sagas.outcome"] == "success"
    for step in ("reserve", "charge", "ship"):  # the handling is the send's child already: no link needed
        assert producers[step].links == ()
    handled = [s for s in mine if s.kind is SpanKind.CONSUMER and s.name == "process sagas.replies"]
    assert len(handled) == 1
    assert handled[0].attributes["sagas.step"] == "charge"
    assert handled[0].parent is not None
    assert handled[0].parent.span_id == root.span_id
    assert [link.context.span_id for link in handled[0].links] == [consumers["charge"].context.span_id]
    # The second engine sent "ship" after the restart: still the saga's trace.
    assert producers["ship"].start_time > producers["charge"].end_time


async def one_saga(tmp_path: Path, provider: TracerProvider, observer: Any, reserve: Any = None) -> None:
    """One three-step saga to completion, its participants traced, its engine observed by `observer`."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
    store = SqlStore(url)
    participants = [ledger_participant("inventory", {"Reserve": reserve, "UndoReserve": None}),
                    ledger_participant("payment", {"Charge": None, "UndoCharge": None}),
                    ledger_participant("shipping", {"Ship": None, "UndoShip": None})]
    engine = Engine(store=store, broker=open_broker("db://", db_url=url), definitions=[three_steps()],
                    observer=observer)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for participant in participants:
                await stack.enter_async_context(serving(participant, url, provider))
            await stack.enter_async_context(engine)
            saga_id = await engine.start_saga("order", {"order_id": "o", "amount": 1})
            assert (await engine.wait(saga_id, timeout=30)).status == "completed"
    finally:
        await store.close()


async def test_a_participant_ignoring_the_headers_still_works_and_handler_logs_carry_ids(
    tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """Commands without ce_traceparent (written by a tracing-free engine, or read by a participant that ignores
    them) are handled as before, their spans still in the saga's trace (children of its root, whose ids the saga id
    gives); with tracing on, a handler's log lines carry the trace and span ids."""
    provider, exporter = spans
    lines: list[dict[str, Any]] = []

    def logged(command: CommandMessage) -> dict[str, Any]:
        lines.append(add_trace_ids(None, "info", {"event": "handled", "step": command.step}))  # type: ignore[arg-type]
        return {"ok": True}

    await one_saga(tmp_path, provider, None, reserve=logged)
    consumers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert len(consumers) == 3
    roots = {s.attributes["sagas.saga.id"]: trace.get_current_span(saga_context(str(s.attributes["sagas.saga.id"])))
             for s in consumers if s.attributes}
    for span in consumers:  # no header: a child of the saga's root, in the saga's trace
        root = roots[span.attributes["sagas.saga.id"]].get_span_context()
        assert span.parent is not None
        assert span.parent.span_id == root.span_id
        assert span.context.trace_id == root.trace_id
    reserve = next(s for s in consumers if s.attributes and s.attributes["sagas.step"] == "reserve")
    assert lines == [{"event": "handled", "step": "reserve", "trace_id": f"{reserve.context.trace_id:032x}",
                      "span_id": f"{reserve.context.span_id:016x}"}]


async def test_a_saga_left_out_by_the_ratio_records_no_span_anywhere(
    tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """At ratio 0 the saga's commands carry an unsampled trace context: neither the engine nor the participants
    (the SDK's default parent-based sampler) record a span, and the saga completes as before."""
    provider, exporter = spans
    quiet = EngineTracing(tracer_provider=provider, messaging_system="sagas.db", ratio=0.0)
    await one_saga(tmp_path, provider, quiet)
    assert exporter.get_finished_spans() == ()


def test_sampling_is_decided_by_the_saga_id_alone() -> None:
    """The same saga id is always in or always out; about `ratio` of ids are in."""
    ids = [f"saga-{n}" for n in range(2000)]
    chosen = [sampled(i, 0.25) for i in ids]
    assert chosen == [sampled(i, 0.25) for i in ids]
    assert 400 < sum(chosen) < 600
    assert all(sampled(i, 1.0) for i in ids[:10])


async def test_a_step_retry_continues_the_saga_trace_with_the_right_parents(
    tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A step whose first attempt is answered `retry`: the retry reply and the re-sent command (attempt 2) are in the
    saga's one trace; each attempt's participant span is the child of that attempt's `send` span, each attempt's
    round trip is ended by its own reply (outcome `retry`, then `success`), and attempt 2 is sent after the retry
    reply ended attempt 1."""
    provider, exporter = spans
    failed: list[int] = []

    def flaky(command: CommandMessage) -> dict[str, Any]:
        if command.attempt == 1:
            failed.append(command.attempt)
            raise RuntimeError("transient: try again")  # not a business error: the participant answers `retry`
        return {"ok": True}

    observer = EngineTracing(tracer_provider=provider, messaging_system="sagas.db")
    await one_saga(tmp_path, provider, observer, reserve=flaky)
    assert failed == [1]
    finished = [s for s in exporter.get_finished_spans() if s.attributes]
    saga_id = str(finished[0].attributes["sagas.saga.id"])
    root = trace.get_current_span(saga_context(saga_id)).get_span_context()
    assert {s.context.trace_id for s in finished} == {root.trace_id}
    reserve = [s for s in finished if s.attributes["sagas.step"] == "reserve"]

    def by_attempt(predicate: Any) -> dict[int, ReadableSpan]:
        chosen = [s for s in reserve if predicate(s)]
        found = {int(s.attributes["sagas.attempt"]): s for s in chosen}
        assert len(found) == len(chosen), chosen
        return found

    sends = by_attempt(lambda s: s.kind is SpanKind.PRODUCER)
    handled = by_attempt(lambda s: s.kind is SpanKind.CONSUMER and s.name == "process inventory.commands")
    assert set(sends) == set(handled) == {1, 2}
    assert not [s for s in reserve if s.name == "process sagas.replies"]  # each reply ended its attempt's span
    for attempt in (1, 2):
        assert sends[attempt].parent is not None
        assert sends[attempt].parent.span_id == root.span_id  # every attempt hangs off the saga's root
        assert handled[attempt].parent is not None
        assert handled[attempt].parent.span_id == sends[attempt].context.span_id
        assert sends[attempt].links == ()  # the participant's span is its child, in the same trace
    assert handled[1].attributes["sagas.outcome"] == "retry"
    assert handled[1].status.status_code is StatusCode.ERROR  # the handler failed on its own
    assert handled[2].status.status_code is StatusCode.UNSET
    assert sends[1].attributes["sagas.outcome"] == "retry"  # the retry reply ended attempt 1's round trip
    assert handled[2].attributes["sagas.outcome"] == "success"
    assert sends[2].attributes["sagas.outcome"] == "success"
    assert sends[2].start_time >= sends[1].end_time  # re-sent after the retry reply, after its backoff


def test_an_attempt_that_times_out_or_is_in_flight_at_the_stop_ends_with_that_outcome(
    spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """An attempt's round-trip span ends with `timeout` when the commit records its timeout, a later attempt's span
    still open at `close` ends with `interrupted`, and a late reply to the timed-out attempt gets a reply span of
    its own (its round trip already ended)."""
    provider, exporter = spans
    tracing = EngineTracing(tracer_provider=provider, messaging_system="memory")
    saga_id = "01a23704-3095-76a4-aa53-a86efb234a63"

    def command(attempt: int) -> OutgoingCommand:
        return OutgoingCommand(id=message_id(saga_id, "reserve", MessageKind.COMMAND, attempt), saga_id=saga_id,
                               saga_name="order", step="reserve", kind=MessageKind.COMMAND, attempt=attempt,
                               topic="inventory.commands", type="Reserve", payload={})

    first = tracing.outgoing(command(1), BrokerMessage(topic="inventory.commands", value=b"{}"))
    assert first.header("ce_traceparent") is not None
    timed_out = HistoryEntry(at=1.0, type="step.timed_out", step="reserve", attempt=1)
    tracing.committed(UnitOfWork(history=[HistoryRecord(saga_id, timed_out)]), 0.001)
    tracing.outgoing(command(2), BrokerMessage(topic="inventory.commands", value=b"{}"))
    late = BrokerMessage(topic="sagas.replies", value=b"{}", headers=(
        ("ce_id", f"{command(1).id}/reply".encode()), ("ce_subject", saga_id.encode()),
        ("ce_sagastep", b"reserve"), ("ce_sagaattempt", b"1"), ("ce_sagacausation", command(1).id.encode()),
        ("ce_sagaoutcome", b"success")))
    tracing.fetched([Delivery(late)])
    tracing.close()
    finished = {(s.name, s.attributes["sagas.attempt"]): s for s in exporter.get_finished_spans()}
    assert set(finished) == {("send inventory.commands", 1), ("send inventory.commands", 2),
                             ("process sagas.replies", 1)}
    assert finished["send inventory.commands", 1].attributes["sagas.outcome"] == "timeout"
    assert finished["send inventory.commands", 2].attributes["sagas.outcome"] == "interrupted"


def test_a_reply_from_a_participant_tracing_in_a_trace_of_its_own_is_linked(
    spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A reply whose ce_traceparent names a span of another trace (a participant that started its own) ends the
    attempt's round trip with a link to that span; malformed trace headers are ignored, never raised."""
    provider, exporter = spans
    tracing = EngineTracing(tracer_provider=provider, messaging_system="memory")
    saga_id = "01a23704-3095-76a4-aa53-a86efb234a63"
    for attempt, parent in ((1, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), (2, "00-zz-bad-01")):
        command = OutgoingCommand(id=message_id(saga_id, "reserve", MessageKind.COMMAND, attempt), saga_id=saga_id,
                                  saga_name="order", step="reserve", kind=MessageKind.COMMAND, attempt=attempt,
                                  topic="inventory.commands", type="Reserve", payload={})
        tracing.outgoing(command, BrokerMessage(topic="inventory.commands", value=b"{}"))
        tracing.fetched([Delivery(BrokerMessage(topic="sagas.replies", value=b"{}", headers=(
            ("ce_sagacausation", command.id.encode()), ("ce_sagaoutcome", b"success"),
            ("ce_traceparent", parent.encode()))))])
    finished = {s.attributes["sagas.attempt"]: s for s in exporter.get_finished_spans()}
    assert [(link.context.trace_id, link.context.span_id) for link in finished[1].links] == [
        (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331)]
    assert finished[2].links == ()
    assert finished[1].attributes["sagas.outcome"] == finished[2].attributes["sagas.outcome"] == "success"


def test_open_round_trips_are_bounded_and_the_oldest_ends_as_pending(
    spans: tuple[TracerProvider, InMemorySpanExporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the bound of open round-trip spans the oldest is ended, marked `pending`; the others stay open."""
    import sagas.adapters.tracing as tracing_module

    provider, exporter = spans
    monkeypatch.setattr(tracing_module, "_OPEN_MAX", 2)
    tracing = EngineTracing(tracer_provider=provider, messaging_system="memory")
    for n in range(3):
        saga_id = f"saga-{n}"
        tracing.outgoing(OutgoingCommand(id=message_id(saga_id, "reserve", MessageKind.COMMAND, 1), saga_id=saga_id,
                                         saga_name="order", step="reserve", kind=MessageKind.COMMAND, attempt=1,
                                         topic="inventory.commands", type="Reserve", payload={}),
                         BrokerMessage(topic="inventory.commands", value=b"{}"))
    assert [(s.attributes["sagas.saga.id"], s.attributes["sagas.outcome"]) for s in exporter.get_finished_spans()] == [
        ("saga-0", "pending")]
