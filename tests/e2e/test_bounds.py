"""Bounds on starts, on SQLite and PostgreSQL: at each limit a saga is stored; one past, a clear error and nothing
written; the same key with a different input is a conflict, in the library and in the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sagas.adapters import open_store
from sagas.adapters.memory import MemoryBroker
from sagas.definitions import limits, loads
from sagas.definitions.model import SagaDefinition
from sagas.engine.admin import SagaAdmin
from sagas.engine.ports import Store
from sagas.engine.runtime import Engine, EngineSettings
from sagas.errors import IdempotencyConflict, InvalidInput, UnknownDefinition
from tests.definitions.support import bounded_yaml

ROOT = Path(__file__).resolve().parents[2]
SAGAS = str(Path(sys.executable).parent / "sagas")
BOUNDED = loads(bounded_yaml())
SAGA_ID = "i" * limits.SAGA_ID_CHARS
KEY = "k" * limits.IDEMPOTENCY_KEY_CHARS


def padded(size: int) -> dict[str, Any]:
    """An input of exactly `size` bytes of compact JSON."""
    return {"pad": "x" * (size - len('{"pad":""}'))}


def nested(depth: int) -> dict[str, Any]:
    """An input whose objects nest `depth` levels."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    opened = open_store(db_url)
    await opened.initialize()
    try:
        yield opened
    finally:
        await opened.close()


def engine(store: Store, *definitions: SagaDefinition) -> Engine:
    return Engine(store=store, broker=MemoryBroker(), definitions=definitions or [BOUNDED],
                  settings=EngineSettings(timer_interval=None, relay_interval=60))


async def nothing_written(store: Store) -> None:
    assert await store.list_instances(limit=10) == []
    assert await store.pending_outbox(10) == []
    assert await store.due_timers(float("inf"), 10) == []


async def test_a_definition_and_a_start_at_every_limit_are_stored(store: Store) -> None:
    """The definition with every field at its limit is stored, and sagas started at the key, id, input size and
    input depth limits are committed with their commands and timers (PostgreSQL refuses any value too long)."""
    async with engine(store) as running:
        first = await running.start_saga(BOUNDED.name, padded(limits.INPUT_BYTES), key=KEY, saga_id=SAGA_ID)
        deep = await running.start_saga(BOUNDED.name, nested(limits.INPUT_DEPTH))
    assert first == SAGA_ID
    stored = (await store.load([first, deep]))
    assert stored[first].idempotency_key == KEY
    assert stored[first].input == padded(limits.INPUT_BYTES)
    assert stored[deep].input == nested(limits.INPUT_DEPTH)
    assert (await store.load_definition(BOUNDED.name)).version == limits.VERSION_MAX
    timers = await store.timers_of(first)
    assert [t.step for t in timers] == [BOUNDED.all_steps[0].name]
    again, created = await SagaAdmin(store).start(BOUNDED.name, padded(limits.INPUT_BYTES), key=KEY)
    assert (again, created) == (first, False)


PAST = {
    "key": ({"key": KEY + "k"}, f"the idempotency key has 201 characters; the limit is {limits.IDEMPOTENCY_KEY_CHARS}"),
    "saga id": ({"saga_id": SAGA_ID + "i"}, f"the saga id has 101 characters; the limit is {limits.SAGA_ID_CHARS}"),
    "key with NUL": ({"key": "k\x00"}, "the idempotency key contains a NUL character"),
    "input size": (
        {"input": padded(limits.INPUT_BYTES + 1)},
        f"is {limits.INPUT_BYTES + 1:,} bytes of JSON; the limit is {limits.INPUT_BYTES:,}",
    ),
    "input depth": ({"input": nested(limits.INPUT_DEPTH + 1)}, f"is nested deeper than {limits.INPUT_DEPTH} levels"),
}


@pytest.mark.parametrize("case", sorted(PAST))
async def test_one_past_a_start_limit_is_refused_and_nothing_is_written(store: Store, case: str) -> None:
    """A key, id or input one past its limit raises InvalidInput with one line naming it, from the engine and the
    admin alike, and the store holds no saga, command or timer afterwards."""
    arguments, message = PAST[case]
    given = {"input": {}, **arguments}
    async with engine(store) as running:
        with pytest.raises(InvalidInput) as caught:
            await running.start_saga(BOUNDED.name, given["input"], key=given.get("key"),
                                     saga_id=given.get("saga_id"))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    if "saga_id" not in given:
        with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
            await SagaAdmin(store).start(BOUNDED.name, given["input"], key=given.get("key"))
    await nothing_written(store)


