"""`sagas top`: the snapshot of a running engine from its /metrics or from the database, as JSON and at 80 columns."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from sagas.adapters import open_broker
from sagas.adapters.sql import SqlStore
from sagas.cli.top import Snapshot, from_metrics, quantile, render, with_rates
from sagas.web.app import create_app
from sagas.web.server import serving
from tests.engine.support import three_steps
from tests.web.test_metrics import lifecycle_participants, run_lifecycle, running

SAGAS = str(Path(sys.executable).parent / "sagas")
ROOT = Path(__file__).resolve().parents[2]


async def sagas(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, from a thread: the test's own event loop keeps serving the engine meanwhile."""
    env = {**os.environ, "COLUMNS": "80", "SAGAS_URL": "", "SAGAS_DB": ""}
    result = await asyncio.to_thread(subprocess.run, [SAGAS, *args], capture_output=True, text=True, env=env,
                                     cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


async def test_top_once_json_and_text_from_a_running_engine(tmp_path: Path) -> None:
    """After four sagas (two completed, one compensated, one parked), `sagas top --url --once --json` reports them
    by status, the parked one, lag 0 and a round trip per step; the text view fits 80 columns; `--db` reads the
    same counts from the database."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
    store = SqlStore(url)
    try:
        async with running(store, lambda: open_broker("db://", db_url=url), [three_steps(comp_attempts=1)],
                           participants=lifecycle_participants()) as (engine, metrics):
            await run_lifecycle(engine, metrics)
            async with serving(create_app(target=engine, metrics=metrics)) as server:
                snapshot = json.loads((await sagas("top", "--url", server.url, "--once", "--json")).stdout)
                text = (await sagas("top", "--url", server.url, "--once")).stdout
    finally:
        await store.close()
    assert snapshot["source"] == server.url
    assert snapshot["sagas"] == {"running": 0, "compensating": 0, "completed": 2, "compensated": 1, "failed": 1}
    assert snapshot["parked"] == 1
    assert snapshot["stuck"] == 0
    assert snapshot["lag"] == {"sagas.replies/0": 0}
    assert snapshot["settled_total"] == {"completed": 2.0, "compensated": 1.0, "failed": 1.0}
    trips = {(row["step"], row["kind"]): row for row in snapshot["round_trips"]}
    assert trips[("reserve", "command")]["count"] == 4
    assert trips[("ship", "command")]["count"] == 2
    assert trips[("reserve", "compensation")]["count"] == 2
    assert 0 < trips[("reserve", "command")]["p50_seconds"] <= trips[("reserve", "command")]["p99_seconds"]
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    for word in ("completed", "parked", "stuck", "outbox", "sagas.replies/0", "round trip per step", "reserve"):
        assert word in text, word

    from_db = json.loads((await sagas("top", "--db", str(tmp_path / "sagas.db"), "--once", "--json")).stdout)
    assert from_db["source"] == "database"
    assert from_db["sagas"] == snapshot["sagas"]
    assert from_db["parked"] == 1


def test_the_live_view_shows_rates_and_windowed_round_trips_at_80_columns() -> None:
    """Between two scrapes the view shows the rates and the round trips of the interval only, within 80 columns,
    even with a long step name."""
    step = "a_step_with_a_rather_long_name_that_would_not_fit_in_its_column"
    before = (
        'sagas_started_total{definition="order",version="1"} 10\n'
        'sagas_settled_total{definition="order",status="completed"} 8\n'
        f'sagas_step_round_trip_seconds_bucket{{definition="order",kind="command",le="0.1",outcome="success",'
        f'step="{step}"}} 10\n'
        f'sagas_step_round_trip_seconds_bucket{{definition="order",kind="command",le="1.0",outcome="success",'
        f'step="{step}"}} 10\n'
        f'sagas_step_round_trip_seconds_bucket{{definition="order",kind="command",le="+Inf",outcome="success",'
        f'step="{step}"}} 10\n'
    )
    after = before.replace(" 10\n", " 30\n").replace(" 8\n", " 28\n").replace(
        'le="0.1",outcome="success",' f'step="{step}"}} 30', 'le="0.1",outcome="success",' f'step="{step}"}} 10')
    first = from_metrics("http://x", before, at=100.0)
    second = with_rates(from_metrics("http://x", after, at=110.0), first)
    assert second.rates == {"started_per_second": 2.0, "settled_per_second": 2.0}
    window = second.trips(first)[0]
    assert window["count"] == 20
    assert 0.1 < window["p50_seconds"] <= 1.0  # the 20 of the interval all took 0.1-1 s
    console = Console(width=80, record=True, color_system=None)
    console.print(render(second, first))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "started/s" in text
    assert "2.0" in text


def test_quantiles_interpolate_within_buckets() -> None:
    """p50 of 10 observations in (0.1, 0.2] is halfway through that bucket; an empty histogram has none."""
    assert quantile(0.5, [(0.1, 0.0), (0.2, 10.0), (float("inf"), 10.0)]) == pytest.approx(0.15)
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert Snapshot(source="s", at=0).trips() == []
