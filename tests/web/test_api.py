"""The HTTP API over a real store (SQLite and PostgreSQL) with a running engine: through the ASGI app in this
process, and through TCP to a real `sagas serve --http` subprocess."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sagas.engine.ports import BrokerMessage
from sagas.engine.runtime import EngineSettings
from sagas.engine.state import SagaStatus
from tests.conftest import pg_database, service_url
from tests.web.served import ORDER, TOKENS, Stack, alice, pg_schema, served_process, stack

VARIANTS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres), "serve-sqlite",
            pytest.param("serve-postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=VARIANTS)
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    """The API on SQLite and PostgreSQL, in this process (ASGI) and as a real `sagas serve` (TCP)."""
    if request.param == "sqlite":
        async with stack(f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}", tmp_path) as s:
            yield s
    elif request.param == "postgres":
        pg_url = service_url("SAGAS_TEST_PG_URL")
        async with pg_schema(pg_url) as schema, stack(pg_url, tmp_path, schema=schema) as s:
            yield s
    elif request.param == "serve-sqlite":
        async with served_process(f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}", tmp_path) as s:
            yield s
    else:
        async with pg_database(service_url("SAGAS_TEST_PG_URL")) as url, served_process(url, tmp_path) as s:
            yield s

PROBLEM = "application/problem+json"


def is_problem(response: object, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    assert response.headers["content-type"].startswith(PROBLEM)  # type: ignore[attr-defined]
    body: dict[str, object] = response.json()  # type: ignore[attr-defined]
    assert body["status"] == status
    assert body["title"]
    return body


async def test_a_start_publishes_its_first_command_at_once_and_is_idempotent_by_key(served: Stack) -> None:
    """POST /api/sagas starts a saga whose first command reaches its participant well before the relay would
    send it; the same key and input answer the same saga, another input is a 409 problem."""
    started_at = time.time()
    response = await served.client.post("/api/sagas", headers=alice(),
                                        json={"definition": "order", "input": ORDER, "key": "k-1"})
    assert response.status_code == 201
    first = response.json()
    assert first["created"] is True
    assert first["status"] == "running"
    assert (await served.settled(first["id"])).status is SagaStatus.COMPLETED
    assert served.switch.seen[0] - started_at < EngineSettings().relay_grace  # not through the relay
    if served.engine is not None:
        assert served.engine.stats["relayed"] == 0
    again = await served.client.post("/api/sagas", headers=alice(),
                                     json={"definition": "order", "input": ORDER, "key": "k-1"})
    assert again.status_code == 200
    assert again.json() == {"id": first["id"], "created": False, "status": "completed"}
    other = await served.client.post("/api/sagas", headers=alice(),
                                     json={"definition": "order", "input": {**ORDER, "amount": 11}, "key": "k-1"})
    assert "different input" in str(is_problem(other, 409)["detail"])


async def test_bad_starts_are_problems_that_name_the_cause(served: Stack) -> None:
    """An unknown definition is 404, a body that is not a start is 422 with each error, both problem+json."""
    unknown = await served.client.post("/api/sagas", headers=alice(), json={"definition": "nope"})
    assert "nope" in str(is_problem(unknown, 404)["detail"])
    bad = await served.client.post("/api/sagas", headers=alice(), json={"definition": "order", "input": [1]})
    body = is_problem(bad, 422)
    assert body["errors"]
    assert "input" in str(body["detail"])
    not_json = await served.client.post("/api/sagas", headers={**alice(), "content-type": "application/json"},
                                        content=b"{nope")
    is_problem(not_json, 422)


async def test_bulk_start_takes_a_list_or_ndjson_and_answers_each(served: Stack) -> None:
    """A bulk start of a JSON list or NDJSON starts each valid entry and reports each invalid one by position."""
    entries = [{"definition": "order", "input": {"order_id": f"b-{i}", "amount": 1}, "key": f"b-{i}"}
               for i in range(3)]
    listed = await served.client.post("/api/sagas/bulk", headers=alice(), json=[*entries, {"definition": "nope"}])
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert (body["started"], body["existing"], body["failed"]) == (3, 0, 1)
    assert body["items"][3]["problem"]["status"] == 404
    ndjson = "\n".join(json.dumps(e) for e in [*entries[:2], {"definition": "order", "input": "x"}]) + "\n"
    again = await served.client.post("/api/sagas/bulk", content=ndjson.encode(),
                                     headers={**alice(), "content-type": "application/x-ndjson"})
    counts = again.json()
    assert (counts["started"], counts["existing"], counts["failed"]) == (0, 2, 1)
    assert counts["items"][2]["problem"]["status"] == 422
    garbage = await served.client.post("/api/sagas/bulk", content=b"{not json",
                                       headers={**alice(), "content-type": "application/x-ndjson"})
    is_problem(garbage, 422)


async def test_a_saga_reads_with_steps_in_order_and_a_paged_history(served: Stack) -> None:
    """GET a saga (by id or by its short id) gives steps in definition order and a history that pages on."""
    saga_id = (await served.client.post("/api/sagas", headers=alice(),
                                        json={"definition": "order", "input": ORDER})).json()["id"]
    await served.settled(saga_id)
    detail = await served.client.get(f"/api/sagas/{saga_id[-12:]}", headers=alice(), params={"history_limit": 3})
    assert detail.status_code == 200, detail.text
    body = detail.json()
    assert body["instance"]["id"] == saga_id
    assert [s["name"] for s in body["steps"]] == ["reserve", "charge", "ship"]
    assert body["steps"][0]["state"]["output"] == {"reserved": "o-1"}
    assert len(body["history"]["items"]) == 3
    seen = [e["type"] for e in body["history"]["items"]]
    after = body["history"]["next_after"]
    while after is not None:
        page = (await served.client.get(f"/api/sagas/{saga_id}/history", headers=alice(),
                                        params={"after": after, "limit": 2})).json()
        seen += [e["type"] for e in page["items"]]
        after = page["next_after"]
    assert seen[0] == "saga.started"
    assert seen[-1] == "saga.completed"
    assert seen.count("step.succeeded") == 3
    is_problem(await served.client.get("/api/sagas/no-such-saga", headers=alice()), 404)


async def test_the_list_filters_and_pages_by_cursor(served: Stack) -> None:
    """GET /api/sagas filters by status, definition, key and reason text, and its cursor pages cover all once."""
    ids = []
    for i in range(7):
        order = {"order_id": f"{'x' if i % 3 == 0 else 'o'}-{i}", "amount": 1}
        body = {"definition": "order", "input": order, "key": f"l-{i}"}
        ids.append((await served.client.post("/api/sagas", headers=alice(), json=body)).json()["id"])
    for saga_id in ids:
        await served.settled(saga_id)
    pages, cursor = [], None
    while True:
        params = {"limit": 3, "total": True, **({"cursor": cursor} if cursor else {})}
        page = (await served.client.get("/api/sagas", headers=alice(), params=params)).json()
        pages.append([s["id"] for s in page["items"]])
        assert page["total"] == 7
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sorted(saga_id for page in pages for saga_id in page) == sorted(ids)
    compensated = (await served.client.get("/api/sagas", headers=alice(),
                                           params={"status": "compensated", "reason": "SHIP"})).json()["items"]
    assert sorted(s["id"] for s in compensated) == sorted(ids[i] for i in (0, 3, 6))
    by_key = (await served.client.get("/api/sagas", headers=alice(), params={"key": "l-4"})).json()["items"]
    assert [s["id"] for s in by_key] == [ids[4]]
    is_problem(await served.client.get("/api/sagas", headers=alice(), params={"cursor": "garbage"}), 422)
    is_problem(await served.client.get("/api/sagas", headers=alice(), params={"status": "sleeping"}), 422)


async def test_a_parked_saga_is_retried_with_the_operator_and_reason_in_its_history(served: Stack) -> None:
    """A saga parked by a failing refund is retried through the API once fixed; it ends compensated and its
    history names the token's operator and the reason."""
    saga_id = await served.parked()
    served.switch.refund_broken = False
    refused = await served.client.post(f"/api/sagas/{saga_id}/retry", json={"reason": "x"})
    is_problem(refused, 401)
    retried = await served.client.post(f"/api/sagas/{saga_id}/retry", headers=alice(),
                                       json={"reason": "refund gateway is back"})
    assert retried.status_code == 200, retried.text
    assert (await served.settled(saga_id)).status is SagaStatus.COMPENSATED
    history = (await served.client.get(f"/api/sagas/{saga_id}/history", headers=alice())).json()["items"]
    retry = next(e for e in history if e["type"] == "operator.retry")
    assert retry["detail"]["operator"] == "alice"
    assert retry["detail"]["reason"] == "refund gateway is back"
    again = await served.client.post(f"/api/sagas/{saga_id}/retry", headers=alice(), json={"reason": "again"})
    is_problem(again, 409)


