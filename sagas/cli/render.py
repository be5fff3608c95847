"""What the operator commands print for people: readable at 80 columns and at 200.

Rules (from watching the output at 80 columns): status words are never cut; ids a person copies into another
command are printed whole, on a line of their own where they do not fit a column, with soft wrapping (the terminal
wraps a long id, so copying it gives the whole id, without a newline in it); free text (reasons, outputs) is cut to
one line in lists and wrapped in `show`; durations are rounded. Everything a saga carries is escaped for rich.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console
from rich.markup import escape as _e
from rich.table import Table

from sagas.formatting import duration, short_ids

if TYPE_CHECKING:
    from sagas.engine.ports import DeadLetter, HistoryRecord
    from sagas.engine.state import SagaInstance, TimerSpec

_COLORS = {"completed": "green", "compensated": "yellow", "failed": "red", "compensating": "magenta"}


def status(value: str) -> str:
    color = _COLORS.get(str(value))
    return f"[{color}]{value}[/{color}]" if color else str(value)


def when(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def clock(at: float | None) -> str:
    """The time of day (UTC) to the millisecond: the date is in the saga's header."""
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S.%f")[:-3]


class ListedSaga(Protocol):
    """What a list line shows of a saga: a `SagaInstance`, or the API's summary of one (`Listed`)."""

    @property
    def id(self) -> str: ...
    @property
    def definition(self) -> str: ...
    @property
    def definition_version(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def created_at(self) -> float: ...
    @property
    def failure(self) -> str | None: ...


@dataclass(frozen=True)
class Listed:
    """A saga as the HTTP API lists it."""

    id: str
    definition: str
    definition_version: int
    status: str
    created_at: float
    updated_at: float
    failure: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Listed:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def saga_list(console: Console, found: Sequence[ListedSaga], *, total: int, limit: int, now: float | None = None
              ) -> None:
    """One saga a line: short id, definition, status, age, and the reason cut to the line."""
    now = time.time() if now is None else now
    shorts = short_ids([inst.id for inst in found])
    names = [f"{inst.definition} v{inst.definition_version}" for inst in found]
    ages = [duration(now - inst.created_at) for inst in found]
    widths = [max(map(len, shorts.values()), default=2), min(28, max(map(len, names), default=4)),
              len("compensating"), max(map(len, ages), default=3)]
    # The reason is cut here, to what the line has left: rich, given a table wider than the terminal, would drop
    # whole columns (the id) or shrink them to nothing rather than cut the last one.
    room = max(10, console.width - sum(widths) - 2 * len(widths))
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("id", no_wrap=True, min_width=widths[0])
    table.add_column("saga", no_wrap=True, overflow="ellipsis", min_width=widths[1], max_width=28)
    table.add_column("status", no_wrap=True, min_width=widths[2])
    table.add_column("age", no_wrap=True, justify="right", min_width=widths[3])
    table.add_column("reason", no_wrap=True, overflow="ellipsis")
    for inst, name, age in zip(found, names, ages, strict=True):
        table.add_row(_e(shorts[inst.id]), _e(name), status(inst.status), age, _e(_cut(_one_line(inst.failure), room)))
    console.print(table)
    if total > len(found):
        console.print(f"showing {len(found)} of {total} (--limit)")
    else:
        console.print(f"{len(found)} saga(s)")


def _detail_value(key: str, value: Any) -> str:
    if isinstance(value, float) and key in ("delay", "timeout", "outage_seconds", "after"):
        return duration(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def saga_report(console: Console, inst: SagaInstance, history: Sequence[HistoryRecord], timers: Sequence[TimerSpec],
                *, step_order: Sequence[str] | None = None, more_history: bool = False) -> None:
    """A saga's header (whole id, status, reason), steps, pending timers and timeline."""
    console.print(f"[bold]{_e(inst.id)}[/bold]", soft_wrap=True)
    console.print(f"{_e(inst.definition)} v{inst.definition_version}  {status(inst.status)}  "
                  f"created {when(inst.created_at)}  updated {when(inst.updated_at)}", soft_wrap=True)
    if inst.idempotency_key is not None:
        console.print(f"key: {_e(inst.idempotency_key)}", soft_wrap=True)
    if inst.failure:
        console.print(f"reason: {_e(inst.failure)}")
    console.print(f"input: {_e(json.dumps(inst.input, ensure_ascii=False))}")
    steps = Table(box=None, pad_edge=False, header_style="bold")
    names = [n for n in (step_order or ()) if n in inst.steps] + [n for n in inst.steps if n not in (step_order or ())]
    # Whole step names (they are short, and a cut one is no use); the output column gives way.
    steps.add_column("step", no_wrap=True, min_width=min(32, max(map(len, names), default=4)))
    steps.add_column("status", no_wrap=True)
    steps.add_column("tries", justify="right", no_wrap=True)
    steps.add_column("undo", justify="right", no_wrap=True)
    steps.add_column("started", no_wrap=True)
    steps.add_column("took", justify="right", no_wrap=True)
    steps.add_column("output / error", overflow="fold", ratio=1)
    for name in names:
        step = inst.steps[name]
        took = None if step.started_at is None or step.finished_at is None else step.finished_at - step.started_at
        shown = step.error or (json.dumps(step.output, ensure_ascii=False) if step.output is not None else "")
        steps.add_row(_e(name), str(step.status), str(step.attempt), str(step.compensation_attempt),
                      clock(step.started_at), duration(took), _e(shown))
    console.print(steps)
    if timers:
        console.print("[bold]pending timers[/bold]")
        for timer in timers:
            console.print(f"  {clock(timer.due_at)}  {timer.timer}  {_e(timer.step or '-')} #{timer.attempt}"
                          f"  (in {duration(timer.due_at - time.time())})", soft_wrap=True)
    console.print("[bold]timeline[/bold]")
    for record in history:
        entry = record.entry
        attempt = f" #{entry.attempt}" if entry.attempt is not None else ""
        where = f"  {_e(entry.step)}{attempt}" if entry.step else ""
        console.print(f"{clock(entry.at)}  {_e(entry.type)}{where}", soft_wrap=True)
        for key, value in entry.detail.items():
            # One detail a line, soft-wrapped: message ids stay whole and copyable however narrow the terminal.
            console.print(f"    {_e(key)}: {_e(_detail_value(key, value))}", soft_wrap=True)
    if more_history:
        console.print("... history goes on (--history-limit)")


def dead_letter_list(console: Console, found: Sequence[DeadLetter], *, total: int | None, limit: int) -> None:
    """Each dead letter as its whole id (what `dlq show` and `dlq replay` take), then when, saga and reason."""
    for dead in found:
        console.print(f"[bold]{_e(dead.id)}[/bold]", soft_wrap=True)
        replayed = f"  replayed {when(dead.replayed_at)}" if dead.replayed_at is not None else ""
        console.print(f"  {when(dead.at)}  saga {_e(dead.saga_id or '-')}  topic {_e(dead.message.topic)}{replayed}",
                      soft_wrap=True)
        console.print(f"  {_e(_cut(_one_line(dead.reason), max(20, console.width - 4)))}", soft_wrap=True)
    if total is not None and total > len(found):
        console.print(f"showing {len(found)} of {total} (--limit)")
    elif len(found) >= limit:
        console.print(f"showing the newest {len(found)} (--limit)")
    else:
        console.print(f"{len(found)} dead letter(s)")
