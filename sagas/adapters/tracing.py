"""OpenTelemetry traces of sagas: `EngineTracing` (an engine observer) and `ParticipantTracing` (for
`Participant.serve(tracing=...)`). Needs only opentelemetry-api; spans go wherever the application's SDK sends them.

    engine = Engine(store=..., broker=..., observer=EngineTracing(messaging_system="kafka"))

One trace per saga. Its trace id and the id of its (never recorded) root span are derived from the saga id, so every
engine of a group, a restarted engine and a retry continue the same trace with nothing more to store: the saga's id
*is* its stored trace context. In it:

- each step attempt (command or compensation) is a PRODUCER span ``send <topic>`` covering its round trip: begun
  when the command is decided (before the commit, so that its context travels in the stored message's
  ``ce_traceparent`` / ``ce_tracestate`` headers, the CloudEvents distributed-tracing extension) and ended when its
  reply is fetched (``sagas.outcome`` = the reply's outcome), linked to the participant's span the reply names;
  or when the attempt times out (``timeout``), or at `EngineTracing.close` (``interrupted``);
- a participant's handling is a CONSUMER span ``process <topic>``, child of that PRODUCER span through the headers,
  and its reply carries the CONSUMER span's context back;
- a reply whose attempt's span this engine does not hold (it was sent before a restart, or by another engine of the
  group, or came after the timeout) is handled in a CONSUMER span ``process <reply topic>`` of its own, in the
  saga's trace, linked to the participant's span, ended when the reply's unit of work is committed.

One span per attempt on the engine's side, not a PRODUCER + CONSUMER pair: what each span costs in the SDK is most of
what tracing costs (see bench/observability_overhead.py), and the round trip is what an operator looks for.

Attributes follow the OpenTelemetry messaging conventions (``messaging.system``, ``messaging.destination.name``,
``messaging.operation.type``, ``messaging.operation.name``, ``messaging.message.id``) plus ``sagas.saga.id``,
``sagas.saga.name``, ``sagas.step``, ``sagas.attempt``, ``sagas.kind`` and ``sagas.outcome``. A message without
the headers (a kcat participant, a row written by the CLI) is handled as before; a participant's span of a command
without them is still in the saga's trace, a child of its root.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sagas.engine.ports import BrokerMessage, Delivery, NoObserver, UnitOfWork
from sagas.engine.state import OutgoingCommand, message_id
from sagas.engine.wire import CommandMessage

__all__ = ["EngineTracing", "ParticipantTracing", "saga_context", "sampled", "trace_headers"]

TRACEPARENT = "ce_traceparent"
TRACESTATE = "ce_tracestate"
_OPEN_MAX = 10_000
"""Spans begun and not yet ended that are remembered (an SDK span holds a few kB: attempts waiting for a human's reply
could be many); beyond, the oldest are ended as they are, marked ``sagas.outcome=pending``."""
_propagator = TraceContextTextMapPropagator()


_ROOTS: OrderedDict[tuple[str, bool], otel_context.Context] = OrderedDict()
_ROOTS_MAX = 10_000


@functools.lru_cache(maxsize=10_000)
def _trace_id(saga_id: str) -> int:
    """The saga's trace id: its UUID's 128 bits, or the first 128 bits of the SHA-256 of another id."""
    try:
        trace_id = uuid.UUID(saga_id).int
    except ValueError:
        trace_id = int.from_bytes(hashlib.sha256(saga_id.encode()).digest()[:16], "big")
    return trace_id or 1


def saga_context(saga_id: str, sampled: bool = True) -> otel_context.Context:
    """The context whose span is the saga's root: the same ids for the same saga, in any process, at any time.
    `sampled` is its trace flag: a parent-based sampler records the saga's spans, in every process, or none."""
    key = (saga_id, sampled)
    found = _ROOTS.get(key)
    if found is not None:
        return found
    span_id = int.from_bytes(hashlib.sha256(b"root:" + saga_id.encode()).digest()[:8], "big") or 1
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    root = SpanContext(trace_id=_trace_id(saga_id), span_id=span_id, is_remote=True, trace_flags=flags)
    found = _ROOTS[key] = trace.set_span_in_context(NonRecordingSpan(root))
    if len(_ROOTS) > _ROOTS_MAX:
        _ROOTS.popitem(last=False)
    return found


