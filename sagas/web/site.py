"""The operators' part of the HTTP app: the API at /api and the console at /, behind the body limit and the
security headers.

    routes = operator_routes(Operations(admin, engine), security)
    app = create_app(target=engine, routes=routes, middleware=[Middleware(BodyLimit, limit=security.max_body)])

`operator_app` assembles them alone (tests, and a server over a database without an engine).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount

from sagas.web.api import create_api
from sagas.web.console import create_console
from sagas.web.operations import Operations
from sagas.web.security import BodyLimit, PathGuard, Security, SecurityHeaders


def operator_routes(ops: Operations, security: Security) -> list[BaseRoute]:
    return [Mount("/api", app=create_api(ops, security)), Mount("/", app=create_console(ops, security))]


def operator_middleware(security: Security) -> list[Middleware]:
    return [Middleware(SecurityHeaders), Middleware(PathGuard), Middleware(BodyLimit, limit=security.max_body)]


def operator_app(ops: Operations, security: Security) -> Starlette:
    return Starlette(routes=operator_routes(ops, security), middleware=operator_middleware(security))
