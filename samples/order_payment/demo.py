"""Run a batch of order sagas on the embedded default: SQLite + the in-process broker, no servers.

    python -m samples.order_payment.demo --db demo.db --sagas 200
    sagas list --db demo.db
    sagas show <saga id> --db demo.db

Some orders fail on purpose: every 7th has a total above the card limit (declined at the pivot), and orders of
truffles run the 40 in stock dry (refused by inventory). Those sagas are compensated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sql import SqlStore
from sagas.definitions import load_file
from sagas.engine.runtime import Engine
from sagas.engine.state import SagaStatus
from sagas.logs import configure_logging
from samples.order_payment.participants import ALL

HERE = Path(__file__).parent


def order(i: int) -> dict[str, object]:
    """Deterministic orders: every 7th is declined by payments, truffle orders exhaust the stock."""
    items = [{"sku": "apple", "quantity": 1 + i % 3}]
    if i % 5 == 0:
        items.append({"sku": "truffle", "quantity": 3})
    total = 900.0 if i % 7 == 3 else 20.0 + i % 50
    return {"customer_id": f"c-{i % 17}", "items": items, "total": total, "currency": "EUR"}


async def run(db: Path, count: int, concurrency: int) -> int:
    console = Console()
    definition = load_file(HERE / "saga.yaml")
    store = SqlStore(f"sqlite+aiosqlite:///{db}")
    broker = MemoryBroker()
    started = time.perf_counter()
    counts: dict[SagaStatus, int] = {}
    async with contextlib.AsyncExitStack() as stack:
        engine = await stack.enter_async_context(Engine(store=store, broker=broker, definitions=[definition]))
        for participant in ALL:
            own_db = db.parent / f"{db.stem}.{participant.name}.db"
            await stack.enter_async_context(participant.serve(broker=broker, database_url=f"sqlite+aiosqlite:///{own_db}"))
        gate = asyncio.Semaphore(concurrency)
        with Progress(TextColumn("order sagas"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("sagas", total=count)

            async def one(i: int) -> None:
                async with gate:
                    saga_id = await engine.start_saga("order_payment", order(i), key=f"demo-order-{i}")
                    instance = await engine.wait(saga_id, timeout=120)
                counts[instance.status] = counts.get(instance.status, 0) + 1
                progress.advance(task)

            await asyncio.gather(*(one(i) for i in range(count)))
    await store.close()
    elapsed = time.perf_counter() - started
    table = Table("outcome", "sagas", title=f"{count} sagas, {elapsed:.1f} s")
    for status in SagaStatus:
        if counts.get(status):
            table.add_row(str(status), str(counts[status]))
    console.print(table)
    console.print(f"Inspect them: [bold].venv/bin/sagas list --db {db}[/bold]  and  "
                  f"[bold].venv/bin/sagas show <id> --db {db}[/bold]")
    return 0 if sum(counts.values()) == count else 1


def remove_previous_run(db: Path) -> None:
    """Each run starts from empty databases, so its figures describe that run alone."""
    for path in [db, *db.parent.glob(f"{db.stem}.*.db")]:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("demo.db"))
    parser.add_argument("--sagas", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    configure_logging(level="WARNING")
    remove_previous_run(args.db.resolve())
    raise SystemExit(asyncio.run(run(args.db.resolve(), args.sagas, args.concurrency)))


if __name__ == "__main__":
    main()
