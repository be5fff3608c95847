"""Order is data, on SQLite and PostgreSQL: steps come back in definition order, a saga's input and its replies
with their keys in the order they were written (PostgreSQL's JSONB would sort keys by length)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from sagas.definitions import loads
from sagas.engine.admin import SagaAdmin
from sagas.engine.state import SagaStatus
from sagas.engine.wire import CommandMessage
from sagas.participant import Participant
from sagas.testing import SagaHarness

ROOT = Path(__file__).resolve().parents[2]
SAGAS = str(Path(sys.executable).parent / "sagas")
# Definition order is long, short, middle: JSONB's order (by length) would be short, middle, long.
STEPS = ["reserve_everything_for_the_order", "pay", "ship_it"]
DEFINITION = loads(f"""\
name: ordered
version: 1
steps:
  - {{name: {STEPS[0]}, participant: shop, command: shop.reserve, kind: retriable}}
  - {{name: {STEPS[1]}, participant: shop, command: shop.pay, kind: retriable}}
  - {{name: {STEPS[2]}, participant: shop, command: shop.ship, kind: retriable}}
""")
INPUT = {"zeta_the_longest_key": 1, "a": 2, "mm": {"zz_inner": 3, "b": 4}}
REPLY = {"the_longest_field_first": "x", "id": 7, "mid": [1, 2]}

shop = Participant("shop")


@shop.command("shop.reserve")
@shop.command("shop.pay")
@shop.command("shop.ship")
async def answer(command: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
    return REPLY


def sagas(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "SAGAS_DB": ""}
    result = subprocess.run([SAGAS, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    return result


async def test_show_and_json_keep_definition_order_and_key_order(db_url: str) -> None:
    """After a saga completes, `sagas show`, `show --json` and the library list its steps in definition order and
    its input and reply data with their keys in the order written."""
    async with SagaHarness([DEFINITION], participants=[shop], store_url=db_url) as h:
        saga_id = await h.start("ordered", INPUT)
        instance = await h.instance(saga_id)
        assert instance.status == SagaStatus.COMPLETED
        assert list(instance.steps) == STEPS
        assert list(instance.input) == list(INPUT)
        assert list(instance.input["mm"]) == list(INPUT["mm"])
        assert all(list(step.output or {}) == list(REPLY) for step in instance.steps.values())
        replies = [r.entry.detail for r in await h.history(saga_id) if r.entry.type == "step.succeeded"]

    report = json.loads(sagas("show", saga_id, "--db", db_url, "--json").stdout)["instance"]
    assert list(report["steps"]) == STEPS
    assert list(report["input"]) == list(INPUT)
    assert list(report["input"]["mm"]) == list(INPUT["mm"])
    assert [list(step["output"]) for step in report["steps"].values()] == [list(REPLY)] * 3
    human = sagas("show", saga_id, "--db", db_url).stdout
    assert f"input: {json.dumps(INPUT)}" in human
    positions = [human.index(f" {name} ") for name in STEPS]
    assert positions == sorted(positions)
    assert len(replies) == 3


async def test_steps_stored_out_of_order_are_listed_in_definition_order(db_url: str) -> None:
    """A snapshot whose steps were stored in another order (as JSONB did before migration 0002) is shown by the
    admin and the CLI in definition order."""
    async with SagaHarness([DEFINITION], participants=[shop], store_url=db_url) as h:
        saga_id = await h.start("ordered", INPUT)
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as connection:
            text = (await connection.execute(sa.text("SELECT CAST(snapshot AS TEXT) FROM saga_instances"))).scalar_one()
            snapshot = json.loads(text)
            snapshot["steps"] = dict(sorted(snapshot["steps"].items(), key=lambda item: (len(item[0]), item[0])))
            assert list(snapshot["steps"]) != STEPS
            await connection.execute(sa.text("UPDATE saga_instances SET snapshot = :s"), {"s": json.dumps(snapshot)})
    finally:
        await engine.dispose()
    async with SagaHarness([DEFINITION], store_url=db_url) as h:
        assert list((await h.store.load([saga_id]))[saga_id].steps) != STEPS  # stored out of order
        admin = SagaAdmin(h.store)
        assert list((await admin.show(saga_id)).instance.steps) == STEPS
        assert [list(i.steps) for i in await admin.list()] == [STEPS]
    report = json.loads(sagas("show", saga_id, "--db", db_url, "--json").stdout)["instance"]
    assert list(report["steps"]) == STEPS
