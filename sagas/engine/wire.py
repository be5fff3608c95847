"""The wire format: CloudEvents 1.0 in Kafka binary mode (attributes as `ce_*` headers, JSON data as the value).

`docs/protocol.md` documents it for participants written in other languages. Parsing never raises anything but
`MalformedMessage`, whose text becomes the dead-letter reason.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from sagas.definitions.limits import MESSAGE_ID_CHARS, STORED_SAGA_ID_CHARS
from sagas.definitions.schema import has_nul
from sagas.engine.ports import BrokerMessage
from sagas.engine.state import MessageKind, Outcome, OutgoingCommand, ReplyReceived, trusted

SPEC_VERSION = "1.0"
SCHEMA_VERSION = "1"
SOURCE = "sagas-engine"
MAX_MESSAGE_BYTES = 1_000_000
MAX_ATTRIBUTE_CHARS = 1_000
MAX_MESSAGE_ID_CHARS = MESSAGE_ID_CHARS
"""The store's message id columns (inbox, outbox, dead letters)."""
MAX_SAGA_ID_CHARS = STORED_SAGA_ID_CHARS
"""The store's saga id columns."""
MAX_REASON_CHARS = 500
"""What a reply carries of its reason."""
MAX_HEADERS = 64
"""Headers a message may carry (the protocol's own are 13)."""
MAX_DEPTH = 100
"""How deeply a message's JSON value may nest."""
MAX_ATTEMPT = 2**31 - 1
"""The store's attempt columns are 32-bit integers."""
DEAD_LETTER_PREFIX = "dl/"
_MAX_CHARS = {"id": 296, "subject": MAX_SAGA_ID_CHARS}
"""A reply's id is an inbox key and, after the prefix, a dead letter's (296 leaves room for it); its subject is a
saga id."""
CONTENT_TYPE = "application/json"


class MalformedMessage(ValueError):
    """A message that does not follow the protocol; the text says why."""


