"""The HTTP API (FastAPI, mounted at /api): start, inspect and repair sagas, dead letters, definitions.

    api = create_api(Operations(admin, engine), Security.from_env())

Every error is an RFC 9457 problem document (application/problem+json). Mutating calls need a bearer token whose
name becomes the operator in the saga's history; reads need one too unless `Security.open_reads` lets loopback
callers read freely. See docs/operations.md ("HTTP API and console").
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time, and those naming the
# dependencies built inside `create_api` (Operator, Reader) only resolve where they are evaluated, in its scope.

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, cast

import structlog
from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from sagas.definitions.graph import to_dot, to_mermaid
from sagas.definitions.model import SagaDefinition
from sagas.engine.ports import DeadLetter, HistoryRecord, SagaQuery
from sagas.engine.state import OperatorCommand, SagaInstance, SagaStatus
from sagas.errors import (
    AmbiguousSagaId,
    ConcurrencyConflict,
    DefinitionError,
    IdempotencyConflict,
    InvalidInput,
    OperatorError,
    SagaError,
    StoreError,
    UnknownDeadLetter,
    UnknownDefinition,
    UnknownSaga,
)
from sagas.formatting import LIST_PREVIEW_BYTES, SHOW_PREVIEW_BYTES, dead_letter_json
from sagas.web import models as m
from sagas.web.operations import HISTORY_PAGE, Operations
from sagas.web.security import Security
from sagas.web.svg import render_svg

log = structlog.get_logger("sagas.web")
PROBLEM = "application/problem+json"
BULK_MAX = 1000
"""Starts one bulk request may hold."""

_problem_schema = {"$ref": "#/components/schemas/Problem"}
_STATUS_TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found", 409: "Conflict",
                  413: "Request body too large", 422: "Unprocessable content", 503: "Service unavailable"}
PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"description": title, "content": {PROBLEM: {"schema": _problem_schema}}}
    for code, title in _STATUS_TITLES.items()
}


def problem(status: int, detail: str | None, *, title: str | None = None, instance: str | None = None,
            errors: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = m.Problem(title=title or _STATUS_TITLES.get(status, "Error"), status=status, detail=detail,
                     instance=instance, errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, media_type=PROBLEM, headers=headers)


def _status_of(error: SagaError) -> int:
    if isinstance(error, AmbiguousSagaId):
        return 400
    if isinstance(error, UnknownSaga | UnknownDefinition | UnknownDeadLetter):
        return 404
    if isinstance(error, IdempotencyConflict | OperatorError | ConcurrencyConflict):
        return 409
    if isinstance(error, InvalidInput | DefinitionError):
        return 422
    if isinstance(error, StoreError):
        return 503 if error.retriable else 500
    return 400


# ---- conversions ----------------------------------------------------------------------------------------


def summary(instance: SagaInstance) -> m.SagaSummary:
    return m.SagaSummary(
        id=instance.id, definition=instance.definition, definition_version=instance.definition_version,
        status=instance.status, stage=instance.stage, failure=instance.failure,
        idempotency_key=instance.idempotency_key, created_at=instance.created_at, updated_at=instance.updated_at,
    )


def history_item(record: HistoryRecord) -> m.HistoryItem:
    entry = record.entry
    return m.HistoryItem(seq=record.seq, at=entry.at, type=entry.type, step=entry.step, attempt=entry.attempt,
                         detail=entry.detail)


def dead_letter_view(dead: DeadLetter, preview: int = SHOW_PREVIEW_BYTES) -> m.DeadLetterView:
    """The letter in bounded form (a preview of its body, its size and SHA-256); `/body` gives the stored bytes."""
    return m.DeadLetterView(**dead_letter_json(dead, preview))


def step_views(definition: SagaDefinition | None, instance: SagaInstance) -> list[m.StepView]:
    """The steps in definition order (stage by stage), each with the saga's state of it."""
    if definition is None:
        return [m.StepView(name=n, stage=-1, kind="unknown", participant="", command="", compensation=None, state=s)
                for n, s in instance.steps.items()]
    views = []
    for index, stage in enumerate(definition.stages):
        for step in stage:
            state = instance.steps.get(step.name)
            if state is None:
                continue
            views.append(m.StepView(
                name=step.name, stage=index, kind=str(step.kind), participant=step.participant, command=step.command,
                compensation=step.compensation.command if step.compensation else None, state=state,
            ))
    return views


