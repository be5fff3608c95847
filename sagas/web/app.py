"""The HTTP app of an engine or participant process: `/metrics`, `/healthz`, `/readyz`, and whatever else is mounted.

    app = create_app(target=engine, metrics=metrics, routes=[Mount("/api", api_app)])

- ``/healthz``: 200 while the process and every supervised loop are alive; 503 once a loop has failed repeatedly
  within its supervisor's window, or has stopped (`target.healthy`). The body lists every loop's restarts.
- ``/readyz``: 200 when the store and the broker answer (and the schema is at the newest migration); 503 with the
  reason of each that does not (`await target.ready()`).
- ``/metrics``: the Prometheus text format from `metrics` (for example `sagas.adapters.prometheus.EngineMetrics`,
  whose gauges read the store at scrape time, at a bounded cost); 404 when the app has no metrics.

Other routers join through `routes` (Starlette `Route`s or `Mount`s, placed after the built-in ones, so that a mount
at ``/`` can serve a console without hiding them) and `middleware`. What they need is in ``app.state``: ``target``,
``metrics`` and whatever is passed as `state` (``admin``, ``settings``...). Every route here only reads: nothing to
authenticate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sagas.engine.supervise import LoopHealth


class Target(Protocol):
    """What the health routes read: an `Engine`, or a participant's worker."""

    @property
    def healthy(self) -> bool: ...

    def health(self) -> Mapping[str, LoopHealth]: ...

    async def ready(self, timeout: float = 2.0) -> dict[str, str | None]: ...


class MetricsSource(Protocol):
    """What `/metrics` serves."""

    async def exposition(self) -> tuple[bytes, str]:
        """The metrics in a text format, and its content type."""
        ...


def create_app(
    *,
    target: Target | None = None,
    metrics: MetricsSource | None = None,
    routes: Sequence[BaseRoute] = (),
    middleware: Sequence[Middleware] = (),
    state: Mapping[str, Any] | None = None,
    ready_timeout: float = 2.0,
) -> Starlette:
    """The ASGI app: `/metrics`, `/healthz`, `/readyz`, then `routes`."""

    async def healthz(request: Request) -> Response:
        if target is None:
            return JSONResponse({"status": "ok", "loops": {}})
        loops = {
            name: {"running": h.running, "restarts": h.restarts, "recent_failures": len(h.recent),
                   "last_error": h.last_error}
            for name, h in sorted(target.health().items())
        }
        healthy = target.healthy
        return JSONResponse({"status": "ok" if healthy else "failing", "loops": loops},
                            status_code=200 if healthy else 503)

    async def readyz(request: Request) -> Response:
        checks = {} if target is None else await target.ready(ready_timeout)
        ready = all(reason is None for reason in checks.values())
        body = {"status": "ready" if ready else "not ready",
                "checks": {name: reason or "ok" for name, reason in checks.items()}}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics_route(request: Request) -> Response:
        if metrics is None:
            return Response("no metrics in this process\n", status_code=404, media_type="text/plain")
        body, content_type = await metrics.exposition()
        return Response(body, headers={"Content-Type": content_type})

    app = Starlette(
        routes=[
            Route("/metrics", metrics_route, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            *routes,
        ],
        middleware=list(middleware),
    )
    app.state.target = target
    app.state.metrics = metrics
    for name, value in (state or {}).items():
        setattr(app.state, name, value)
    return app
