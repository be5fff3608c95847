"""The wire's parsers against any bytes and any headers: they answer a message or `MalformedMessage`, nothing else."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagas.engine.ports import BrokerMessage
from sagas.engine.state import MessageKind, Outcome, ReplyReceived
from sagas.engine.wire import MAX_DEPTH, MAX_MESSAGE_BYTES, MalformedMessage, decode_command, decode_reply

SAGA = "s-1"
VALID_REPLY = {
    "ce_specversion": b"1.0", "ce_id": b"s-1/ship/command/1/reply", "ce_source": b"test", "ce_type": b"Ship.ok",
    "ce_subject": b"s-1", "ce_sagastep": b"ship", "ce_sagaattempt": b"1", "ce_sagakind": b"reply",
    "ce_sagacausation": b"s-1/ship/command/1", "ce_sagaoutcome": b"success", "ce_sagaschema": b"1",
}
VALID_COMMAND = {**VALID_REPLY, "ce_id": b"s-1/ship/command/1", "ce_sagakind": b"command",
                 "ce_sagareplyto": b"sagas.replies", "ce_saganame": b"order"}

# Values of any type, as an in-process publisher (the memory broker) can hand them over.
any_value = st.one_of(
    st.binary(max_size=64), st.text(max_size=20), st.integers(), st.none(), st.floats(), st.lists(st.integers()),
    st.sampled_from([b"", b"1.0", b"reply", b"command", b"success", b"0", b"-1", b"9" * 40, b"\x00", b"\xff\xfe",
                     b"x" * 5000, b"s-1/ship/command/1", b"s-1"]),
)
any_name = st.one_of(st.sampled_from(sorted(VALID_COMMAND)), st.text(max_size=12), st.binary(max_size=8),
                     st.integers(), st.none())


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=5), inner, max_size=4)),
                        max_leaves=20)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "deep", "deep-object", "big-int", "nul", "utf16"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(_json_values())).encode()
    depth = draw(st.integers(MAX_DEPTH - 2, 20_000))
    if kind == "deep":
        return b"[" * depth + b"]" * depth
    if kind == "deep-object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == "big-int":
        return b'{"n": ' + b"7" * draw(st.integers(4000, 20_000)) + b"}"
    if kind == "nul":
        return b'{"k\\u0000": 1}'
    return json.dumps({"a": "b"}).encode("utf-16")


@st.composite
def headers(draw: st.DrawFn) -> Any:
    """Mostly a valid set mutated (so that parsing gets deep), sometimes anything at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(any_value, max_size=3)))
    base = dict(draw(st.sampled_from([VALID_REPLY, VALID_COMMAND])))
    pairs: list[Any] = list(base.items())
    for _ in range(draw(st.integers(0, 4))):
        action = draw(st.sampled_from(["drop", "replace", "add", "duplicate", "odd-pair"]))
        if action == "drop" and pairs:
            pairs.pop(draw(st.integers(0, len(pairs) - 1)))
        elif action == "replace" and pairs:
            index = draw(st.integers(0, len(pairs) - 1))
            if isinstance(pairs[index], tuple) and len(pairs[index]) == 2:  # an odd pair added earlier has no name
                pairs[index] = (pairs[index][0], draw(any_value))
        elif action == "add":
            pairs.append((draw(any_name), draw(any_value)))
        elif action == "duplicate" and pairs:
            pairs.append(pairs[draw(st.integers(0, len(pairs) - 1))])
        else:
            pairs.append(draw(st.one_of(st.tuples(), st.tuples(any_name), st.none(), st.integers())))
    return tuple(pairs)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(value=bodies(), headers=headers(), key=st.one_of(st.none(), st.text(max_size=5), st.integers()),
       malformed=st.one_of(st.none(), st.just("headers undecodable")))
