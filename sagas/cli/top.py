"""`sagas top`: a live view of a running engine, from its `/metrics` (`--url`), or from the database.

    sagas top --url http://127.0.0.1:9464       # what the engine's /metrics says, every 2 s
    sagas top --db sagas.db                     # no engine reachable: the database's own numbers
    sagas top --url ... --once --json           # one snapshot for scripts

Rates and the p50/p99 round trips of the live view come from the difference between two scrapes; `--once` shows
what the counters hold since the engine started. Laid out for 80 columns.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from sagas.cli.app import app

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
STATUSES = ("running", "compensating", "completed", "compensated", "failed")


def parse_metrics(text: str) -> Samples:
    """The samples of a Prometheus text exposition, by (name, sorted labels)."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            continue
        name, raw, value = match.groups()
        labels = tuple(sorted(
            (key, val.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
            for key, val in _LABEL.findall(raw or "")
        ))
        try:
            samples[(name, labels)] = float(value)
        except ValueError:
            continue
    return samples


def _series(samples: Samples, name: str) -> Iterator[tuple[dict[str, str], float]]:
    for (metric, labels), value in samples.items():
        if metric == name:
            yield dict(labels), value


def _total(samples: Samples, name: str, **match: str) -> float:
    return sum(v for labels, v in _series(samples, name) if all(labels.get(k) == m for k, m in match.items()))


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """`histogram_quantile` on cumulative (upper bound, count) buckets, interpolating within the bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            width = count - below
            return lower + (upper - lower) * ((rank - below) / width if width else 1.0)
        lower, below = upper, count
    return lower


@dataclass
class Snapshot:
    """What `sagas top` shows; `as_json()` is the `--once --json` document."""

    source: str
    at: float
    sagas: dict[str, int] = field(default_factory=dict)
    parked: int = 0
    stuck: int = 0
    outbox_pending: int = 0
    outbox_age: float = 0.0
    timers_due: int = 0
    dead_letters: int = 0
    lag: dict[str, int] = field(default_factory=dict)
    started_total: float | None = None
    settled_total: dict[str, float] = field(default_factory=dict)
    round_trips: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)

    def trips(self, previous: Snapshot | None = None) -> list[dict[str, Any]]:
        rows = []
        for (step, kind), buckets in sorted(self.round_trips.items()):
            if previous is not None and (step, kind) in previous.round_trips:
                before = dict(previous.round_trips[(step, kind)])
                buckets = [(le, count - before.get(le, 0.0)) for le, count in buckets]
            count = max((c for _, c in buckets), default=0.0)
            rows.append({"step": step, "kind": kind, "count": int(count),
                         "p50_seconds": quantile(0.5, buckets), "p99_seconds": quantile(0.99, buckets)})
        return rows

    def as_json(self, previous: Snapshot | None = None) -> dict[str, Any]:
        return {
            "source": self.source, "at": self.at, "sagas": self.sagas, "parked": self.parked, "stuck": self.stuck,
            "outbox": {"pending": self.outbox_pending, "oldest_age_seconds": self.outbox_age},
            "timers_due": self.timers_due, "dead_letters": self.dead_letters, "lag": self.lag,
            "started_total": self.started_total, "settled_total": self.settled_total, "rates": self.rates,
            "round_trips": self.trips(previous),
        }


def from_metrics(source: str, text: str, at: float) -> Snapshot:
    samples = parse_metrics(text)
    snap = Snapshot(source=source, at=at)
    snap.sagas = {status: int(_total(samples, "sagas_sagas", status=status)) for status in STATUSES}
    snap.parked = int(_total(samples, "sagas_parked_sagas"))
    snap.stuck = int(_total(samples, "sagas_stuck_sagas"))
    snap.outbox_pending = int(_total(samples, "sagas_outbox_pending_messages"))
    snap.outbox_age = _total(samples, "sagas_outbox_oldest_age_seconds")
    snap.timers_due = int(_total(samples, "sagas_timers_due"))
    snap.dead_letters = int(_total(samples, "sagas_dead_letters_stored"))
    for labels, value in _series(samples, "sagas_consumer_lag_messages"):
        snap.lag[f"{labels.get('topic')}/{labels.get('partition')}"] = int(value)
    for labels, value in _series(samples, "sagas_participant_consumer_lag_messages"):
        snap.lag[f"{labels.get('topic')}/{labels.get('partition')}"] = int(value)
    snap.started_total = _total(samples, "sagas_started_total")
    settled: dict[str, float] = defaultdict(float)
    for labels, value in _series(samples, "sagas_settled_total"):
        settled[labels.get("status", "?")] += value
    snap.settled_total = dict(settled)
    trips: dict[tuple[str, str], dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in _series(samples, "sagas_step_round_trip_seconds_bucket"):
        trips[(labels.get("step", "?"), labels.get("kind", "?"))][float(labels.get("le", "inf"))] += value
    snap.round_trips = {key: sorted(buckets.items()) for key, buckets in trips.items()}
    return snap


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    target = url.rstrip("/") + "/metrics"
    if not target.startswith(("http://", "https://")):
        raise ValueError(f"--url {url!r}: expected http://HOST:PORT")
    with urllib.request.urlopen(target, timeout=timeout) as answer:  # checked to be http(s) above
        return from_metrics(url, answer.read().decode("utf-8", errors="replace"), time.time())


async def from_database(db_url: str, stuck_after: float) -> Snapshot:
    from sagas.adapters import open_store
    from sagas.engine.ports import Gauges

    store = open_store(db_url)
    try:
        await store.initialize()
        now = time.time()
        snap = Snapshot(source="database", at=now, started_total=None)
        if isinstance(store, Gauges):
            gauges = await store.gauges(now, stuck_after)
            snap.sagas = {status.value: count for status, count in gauges.by_status.items()}
            snap.parked = snap.sagas.get("failed", 0)
            snap.stuck = gauges.stuck
            snap.outbox_pending = gauges.outbox_pending
            snap.outbox_age = 0.0 if gauges.outbox_oldest_at is None else max(now - gauges.outbox_oldest_at, 0.0)
            snap.timers_due = gauges.timers_due
            snap.dead_letters = gauges.dead_letters
        else:
            snap.sagas = {status.value: count for status, count in (await store.count_by_status()).items()}
        return snap
    finally:
        await store.close()


def with_rates(current: Snapshot, previous: Snapshot | None) -> Snapshot:
    if previous is None or current.at <= previous.at:
        return current
    elapsed = current.at - previous.at
    if current.started_total is not None and previous.started_total is not None:
        current.rates["started_per_second"] = (current.started_total - previous.started_total) / elapsed
    if current.settled_total or previous.settled_total:
        settled = sum(current.settled_total.values()) - sum(previous.settled_total.values())
        current.rates["settled_per_second"] = settled / elapsed
    return current


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def render(snap: Snapshot, previous: Snapshot | None = None) -> Group:
    """The view, at most 80 columns wide."""
    head = Text(f"sagas top · {snap.source} · {time.strftime('%H:%M:%S', time.localtime(snap.at))}", style="bold")
    sagas = Table(title="sagas", title_justify="left", expand=False, box=None, padding=(0, 1))
    for status in STATUSES:
        sagas.add_column(status, justify="right")
    sagas.add_row(*(str(snap.sagas.get(status, 0)) for status in STATUSES))
    health = Table(box=None, padding=(0, 1), show_header=False)
    health.add_column("what")
    health.add_column("value", justify="right")
    health.add_column("what")
    health.add_column("value", justify="right")
    parked = Text(str(snap.parked), style="red bold" if snap.parked else "")
    stuck = Text(str(snap.stuck), style="yellow bold" if snap.stuck else "")
    health.add_row("parked", parked, "stuck", stuck)
    health.add_row("outbox", str(snap.outbox_pending), "oldest", _seconds(snap.outbox_age))
    health.add_row("timers due", str(snap.timers_due), "dead letters", str(snap.dead_letters))
    if snap.rates:
        health.add_row("started/s", f"{snap.rates.get('started_per_second', 0):.1f}",
                       "settled/s", f"{snap.rates.get('settled_per_second', 0):.1f}")
    parts: list[Any] = [head, sagas, health]
    if snap.lag:
        lag = Table(title="lag (messages)", title_justify="left", box=None, padding=(0, 1))
        lag.add_column("topic/partition", overflow="fold", max_width=60)
        lag.add_column("lag", justify="right")
        for name, value in sorted(snap.lag.items()):
            lag.add_row(name, str(value))
        parts.append(lag)
    trips = snap.trips(previous)
    if trips:
        table = Table(title="round trip per step", title_justify="left", box=None, padding=(0, 1))
        table.add_column("step", overflow="fold", max_width=36)
        table.add_column("kind")
        table.add_column("n", justify="right")
        table.add_column("p50", justify="right")
        table.add_column("p99", justify="right")
        for row in trips:
            table.add_row(row["step"], row["kind"], str(row["count"]), _seconds(row["p50_seconds"]),
                          _seconds(row["p99_seconds"]))
        parts.append(table)
    return Group(*parts)


@app.command()
def top(
    url: Annotated[str | None, typer.Option("--url", envvar="SAGAS_URL",
                                            help="A `sagas serve --http` address: its /metrics is read.")] = None,
    db_url: Annotated[str, typer.Option("--db", envvar="SAGAS_DB", help="Database, when no --url.")] = "sagas.db",
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: JSON for scripts.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds between refreshes.")] = 2.0,
    stuck_after: Annotated[float, typer.Option("--stuck-after", help="From the database: stuck after (s).")] = 300,
) -> None:
    """A live view of sagas: in flight by status, parked and stuck, lag, outbox age, round trips per step."""
    import asyncio

    from sagas.cli.operate import fail

    def read() -> Snapshot:
        try:
            if url is not None:
                return scrape(url)
            return asyncio.run(from_database(db_url, stuck_after))
        except (OSError, ValueError) as exc:
            raise fail(f"cannot read {url or db_url}: {exc}") from None

    console = Console()
    if once:
        snap = read()
        if as_json:
            print(json.dumps(snap.as_json(), indent=2, sort_keys=True))
        else:
            console.print(render(snap))
        return
    from rich.live import Live

    previous = read()
    with Live(render(previous), console=console, refresh_per_second=4, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                current = with_rates(read(), previous)
                live.update(render(current, previous))
                previous = current
        except KeyboardInterrupt:
            pass