async def test_abort_and_skip_change_a_saga_and_refuse_what_does_not_fit(served: Stack) -> None:
    """Skip marks a parked step's compensation done; abort of a finished saga is a 409 problem."""
    saga_id = await served.parked()
    skipped = await served.client.post(f"/api/sagas/{saga_id}/skip", headers=alice(),
                                       json={"step": "charge", "reason": "refunded by hand"})
    assert skipped.status_code == 200, skipped.text
    assert (await served.settled(saga_id)).status is SagaStatus.COMPENSATED
    aborted = await served.client.post(f"/api/sagas/{saga_id}/abort", headers=alice(), json={"reason": "late"})
    is_problem(aborted, 409)
    empty = await served.client.post(f"/api/sagas/{saga_id}/abort", headers=alice(), json={"reason": ""})
    is_problem(empty, 422)


async def test_bulk_retry_counts_first_and_acts_only_on_the_confirmed_count(served: Stack) -> None:
    """Bulk retry without a count answers how many parked sagas match; a wrong count is refused; the right one
    retries them all."""
    parked = [await served.parked() for _ in range(2)]
    served.switch.refund_broken = False
    ask = await served.client.post("/api/bulk/retry", headers=alice(),
                                   json={"filter": {"definition": "order"}, "reason": "refunds back"})
    assert ask.json() == {"count": 2, "retried": 0, "confirmed": False}
    wrong = await served.client.post("/api/bulk/retry", headers=alice(),
                                     json={"filter": {}, "confirm_count": 3, "reason": "refunds back"})
    assert "2 parked" in str(is_problem(wrong, 409)["detail"])
    done = await served.client.post("/api/bulk/retry", headers=alice(),
                                    json={"filter": {"reason": "GATEWAY DOWN"}, "confirm_count": 2,
                                          "reason": "refunds back"})
    assert done.json() == {"count": 2, "retried": 2, "confirmed": True}
    for saga_id in parked:
        assert (await served.settled(saga_id)).status is SagaStatus.COMPENSATED


