"""The CLI as a user runs it: real subprocesses on a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAGAS = str(Path(sys.executable).parent / "sagas")
SAMPLE = ROOT / "samples" / "order_payment" / "saga.yaml"
ORDER = {"customer_id": "c-1", "items": [{"sku": "apple", "quantity": 1}], "total": 10.0, "currency": "EUR"}


def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "SAGAS_DB": ""}
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def sagas(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(SAGAS, *args, check=check)


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("demo") / "demo.db"
    result = run(sys.executable, "-m", "samples.order_payment.demo", "--db", str(db), "--sagas", "40")
    assert "completed" in result.stdout
    assert "compensated" in result.stdout
    return db


def test_demo_then_list_shows_every_saga_settled(demo_db: Path) -> None:
    """After the demo, `sagas list --json` on its database shows all 40 sagas completed or compensated."""
    listed = as_json(sagas("list", "--db", str(demo_db), "--json", "--limit", "1000"))
    assert len(listed) == 40
    statuses = {s["status"] for s in listed}
    assert statuses == {"completed", "compensated"}
    compensated = as_json(sagas("list", "--db", str(demo_db), "--status", "compensated", "--json"))
    assert 0 < len(compensated) < 40
    assert all(s["status"] == "compensated" for s in compensated)
    human = sagas("list", "--db", str(demo_db)).stdout
    short = human.splitlines()[1].split()[0]
    assert listed[0]["id"].endswith(short)  # a short id, which every command takes
    assert as_json(sagas("show", short, "--db", str(demo_db), "--json"))["instance"]["id"] == listed[0]["id"]
    assert "40 saga(s)" in sagas("list", "--db", str(demo_db), "--limit", "1000").stdout
    assert "showing 5 of 40 (--limit)" in sagas("list", "--db", str(demo_db), "--limit", "5").stdout


def test_show_tells_the_story_of_a_compensated_saga(demo_db: Path) -> None:
    """`sagas show` prints the reason, every step, and a timeline ending in the compensation."""
    saga_id = as_json(sagas("list", "--db", str(demo_db), "--status", "compensated", "--json"))[0]["id"]
    report = as_json(sagas("show", saga_id, "--db", str(demo_db), "--json"))
    types = [entry["type"] for entry in report["history"]]
    assert types[0] == "saga.started"
    assert types[-1] == "saga.compensated"
    assert "compensation.sent" in types
    assert report["timers"] == []
    human = sagas("show", saga_id, "--db", str(demo_db)).stdout
    for step in ("create_order", "reserve_inventory", "charge_payment", "confirm_order"):
        assert step in human
    assert "reason:" in human
    assert "saga.compensated" in human


def register(db: Path) -> None:
    """Store the sample definition the way `sagas serve` does, without running an engine."""
    run(sys.executable, "-c", (
        "import asyncio;from sagas.adapters import open_store;from sagas.definitions import load_file\n"
        f"async def go():\n s=open_store('{db}');await s.initialize();await s.save_definition(load_file('{SAMPLE}'));"
        "await s.close()\nasyncio.run(go())"))


def test_start_is_idempotent_and_repairs_are_recorded(tmp_path: Path) -> None:
    """`start --key` twice gives one saga; abort and skip change it and leave their reason in the history."""
    db = tmp_path / "ops.db"
    sagas("validate", str(SAMPLE))
    register(db)
    first = as_json(sagas("start", "order_payment", "--input", json.dumps(ORDER), "--key", "k-1",
                          "--db", str(db), "--json"))
    second = as_json(sagas("start", "order_payment", "--input", json.dumps(ORDER), "--key", "k-1",
                           "--db", str(db), "--json"))
    assert first == {"id": first["id"], "created": True}
    assert second == {"id": first["id"], "created": False}
    assert len(as_json(sagas("list", "--db", str(db), "--json"))) == 1

    aborted = as_json(sagas("abort", first["id"], "--reason", "customer cancelled", "--db", str(db), "--json"))
    assert aborted["status"] == "compensating"
    bad = sagas("skip", first["id"], "create_order", "--reason", "x", "--output", "[1]", "--db", str(db), check=False)
    one_clear_line(bad, "--output must be a JSON object")
    skipped = as_json(sagas("skip", first["id"], "create_order", "--reason", "rejected by hand", "--db", str(db),
                            "--json"))
    assert skipped["status"] == "compensated"
    history = as_json(sagas("show", first["id"], "--db", str(db), "--json"))["history"]
    reasons = {e["type"]: e["detail"].get("reason") for e in history if e["type"].startswith("operator.")}
    assert reasons == {"operator.abort": "customer cancelled", "operator.skip": "rejected by hand"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("show", "no-such-saga"), "no saga with id"),
        (("retry", "no-such-saga"), "no saga with id"),
        (("start", "no_such_saga"), "no_such_saga"),
        (("start", "order_payment", "--input", "{not json"), "not valid JSON"),
        (("start", "order_payment", "--input", "[1]"), "JSON object"),
        (("list", "--since", "yesterday-ish"), "--since"),
        (("dlq", "show", "dl/nothing"), "dl/nothing"),
    ],
)
def test_bad_requests_get_one_clear_line_and_a_nonzero_exit(tmp_path: Path, args: tuple[str, ...],
                                                             message: str) -> None:
    """Unknown ids, unknown saga names and bad JSON print one line naming the problem, with no traceback."""
    db = tmp_path / "empty.db"
    sagas("db", "upgrade", "--db", str(db))
    one_clear_line(sagas(*args, "--db", str(db), check=False), message)


def one_clear_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("list", "--db", "{tmp}/typo.db"), "no database at"),
        (("serve", "--definitions", "{tmp}/missing", "--db", "{tmp}/typo.db"), "no such file"),
        (("serve", "--definitions", str(SAMPLE), "--db", "{tmp}/typo.db", "--broker", "bogus://x"),
         "unsupported broker URL"),
    ],
)
def test_wrong_paths_and_urls_get_one_clear_line_and_create_nothing(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    one_clear_line(sagas(*(a.format(tmp=tmp_path) for a in args), check=False), message)
    assert not (tmp_path / "typo.db").exists()


def test_validate_reads_folders_and_names_a_missing_path(tmp_path: Path) -> None:
    """A folder's helper modules (participants, the demo) are not definitions and are passed over."""
    result = sagas("validate", str(SAMPLE.parent.parent), str(tmp_path / "missing"), check=False)
    assert result.returncode == 1
    assert "OK travel_booking v1" in result.stdout
    assert "OK order_payment v1" in result.stdout
    assert "no saga definitions" not in result.stdout
    assert "importing the module failed" not in result.stdout  # demo.py imports `samples`, found from the cwd
    problems = [line for line in result.stdout.splitlines() if not line.startswith("OK ")]
    assert problems == [f"{tmp_path / 'missing'}:1:1: <root>: no such file"]


