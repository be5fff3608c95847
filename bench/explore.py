"""`sagas explore` on definitions of 3, 8 and 12 steps, each with a parallel group of 3 and retries, side by side.

Each definition: a parallel group of three compensatable steps first, then compensatable steps, a pivot and a
retriable step (the 3-step one is the group alone); every step retries (3 attempts, the pivot 5, the retriable
step forever), compensations retry 4 times, and the saga has a deadline. Printed per definition: canonical states
visited, transitions decided, endings, paths to them, and wall and CPU time (best of `--repeat` runs).

    .venv/bin/python bench/explore.py [--max-attempts 3] [--repeat 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sagas.definitions.model import (
    CompensationDefinition,
    ParallelGroup,
    RetryPolicy,
    SagaDefinition,
    StepDefinition,
    StepKind,
)
from sagas.engine.explore import Exploration, explore

RETRY = RetryPolicy(max_attempts=3, initial_backoff=1.0, max_backoff=8.0)


def _step(
    name: str, previous: str | None, kind: StepKind = StepKind.COMPENSATABLE, attempts: int = 3
) -> StepDefinition:
    payload = {"order": "input.order_id"} | ({"previous": f"steps.{previous}.id"} if previous else {})
    compensation = None
    if kind is StepKind.COMPENSATABLE:
        compensation = CompensationDefinition(command=f"{name}.undo", payload={"order": "input.order_id"})
    return StepDefinition(
        name=name, participant=f"{name}-service", command=f"{name}.do", payload=payload, compensation=compensation,
        timeout=10.0, kind=kind, retry=RETRY.model_copy(update={"max_attempts": attempts}),
    )  # fmt: skip


def definition(steps: int) -> SagaDefinition:
    """`steps` steps: a group of three, then compensatable steps, then (from 5 steps on) a pivot and a retriable."""
    stages: list[StepDefinition | ParallelGroup] = [
        ParallelGroup(name="group", parallel=tuple(_step(f"member_{m}", None) for m in "abc"))
    ]
    tail = steps - 3
    pivot = tail >= 2
    compensatable = tail - 2 if pivot else tail
    previous = "member_a"
    for index in range(compensatable):
        stages.append(_step(f"step_{index + 1}", previous))
        previous = f"step_{index + 1}"
    if pivot:
        stages.append(_step("pivot", previous, StepKind.PIVOT, attempts=5))
        stages.append(_step("finish", "pivot", StepKind.RETRIABLE, attempts=100))
    return SagaDefinition(
        name=f"bench_{steps}", version=1, steps=tuple(stages), deadline=600.0,
        compensation_retry=RetryPolicy(max_attempts=4, initial_backoff=1.0, max_backoff=8.0),
    )  # fmt: skip


def timed(steps: int, max_attempts: int, repeat: int) -> tuple[Exploration, float, float]:
    """The exploration, and its best wall and CPU seconds (on a shared machine, CPU is the figure to compare)."""
    wall = cpu = float("inf")
    result = None
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = explore(definition(steps), max_attempts=max_attempts)
        wall = min(wall, time.perf_counter() - started)
        cpu = min(cpu, time.process_time() - started_cpu)
    assert result is not None
    return result, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--steps", type=int, nargs="*", default=[3, 8, 12])
    args = parser.parse_args()
    print(f"sagas explore, --max-attempts {args.max_attempts} (best of {args.repeat})")
    print(f"{'steps':>5} {'states':>8} {'transitions':>12} {'endings':>8} {'paths':>10} {'wall s':>7} {'CPU s':>6} ok")
    for steps in args.steps:
        result, wall, cpu = timed(steps, args.max_attempts, args.repeat)
        paths = sum(e.paths for e in result.endings)
        print(
            f"{steps:>5} {result.states:>8} {result.transitions:>12} {len(result.endings):>8} {paths:>10.2e} "
            f"{wall:>7.2f} {cpu:>6.2f} {'yes' if result.ok else 'NO'}"
        )


if __name__ == "__main__":
    main()
