"""The benchmark's scale-out and peer modes, run as a user runs them (bench/saga_throughput.py, bench/peers/)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from bench.peers.compare import Figures, spread, summary
from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "saga_throughput.py"


def bench(*args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, check=False)
    assert result.returncode == 0, f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def figures(rate: float, cpu_ms: float) -> Figures:
    return Figures(rate=rate, p50_ms=1.0, p99_ms=2.0, cpu_ms=cpu_ms, machine_ms=cpu_ms)


def test_spread_is_the_median_with_the_range() -> None:
    """A spread reads median [min..max] whatever the order of the values."""
    assert spread([300.0, 100.0, 200.0]) == "200 [100..300]"
    assert spread([1.234, 1.0], 2) == "1.12 [1.00..1.23]"


def test_the_ratio_pairs_runs_by_repetition() -> None:
    """The ratio to a peer divides each repetition's figure by the same repetition's peer figure, not medians."""
    rows = {"ours": [figures(1000, 1.0), figures(100, 2.0)], "theirs": [figures(10, 10.0), figures(50, 4.0)]}
    lines = summary(rows, baseline="ours", peers=["theirs"])
    ratio = next(line for line in lines if line.startswith("ratio"))
    assert "sagas/s 51.0 [2.0..100.0]x" in ratio  # 1000/10 and 100/50; median of the pairs
    assert "over ours 6.0 [2.0..10.0]x" in ratio  # 10/1 and 4/2


def test_participants_in_their_own_process_on_db_queue(tmp_path: Path) -> None:
    """With --participants-process on db://, every saga completes through a child process whose CPU is reported
    apart from the engine's, and the child handled exactly the three commands of each saga."""
    out = bench("--sagas", "30", "--concurrency", "10", "--broker", "db://", "--participants-process",
                "--floor-sagas", "30", "--raw-seconds", "0.1", "--db", str(tmp_path))
    assert "completed 30 in" in out
    alone = re.search(r"engine process alone: +([\d.]+) ms .* participants' process ([\d.]+) ms per saga .* handled "
                      r"([\d,]+) commands", out)
    assert alone is not None, out
    assert float(alone[1]) > 0
    assert float(alone[2]) > 0
    assert int(alone[3].replace(",", "")) == 3 * (30 + 30)  # 30 warm-up sagas (fewer than 50), 30 measured


def test_peers_run_side_by_side_interleaved(tmp_path: Path) -> None:
    """--peers runs sagas and DBOS Transact alternately on SQLite and prints both rows and their ratio."""
    if importlib.util.find_spec("dbos") is None:
        missing("DBOS Transact is the 'bench' extra (also in dev): pip install -e '.[dev]'")
    out = bench("--sagas", "20", "--concurrency", "10", "--peers", "--repeat", "2", "--floor-sagas", "20",
                "--raw-seconds", "0.1", "--db", str(tmp_path))
    order = re.findall(r"---- (sagas|DBOS)\S*.*repetition (\d) of 2", out)
    assert order == [("sagas", "1"), ("DBOS", "1"), ("DBOS", "2"), ("sagas", "2")], out
    assert re.search(r"DBOS Transact [\d.]+ \(WAL, synchronous=NORMAL, sync API\) \(2 runs\)", out), out
    assert re.search(r"ratio sagas \(SQLite \+ memory broker\) / DBOS .*: sagas/s [\d.]+ \[", out), out
