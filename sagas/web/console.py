"""The web console: server-rendered pages (Jinja2, autoescaped) over the same `Operations` as the API.

No JavaScript and nothing fetched from elsewhere: the stylesheet is package data under /static. Repairs take two
steps, as a person confirms them: the form on a saga's page (with its reason) shows what will be done and asks to
confirm; only the confirmation acts. Every form carries a CSRF field tied to the signed-in session; signing in takes
an API token once and keeps only its name, signed, in an HttpOnly SameSite=Strict cookie.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from sagas.engine.ports import SagaQuery
from sagas.engine.state import OperatorCommand, SagaStatus
from sagas.errors import InvalidInput, SagaError
from sagas.formatting import duration, short_ids
from sagas.web.api import _status_of, step_views
from sagas.web.operations import Operations
from sagas.web.security import LOGIN_COOKIE, SESSION_COOKIE, Security, safe_next
from sagas.web.svg import LEGEND, render_svg

HISTORY_PAGE = 200
LIST_PAGE = 50


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _ago(at: float | None) -> str:
    return "-" if at is None else duration(time.time() - at) + " ago"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=1, sort_keys=True)


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("sagas.web", "templates"), autoescape=select_autoescape(["html"]),
                      auto_reload=False)
    env.filters.update(when=_when, ago=_ago, duration=duration, json=_json)
    return env


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


def create_console(ops: Operations, security: Security) -> Starlette:
    templates = Jinja2Templates(env=_environment())

    def session_of(request: Request) -> tuple[str | None, str | None]:
        cookie = request.cookies.get(SESSION_COOKIE)
        operator = security.session_operator(cookie)
        return operator, (cookie if operator else None)

    def may_read(request: Request) -> bool:
        operator, _ = session_of(request)
        client = request.client.host if request.client else None
        return operator is not None or security.reads_open_to(client, request.scope.get("headers", []))

    def page(request: Request, template: str, status: int = 200, **context: Any) -> Response:
        operator, session = session_of(request)
        context.update(request=request, operator=operator, csrf=security.csrf(session) if session else "",
                       legend=LEGEND)
        return templates.TemplateResponse(request, template, context, status_code=status)

    def reading(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            if not may_read(request):
                target = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
                return RedirectResponse(f"{request.scope.get('root_path', '')}/login?next={target}", 303)
            try:
                return await handler(request)
            except SagaError as exc:
                return page(request, "error.html", _status_of(exc), message=str(exc))
            except _Refused as exc:
                return page(request, "error.html", exc.status, message=exc.message)
        return run

    async def acting(request: Request) -> tuple[str, dict[str, str]]:
        """The signed-in operator and the form, or a refusal: no session, or a missing or wrong CSRF field."""
        form = {k: str(v) for k, v in (await request.form()).items()}
        operator, session = session_of(request)
        if operator is None:
            raise _Refused(401, "sign in with an API token to act on sagas: this action was refused")
        if not security.csrf_ok(session, form.get("csrf")):
            raise _Refused(403, "the form's CSRF field is missing or wrong: reload the page and try again")
        return operator, form

    # ---- sign in ---------------------------------------------------------------------------------------

    def login_form(request: Request, status: int, next_url: str, failed: bool) -> Response:
        """The sign-in page, with a CSRF field derived from a fresh random pre-session cookie."""
        nonce = secrets.token_urlsafe(24)
        response = page(request, "login.html", status, next=safe_next(next_url), failed=failed,
                        login_csrf=security.login_csrf(nonce))
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/login")
        return response

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return login_form(request, 200, request.query_params.get("next", "/"), failed=False)
        form = await request.form()
        next_url = safe_next(str(form.get("next") or "/"))  # never redirect off this site
        if not security.login_csrf_ok(request.cookies.get(LOGIN_COOKIE), str(form.get("csrf", ""))):
            return page(request, "error.html", 403,
                        message="the sign-in form's CSRF field is missing or wrong: open the sign-in page again")
        operator = security.operator(str(form.get("token", "")))
        if operator is None:
            return login_form(request, 401, next_url, failed=True)
        response = RedirectResponse(next_url, 303)
        response.set_cookie(SESSION_COOKIE, security.session(operator), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/",
                            max_age=int(security.session_max_age))
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(request: Request) -> Response:
        try:
            await acting(request)
        except _Refused as exc:
            return page(request, "error.html", exc.status, message=exc.message)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # ---- pages -----------------------------------------------------------------------------------------

    @reading
    async def overview(request: Request) -> Response:
        data = await ops.overview()
        per_definition: dict[str, dict[str, int]] = {}
        for row in data["counts"]:
            per_definition.setdefault(row["definition"], {})[str(row["status"])] = row["count"]
        # Definitions with parked sagas first, then stuck ones, then by name.
        order = sorted(per_definition, key=lambda d: (-per_definition[d].get("failed", 0), d))
        shown = data["parked"] + data["stuck"]
        return page(request, "overview.html", data=data, per_definition=per_definition, order=order,
                    statuses=[str(s) for s in SagaStatus], shorts=short_ids([i.id for i in shown]))

    def _filters(params: Any) -> dict[str, str]:
        keys = ("status", "definition", "key", "reason", "created_from", "created_to")
        return {k: str(params[k]) for k in keys if params.get(k)}

    def _query(filters: dict[str, str], limit: int) -> SagaQuery:
        def stamp(name: str) -> float | None:
            text = filters.get(name)
            if not text:
                return None
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                raise InvalidInput(f"{name} {text!r}: use a date-time like 2026-12-01T10:00") from None
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()

        status = filters.get("status")
        if status is not None and status not in {str(s) for s in SagaStatus}:
            raise InvalidInput(f"status {status!r} is not one of {', '.join(map(str, SagaStatus))}")
        return SagaQuery(status=SagaStatus(status) if status else None, definition=filters.get("definition"),
                         key=filters.get("key"), reason=filters.get("reason"), created_from=stamp("created_from"),
                         created_to=stamp("created_to"), limit=limit)

    @reading
    async def saga_list(request: Request) -> Response:
        filters = _filters(request.query_params)
        cursor = request.query_params.get("cursor")
        found = await ops.page(_query(filters, LIST_PAGE), cursor=cursor, total=False)
        next_link = "?" + urlencode({**filters, "cursor": found.next_cursor}) if found.next_cursor else None
        return page(request, "list.html", sagas=found.items, filters=filters, next_link=next_link,
                    first_link="?" + urlencode(filters), paged=bool(cursor),
                    statuses=[str(s) for s in SagaStatus], shorts=short_ids([i.id for i in found.items]))

    @reading
    async def saga_page(request: Request) -> Response:
        instance = await ops.admin.get(request.path_params["saga_id"])
        if instance.id != request.path_params["saga_id"]:
            return RedirectResponse(f"/sagas/{quote(instance.id)}", 303)  # a short id: to the saga's own address
        try:
            after = max(0, int(request.query_params.get("after", "0")))
        except ValueError:
            after = 0
        history, next_after = await ops.history(instance.id, after=after, limit=HISTORY_PAGE)
        definition = await ops.definition_of(instance)
        svg = Markup(render_svg(definition, instance)) if definition else None  # render_svg escapes every text itself
        trail = [r for r in await ops.admin.history(instance.id, limit=5000)
                 if r.entry.type.startswith(("compensation.", "saga.compensat"))] if after == 0 else []
        return page(request, "saga.html", saga=instance, steps=step_views(definition, instance), graph=svg,
                    history=history, next_after=next_after, after=after, trail=trail,
                    timers=await ops.admin.store.timers_of(instance.id))

    async def repair(request: Request) -> Response:
        saga_id, action = request.path_params["saga_id"], request.path_params["action"]
        try:
            operator, form = await acting(request)
            if action not in ("retry", "abort", "skip"):
                raise _Refused(404, f"no action {action!r}")
            reason = form.get("reason", "").strip()
            if not reason:
                raise _Refused(422, "give a reason: it is recorded in the saga's history")
            step = form.get("step") or None
            output = None
            if form.get("output", "").strip():
                try:
                    output = json.loads(form["output"])
                except ValueError:
                    raise _Refused(422, "output must be a JSON object") from None
                if not isinstance(output, dict):
                    raise _Refused(422, "output must be a JSON object")
            if form.get("confirm") != "yes":
                instance = await ops.admin.get(saga_id)
                return page(request, "confirm.html", saga=instance, action=action, reason=reason, step=step,
                            output=form.get("output", ""))
            command = OperatorCommand(action=action, step=step, reason=reason, operator=operator, output=output)
            instance = await ops.operate(saga_id, command)
        except _Refused as exc:
            return page(request, "error.html", exc.status, message=exc.message)
        except SagaError as exc:
            return page(request, "error.html", _status_of(exc), message=str(exc))
        return RedirectResponse(f"/sagas/{quote(instance.id)}", 303)

    @reading
    async def dead_letters(request: Request) -> Response:
        include = request.query_params.get("all") == "1"
        found = await ops.dead_letters(limit=200, include_replayed=include)
        return page(request, "dead_letters.html", letters=found, include=include)

    async def replay(request: Request) -> Response:
        try:
            _, form = await acting(request)
            letter = form.get("id", "")
            if form.get("confirm") != "yes":
                return page(request, "confirm.html", letter=await ops.admin.dead_letter(letter), action="replay",
                            saga=None, reason="", step=None, output="")
            outcome = await ops.admin.replay(letter)
        except _Refused as exc:
            return page(request, "error.html", exc.status, message=exc.message)
        except SagaError as exc:
            return page(request, "error.html", _status_of(exc), message=str(exc))
        return page(request, "done.html", message=f"replayed {letter}: {outcome}")

    @reading
    async def bulk(request: Request) -> Response:
        filters = {k: v for k, v in _filters(request.query_params).items() if k != "status"}
        query = _query({**filters, "status": "failed"}, 1)
        count = await ops.admin.count(query)
        return page(request, "bulk.html", filters=filters, count=count)

    async def bulk_retry(request: Request) -> Response:
        try:
            operator, form = await acting(request)
            filters = {k: v for k, v in _filters(form).items() if k != "status"}
            reason = form.get("reason", "").strip()
            if not reason:
                raise _Refused(422, "give a reason: it is recorded in every saga's history")
            try:
                expected = int(form.get("count", ""))
            except ValueError:
                raise _Refused(422, "the confirmed count is missing") from None
            query = _query({**filters, "status": "failed"}, 1)
            retried = await ops.admin.bulk_retry(query, expected=expected, reason=reason, operator=operator)
        except _Refused as exc:
            return page(request, "error.html", exc.status, message=exc.message)
        except SagaError as exc:
            return page(request, "error.html", _status_of(exc), message=str(exc))
        return page(request, "done.html", message=f"retried {retried} of {expected} parked saga(s)")

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        return page(request, "error.html", status, message="no such page")

    routes = [
        Route("/", overview),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/sagas", saga_list),
        Route("/sagas/{saga_id}", saga_page),
        Route("/sagas/{saga_id}/{action}", repair, methods=["POST"]),
        Route("/dead-letters", dead_letters),
        Route("/dead-letters/replay", replay, methods=["POST"]),
        Route("/bulk-retry", bulk),
        Route("/bulk-retry", bulk_retry, methods=["POST"]),
        Mount("/static", app=StaticFiles(packages=[("sagas.web", "static")]), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