async def test_the_same_key_with_another_input_is_a_conflict(store: Store) -> None:
    """The same key and input return the saga it started (keys in any order); another input raises
    IdempotencyConflict naming that saga, from the engine and the admin, and starts nothing."""
    order = {"customer": "c-1", "total": 10, "express": True}
    async with engine(store) as running:
        first = await running.start_saga(BOUNDED.name, order, key="order-1")
        assert await running.start_saga(BOUNDED.name, dict(reversed(order.items())), key="order-1") == first
        with pytest.raises(IdempotencyConflict) as caught:
            await running.start_saga(BOUNDED.name, {**order, "express": 1}, key="order-1")
    assert caught.value.saga_id == first
    assert str(caught.value) == (
        f"idempotency key 'order-1' already started saga {first} of {BOUNDED.name!r} with a different input")
    with pytest.raises(IdempotencyConflict):
        await SagaAdmin(store).start(BOUNDED.name, {**order, "total": 11}, key="order-1")
    assert [i.id for i in await store.list_instances(limit=10)] == [first]


def sagas(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "SAGAS_DB": ""}
    return subprocess.run([SAGAS, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def one_clear_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {message}"]


async def test_sagas_start_at_and_past_the_bounds(store: Store, db_url: str) -> None:
    """`sagas start`: a key at its limit starts a saga and starts it once; one past, a nested input past its
    depth and a key reused with another input each print one error line, exit 1 and write nothing more."""
    await store.save_definition(BOUNDED)
    name = BOUNDED.name
    started = sagas("start", name, "--input", '{"total": 1}', "--key", KEY, "--db", db_url, "--json")
    assert started.returncode == 0, started.stderr
    saga_id = json.loads(started.stdout)["id"]
    again = sagas("start", name, "--input", '{"total": 1}', "--key", KEY, "--db", db_url, "--json")
    assert json.loads(again.stdout) == {"id": saga_id, "created": False}

    one_clear_line(sagas("start", name, "--key", KEY + "k", "--db", db_url),
                   f"the idempotency key has 201 characters; the limit is {limits.IDEMPOTENCY_KEY_CHARS}")
    one_clear_line(sagas("start", name, "--input", json.dumps(nested(limits.INPUT_DEPTH + 1)), "--db", db_url),
                   f"input of {name} v{limits.VERSION_MAX} is nested deeper than {limits.INPUT_DEPTH} levels")
    one_clear_line(sagas("start", name, "--input", '{"total": 2}', "--key", KEY, "--db", db_url),
                   f"idempotency key {KEY!r} already started saga {saga_id} of {name!r} with a different input")
    assert [i.id for i in await store.list_instances(limit=10)] == [saga_id]
    assert len(await store.pending_outbox(10)) == 1  # the first command of the one saga


@pytest.mark.parametrize("over", ["version", "steps[0].command"])
async def test_sagas_serve_refuses_a_definition_past_a_limit_and_writes_nothing(
    store: Store, db_url: str, tmp_path: Path, over: str
) -> None:
    """`sagas serve` with a definition one past a limit prints its located problem on one line and exits 1 before
    the engine starts: no definition is stored (a version over 2^31 - 1 used to crash it at the insert)."""
    path = tmp_path / "big.yaml"
    text = bounded_yaml(version=limits.VERSION_MAX + 1) if over == "version" else bounded_yaml(over)
    path.write_text(text, encoding="utf-8")
    result = sagas("serve", "--definitions", str(path), "--db", db_url, "--broker", "memory://")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}:")
    assert f": {over}: " in line
    with pytest.raises(UnknownDefinition):
        await store.load_definition(BOUNDED.name)


def test_every_id_of_a_saga_at_the_limits_fits_its_column() -> None:
    """With a saga id, a step name and an attempt at their limits, the longest message, reply and timer ids fit
    the store's id columns, and the tables' widths are the limits' own."""
    from sagas.adapters.sql import tables
    from sagas.engine.state import MessageKind, TimerKind, message_id, timer_id
    from sagas.engine.wire import MAX_ATTEMPT

    step = "s" * limits.NAME_CHARS
    command = message_id(SAGA_ID, step, MessageKind.COMPENSATION, MAX_ATTEMPT)
    timers = [timer_id(SAGA_ID, kind, step, MAX_ATTEMPT) for kind in TimerKind]
    assert len(f"{command}/reply") <= 296  # the longest reply id the wire takes (docs/protocol.md)
    assert max(map(len, timers)) <= limits.MESSAGE_ID_CHARS
    instances = tables.saga_instances.c
    assert (instances.id.type.length, tables.outbox.c.id.type.length) == (
        limits.STORED_SAGA_ID_CHARS, limits.MESSAGE_ID_CHARS)
    assert (instances.definition.type.length, instances.idempotency_key.type.length) == (
        limits.NAME_CHARS, limits.IDEMPOTENCY_KEY_CHARS)
    assert tables.TOPIC_COLUMN_CHARS >= limits.TOPIC_CHARS