@functools.lru_cache(maxsize=10_000)
def _sample_point(saga_id: str) -> float:
    return int.from_bytes(hashlib.sha256(b"sample:" + saga_id.encode()).digest()[:8], "big") / 2**64


def sampled(saga_id: str, ratio: float) -> bool:
    """Whether a saga's trace is sampled at `ratio`: decided by a hash of its id alone, so every process agrees.
    Not by the trace id's own bits (what the SDK's `TraceIdRatioBased` reads): the engine's UUIDv7 ids have fixed
    variant bits there, and the ids of one millisecond count up from one random start, so whole bursts of sagas
    would be in or out together."""
    return ratio >= 1.0 or _sample_point(saga_id) < ratio


def trace_headers(span: Span) -> tuple[tuple[str, bytes], ...]:
    """`span`'s context as the CloudEvents distributed-tracing headers (W3C trace context, version 00)."""
    context = span.get_span_context()
    if not context.is_valid:
        return ()
    parent = (TRACEPARENT, f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}".encode())
    state = context.trace_state.to_header() if context.trace_state else ""
    return (parent, (TRACESTATE, state.encode())) if state else (parent,)


_WANTED = frozenset({TRACEPARENT, TRACESTATE, "ce_sagacausation", "ce_sagaoutcome", "ce_subject", "ce_id",
                     "ce_sagastep", "ce_sagaattempt"})


def _headers(message: BrokerMessage) -> dict[str, str]:
    """The trace context and reply headers of `message`, in one pass over its headers (never raises)."""
    found: dict[str, str] = {}
    try:
        for key, value in message.headers:
            if key in _WANTED and key not in found and isinstance(value, bytes | bytearray | memoryview):
                found[key] = bytes(value).decode("utf-8", errors="replace")
    except (TypeError, ValueError):  # headers that are not pairs
        pass
    return found


def _remote(parent: str | None, state: str | None) -> SpanContext | None:
    """The valid span context of a ``traceparent`` (and ``tracestate``) header, or None."""
    if parent is None:
        return None
    if state is None:
        parts = parent.split("-")
        # The common case parsed here; anything else (tracestate, another version) by the W3C propagator.
        if len(parts) == 4 and parts[0] == "00" and len(parts[1]) == 32 and len(parts[2]) == 16 and len(parts[3]) == 2:
            try:
                trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
            except ValueError:
                return None
            if not trace_id or not span_id:
                return None
            return SpanContext(trace_id=trace_id, span_id=span_id, is_remote=True, trace_flags=TraceFlags(flags))
    carrier = {"traceparent": parent} if state is None else {"traceparent": parent, "tracestate": state}
    context = trace.get_current_span(_propagator.extract(carrier)).get_span_context()
    return context if context.is_valid else None


@functools.lru_cache(maxsize=10_000)
def _unsampled(saga_id: str) -> tuple[tuple[str, bytes], ...]:
    """The headers of an unsampled saga's commands: its root context, flagged not sampled."""
    return trace_headers(trace.get_current_span(saga_context(saga_id, False)))


def _with_headers(message: BrokerMessage, headers: tuple[tuple[str, bytes], ...]) -> BrokerMessage:
    kept = [h for h in message.headers if h[0] != TRACEPARENT and h[0] != TRACESTATE]
    return BrokerMessage(topic=message.topic, value=message.value, key=message.key, headers=(*kept, *headers))


class _Current:
    """`span` current while the handler runs (what `trace.use_span` does, without its generator and exception
    recording: the worker answers a handler's exception itself)."""

    __slots__ = ("context", "token")

    def __init__(self, span: Span) -> None:
        self.context = trace.set_span_in_context(span)
        self.token: object = None

    def __enter__(self) -> None:
        self.token = otel_context.attach(self.context)

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self.token)  # type: ignore[arg-type]