async def test_dead_letters_list_show_and_refuse_a_replay_that_cannot_work(served: Stack) -> None:
    """A malformed reply becomes a dead letter the API lists and shows whole; its replay is a 409 problem."""
    await served.broker.publish([BrokerMessage(topic=served.reply_topic, value=b"\x80junk",
                                               headers=(("ce_id", b"bad-1"),))])
    letters = await served.until(lambda: _letters(served))
    letter = letters[0]
    assert letter["value"].endswith("junk")
    shown = await served.client.get(f"/api/dead-letters/{letter['id']}", headers=alice())
    assert shown.json()["id"] == letter["id"]
    replay = await served.client.post(f"/api/dead-letters/{letter['id']}/replay", headers=alice())
    is_problem(replay, 409)
    is_problem(await served.client.get("/api/dead-letters/dl/none", headers=alice()), 404)


async def _letters(served: Stack) -> list[dict[str, str]]:
    items: list[dict[str, str]] = (await served.client.get("/api/dead-letters", headers=alice())).json()["items"]
    return items


async def test_definitions_list_show_and_draw(served: Stack) -> None:
    """Definitions are listed with their steps, shown whole, and drawn as Mermaid, DOT or SVG."""
    listed = (await served.client.get("/api/definitions", headers=alice())).json()
    assert [(d["name"], d["steps"]) for d in listed] == [("order", ["reserve", "charge", "ship"])]
    shown = (await served.client.get("/api/definitions/order", headers=alice())).json()
    assert shown["name"] == "order"
    mermaid = await served.client.get("/api/definitions/order/graph", headers=alice())
    assert mermaid.text.startswith("flowchart TD")
    svg = await served.client.get("/api/definitions/order/graph", headers=alice(), params={"format": "svg"})
    assert svg.headers["content-type"].startswith("image/svg+xml")
    assert "<svg" in svg.text
    is_problem(await served.client.get("/api/definitions/nope", headers=alice()), 404)


async def test_tokens_guard_every_call_unless_reads_are_open_on_loopback(served: Stack) -> None:
    """Without a token, or with a wrong one, reads and writes are refused with 401; the right token is named."""
    for headers in ({}, {"Authorization": "Bearer wrong-token-000000000"}, {"Authorization": "Basic abc"}):
        is_problem(await served.client.get("/api/sagas", headers=headers), 401)
        is_problem(await served.client.post("/api/sagas", headers=headers, json={"definition": "order"}), 401)
    ok = await served.client.get("/api/sagas", headers={"Authorization": f"Bearer {TOKENS['bob']}"})
    assert ok.status_code == 200
    if served.process is not None:
        return  # a served process's settings are its own: open reads are tested in this process
    served.security.open_reads = True
    assert (await served.client.get("/api/overview")).status_code == 200
    is_problem(await served.client.post("/api/sagas", json={"definition": "order"}), 401)


async def test_a_body_over_the_limit_is_refused_before_it_is_read(served: Stack) -> None:
    """A request body larger than the limit gets 413 problem+json, and nothing is started."""
    big = {"definition": "order", "input": {"pad": "x" * (served.security.max_body + 10)}}
    is_problem(await served.client.post("/api/sagas", headers=alice(), json=big), 413)
    assert (await served.client.get("/api/sagas", headers=alice())).json()["items"] == []


async def test_the_overview_counts_by_definition_and_lists_parked_sagas(served: Stack) -> None:
    """The overview counts sagas per definition and status and lists the parked one."""
    saga_id = await served.parked()
    body = (await served.client.get("/api/overview", headers=alice())).json()
    assert {"definition": "order", "status": "failed", "count": 1} in body["counts"]
    assert [s["id"] for s in body["parked"]] == [saga_id]
    assert body["started_last_minute"] == 1
