"""An HTTP server inside the running event loop: uvicorn, started and stopped with the engine or participant.

    async with Engine(...) as engine, serving(create_app(target=engine), "127.0.0.1:9464") as server:
        print(server.url)

The socket is bound here, before uvicorn runs, so that a port in use fails `start()` with a clear `OSError`
(uvicorn alone would log it and exit the process). Port 0 takes a free port (`server.port` tells which). Signals are
left to the caller: the engine's own SIGTERM handling drives the shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Generator
from typing import Any

import uvicorn

DEFAULT_HOST = "127.0.0.1"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (loopback), ``[::1]:PORT``; a clear ValueError otherwise."""
    value = text.strip()
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    host = host.strip("[]") or DEFAULT_HOST
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--http {text!r}: expected HOST:PORT (for example 127.0.0.1:9464)") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"--http {text!r}: port must be 0-65535")
    return host, number


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The process's owner (`sagas serve`, a participant service) handles SIGTERM/SIGINT, not the HTTP server.
        yield


class HttpServer:
    """Serves an ASGI app on `address` (``HOST:PORT``, loopback by default) while started."""

    def __init__(self, app: Any, address: str = f"{DEFAULT_HOST}:0", *, start_timeout: float = 10.0) -> None:
        self.host, self._port = parse_address(address)
        self.app = app
        self.start_timeout = start_timeout
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {self.host}:{self._port}: {exc.strerror or exc}") from exc
        sock.set_inheritable(True)
        self._socket = sock
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._server = _Server(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        async with asyncio.timeout(self.start_timeout):
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                    raise OSError(f"HTTP server on {self.url} stopped while starting")
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        server, task, self._server, self._task = self._server, self._task, None, None
        if server is not None and task is not None:
            server.should_exit = True
            try:
                async with asyncio.timeout(5):
                    await task
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._socket is not None:
            self._socket.close()
            self._socket = None



@contextlib.asynccontextmanager
async def serving(app: Any, address: str = f"{DEFAULT_HOST}:0") -> AsyncIterator[HttpServer]:
    """An `HttpServer` started for the block and stopped after it."""
    server = HttpServer(app, address)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def participant_server(worker: Any, address: str) -> HttpServer:
    """Serve a participant worker's /metrics, /healthz and /readyz on `address`; started, for the caller to stop."""
    from sagas.adapters.prometheus import ParticipantMetrics
    from sagas.web.app import create_app

    metrics = ParticipantMetrics(worker)
    server = HttpServer(create_app(target=worker, metrics=metrics), address)
    await server.start()
    return server