class _OpenSpans:
    """Spans begun by one call and ended by a later one, bounded."""

    def __init__(self) -> None:
        self._spans: OrderedDict[str, Span] = OrderedDict()

    def __len__(self) -> int:
        return len(self._spans)

    def put(self, key: str, span: Span) -> None:
        # Decided again (a conflict re-ran the batch): the first never went out, and is dropped unrecorded.
        self._spans.pop(key, None)
        self._spans[key] = span
        if len(self._spans) > _OPEN_MAX:
            oldest = self._spans.popitem(last=False)[1]
            oldest.set_attribute("sagas.outcome", "pending")
            oldest.end()

    def pop(self, key: str) -> Span | None:
        return self._spans.pop(key, None)

    def end(self, key: str) -> None:
        span = self._spans.pop(key, None)
        if span is not None:
            span.end()

    def end_all(self, **attributes: Any) -> None:
        spans, self._spans = self._spans, OrderedDict()
        for span in spans.values():
            span.set_attributes(attributes)
            span.end()


_TIMED_OUT = {"step.timed_out": "command", "compensation.timed_out": "compensation"}


class EngineTracing(NoObserver):
    """The engine's spans, on the observer seam (see the module docstring). Call `close` once the engine has
    stopped: it ends the spans of the attempts still waiting for their reply (`sagas serve` does)."""

    def __init__(self, *, tracer_provider: Any = None, messaging_system: str = "kafka", ratio: float = 1.0) -> None:
        """`messaging_system`: the broker, as the conventions name it (``kafka``, ``rabbitmq``; ``sagas.db`` for
        db://, ``memory``); `ratio`: the share of sagas whose traces are sampled, decided by the saga id (with
        the SDK's default parent-based sampler, participants follow the flag in ``ce_traceparent``)."""
        self.tracer = trace.get_tracer("sagas.engine", tracer_provider=tracer_provider)
        self.messaging_system = messaging_system
        self.ratio = ratio
        self._round_trips = _OpenSpans()
        """Command id -> its PRODUCER span, from the decision to the reply fetched (or the timeout)."""
        self._processing = _OpenSpans()
        """Reply id -> a CONSUMER span of a reply whose attempt's span is not here (sent before a restart)."""
        self._per_topic: dict[str, tuple[str, dict[str, Any]]] = {}

    def _topic(self, topic: str) -> tuple[str, dict[str, Any]]:
        """The name and the constant attributes of the spans of `topic`, built once."""
        found = self._per_topic.get(topic)
        if found is None:
            found = self._per_topic[topic] = (f"send {topic}", {
                "messaging.system": self.messaging_system, "messaging.destination.name": topic,
                "messaging.operation.type": "send", "messaging.operation.name": "send"})
        return found

    def outgoing(self, command: OutgoingCommand, message: BrokerMessage) -> BrokerMessage:
        if not sampled(command.saga_id, self.ratio):
            # No span to record, here or downstream: the unsampled root context tells the participants so.
            return _with_headers(message, _unsampled(command.saga_id))
        name, constant = self._topic(command.topic)
        span = self.tracer.start_span(
            name, context=saga_context(command.saga_id), kind=SpanKind.PRODUCER,
            attributes={
                **constant, "messaging.message.id": command.id, "sagas.saga.id": command.saga_id,
                "sagas.saga.name": command.saga_name, "sagas.step": command.step, "sagas.attempt": command.attempt,
                "sagas.kind": str(command.kind),
            },
        )
        self._round_trips.put(command.id, span)
        return _with_headers(message, trace_headers(span))

    def fetched(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            message = delivery.message
            found = _headers(message)
            causation = found.get("ce_sagacausation")
            span = None if causation is None else self._round_trips.pop(causation)
            if span is not None:  # the attempt's round trip ends here
                remote = _remote(found.get(TRACEPARENT), found.get(TRACESTATE))
                if remote is not None and remote.trace_id != span.get_span_context().trace_id:
                    span.add_link(remote)  # the participant's span is in a trace of its own: link it
                span.set_attribute("sagas.outcome", found.get("ce_sagaoutcome", ""))
                span.end()
                continue
            saga_id, reply_id = found.get("ce_subject"), found.get("ce_id")
            if saga_id is None or reply_id is None or not sampled(saga_id, self.ratio):
                continue  # malformed (a dead letter, in no saga's trace), or the saga is not traced
            remote = _remote(found.get(TRACEPARENT), found.get(TRACESTATE))
            try:
                attempt = int(found.get("ce_sagaattempt") or 0)
            except ValueError:
                attempt = 0
            span = self.tracer.start_span(
                f"process {message.topic}", context=saga_context(saga_id), kind=SpanKind.CONSUMER,
                links=[] if remote is None else [Link(remote)],
                attributes={
                    "messaging.system": self.messaging_system, "messaging.destination.name": message.topic,
                    "messaging.operation.type": "process", "messaging.operation.name": "process",
                    "messaging.message.id": reply_id, "sagas.saga.id": saga_id,
                    "sagas.step": found.get("ce_sagastep", ""), "sagas.kind": "reply", "sagas.attempt": attempt,
                },
            )
            self._processing.put(reply_id, span)

    def committed(self, work: UnitOfWork, seconds: float) -> None:
        if len(self._processing):
            for record in work.inbox:
                self._processing.end(record.message_id)
            for dead in work.dead_letters:
                self._processing.end(dead.id)
        for history in work.history:
            kind = _TIMED_OUT.get(history.entry.type)
            if kind is not None and history.entry.step is not None and history.entry.attempt is not None:
                span = self._round_trips.pop(message_id(history.saga_id, history.entry.step, kind,
                                                        history.entry.attempt))
                if span is not None:
                    span.set_attribute("sagas.outcome", "timeout")
                    span.end()

    def close(self) -> None:
        """End the spans still open (attempts whose reply has not come), marked ``sagas.outcome=interrupted``:
        an engine that stops without it leaves them unrecorded. The replies, handled by the next engine, get
        a `process` span of their own."""
        self._round_trips.end_all(**{"sagas.outcome": "interrupted"})
        self._processing.end_all()


class ParticipantTracing:
    """A participant's CONSUMER spans: each command's handling, child of the engine's PRODUCER span."""

    def __init__(self, *, tracer_provider: Any = None, messaging_system: str = "kafka", ratio: float = 1.0) -> None:
        """`ratio`: the share of sagas traced, for commands that carry no trace context (see `begin`)."""
        self.tracer = trace.get_tracer("sagas.participant", tracer_provider=tracer_provider)
        self.messaging_system = messaging_system
        self.ratio = ratio

    def begin(self, participant: str, message: BrokerMessage, command: CommandMessage) -> Span:
        """The span of `command`'s handling (the caller makes it current while the handler runs, and ends it);
        none (the invalid span) when the engine said the saga is not sampled. A command without the headers
        (written by `SagaAdmin.start`, the CLI or the HTTP API, or by an engine without tracing) is still put in
        its saga's trace, whose ids the saga id gives: its span is a child of the saga's root."""
        remote = _remote(message.header(TRACEPARENT), message.header(TRACESTATE))
        if remote is None:
            if not sampled(command.saga_id, self.ratio):
                return trace.INVALID_SPAN
            parent = saga_context(command.saga_id)
        elif not remote.trace_flags.sampled:
            return trace.INVALID_SPAN
        else:
            parent = trace.set_span_in_context(NonRecordingSpan(remote))
        return self.tracer.start_span(
            f"process {message.topic}", context=parent, kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": self.messaging_system, "messaging.destination.name": message.topic,
                "messaging.operation.type": "process", "messaging.operation.name": "process",
                "messaging.message.id": command.id, "messaging.consumer.group.name": participant,
                "sagas.saga.id": command.saga_id, "sagas.saga.name": command.saga_name, "sagas.step": command.step,
                "sagas.attempt": command.attempt, "sagas.kind": str(command.kind),
            },
        )

    def current(self, span: Span) -> Any:
        """A context manager making `span` current while the handler runs: its log lines carry the span's ids."""
        if span is trace.INVALID_SPAN:
            return contextlib.nullcontext()
        return _Current(span)

    def reply(self, span: Span, reply: BrokerMessage, outcome: str) -> BrokerMessage:
        """End `span` with the answer's outcome; the reply carries its context back to the engine."""
        if span is trace.INVALID_SPAN:
            return reply  # not sampled: the reply goes as it is
        span.set_attribute("sagas.outcome", outcome)
        if outcome == "retry":  # the handler failed on its own (a business failure is an answer, not an error)
            span.set_status(Status(StatusCode.ERROR, "handler failed; answered retry"))
        span.end()
        return _with_headers(reply, trace_headers(span))