@dataclass(frozen=True)
class CommandMessage:
    """A command or compensation as a participant sees it."""

    id: str
    saga_id: str
    saga_name: str
    step: str
    kind: MessageKind
    attempt: int
    type: str
    data: dict[str, Any]
    reply_topic: str

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts: a retried command must not apply its effect again."""
        return f"{self.saga_id}/{self.step}/{self.kind}"


@functools.lru_cache(maxsize=256)
def _iso(at: float) -> str:
    # Cached: the messages of one batch share its timestamp.
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


_CONTENT_TYPE_HEADER = ("content-type", CONTENT_TYPE.encode())
# json.dumps with options builds a new encoder per call; one shared encoder writes the same bytes. Keys keep their
# order: a payload's fields as its mapping lists them, a reply's as the participant wrote them (order is data).
_BODY_ENCODER = json.JSONEncoder(separators=(",", ":"))
# Headers are built below as literal tuples, without an attribute dict and a loop over it: the codec runs for every
# command and every reply, on the event loop's thread.
_SPECVERSION = ("ce_specversion", SPEC_VERSION.encode())
_SOURCE = ("ce_source", SOURCE.encode())
_SCHEMA = ("ce_sagaschema", SCHEMA_VERSION.encode())
_KIND_REPLY = ("ce_sagakind", MessageKind.REPLY.value.encode())


@functools.lru_cache(maxsize=256)
def _iso_bytes(at: float) -> bytes:
    return _iso(at).encode()


@functools.lru_cache(maxsize=64)
def _encoded(value: str) -> bytes:
    """For the few distinct values (kinds, outcomes, topics, sources) that repeat in every message."""
    return value.encode()


def encode_body(data: dict[str, Any]) -> bytes:
    """The JSON value of a message: `data` as the wire carries it (raises TypeError or ValueError when `data` is not
    a JSON object this encoder can write: keys that are not strings, values JSON has no type for)."""
    if not isinstance(data, dict):
        raise TypeError(f"a message body must be a JSON object, not {type(data).__name__}")
    try:
        return orjson.dumps(data)  # a tenth of the stdlib's cost
    except TypeError:  # beyond orjson: integers over 64 bits, say; the stdlib writes those (or raises the same)
        _text_keys_only(data)
        return _BODY_ENCODER.encode(data).encode()


def _text_keys_only(data: Any) -> None:
    """Raise TypeError for a key that is not a string anywhere in `data`, as orjson does: the stdlib would write
    the key 1 as "1", and a reply read back would not say what its handler returned."""
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if not isinstance(key, str):
                    raise TypeError(f"a JSON object's keys are strings, not {type(key).__name__} ({key!r})")
                pending.append(value)
        elif isinstance(item, list | tuple):
            pending.extend(item)


def _decode(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("utf-8", errors="replace")


def encode_command(command: OutgoingCommand, *, reply_topic: str, at: float) -> BrokerMessage:
    headers = (
        _SPECVERSION,
        ("ce_id", command.id.encode()),
        _SOURCE,
        ("ce_type", command.type.encode()),
        ("ce_subject", command.saga_id.encode()),
        ("ce_time", _iso_bytes(at)),
        ("ce_saganame", command.saga_name.encode()),
        ("ce_sagastep", command.step.encode()),
        ("ce_sagaattempt", str(command.attempt).encode()),
        ("ce_sagakind", _encoded(str(command.kind))),
        ("ce_sagareplyto", _encoded(reply_topic)),
        _SCHEMA,
        _CONTENT_TYPE_HEADER,
    )
    return BrokerMessage(topic=command.topic, key=command.saga_id, headers=headers, value=encode_body(command.payload))


def encode_reply(
    command: CommandMessage,
    *,
    outcome: Outcome,
    type: str,
    data: dict[str, Any],
    source: str,
    at: float,
    reason: str | None = None,
    body: bytes | None = None,
) -> BrokerMessage:
    """A participant's reply to `command`. `body`: `data` as `encode_body` wrote it, when the caller has it."""
    headers = [
        _SPECVERSION,
        ("ce_id", f"{command.id}/reply".encode()),
        ("ce_source", _encoded(source)),
        ("ce_type", type.encode()),
        ("ce_subject", command.saga_id.encode()),
        ("ce_time", _iso_bytes(at)),
        ("ce_sagastep", command.step.encode()),
        ("ce_sagaattempt", str(command.attempt).encode()),
        _KIND_REPLY,
        ("ce_sagacausation", command.id.encode()),
        ("ce_sagaoutcome", _encoded(str(outcome))),
        _SCHEMA,
    ]
    if reason:
        headers.append(("ce_sagareason", reason[:MAX_REASON_CHARS].encode()))
    headers.append(_CONTENT_TYPE_HEADER)
    return BrokerMessage(
        topic=command.reply_topic, key=command.saga_id, headers=tuple(headers),
        value=encode_body(data) if body is None else body,
    )


_ATTRIBUTE_NAMES: dict[str, tuple[str, int]] = {}
"""Header name -> (CloudEvents attribute name, its length limit): ("ce_id" -> ("id", 296)), ("", 0) for other
headers: the slicing and the limit's look-up are paid once per name."""
_KINDS = {kind.value: kind for kind in MessageKind}
_OUTCOMES = {outcome.value: outcome for outcome in Outcome}


_BYTES = (bytes, bytearray, memoryview)
_PAIRS = (tuple, list)