def test_text_from_users_is_shown_as_it_is_never_read_as_markup(tmp_path: Path) -> None:
    """Inputs, reasons and reply types are printed literally: brackets neither vanish nor crash the output."""
    db = tmp_path / "markup.db"
    register(db)
    order = {**ORDER, "customer_id": "[bold]c-1[/bold] [/x]"}
    saga_id = as_json(sagas("start", "order_payment", "--input", json.dumps(order), "--db", str(db), "--json"))["id"]
    sagas("abort", saga_id, "--reason", "why [/ops] [red]", "--db", str(db))
    shown = sagas("show", saga_id, "--db", str(db)).stdout
    assert "[bold]c-1[/bold] [/x]" in shown
    assert "why [/ops] [red]" in shown
    assert "why [/ops] [red]" in sagas("list", "--db", str(db)).stdout


def test_serve_shuts_down_gracefully_on_sigterm(tmp_path: Path) -> None:
    """`sagas serve` starts, registers its definitions, and exits cleanly on SIGTERM."""
    db = tmp_path / "serve.db"
    proc = subprocess.Popen([SAGAS, "serve", "--definitions", str(SAMPLE), "--db", str(db), "--broker", "db://",
                             "--json-logs"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        started = None
        while time.monotonic() < deadline and started is None:
            result = sagas("start", "order_payment", "--input", json.dumps(ORDER), "--db", str(db), "--json",
                           check=False)
            if result.returncode == 0:
                started = as_json(result)["id"]
            else:
                time.sleep(0.2)  # the definition appears once serve has started
        assert started is not None, "serve never registered its definition"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "engine started" in events
    assert "engine stopped" in events
