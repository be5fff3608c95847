"""The Supervisor restarts a failing loop with backoff, records it, and reports a loop that keeps failing."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import structlog

from sagas.engine.supervise import Supervisor


async def _until(condition: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110 - polls a condition of several loops
            await asyncio.sleep(0.005)


async def test_a_loop_that_fails_once_is_restarted_and_goes_on() -> None:
    """A loop raising an unexpected exception runs again; its restart and error are recorded; it stays healthy."""
    runs: list[int] = []
    failures: list[tuple[str, str]] = []

    async def loop() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("boom")
        await asyncio.Event().wait()

    supervisor = Supervisor("test", backoff_initial=0.001,
                            on_failure=lambda name, exc: failures.append((name, repr(exc))))
    with structlog.testing.capture_logs() as logs:
        supervisor.spawn("worker", loop)
        await _until(lambda: len(runs) == 2)
    health = supervisor.health()["worker"]
    assert health.restarts == 1
    assert health.last_error == "RuntimeError('boom')"
    assert health.running
    assert supervisor.healthy
    assert failures == [("worker", "RuntimeError('boom')")]
    lines = [entry for entry in logs if entry["event"].startswith("loop failed")]
    assert len(lines) == 1
    assert lines[0]["loop"] == "worker"
    assert lines[0]["error"] == "RuntimeError('boom')"
    await supervisor.cancel_all()
    assert not supervisor.running


async def test_a_loop_that_keeps_failing_makes_the_supervisor_unhealthy_and_logs_one_traceback() -> None:
    """Repeated failures of the same error log the traceback once, then short lines; health turns false."""
    async def loop() -> None:
        raise ValueError("always")

    supervisor = Supervisor("test", backoff_initial=0.001, backoff_max=0.002, unhealthy_after=3)
    with structlog.testing.capture_logs() as logs:
        supervisor.spawn("worker", loop)
        await _until(lambda: supervisor.health()["worker"].restarts >= 5)
    assert not supervisor.healthy
    with_traceback = [e for e in logs if "exc_info" in e]
    assert len(with_traceback) == 1
    assert all(e["event"] == "loop failed again; restarting" for e in logs if "exc_info" not in e)
    await supervisor.cancel_all()


async def test_an_observer_that_raises_does_not_stop_the_loop() -> None:
    """A failing on_failure callback is logged and the loop is restarted all the same."""
    runs: list[int] = []

    async def loop() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        await asyncio.Event().wait()

    def bad_observer(name: str, exc: BaseException) -> None:
        raise KeyError("observer bug")

    supervisor = Supervisor("test", backoff_initial=0.001, on_failure=bad_observer)
    supervisor.spawn("worker", loop)
    await _until(lambda: len(runs) == 3)
    assert supervisor.health()["worker"].restarts == 2
    await supervisor.cancel_all()


async def test_cancelling_stops_the_loop_without_counting_a_failure() -> None:
    """Cancellation is how loops stop: it is not a failure and the loop is not restarted."""
    started = asyncio.Event()

    async def loop() -> None:
        started.set()
        await asyncio.Event().wait()

    supervisor = Supervisor("test")
    task = supervisor.spawn("worker", loop)
    await started.wait()
    await supervisor.cancel("worker")
    assert task.cancelled()
    assert supervisor.health()["worker"].restarts == 0
    assert supervisor.healthy


@pytest.mark.parametrize("backoff_max", [0.01])
async def test_backoff_is_capped(backoff_max: float) -> None:
    """The delay between restarts doubles up to the cap and no further."""
    times: list[float] = []
    loop_ = asyncio.get_running_loop()

    async def loop() -> None:
        times.append(loop_.time())
        raise RuntimeError("again")

    supervisor = Supervisor("test", backoff_initial=0.001, backoff_max=backoff_max)
    supervisor.spawn("worker", loop)
    await _until(lambda: len(times) >= 16, timeout=20)
    await supervisor.cancel_all()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Uncapped, the 15th delay would be 0.001 * 2**14 = 16 s; capped it is 0.01 s (1 s leaves room for a loaded
    # machine's scheduling).
    assert max(gaps) < 1.0
    assert gaps[-1] >= backoff_max * 0.9  # and it did grow to the cap
