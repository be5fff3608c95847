"""CPU per saga with observability off, with Prometheus metrics, and with tracing to an in-memory exporter.

The three configurations run interleaved in one process (off, metrics, tracing, off, metrics, ... for `--rounds`),
each round a fresh engine on a SQLite file store and the in-memory broker with the three in-process participants of
bench/saga_throughput.py, N sagas at a bounded concurrency after a warm-up. The figure is the process's CPU time
(every thread) per saga: what observability costs, whatever the machine's other load does to wall time.

- metrics: `EngineMetrics` on the engine, and `/metrics` rendered once a second (a scrape, gauges read from the store);
- tracing: `EngineTracing` on the engine and `ParticipantTracing` on the participants, spans exported by the SDK's
  `SimpleSpanProcessor` to an `InMemorySpanExporter`, emptied once a second as a batch exporter would send its
  batch away (spans kept for the whole round would only make every garbage collection longer): six spans a saga
  (one per step attempt's round trip on the engine, one per command handled by a participant);
- traced10: the same with `EngineTracing(ratio=0.1)`: one saga in ten traced (the others' spans are not recorded,
  by the engine nor by the participants, through the SDK's default parent-based sampler).

Targets (issue 11): metrics at most 5 % more CPU per saga, tracing at most 15 % more.

Two figures per configuration: the whole process's CPU per saga (median [min..max] over the rounds, and the median's
difference to "off": what the targets are about, but on a loaded machine each round's figure moves by 10 % or
more; "paired": the median of each round's difference to the "off" round run just before it, less exposed to the
machine's load drifting over the run), and the CPU spent inside the observer's and the participants' tracing
calls themselves, on the event loop's thread (`time.thread_time`, less what timing a call costs), per saga: a
direct reading of what observability adds, much steadier, though it leaves out what happens elsewhere (the scrape's
queries in the database thread, bigger messages, the garbage collector).

    .venv/bin/python bench/observability_overhead.py [--sagas 1000] [--rounds 5] [--concurrency 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.saga_throughput import STEPS, definition, participant
from sagas.adapters.memory import MemoryBroker
from sagas.adapters.prometheus import EngineMetrics
from sagas.adapters.sql import SqlStore
from sagas.adapters.tracing import EngineTracing, ParticipantTracing
from sagas.engine.ports import NoObserver
from sagas.engine.runtime import Engine
from sagas.engine.state import SagaStatus
from sagas.logs import configure_logging

MODES = ("off", "metrics", "tracing", "traced10")
TARGETS = {"metrics": "+5%", "tracing": "+15%", "traced10": "+15%"}


class Timed:
    """`inner` with its observer / tracing calls timed: `seconds` of the calling thread's CPU spent in them."""

    CALLS = frozenset({"committed", "published", "outage", "loop_failed", "timers_fired", "fetched", "outgoing",
                       "begin", "reply"})

    overhead = 0.0
    """Seconds `Timed` itself adds to one call's reading (two clock reads), measured once and subtracted."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    @classmethod
    def calibrate(cls, calls: int = 50_000) -> None:
        probe = cls(NoObserver())
        for _ in range(calls):
            probe.loop_failed("x", None)
        cls.overhead = probe.seconds / calls

    @property
    def net(self) -> float:
        return max(self.seconds - self.calls * self.overhead, 0.0)

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.inner, name)
        if name not in self.CALLS:
            return found

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.thread_time()
            try:
                return found(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - began
                self.calls += 1

        return timed


@contextlib.asynccontextmanager
async def running(mode: str, directory: Path, exporter: InMemorySpanExporter,
                  provider: TracerProvider) -> AsyncIterator[tuple[Engine, EngineMetrics | None, list[Timed]]]:
    broker = MemoryBroker()
    store = SqlStore(f"sqlite+aiosqlite:///{directory / 'engine.db'}")
    metrics = EngineMetrics() if mode == "metrics" else None
    observer: Any = metrics
    if mode in ("tracing", "traced10"):
        observer = EngineTracing(tracer_provider=provider, messaging_system="memory",
                                 ratio=1.0 if mode == "tracing" else 0.1)
    timed = [Timed(observer)] if observer is not None else []
    engine = Engine(store=store, broker=broker, definitions=[definition()], observer=timed[0] if timed else None)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(store.close)
        await stack.enter_async_context(engine)
        if metrics is not None:
            metrics.bind(engine)
        tracing = None
        if observer is not None and metrics is None:
            timed.append(Timed(ParticipantTracing(tracer_provider=provider, messaging_system="memory")))
            tracing = timed[-1]
        for _, service, command in STEPS:
            url = f"sqlite+aiosqlite:///{directory / f'{service}.db'}"
            await stack.enter_async_context(participant(service, command).serve(broker=broker, database_url=url,
                                                                                tracing=tracing))
        yield engine, metrics, timed
        if isinstance(observer, EngineTracing):
            observer.close()


async def one_round(mode: str, sagas: int, concurrency: int, exporter: InMemorySpanExporter,
                    provider: TracerProvider) -> tuple[float, float, int, float]:
    """CPU seconds per saga, sagas per second (wall), spans recorded, CPU seconds per saga in the timed calls."""
    with tempfile.TemporaryDirectory(prefix=f"obs-{mode}-") as tmp:
        async with running(mode, Path(tmp), exporter, provider) as (engine, metrics, timed):
            gate = asyncio.Semaphore(concurrency)
            completed = 0

            async def one(index: int) -> None:
                nonlocal completed
                async with gate:
                    saga_id = await engine.start_saga("order", {"order_id": f"o-{index}", "amount": 10})
                    settled = await engine.wait(saga_id, timeout=120)
                    completed += settled.status == SagaStatus.COMPLETED
                    if settled.status != SagaStatus.COMPLETED:  # what went wrong, should it ever
                        print(f"saga {index}: {settled.status} ({settled.failure})", file=sys.stderr)

            exported = 0

            async def scraping() -> None:
                nonlocal exported
                while True:
                    if metrics is not None:
                        await metrics.exposition()
                    # What a batch exporter does once a second: the finished spans leave the process (kept, they
                    # would only make every garbage collection walk them).
                    exported += len(exporter.get_finished_spans())
                    exporter.clear()
                    await asyncio.sleep(1.0)

            await asyncio.gather(*(one(i) for i in range(50)))  # warm-up
            exporter.clear()
            gc.collect()
            for calls in timed:
                calls.seconds, calls.calls = 0.0, 0
            scraper = asyncio.ensure_future(scraping())
            cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(50, 50 + sagas)))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            inside = sum(calls.net for calls in timed)
            scraper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scraper
            assert completed == sagas + 50, f"{mode}: only {completed} of {sagas + 50} completed"
            spans = exported + len(exporter.get_finished_spans())
            exporter.clear()
    return cpu / sagas, sagas / wall, spans, inside / sagas


async def main_async(args: argparse.Namespace) -> None:
    Timed.calibrate()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    results: dict[str, list[tuple[float, float, int, float]]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            result = await one_round(mode, args.sagas, args.concurrency, exporter, provider)
            results[mode].append(result)
            print(f"round {round_ + 1} {mode:8} {result[0] * 1e3:7.3f} ms CPU/saga  {result[1]:7.1f} sagas/s  "
                  f"{result[2]:5d} spans  {result[3] * 1e6:6.1f} us/saga in the observer calls", flush=True)
    base = statistics.median(r[0] for r in results["off"])
    print(f"\n{args.sagas} sagas x {args.rounds} rounds, interleaved; CPU per saga (whole process), median [min..max]; "
          "CPU per saga inside the observer and tracing calls (event-loop thread), median")
    print("  paired: the median over rounds of each round's CPU per saga against the 'off' round just before it")
    print(f"{'mode':10}{'CPU/saga ms':>26}{'vs off':>9}{'paired':>9}{'in calls':>12}{'vs off':>9}{'sagas/s':>9}"
          f"{'target':>8}")
    for mode in MODES:
        paired = statistics.median(r[0] / off[0] - 1 for r, off in zip(results[mode], results["off"], strict=True))
        cpus = [r[0] * 1e3 for r in results[mode]]
        cpu = statistics.median(cpus)
        inside = statistics.median(r[3] for r in results[mode])
        rate = statistics.median(r[1] for r in results[mode])
        spread = f"{cpu:.3f} [{min(cpus):.3f}..{max(cpus):.3f}]"
        print(f"{mode:10}{spread:>26}{(cpu / (base * 1e3) - 1) * 100:+8.1f}%{paired * 100:+8.1f}%{inside * 1e6:9.1f} us"
              f"{inside / base * 100:+8.1f}%{rate:9.1f}{TARGETS.get(mode, ''):>8}")
    provider.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sagas", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    configure_logging(level="WARNING")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
