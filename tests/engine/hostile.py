"""Hostile messages for the fuzz tests: a Hypothesis strategy draws a pool of shapes, a seeded expansion turns it
into thousands of messages cheaply (fresh ids, bytes rolled again), each tagged with its key so that its fate can be
found afterwards: a dead letter (by key) or an ignored reply (by message id, in its saga's history)."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from sagas.engine.ports import BrokerMessage
from sagas.engine.wire import MAX_DEPTH, MAX_MESSAGE_BYTES

KINDS = ("bytes", "json", "deep", "huge", "unknown-saga", "unknown-step", "stale-attempt", "missing", "duplicated",
         "encoding", "bad-values", "transport")
ATTRS = ("ce_specversion", "ce_id", "ce_source", "ce_type", "ce_subject", "ce_sagastep", "ce_sagaattempt",
         "ce_sagakind", "ce_sagacausation", "ce_sagaoutcome", "ce_sagaschema")


@dataclass(frozen=True)
class Shape:
    """What kind of hostile message, and the drawn details that the expansion varies around."""

    kind: str
    size: int = 0
    drop: tuple[str, ...] = ()
    extra: tuple[tuple[str, bytes], ...] = ()
    junk: Any = None
    variant: int = 0


@dataclass
class Hostile:
    """One hostile message as a transport writes it; `raw` is set for what only that transport can carry."""

    index: int
    message: BrokerMessage
    ce_id: str | None = None
    saga_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    copy_of: int | None = None

    @property
    def key(self) -> str:
        return f"h{self.index if self.copy_of is None else self.copy_of}"


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8,
)


def pools(per_kind: int = 2) -> st.SearchStrategy[list[Shape]]:
    """`per_kind` shapes of every kind (so that even Hypothesis's simplest example covers them all), details drawn."""
    return st.tuples(*(shapes(kind) for kind in KINDS for _ in range(per_kind))).map(list)


@st.composite
def shapes(draw: st.DrawFn, kind: str) -> Shape:
    return Shape(
        kind=kind,
        size=draw(st.integers(0, 400)),
        drop=tuple(draw(st.lists(st.sampled_from(ATTRS), min_size=1, max_size=3, unique=True))),
        extra=tuple(draw(st.lists(st.tuples(st.sampled_from([*ATTRS, "x-other", "ce_", "ce_sagareason"]),
                                            st.binary(max_size=12)), max_size=3))),
        junk=draw(json_values),
        variant=draw(st.integers(0, 7)),
    )


def valid_headers(
    ce_id: str, saga_id: str, step: str, attempt: int, outcome: str = "success"
) -> list[tuple[str, bytes]]:
    attrs = {
        "ce_specversion": "1.0", "ce_id": ce_id, "ce_source": "hostile", "ce_type": f"{step}.succeeded",
        "ce_subject": saga_id, "ce_sagastep": step, "ce_sagaattempt": str(attempt), "ce_sagakind": "reply",
        "ce_sagacausation": f"{saga_id}/{step}/command/{attempt}", "ce_sagaoutcome": outcome, "ce_sagaschema": "1",
    }
    return [(name, value.encode()) for name, value in attrs.items()]


def expand(pool: list[Shape], seed: int, count: int, *, saga_ids: list[str], steps: list[str], transport: str,
           huge_every: int = 250, max_huge: int = MAX_MESSAGE_BYTES + 50_000, duplicates: float = 0.02,
           topic: str) -> list[Hostile]:
    """`count` hostile messages from `pool`, plus exact copies of earlier ones (a fraction `duplicates`), for the
    transport "memory", "sqlite", "postgres", "kafka" or "rabbitmq". Huge values are rare (one in `huge_every`) and
    at most `max_huge` bytes (Kafka refuses records over its limit, so there they stay under it)."""
    rng = random.Random(seed)
    out: list[Hostile] = []
    originals = 0
    for index in itertools.count():
        if originals == count:
            break
        if out and rng.random() < duplicates:
            original = out[rng.randrange(len(out))]
            out.append(Hostile(index, original.message, original.ce_id, original.saga_id, original.raw,
                               copy_of=original.index if original.copy_of is None else original.copy_of))
            continue
        shape = pool[index % len(pool)]
        # Hypothesis's pool sets the kinds and their base details; the seed varies them from message to message.
        shape = Shape(shape.kind, shape.size + rng.randrange(400), shape.drop, shape.extra, shape.junk,
                      (shape.variant + rng.randrange(8)) % 8)
        if shape.kind == "huge" and index % huge_every:
            shape = Shape("bytes", shape.size, variant=shape.variant)
        out.append(_one(index, shape, rng, saga_ids, steps, transport, max_huge, topic))
        originals += 1
    return out


def _one(index: int, shape: Shape, rng: random.Random, saga_ids: list[str], steps: list[str], transport: str,
         max_huge: int, topic: str) -> Hostile:
    ce_id = f"hostile-{index}-{rng.getrandbits(32):x}"
    stranger = f"stranger-{index}"
    headers = valid_headers(ce_id, stranger, rng.choice(steps), 1)
    value = b"{}"
    saga_id: str | None = None
    raw: dict[str, Any] = {}
    kind = shape.kind
    if kind == "bytes":
        value = rng.randbytes(shape.size)
        if shape.variant % 2:
            headers = [(name, rng.randbytes(rng.randrange(8))) for name, _ in headers]
            headers.append(("ce_id", ce_id.encode()))
    elif kind == "json":
        value = json.dumps(shape.junk).encode()  # often not an object; when it is, the saga is unknown
    elif kind == "deep":
        depth = MAX_DEPTH + 1 + shape.size * 10
        if shape.variant % 2:
            value = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
        else:
            value = b'{"a":' * depth + b"1" + b"}" * depth
    elif kind == "huge":
        value = b'{"blob":"' + b"x" * (max_huge - 12) + b'"}'
    elif kind == "unknown-saga":
        value = json.dumps({"junk": shape.junk}).encode()
    elif kind == "unknown-step":
        saga_id = rng.choice(saga_ids)
        headers = valid_headers(ce_id, saga_id, f"teleport{shape.variant}", 1)
    elif kind == "stale-attempt":
        saga_id = rng.choice(saga_ids)
        outcome = ("success", "failure", "retry")[shape.variant % 3]
        headers = valid_headers(ce_id, saga_id, rng.choice(steps), 2 + rng.randrange(50), outcome)
    elif kind == "missing":
        headers = [(name, v) for name, v in headers if name not in shape.drop or name == "ce_id"]
        if "ce_id" in shape.drop:
            headers = [(name, v) for name, v in headers if name != "ce_id"]
    elif kind == "duplicated":
        headers = headers + [(name, v) for name, v in shape.extra if name != "ce_id"] + [("ce_sagaoutcome", b"failure")]
    elif kind == "encoding":
        headers = [(name, v.decode().encode("utf-16") if name in shape.drop and name != "ce_id" else v)
                   for name, v in headers]
        value = json.dumps({"a": "é"}).encode("utf-16" if shape.variant % 2 else "latin-1")
        if shape.variant % 3 == 0:
            headers.append(("ce_sagastep", "é".encode("latin-1")))
    elif kind == "bad-values":
        bad = [b"0.3", b"\x00", b"-1", b"9" * 30, b"x" * 2000, b"maybe", b"command", b""][shape.variant]
        name = ("ce_specversion", "ce_sagakind", "ce_sagaattempt", "ce_sagaattempt", "ce_sagastep",
                "ce_sagaoutcome", "ce_sagakind", "ce_subject")[shape.variant]
        headers = [(n, bad if n == name else v) for n, v in headers]
    else:  # transport: what only this transport can carry
        headers, value, raw = _transport(transport, shape, headers, rng)
    # A list becomes the tuple a broker hands over; anything else (an in-process publisher's mistake) stays as it is.
    message = BrokerMessage(topic=topic, value=value, key=f"h{index}",
                            headers=tuple(headers) if isinstance(headers, list) else headers)
    return Hostile(index, message, ce_id, saga_id, raw)


def _transport(
    transport: str, shape: Shape, headers: list[Any], rng: random.Random
) -> tuple[Any, bytes, dict[str, Any]]:
    variant = shape.variant
    if transport == "memory":  # an in-process publisher can put anything in a BrokerMessage
        odd: list[Any] = [
            [*headers, ("ce_sagaattempt", 2)],
            [(5, b"x"), *headers],
            [(b"ce_id", b"x"), ("ce_id",), None],
            7,
            "ce_id",
            [*headers, ("ce_type", None)],
            [(name, v.decode()) for name, v in headers],
            headers * 10,
        ]
        return odd[variant], rng.randbytes(shape.size % 50), {}
    if transport in ("sqlite", "postgres"):  # rows written behind the queue's back
        rows = ['{"ce_id": "YQ=="}', '"x"', '[["ce_id"]]', '[["ce_id", 5]]', '[["ce_id", "***"]]', '[[5, "YQ=="]]',
                "{not json", 42]
        headers_raw = rows[variant]
        value_raw: Any = b"{}"
        if transport == "postgres" and variant >= 6:  # PostgreSQL's json column only takes valid JSON
            headers_raw = '[["ce_id", "YQ=="]]'
            value_raw = b"x" * (MAX_MESSAGE_BYTES + 1 + shape.size)
        elif transport == "sqlite" and variant == 7:
            value_raw = "stored as text" if shape.size % 2 else 12345
        return headers, b"", {"headers": headers_raw, "value": value_raw}
    if transport == "rabbitmq":  # AMQP properties written raw, as another client may (see `amqp_properties`)
        return headers, rng.randbytes(shape.size % 64) if variant == 4 else b"{}", {"amqp": variant}
    # kafka: headers without a value, records without a value, too many headers, names that are not ASCII
    if variant % 4 == 0:
        return [(name, None if name in shape.drop else v) for name, v in headers], b"{}", {"null_value": False}
    if variant % 4 == 1:
        return headers, b"", {"null_value": True}
    if variant % 4 == 2:
        return headers + [(f"x-{i}", b"v") for i in range(80)], b"{}", {}
    return [("ce_ïd" if name == "ce_id" else name, v) for name, v in headers], b"{}", {}
