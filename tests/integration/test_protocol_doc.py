"""docs/protocol.md as written works: its own kcat commands, extracted from the page and run verbatim against the
real Kafka on fresh topics, take part in sagas, the participant started before any saga."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from sagas.adapters.kafka import KafkaBroker
from sagas.adapters.sql import SqlStore
from sagas.definitions import loads
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import SagaStatus, StepStatus
from sagas.engine.wire import CommandMessage
from sagas.participant import BusinessFailure, Participant

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"
PARTITIONS = 2


def doc_block(name: str) -> str:
    """The shell block of docs/protocol.md marked ``<!-- protocol-test: NAME -->``, exactly as written there."""
    blocks = dict(re.findall(r"<!-- protocol-test: (\S+) -->\n```sh\n(.*?)```", DOC.read_text(encoding="utf-8"),
                             flags=re.DOTALL))
    assert name in blocks, f"docs/protocol.md has no block marked {name!r}"
    return blocks[name]


def test_the_doc_marks_its_commands_and_says_what_a_participant_needs() -> None:
    """The page marks its participant and its retry headers, and states the offset reset and the retry type."""
    participant = doc_block("participant")
    assert "-X auto.offset.reset=earliest" in participant
    assert "ce_sagareplyto" in participant
    assert "ce_sagaoutcome=retry" in doc_block("retry-headers")
    text = DOC.read_text(encoding="utf-8")
    assert "`<command type>.retry`" in text
    assert "1,000,000 bytes" in text


def retrying(participant: str) -> str:
    """The doc's participant answering `retry`, with the doc's retry headers in place of its success ones."""
    success = '-H "ce_type=${h[ce_type]}.succeeded"'
    assert success in participant
    assert "-H ce_sagaoutcome=success" in participant
    retry = doc_block("retry-headers").strip()
    return participant.replace(success, retry).replace("-H ce_sagaoutcome=success", "")


@contextlib.contextmanager
def shell(script: str, log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """`script` run by bash with `env` set (the doc's BROKER, TOPIC and GROUP), stopped afterwards."""
    with log.open("w") as out:
        process = subprocess.Popen(["bash", "-c", script], env={**os.environ, **env}, start_new_session=True,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def definition(prefix: str) -> Any:
    """Reserve (the kcat participant; compensated by a release) then charge (a Python participant; the pivot)."""
    return loads(f"""\
name: {prefix}_order
version: 1
steps:
  - {{name: reserve, participant: {prefix}_inventory, command: inventory.reserve,
     compensation: {{command: inventory.release}}}}
  - {{name: charge, participant: {prefix}_payments, command: payment.charge, kind: pivot,
     payload: {{total: input.total}}}}
""")


def one_pivot(prefix: str, attempts: int) -> Any:
    """One pivot step on the kcat participant: once its attempts are spent, the saga is parked."""
    return loads(f"""\
name: {prefix}_order
version: 1
steps:
  - {{name: reserve, participant: {prefix}_inventory, command: inventory.reserve, kind: pivot,
     retry: {{max_attempts: {attempts}, initial_backoff: 0, jitter: 0}}}}
""")


def payments(prefix: str) -> Participant:
    participant = Participant(f"{prefix}_payments")

    @participant.command("payment.charge")
    async def charge(command: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
        if command.data["total"] > 500:
            raise BusinessFailure("over limit")
        return {"payment": f"pay-{command.saga_id[:8]}"}

    return participant


@contextlib.asynccontextmanager
async def engine(kafka_url: str, prefix: str, tmp_path: Path, *definitions: Any) -> AsyncIterator[Engine]:
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'engine.db'}")
    settings = EngineSettings(reply_topic=f"{prefix}.replies", group=f"{prefix}-engine", timer_interval=0.05)
    broker = KafkaBroker.from_url(f"{kafka_url}?partitions={PARTITIONS}")
    try:
        async with Engine(store=store, broker=broker, definitions=definitions, settings=settings) as running:
            yield running
    finally:
        await store.close()


def partitions(kafka_url: str, topic: str) -> int | None:
    """How many partitions `topic` has, by kcat's metadata listing."""
    listing = subprocess.run(["kcat", "-b", kafka_url.removeprefix("kafka://"), "-L", "-t", topic],
                             capture_output=True, text=True, timeout=30).stdout
    found = re.search(rf'topic "{re.escape(topic)}" with (\d+) partitions', listing)
    return int(found.group(1)) if found else None


@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_the_docs_kcat_participant_started_first_takes_part_in_sagas(kafka_url: str, tmp_path: Path) -> None:
    """The engine creates the fresh command and reply topics (with the configured partitions) at start; the doc's
    kcat participant, started before any saga, answers commands and compensations: an accepted order completes,
    a declined one is compensated through the kcat participant."""
    prefix = f"doc{uuid.uuid4().hex[:10]}"
    topic = f"{prefix}_inventory.commands"
    # Fresh by its name (no probe: a metadata request for a missing topic makes Kafka create it, with 1 partition).
    env = {"BROKER": kafka_url.removeprefix("kafka://"), "TOPIC": topic, "GROUP": f"{prefix}-inventory"}
    log = tmp_path / "kcat.log"
    async with engine(kafka_url, prefix, tmp_path, definition(prefix)) as running:
        for created in (topic, f"{prefix}_payments.commands", f"{prefix}.replies"):
            assert partitions(kafka_url, created) == PARTITIONS
        with shell(doc_block("participant"), log, **env) as kcat:
            broker = KafkaBroker.from_url(kafka_url)
            try:
                async with payments(prefix).serve(broker=broker,
                                                  database_url=f"sqlite+aiosqlite:///{tmp_path / 'pay.db'}"):
                    ids = [await running.start_saga(f"{prefix}_order", {"total": total}) for total in (10, 900)]
                    done = await asyncio.gather(*(running.wait(i, timeout=90) for i in ids))
            finally:
                await broker.close()
            assert kcat.poll() is None, log.read_text()  # it found its topic and kept running
        assert await running.store.dead_letters() == []
    accepted, declined = done
    assert accepted.status == SagaStatus.COMPLETED, log.read_text()
    assert accepted.steps["reserve"].output == {"reservation": f"r-{ids[0]}"}
    assert declined.status == SagaStatus.COMPENSATED, log.read_text()
    assert declined.steps["reserve"].status == StepStatus.COMPENSATED


@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_the_docs_retry_reply_makes_the_engine_send_the_command_again(kafka_url: str, tmp_path: Path) -> None:
    """The doc's participant with the doc's retry headers: each `<command>.retry` reply is accepted (no dead
    letter) and answered with a new attempt, until the step's attempts are spent."""
    prefix = f"doc{uuid.uuid4().hex[:10]}"
    topic = f"{prefix}_inventory.commands"
    env = {"BROKER": kafka_url.removeprefix("kafka://"), "TOPIC": topic, "GROUP": f"{prefix}-inventory"}
    async with engine(kafka_url, prefix, tmp_path, one_pivot(prefix, attempts=2)) as running:
        with shell(retrying(doc_block("participant")), tmp_path / "kcat.log", **env):
            saga_id = await running.start_saga(f"{prefix}_order", {})
            final = await running.wait(saga_id, timeout=90)
        history = [record.entry for record in await running.store.history(saga_id)]
        assert await running.store.dead_letters() == []
    assert [e.attempt for e in history if e.type == "step.sent"] == [1, 2]
    retries = [e for e in history if e.type == "step.retry_scheduled"]
    assert [e.attempt for e in retries] == [1]
    assert retries[0].detail["reply_type"] == "inventory.reserve.retry"
    assert "database busy" in retries[0].detail["reason"]
    assert final.status == SagaStatus.FAILED  # the pivot's attempts are spent: parked for an operator
    assert final.steps["reserve"].status == StepStatus.UNKNOWN
