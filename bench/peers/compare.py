"""Side by side: sagas and its peers in one benchmark run (`saga_throughput.py --peers`, `--repeat`), and what both
measure the same way (the servers' CPU and PostgreSQL's WAL, less what the shared servers do without them).

A peer runs in a child process of its own (`dbos_saga.py`: DBOS is one instance per process and sets up its own
logging), on a fresh database of the same kind as the sagas run's, and reports its figures as JSON. Repetitions
alternate which system goes first (sagas, peer, peer, sagas, ...), so a slow spell of this shared machine falls
on both; the summary gives median [min..max] over the repetitions, and the ratio of each repetition's pair.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench.broker_floor import ServerClock

HERE = Path(__file__).resolve().parent


class Servers(ServerClock):
    """The servers of bench/broker_floor.py, and RabbitMQ's Erlang VM."""

    KINDS = (*ServerClock.KINDS, ("RabbitMQ", {"name": "beam.smp"}))


async def pg_wal_position(url: str) -> int:
    """PostgreSQL's current WAL position in bytes (server-wide), for any postgresql[+driver]:// URL."""
    import asyncpg

    connection = await asyncpg.connect("postgresql://" + url.partition("://")[2])
    try:
        return int(await connection.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
    finally:
        await connection.close()


@dataclass
class Background:
    """What the shared servers did while the system under test sat idle: the machine is shared, so a server's CPU
    and PostgreSQL's WAL during a run count other clients' work too; this rate, times the run's length, is
    taken off (a rough correction: the others' load changes from second to second)."""

    seconds: float
    cpu: dict[str, float]
    """CPU seconds per second, by server kind."""
    wal: float | None
    """WAL bytes per second; None without PostgreSQL."""

    @classmethod
    def measure(cls, seconds: float, postgres_url: str | None) -> Background:
        """Sleep `seconds` (blocking: run it in a thread from an event loop) and see what the servers did."""
        if seconds <= 0:
            return cls(0.0, {}, None)
        clock, wal = Servers(), asyncio.run(pg_wal_position(postgres_url)) if postgres_url else None
        started = time.perf_counter()
        time.sleep(seconds)
        elapsed = time.perf_counter() - started
        wal_end = asyncio.run(pg_wal_position(postgres_url)) if postgres_url else None
        return cls(elapsed, {kind: cpu / elapsed for kind, cpu in clock.spent().items()},
                   None if wal is None or wal_end is None else (wal_end - wal) / elapsed)

    def net(self, spent: dict[str, float], seconds: float) -> dict[str, float]:
        """`spent` (CPU seconds by server kind over `seconds`) less the background's; never below 0."""
        return {kind: max(0.0, cpu - self.cpu.get(kind, 0.0) * seconds) for kind, cpu in spent.items()}

    def net_wal(self, wal_bytes: int, seconds: float) -> float:
        return max(0.0, wal_bytes - (self.wal or 0.0) * seconds)


@dataclass
class Figures:
    """One run of one system, in the units the summary prints."""

    rate: float
    """Completed sagas (workflows) per second."""
    p50_ms: float
    p99_ms: float
    cpu_ms: float
    """CPU per saga of the process that runs the sagas (the engine's process; DBOS's process)."""
    machine_ms: float
    """CPU per saga of the whole machine, every process (servers and other load included)."""
    extra: dict[str, float] = field(default_factory=dict)
    """More CPU per saga figures, by name: participants' process; PostgreSQL, the Kafka JVM... as measured, and
    less the background (``"<kind> net"``)."""
    wal_kib: float | None = None
    """PostgreSQL's WAL per saga, less the background's; None on SQLite."""


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_dbos(db: str, sagas: int, concurrency: int, servers: Sequence[str], api: str = "sync") -> tuple[Figures, str]:
    """Run the three-step saga on DBOS Transact at `db` (a fresh SQLite file path or a PostgreSQL URL) in a child
    process; its figures (with the CPU of the `servers` kinds it used) and a one-line description of what ran."""
    command = [sys.executable, str(HERE / "dbos_saga.py"), "--json", "--db", db, "--sagas", str(sagas),
               "--concurrency", str(concurrency), "--api", api]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"DBOS run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["completed"] != sagas:
        raise RuntimeError(f"DBOS completed {result['completed']} of {sagas} workflows")
    per_saga = 1000 / sagas
    extra = server_figures(result["servers"], result["servers_net"], servers, per_saga)
    wal = result.get("wal_net")
    figures = Figures(result["completed"] / result["seconds"], percentile(result["latencies"], 0.5) * 1000,
                      percentile(result["latencies"], 0.99) * 1000, result["cpu"] * per_saga,
                      result["machine"] * per_saga, extra, None if wal is None else wal / sagas / 1024)
    return figures, f"DBOS Transact {result['version']} ({result['store']})"


def server_figures(spent: dict[str, float], net: dict[str, float], servers: Sequence[str],
                   per_saga: float) -> dict[str, float]:
    """CPU per saga (ms) of the `servers` kinds, as measured and less the background (`<kind> net`)."""
    figures = {}
    for kind in servers:
        if kind in spent:
            figures[kind] = spent[kind] * per_saga
            figures[f"{kind} net"] = net.get(kind, 0.0) * per_saga
    return figures


def spread(values: Sequence[float], digits: int = 0) -> str:
    """``median [min..max]``."""
    def show(value: float) -> str:
        return f"{value:,.{digits}f}"

    return f"{show(statistics.median(values))} [{show(min(values))}..{show(max(values))}]"


def summary(rows: dict[str, list[Figures]], *, baseline: str, peers: Sequence[str]) -> list[str]:
    """Lines of the side-by-side table: one row per system, then the ratios of `baseline` to each peer, paired
    by repetition."""
    lines = []
    for label, runs in rows.items():
        extra = sorted({name for run in runs for name in run.extra})
        parts = [f"{spread([r.rate for r in runs])} sagas/s",
                 f"p50 {spread([r.p50_ms for r in runs], 1)} ms",
                 f"p99 {spread([r.p99_ms for r in runs], 1)} ms",
                 f"CPU per saga {spread([r.cpu_ms for r in runs], 2)} ms",
                 *(f"{name} {spread([r.extra.get(name, 0.0) for r in runs], 2)} ms" for name in extra),
                 f"machine {spread([r.machine_ms for r in runs], 2)} ms",
                 *([f"PostgreSQL WAL net {spread([r.wal_kib or 0.0 for r in runs], 1)} KiB"]
                   if any(r.wal_kib is not None for r in runs) else [])]
        lines.append(f"{label} ({len(runs)} runs):")
        lines.append("    " + "; ".join(parts))
    for peer in peers:
        pairs = list(zip(rows[baseline], rows[peer], strict=False))
        lines.append(f"ratio {baseline} / {peer}, per repetition: sagas/s "
                     f"{spread([ours.rate / theirs.rate for ours, theirs in pairs], 1)}x; their CPU per saga over "
                     f"ours {spread([theirs.cpu_ms / ours.cpu_ms for ours, theirs in pairs], 1)}x")
    return lines