def definition_summary(definition: SagaDefinition) -> m.DefinitionSummary:
    return m.DefinitionSummary(name=definition.name, version=definition.version, digest=definition.digest,
                               description=definition.description,
                               steps=[step.name for stage in definition.stages for step in stage])


# ---- the app --------------------------------------------------------------------------------------------


def create_api(ops: Operations, security: Security) -> FastAPI:
    """The API as an ASGI app, to mount at /api (its OpenAPI document is /api/openapi.json)."""
    api = FastAPI(
        title="sagas", version="1", summary="Start, inspect and repair sagas.",
        description="Errors are RFC 9457 problem documents. Mutating calls need a bearer token (its name is "
                    "recorded as the operator).",
        docs_url=None, redoc_url=None, openapi_url="/openapi.json", servers=[{"url": "/api"}],
        responses={**{c: PROBLEMS[c] for c in (400, 401, 403, 413, 422, 503)}},
    )
    bearer = HTTPBearer(auto_error=False, description="A token of SAGAS_HTTP_TOKENS / SAGAS_HTTP_TOKENS_FILE.")
    Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

    def operator(request: Request, credentials: Credentials) -> str:
        """The token's name; 401 without a valid bearer token."""
        name = security.operator(credentials.credentials if credentials else None)
        if name is None:
            raise HTTPException(401, "a valid bearer token is needed (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": 'Bearer realm="sagas"'})
        return name

    def reader(request: Request, credentials: Credentials) -> str | None:
        client = request.client.host if request.client else None
        if security.reads_open_to(client, request.scope.get("headers", [])):
            return None
        return operator(request, credentials)

    Operator = Annotated[str, Depends(operator)]
    Reader = Annotated[str | None, Depends(reader)]

    @api.exception_handler(SagaError)
    async def saga_error(request: Request, exc: SagaError) -> Response:
        status = _status_of(exc)
        if status >= 500:
            log.error("api call failed", path=request.url.path, error=str(exc))
        return problem(status, str(exc), instance=request.url.path)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
        return problem(422, detail, instance=request.url.path, errors=errors)

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return problem(exc.status_code, str(exc.detail), instance=request.url.path,
                       headers=dict(exc.headers or {}))

    @api.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        log.exception("api call crashed", path=request.url.path)
        return problem(500, "internal error; the server log has the details", title="Internal server error")

    # ---- sagas ----------------------------------------------------------------------------------------

    async def _start(body: m.StartRequest) -> tuple[m.StartResult, bool]:
        instance, created = await ops.start(body.definition, body.input, body.key)
        return m.StartResult(id=instance.id, created=created, status=instance.status), created

    @api.post("/sagas", response_model=m.StartResult, status_code=201, tags=["sagas"],
              responses={200: {"model": m.StartResult, "description": "The key had started this saga already"},
                         404: PROBLEMS[404], 409: PROBLEMS[409]})
    async def start_saga(body: m.StartRequest, who: Operator) -> Response:
        """Start a saga; idempotent by `key` (the same key and input answer the existing saga with 200)."""
        result, created = await _start(body)
        return JSONResponse(result.model_dump(mode="json"), status_code=201 if created else 200)

    @api.post("/sagas/bulk", response_model=m.BulkStartResult, tags=["sagas"], openapi_extra={
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"type": "array", "maxItems": BULK_MAX,
                                            "items": {"$ref": "#/components/schemas/StartRequest"}}},
            "application/x-ndjson": {"schema": {"type": "string"}},
        }}})
    async def start_many(request: Request, who: Operator) -> m.BulkStartResult:
        """Start many sagas: a JSON array of starts, or NDJSON (one start a line). Each is answered on its own."""
        raw = await request.body()
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        try:
            if kind in ("application/x-ndjson", "application/jsonl"):
                entries: Any = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
            else:
                entries = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPException(422, f"the body is not JSON or NDJSON: {exc}") from None
        if not isinstance(entries, list):
            raise HTTPException(422, "the body must be a JSON array of starts (or NDJSON)")
        if len(entries) > BULK_MAX:
            raise HTTPException(422, f"{len(entries)} starts is more than one request takes ({BULK_MAX})")
        items: list[m.BulkStartItem] = []
        counts = {"started": 0, "existing": 0, "failed": 0}
        for index, entry in enumerate(entries):
            try:
                result, created = await _start(m.StartRequest.model_validate(entry))
            except ValidationError as exc:
                error = exc.errors()[0]
                detail = f"{'.'.join(map(str, error['loc'])) or 'start'}: {error['msg']}"
                items.append(m.BulkStartItem(index=index, problem=m.Problem(title="Invalid start", status=422,
                                                                            detail=detail)))
                counts["failed"] += 1
            except SagaError as exc:
                status = _status_of(exc)
                items.append(m.BulkStartItem(index=index, problem=m.Problem(
                    title=_STATUS_TITLES.get(status, "Error"), status=status, detail=str(exc))))
                counts["failed"] += 1
            else:
                items.append(m.BulkStartItem(index=index, result=result))
                counts["started" if created else "existing"] += 1
        return m.BulkStartResult(items=items, **counts)

    @api.get("/sagas", response_model=m.SagaPage, tags=["sagas"])
    async def list_sagas(
        who: Reader,
        status: SagaStatus | None = None,
        definition: Annotated[str | None, Query(max_length=100)] = None,
        created_from: float | None = None,
        created_to: float | None = None,
        key: Annotated[str | None, Query(max_length=200)] = None,
        reason: Annotated[str | None, Query(max_length=200, description="Text the failure reason contains.")] = None,
        id_prefix: Annotated[str | None, Query(max_length=200)] = None,
        cursor: Annotated[str | None, Query(max_length=600)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        total: bool = False,
    ) -> m.SagaPage:
        """Sagas newest first, filtered; page on with `cursor` (keyset paging: as fast on page 10,000 as on 1)."""
        query = SagaQuery(status=status, definition=definition, created_from=created_from, created_to=created_to,
                          key=key, reason=reason, id_prefix=id_prefix, limit=limit)
        page = await ops.page(query, cursor=cursor, total=total)
        return m.SagaPage(items=[summary(i) for i in page.items], next_cursor=page.next_cursor, total=page.total)

    @api.get("/sagas/{saga_id}", response_model=m.SagaDetail, tags=["sagas"], responses={404: PROBLEMS[404]})
    async def get_saga(
        saga_id: str, who: Reader,
        history_limit: Annotated[int | None, Query(ge=1, le=5000)] = None,
    ) -> m.SagaDetail:
        """A saga (by id, or the unique end or start of one): steps in definition order, timers, first history
        page (`history_limit`, 200 by default)."""
        instance = await ops.admin.get(saga_id)
        history, next_after = await ops.history(instance.id, after=0, limit=history_limit or HISTORY_PAGE)
        return m.SagaDetail(
            instance=instance, steps=step_views(await ops.definition_of(instance), instance),
            timers=await ops.admin.store.timers_of(instance.id),
            history=m.HistoryPage(items=[history_item(r) for r in history], next_after=next_after),
        )

    @api.get("/sagas/{saga_id}/history", response_model=m.HistoryPage, tags=["sagas"],
             responses={404: PROBLEMS[404]})
    async def saga_history(
        saga_id: str, who: Reader,
        after: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=5000)] = HISTORY_PAGE,
    ) -> m.HistoryPage:
        """The saga's timeline, `limit` entries after sequence number `after`."""
        instance = await ops.admin.get(saga_id)
        history, next_after = await ops.history(instance.id, after=after, limit=limit)
        return m.HistoryPage(items=[history_item(r) for r in history], next_after=next_after)

    def _repair(action: Literal["retry", "abort", "skip"]
                ) -> Callable[[str, m.RepairRequest, str], Awaitable[SagaInstance]]:
        async def run(saga_id: str, body: m.RepairRequest, who: str) -> SagaInstance:
            step = body.step if isinstance(body, m.SkipRequest) else None
            output = body.output if isinstance(body, m.SkipRequest) else None
            command = OperatorCommand(action=action, step=step, reason=body.reason, operator=who, output=output)
            return await ops.operate(saga_id, command)
        return run

    repairs: dict[int | str, dict[str, Any]] = {404: PROBLEMS[404], 409: PROBLEMS[409]}
    retry, abort, skip = _repair("retry"), _repair("abort"), _repair("skip")

    @api.post("/sagas/{saga_id}/retry", response_model=SagaInstance, tags=["repair"], responses=repairs)
    async def retry_saga(saga_id: str, body: m.RepairRequest, who: Operator) -> SagaInstance:
        """Resume a parked saga: send its stuck step or compensation again."""
        return await retry(saga_id, body, who)

    @api.post("/sagas/{saga_id}/abort", response_model=SagaInstance, tags=["repair"], responses=repairs)
    async def abort_saga(saga_id: str, body: m.RepairRequest, who: Operator) -> SagaInstance:
        """Stop a running saga and compensate what it did (not after its pivot)."""
        return await abort(saga_id, body, who)

    @api.post("/sagas/{saga_id}/skip", response_model=SagaInstance, tags=["repair"], responses=repairs)
    async def skip_step(saga_id: str, body: m.SkipRequest, who: Operator) -> SagaInstance:
        """Mark a stuck step (or its compensation) done by hand, with `output` as its reply data."""
        return await skip(saga_id, body, who)

    @api.post("/bulk/retry", response_model=m.BulkRetryResult, tags=["repair"], responses={409: PROBLEMS[409]})
    async def bulk_retry(body: Annotated[m.BulkRetryRequest, Body()], who: Operator) -> m.BulkRetryResult:
        """Retry every parked saga the filter selects: first without `confirm_count` to learn how many, then with
        that count to do it (refused with 409 if the count changed meanwhile)."""
        f = body.filter
        query = SagaQuery(status=SagaStatus.FAILED, definition=f.definition, created_from=f.created_from,
                          created_to=f.created_to, key=f.key, reason=f.reason)
        if body.confirm_count is None:
            return m.BulkRetryResult(count=await ops.admin.count(query), retried=0, confirmed=False)
        retried = await ops.admin.bulk_retry(query, expected=body.confirm_count, reason=body.reason, operator=who)
        return m.BulkRetryResult(count=body.confirm_count, retried=retried, confirmed=True)

    # ---- dead letters ---------------------------------------------------------------------------------

    @api.get("/dead-letters", response_model=m.DeadLetterPage, tags=["dead letters"])
    async def dead_letters(who: Reader, include_replayed: bool = False,
                           limit: Annotated[int, Query(ge=1, le=500)] = 100) -> m.DeadLetterPage:
        """Dead letters, newest first."""
        found = await ops.dead_letters(limit=limit, include_replayed=include_replayed)
        return m.DeadLetterPage(items=[dead_letter_view(d, LIST_PREVIEW_BYTES) for d in found])

    @api.post("/dead-letters/{dead_letter_id:path}/replay", response_model=m.ReplayResult, tags=["dead letters"],
              responses={404: PROBLEMS[404], 409: PROBLEMS[409]})
    async def replay(dead_letter_id: str, who: Operator) -> m.ReplayResult:
        """Process a dead-lettered reply again (after its cause was fixed)."""
        outcome = await ops.admin.replay(dead_letter_id)
        return m.ReplayResult(id=dead_letter_id, outcome="applied" if outcome == "applied" else "ignored")

    @api.get("/dead-letters/{dead_letter_id:path}/body", tags=["dead letters"], response_class=Response,
             responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                  "format": "binary"}}},
                              "description": "The stored body, byte for byte (X-Sagas-Truncated: whether only "
                                             "a prefix of what arrived was kept)."},
                        404: PROBLEMS[404]})
    async def dead_letter_body(dead_letter_id: str, who: Reader) -> Response:
        """The dead letter's stored body, byte for byte (its JSON view holds a preview only)."""
        dead = await ops.admin.dead_letter(dead_letter_id)
        headers = {"X-Sagas-Size": str(dead.size), "X-Sagas-Truncated": "true" if dead.truncated else "false",
                   "Content-Disposition": "attachment"}
        if dead.sha256:
            headers["X-Sagas-Sha256"] = dead.sha256
        return Response(dead.message.value, media_type="application/octet-stream", headers=headers)

    @api.get("/dead-letters/{dead_letter_id:path}", response_model=m.DeadLetterView, tags=["dead letters"],
             responses={404: PROBLEMS[404]})
    async def dead_letter(dead_letter_id: str, who: Reader) -> m.DeadLetterView:
        """One dead letter: a preview of its body (4 KiB), its size and SHA-256; `/body` gives the stored bytes."""
        return dead_letter_view(await ops.admin.dead_letter(dead_letter_id))

    # ---- definitions and overview ---------------------------------------------------------------------

    @api.get("/definitions", response_model=list[m.DefinitionSummary], tags=["definitions"])
    async def definitions(who: Reader) -> list[m.DefinitionSummary]:
        """The newest stored version of each definition."""
        return [definition_summary(d) for d in await ops.definitions()]

    @api.get("/definitions/{name}", response_model=SagaDefinition, tags=["definitions"],
             responses={404: PROBLEMS[404]})
    async def definition(name: str, who: Reader,
                         version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None) -> SagaDefinition:
        """A definition (its newest version unless `version` is given)."""
        return await ops.definition(name, version)

    @api.get("/definitions/{name}/graph", tags=["definitions"], response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}},
                                          "image/svg+xml": {"schema": {"type": "string"}}}},
                        404: PROBLEMS[404]})
    async def graph(name: str, who: Reader, format: Literal["mermaid", "dot", "svg"] = "mermaid",
                    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None) -> Response:
        """The definition's graph as Mermaid, Graphviz DOT or SVG."""
        found = await ops.definition(name, version)
        if format == "svg":
            return Response(render_svg(found), media_type="image/svg+xml")
        return PlainTextResponse(to_mermaid(found) if format == "mermaid" else to_dot(found))

    @api.get("/overview", response_model=m.Overview, tags=["overview"])
    async def overview(who: Reader) -> m.Overview:
        """Counts by definition and status, parked and stuck sagas, dead letters, recent starts."""
        data = await ops.overview()
        return m.Overview(
            counts=[m.DefinitionCount(**c) for c in data["counts"]],
            parked=[summary(i) for i in data["parked"]], stuck=[summary(i) for i in data["stuck"]],
            dead_letters=data["dead_letters"], started_last_minute=data["started_last_minute"],
            started_last_hour=data["started_last_hour"],
        )

    return api


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document, as served at /api/openapi.json and kept in docs/openapi.json."""
    return create_api(cast(Operations, None), Security()).openapi()


if __name__ == "__main__":  # python -m sagas.web.api > docs/openapi.json
    print(json.dumps(openapi_document(), indent=2))
