"""Supervised loops: a long-running loop that fails unexpectedly is logged once with its cause and restarted with
capped backoff, never left dead in a process that looks alive.

The engine and the participant helper run every loop (consumer, writer, publisher, relay, timers, retention,
workers) under one `Supervisor`. What it records (restarts, the last error, failures in a recent window) is what a
health check reads: a loop that keeps failing makes `healthy` false.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from sagas.engine.ports import Probe

log = structlog.get_logger("sagas.supervise")

LoopFactory = Callable[[], Awaitable[None]]


@dataclass
class LoopHealth:
    """What is known of one supervised loop."""

    name: str
    restarts: int = 0
    last_error: str | None = None
    last_failure: float | None = None
    """Wall-clock time of the last failure."""
    recent: deque[float] = field(default_factory=deque)
    """Monotonic times of the failures within the supervisor's window."""
    running: bool = False


class Supervisor:
    """Runs named loops as tasks and restarts the ones that fail.

    `unhealthy_after` failures of one loop within `window` seconds make the supervisor unhealthy until that loop
    has run `window` seconds without failing. A loop that returns is finished (not restarted); cancelling stops it.
    `on_failure` is told of every failure (the engine's observer counts restarts there); it must not raise.
    """

    def __init__(
        self,
        component: str,
        *,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        unhealthy_after: int = 3,
        window: float = 60.0,
        on_failure: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.component = component
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.unhealthy_after = unhealthy_after
        self.window = window
        self.on_failure = on_failure
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._health: dict[str, LoopHealth] = {}

    def spawn(self, name: str, factory: LoopFactory) -> asyncio.Task[None]:
        """Start `factory()` as the loop `name`; when it raises, log, back off and call `factory()` again."""
        health = self._health.setdefault(name, LoopHealth(name))
        task = asyncio.ensure_future(self._run(health, factory))
        task.set_name(f"{self.component}:{name}")
        self._tasks[name] = task
        return task

    async def _run(self, health: LoopHealth, factory: LoopFactory) -> None:
        delay = self.backoff_initial
        health.running = True
        try:
            while True:
                started = time.monotonic()
                try:
                    await factory()
                    return
                except Exception as exc:
                    self._failed(health, exc, repeated=health.last_error == repr(exc))
                if time.monotonic() - started > self.window:  # it had run fine for a while: start afresh
                    delay = self.backoff_initial
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
        finally:
            health.running = False

    def _failed(self, health: LoopHealth, exc: Exception, *, repeated: bool) -> None:
        now = time.monotonic()
        health.restarts += 1
        health.last_error = repr(exc)
        health.last_failure = time.time()
        health.recent.append(now)
        while health.recent and health.recent[0] < now - self.window:
            health.recent.popleft()
        if repeated:  # the traceback was logged the first time; a loop failing in a row must not flood the log
            log.error("loop failed again; restarting", component=self.component, loop=health.name,
                      error=health.last_error, restarts=health.restarts)
        else:
            log.error("loop failed; restarting", component=self.component, loop=health.name,
                      error=health.last_error, restarts=health.restarts, exc_info=exc)
        if self.on_failure is not None:
            try:
                self.on_failure(health.name, exc)
            except Exception:
                log.exception("loop failure observer failed", loop=health.name)

    def health(self) -> dict[str, LoopHealth]:
        """Every loop ever spawned, by name (the recent-failure windows trimmed to now)."""
        cutoff = time.monotonic() - self.window
        for health in self._health.values():
            while health.recent and health.recent[0] < cutoff:
                health.recent.popleft()
        return dict(self._health)

    @property
    def healthy(self) -> bool:
        """No loop failed `unhealthy_after` times within the window, and every spawned loop is still running."""
        return all(
            len(h.recent) < self.unhealthy_after and (h.running or h.name not in self._tasks)
            for h in self.health().values()
        )

    async def cancel(self, name: str) -> None:
        """Stop the loop `name` (if running) and wait for it."""
        task = self._tasks.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def cancel_all(self) -> None:
        for name in list(self._tasks):
            await self.cancel(name)

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks.values())


async def probe_all(components: dict[str, object], timeout: float) -> dict[str, str | None]:
    """Probe each component (those with a `probe`) at once, each within `timeout` seconds: None when it answered,
    else why not."""

    async def one(component: object) -> str | None:
        if not isinstance(component, Probe):
            return None
        try:
            async with asyncio.timeout(timeout):
                await component.probe()
        except TimeoutError:
            return f"no answer within {timeout:g}s"
        except Exception as exc:
            return str(exc) or type(exc).__name__
        return None

    results = await asyncio.gather(*(one(c) for c in components.values()))
    return dict(zip(components, results, strict=True))