def test_parsing_raises_nothing_but_malformed_message_whatever_the_message(
    value: bytes, headers: Any, key: Any, malformed: str | None
) -> None:
    """Any body, any headers of any type, any key: decode_reply and decode_command return or raise MalformedMessage
    with a reason, and a message's own `header()` never raises."""
    message = BrokerMessage(topic="t", value=value, key=key, headers=headers, malformed=malformed)
    message.header("ce_id")
    for decode in (decode_reply, decode_command):
        reason = None
        try:
            decode(message)
        except MalformedMessage as exc:
            reason = str(exc)
        if reason is not None:  # a reason that a dead letter can show
            assert 0 < len(reason) < 2000


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(value=bodies(), headers=headers(), reason=st.one_of(st.none(), st.text(max_size=30)))
def test_a_decoded_reply_is_exactly_what_validating_its_fields_gives(value: bytes, headers: Any,
                                                                     reason: str | None) -> None:
    """The decoder builds replies without pydantic's validation: each one it returns equals, field by field and
    type by type, the reply that validating the same fields builds."""
    if reason is not None and isinstance(headers, tuple):
        headers = (*headers, ("ce_sagareason", reason.encode("utf-8", "replace")))
    try:
        reply = decode_reply(BrokerMessage(topic="t", value=value, headers=headers))
    except MalformedMessage:
        return
    validated = ReplyReceived.model_validate(dict(reply.__dict__))
    assert reply == validated
    assert [type(v) for v in reply.__dict__.values()] == [type(v) for v in validated.__dict__.values()]
    assert reply.model_dump_json() == validated.model_dump_json()


def test_a_valid_reply_decodes_with_every_field_and_is_a_validated_value() -> None:
    """The reply of the valid headers: its fields as sent, enum members for kind and outcome."""
    reply = decode_reply(BrokerMessage(topic="t", value=b'{"n": 1}', headers=tuple(VALID_REPLY.items())))
    assert reply == ReplyReceived(message_id="s-1/ship/command/1/reply", causation_id="s-1/ship/command/1",
                                  step="ship", attempt=1, kind=MessageKind.COMMAND, outcome=Outcome.SUCCESS,
                                  type="Ship.ok", data={"n": 1})
    assert type(reply.kind) is MessageKind
    assert type(reply.outcome) is Outcome


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5_000, 200_000])
def test_deeply_nested_values_are_refused_as_malformed_not_by_recursion_error(depth: int) -> None:
    """A value nested deeper than the limit is a malformed message (never RecursionError), however deep."""
    for body in (b'{"a":' + b"[" * depth + b"]" * depth + b"}", b'{"a":' * depth + b"1" + b"}" * depth):
        headers = tuple(VALID_REPLY.items())
        with pytest.raises(MalformedMessage, match=r"nested deeper|exceeds the limit"):
            decode_reply(BrokerMessage(topic="t", value=body, headers=headers))


def test_a_value_at_the_depth_limit_is_accepted() -> None:
    """Nesting up to the limit is a valid reply."""
    body = b'{"a":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    reply = decode_reply(BrokerMessage(topic="t", value=body, headers=tuple(VALID_REPLY.items())))
    inner, levels = reply.data["a"], 2
    while inner:
        inner, levels = inner[0], levels + 1
    assert levels == MAX_DEPTH


def test_the_size_limit_is_checked_before_the_body_is_parsed() -> None:
    """A body one byte over the limit is refused for its size, even when it is not JSON at all."""
    body = b"\xff" * (MAX_MESSAGE_BYTES + 1)
    with pytest.raises(MalformedMessage, match=f"{MAX_MESSAGE_BYTES + 1} bytes exceeds"):
        decode_reply(BrokerMessage(topic="t", value=body, headers=tuple(VALID_REPLY.items())))


def test_a_message_the_broker_could_not_decode_is_malformed_with_the_brokers_reason() -> None:
    """`malformed` set by a broker is the parse's answer, whatever else the message holds."""
    message = BrokerMessage(topic="t", value=b"{}", headers=tuple(VALID_REPLY.items()), malformed="value is text")
    with pytest.raises(MalformedMessage, match="undecodable by the broker: value is text"):
        decode_reply(message)


def test_a_duplicated_attribute_is_malformed() -> None:
    """Two ce_id headers: which id would the message have? It is refused, naming the header."""
    headers = (*VALID_REPLY.items(), ("ce_id", b"other"))
    with pytest.raises(MalformedMessage, match="ce_id appears more than once"):
        decode_reply(BrokerMessage(topic="t", value=b"{}", headers=headers))
