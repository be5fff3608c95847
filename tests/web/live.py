"""The served stack of support.py behind a real HTTP server (uvicorn on 127.0.0.1, a free port), in a thread of
its own with its own event loop, so that blocking clients (Selenium, schemathesis) can talk to it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from tests.web.served import Stack, stack

T = TypeVar("T")


class Live:
    def __init__(self, loop: asyncio.AbstractEventLoop, served: Stack, url: str) -> None:
        self.loop = loop
        self.served = served
        self.url = url

    def run(self, make: Callable[[Stack], Coroutine[Any, Any, T]], timeout: float = 60.0) -> T:
        """Run `make(stack)` in the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(make(self.served), self.loop).result(timeout)


@contextlib.contextmanager
def live_stack(db_url: str, tmp_path: Path, **options: Any) -> Iterator[Live]:
    ready: concurrent.futures.Future[Live] = concurrent.futures.Future()
    stop = threading.Event()

    async def main() -> None:
        try:
            async with stack(db_url, tmp_path, **options) as served:
                sock = socket.socket()
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
                config = uvicorn.Config(served.app, log_level="warning", lifespan="off", access_log=False)
                server = uvicorn.Server(config)
                task = asyncio.create_task(server.serve(sockets=[sock]))
                while not server.started:
                    if task.done():
                        task.result()
                    await asyncio.sleep(0.01)
                ready.set_result(Live(asyncio.get_running_loop(), served, f"http://127.0.0.1:{port}"))
                await asyncio.to_thread(stop.wait)
                server.should_exit = True
                await task
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    thread = threading.Thread(target=lambda: asyncio.run(main()), name="live-server", daemon=True)
    thread.start()
    try:
        yield ready.result(timeout=60)
    finally:
        stop.set()
        thread.join(timeout=30)
