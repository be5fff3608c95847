"""What the operator commands print, read at 80 and at 200 columns as a person would."""

from __future__ import annotations

import io
import uuid

import pytest
from rich.console import Console

from sagas import formatting
from sagas.cli import operate, render
from sagas.engine.ports import BrokerMessage, DeadLetter, HistoryRecord
from sagas.engine.state import HistoryEntry, SagaInstance, SagaStatus, StepState, StepStatus

NOW = 1_800_000_000.0
REASON = ("step 'charge_payment' failed: the card issuer declined the payment because the account is frozen "
          "pending a fraud investigation")


def console(width: int) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=width, color_system=None, force_terminal=False, legacy_windows=False), buffer


def saga(status: SagaStatus, *, failure: str | None = None, saga_id: str | None = None) -> SagaInstance:
    steps = {
        "create_order": StepState(status=StepStatus.COMPENSATED, attempt=1, compensation_attempt=1,
                                  started_at=NOW - 30, finished_at=NOW - 29.9, output={"order_id": "o-1"}),
        "compensation_of_a_long_step_name": StepState(status=StepStatus.FAILED, attempt=3, started_at=NOW - 29,
                                                      finished_at=NOW - 27.9056, error="card declined"),
    }
    return SagaInstance(id=saga_id or str(uuid.uuid4()), definition="order_payment", definition_version=1,
                        status=status, steps=steps, input={"customer_id": "<script>alert(1)</script>"},
                        failure=failure, created_at=NOW - 3725, updated_at=NOW - 20)


@pytest.mark.parametrize("width", [80, 200])
def test_list_shows_whole_status_words_a_short_id_and_one_line_per_saga(width: int) -> None:
    """Each saga is one line with its full status word, the end of its id (which `show` takes), its age and its
    reason cut to the line."""
    sagas = [saga(SagaStatus.COMPENSATING, failure=REASON), saga(SagaStatus.COMPLETED), saga(SagaStatus.FAILED,
             failure=REASON)]
    out, buffer = console(width)
    render.saga_list(out, sagas, total=3, limit=100, now=NOW)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 1 + 3 + 1  # header, one line per saga, the count: no reason spilt over lines
    assert all(len(line) <= width for line in lines)
    for inst, line in zip(sagas, lines[1:4], strict=True):
        short = line.split()[0]
        assert inst.id.endswith(short)
        assert len(short) == formatting.SHORT_ID
        assert str(inst.status) in line.split()
        assert "1h02m" in line  # the age, rounded
    assert "step 'charge_payment' fail" in lines[1]
    assert lines[-1] == "3 saga(s)"


def test_short_ids_grow_until_they_tell_sagas_apart() -> None:
    """Ids are shown by their last 12 characters, or more when two ids on the page share those."""
    a, b, c = "x-0123456789abcd", "y-9123456789abcd", "0196f0c0-1c2b-7d3e-8f40-3c2d1e0f9a8b"
    assert render.short_ids([a, b, c]) == {a: "0123456789abcd", b: "9123456789abcd", c: "3c2d1e0f9a8b"}
    assert render.short_ids(["short"]) == {"short": "short"}


def test_a_capped_list_says_how_many_there_are() -> None:
    """A list cut at --limit says "showing N of M (--limit)" rather than passing for the whole."""
    out, buffer = console(80)
    render.saga_list(out, [saga(SagaStatus.RUNNING)], total=2500, limit=1, now=NOW)
    assert buffer.getvalue().splitlines()[-1] == "showing 1 of 2500 (--limit)"


@pytest.mark.parametrize("width", [80, 200])
def test_show_prints_whole_ids_event_names_and_rounded_durations(width: int) -> None:
    """`show` keeps the saga id, message ids and event names whole, wraps the reason, and rounds durations."""
    inst = saga(SagaStatus.COMPENSATING, failure=REASON, saga_id=str(uuid.uuid4()))
    message_id = f"{inst.id}/compensation_of_a_long_step_name/compensation/12"
    history = [
        HistoryRecord(inst.id, HistoryEntry(at=NOW - 29, type="compensation.retry_scheduled",
                                            step="compensation_of_a_long_step_name", attempt=12,
                                            detail={"delay": 1.0943757843366069, "message_id": message_id}), 7),
        HistoryRecord(inst.id, HistoryEntry(at=NOW - 28, type="saga.compensating", detail={"reason": REASON}), 8),
    ]
    out, buffer = console(width)
    render.saga_report(out, inst, history, [], step_order=["create_order", "compensation_of_a_long_step_name"])
    text = buffer.getvalue()
    # Soft wrapping: a long id is one line of output (the terminal wraps it), so copying it copies it whole.
    assert inst.id in text.splitlines()
    assert f"    message_id: {message_id}" in text.splitlines()
    assert "compensation.retry_scheduled  compensation_of_a_long_step_name #12" in text
    assert "1.0943" not in text
    assert "compensation_of_a_long_step_name" in text.split("timeline")[0]  # the step table keeps the name whole
    assert "1.09s" in text.split("timeline")[0]  # the step took 1.09 s
    assert "<script>alert(1)</script>" in text  # shown as text
    words = " ".join(text.split())
    assert REASON in words  # wrapped, never cut
    assert not [line for line in text.splitlines() if len(line.strip()) == 1]  # no one-letter lines


@pytest.mark.parametrize("width", [80, 200])
def test_dead_letter_list_shows_the_whole_ids_dlq_show_takes(width: int) -> None:
    """Every dead letter's id is printed whole on its own line, with when, which saga and the reason on one line."""
    saga_id = str(uuid.uuid4())
    found = [
        DeadLetter(id=f"dl/{saga_id}/reserve_inventory/command/{n}/reply", reason=REASON + " " + "x" * 300,
                   message=BrokerMessage(topic="sagas.replies", value=b"{}"), at=NOW, saga_id=saga_id)
        for n in range(1, 4)
    ]
    out, buffer = console(width)
    render.dead_letter_list(out, found, total=None, limit=100)
    lines = buffer.getvalue().splitlines()
    for dead in found:
        assert dead.id in lines
    reasons = [line for line in lines if "charge_payment" in line]
    assert len(reasons) == 3
    assert all(len(line) <= width for line in reasons)
    assert lines[-1] == "3 dead letter(s)"


def test_durations_read_as_a_person_says_them() -> None:
    """Durations are rounded to what matters at their size."""
    assert [formatting.duration(s) for s in (0.0123, 1.0943757843366069, 42.4, 185, 7800, 300_000)] == [
        "12ms", "1.09s", "42s", "3m05s", "2h10m", "3d11h"]


def test_the_cli_status_choices_are_the_saga_statuses() -> None:
    """`--status` accepts exactly the statuses a saga can have."""
    assert set(operate.STATUSES) == {str(s) for s in SagaStatus}