def _attrs(message: BrokerMessage, required: tuple[str, ...]) -> dict[str, str]:
    if message.malformed is not None:  # the broker could not even decode it: say why, as for any other defect
        raise MalformedMessage(f"undecodable by the broker: {message.malformed}")
    value = message.value
    if not isinstance(value, _BYTES):
        raise MalformedMessage(f"value must be bytes, got {type(value).__name__}")
    # Checked before anything copies or parses the body.
    if len(value) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"message of {len(value)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    headers = message.headers
    if not isinstance(headers, _PAIRS):
        raise MalformedMessage(f"headers must be a sequence of (name, bytes) pairs, got {type(headers).__name__}")
    if len(headers) > MAX_HEADERS:
        raise MalformedMessage(f"{len(headers)} headers exceed the limit of {MAX_HEADERS}")
    attrs: dict[str, str] = {}
    names = _ATTRIBUTE_NAMES
    # Every header is checked, on the decoder's hot path for every reply and command: the common case (a str
    # name, a bytes value of ASCII text within its limit) takes the fewest steps; anything else the careful ones.
    for header in headers:
        if (type(header) is not tuple and not isinstance(header, _PAIRS)) or len(header) != 2:
            raise MalformedMessage("a header is not a (name, value) pair")
        key, raw = header
        if type(key) is not str and not isinstance(key, str):
            raise MalformedMessage(f"a header name is {type(key).__name__}, not text")
        entry = names.get(key)
        if entry is None:
            entry = (key[3:], _MAX_CHARS.get(key[3:], MAX_ATTRIBUTE_CHARS)) if key[:3] == "ce_" else ("", 0)
            if len(names) < 1024:  # header names come from the network: bound what is remembered
                names[key] = entry
        name, limit = entry
        if not name:
            continue
        if type(raw) is not bytes:
            if not isinstance(raw, _BYTES):
                raise MalformedMessage(f"{_shown(key)} is {type(raw).__name__}, not bytes")
            raw = bytes(raw)
        if name in attrs:  # CloudEvents attributes are unique: which of two ids would be the message's?
            raise MalformedMessage(f"{_shown(key)} appears more than once")
        size = len(raw)
        if size > 4 * limit:  # no UTF-8 text of `limit` characters is longer: refuse before decoding
            raise MalformedMessage(f"{_shown(key)} is longer than {limit} characters")
        if b"\x00" in raw:  # UTF-8 (even repaired) has NUL only where the bytes do
            raise MalformedMessage(f"{_shown(key)} contains a NUL character, which PostgreSQL cannot store")
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            text = _decode(raw)
        if size > limit and len(text) > limit:  # characters are never more than bytes
            raise MalformedMessage(f"{_shown(key)} is longer than {limit} characters")
        attrs[name] = text
    missing = [name for name in required if not attrs.get(name)]
    if missing:
        raise MalformedMessage(f"missing attribute(s): {', '.join('ce_' + m for m in missing)}")
    if attrs["specversion"] != SPEC_VERSION:
        raise MalformedMessage(f"unsupported ce_specversion {attrs['specversion']!r}")
    schema = attrs.get("sagaschema", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        raise MalformedMessage(f"unsupported ce_sagaschema {schema!r}")
    return attrs


def _shown(name: str) -> str:
    """A header name as a reason quotes it: bounded, and escaped when it is not plain text."""
    return name if len(name) <= 40 and name.isprintable() else repr(name[:40])


def _loads(value: bytes) -> Any:
    """orjson's parser, a tenth of the stdlib's cost; what it refuses (integers over 64 bits, NaN) goes to the
    stdlib, whose answer (a value or the error) is the one the protocol has always given."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return json.loads(value)


def _data(message: BrokerMessage) -> dict[str, Any]:
    value = bytes(message.value)
    try:
        data = _loads(value) if value else {}
    except RecursionError:  # the stdlib's parser on a deeply nested value (orjson stops at 1024 levels)
        raise MalformedMessage(f"value is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # invalid JSON or UTF-8, an integer of more digits than Python converts
        raise MalformedMessage(f"value is not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise MalformedMessage(f"value must be a JSON object, got {type(data).__name__}")
    # Nesting can only be as deep as the brackets are many: count them (C speed) before walking anything.
    if value.count(b"[") + value.count(b"{") > MAX_DEPTH and _depth(data) > MAX_DEPTH:
        raise MalformedMessage(f"value is nested deeper than {MAX_DEPTH} levels")
    # NUL can only come as JSON's escape (a raw one is not valid JSON); look closer only when the escape is there.
    if b"\\u0000" in value and has_nul(data):
        raise MalformedMessage("value contains a NUL character (\\u0000), which PostgreSQL cannot store")
    return data


def _depth(data: Any) -> int:
    """How deeply `data` nests, without recursion (a hostile value must not exhaust the stack); stops counting
    just past MAX_DEPTH."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _attempt(attrs: dict[str, str]) -> int:
    try:
        attempt = int(attrs["sagaattempt"])
    except ValueError:
        raise MalformedMessage(f"ce_sagaattempt {attrs['sagaattempt']!r} is not an integer") from None
    if attempt < 1:
        raise MalformedMessage(f"ce_sagaattempt must be at least 1, got {attempt}")
    if attempt > MAX_ATTEMPT:
        raise MalformedMessage(f"ce_sagaattempt must be at most {MAX_ATTEMPT}, got {attempt}")
    return attempt


def decode_reply(message: BrokerMessage) -> ReplyReceived:
    """A reply from a participant, or MalformedMessage saying what is wrong with it (never any other error)."""
    try:
        return _decode_reply(message)
    except MalformedMessage:
        raise
    except Exception as exc:  # whatever the bytes: a defect the checks above missed is still only a bad message
        raise MalformedMessage(f"undecodable: {_error(exc)}") from None


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _decode_reply(message: BrokerMessage) -> ReplyReceived:
    attrs = _attrs(
        message,
        ("specversion", "id", "type", "subject", "sagastep", "sagaattempt", "sagakind", "sagacausation", "sagaoutcome"),
    )
    if attrs["sagakind"] != MessageKind.REPLY:
        raise MalformedMessage(f"ce_sagakind is {attrs['sagakind']!r}, expected 'reply'")
    outcome = _OUTCOMES.get(attrs["sagaoutcome"])
    if outcome is None:
        raise MalformedMessage(f"ce_sagaoutcome {attrs['sagaoutcome']!r} is not one of success, failure, retry")
    causation = attrs["sagacausation"]
    parts = causation.rsplit("/", 3)
    kinds = (MessageKind.COMMAND, MessageKind.COMPENSATION)
    if len(parts) != 4 or parts[0] != attrs["subject"] or parts[2] not in kinds:
        raise MalformedMessage(
            f"ce_sagacausation {causation!r} is not the id of a command of saga {attrs['subject']!r}"
        )
    # Every field checked above, with the type validation would give (text, an int, enum members, a dict): built
    # without pydantic validating it all again (a quarter of a reply's decode).
    return trusted(ReplyReceived, {
        "event": "reply",
        "message_id": attrs["id"],
        "causation_id": causation,
        "step": attrs["sagastep"],
        "attempt": _attempt(attrs),
        "kind": _KINDS[parts[2]],
        "outcome": outcome,
        "type": attrs["type"],
        "data": _data(message),
        "reason": attrs.get("sagareason"),
    })


def reply_saga_id(message: BrokerMessage) -> str | None:
    """The saga a message claims to belong to, for dead-letter records; None when it does not say."""
    key = message.key
    return message.header("ce_subject") or (key if isinstance(key, str) else None)


def decode_command(message: BrokerMessage) -> CommandMessage:
    """A command or compensation, as a participant receives it, or MalformedMessage (never any other error)."""
    try:
        return _decode_command(message)
    except MalformedMessage:
        raise
    except Exception as exc:  # as in decode_reply
        raise MalformedMessage(f"undecodable: {_error(exc)}") from None


def _decode_command(message: BrokerMessage) -> CommandMessage:
    attrs = _attrs(
        message,
        ("specversion", "id", "type", "subject", "sagastep", "sagaattempt", "sagakind", "sagareplyto"),
    )
    if attrs["sagakind"] not in (MessageKind.COMMAND, MessageKind.COMPENSATION):
        raise MalformedMessage(f"ce_sagakind is {attrs['sagakind']!r}, expected 'command' or 'compensation'")
    return CommandMessage(
        id=attrs["id"],
        saga_id=attrs["subject"],
        saga_name=attrs.get("saganame", ""),
        step=attrs["sagastep"],
        kind=_KINDS[attrs["sagakind"]],
        attempt=_attempt(attrs),
        type=attrs["type"],
        data=_data(message),
        reply_topic=attrs["sagareplyto"],
    )
