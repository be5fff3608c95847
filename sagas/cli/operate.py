"""Commands that run the engine and inspect or repair sagas: serve, start, list, show, retry, abort, skip, dlq, db.

Every command that reads or repairs sagas works on the database (`--db`), or through a running server's HTTP API
when given `--url` (or SAGAS_URL), with the bearer token of SAGAS_TOKEN. Imports are deferred to the commands that
need them: `sagas start --url` loads neither SQLAlchemy nor pydantic.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape as _e

from sagas.cli import render
from sagas.cli.app import app
from sagas.errors import SagaError
from sagas.formatting import LIST_PREVIEW_BYTES, SHOW_PREVIEW_BYTES, dead_letter_json
from sagas.remote import Remote, RemoteError

if TYPE_CHECKING:
    from sagas.engine.admin import SagaAdmin
    from sagas.engine.ports import DeadLetter, Store
    from sagas.engine.state import OperatorCommand, SagaInstance
    from sagas.participant import ParticipantDeadLetters
    from sagas.web.security import Security

T = TypeVar("T")
out = Console()
err = Console(stderr=True)

DbOption = Annotated[
    str,
    typer.Option("--db", envvar="SAGAS_DB", help="Database URL or SQLite file path.", show_default=True),
]
UrlOption = Annotated[
    str | None,
    typer.Option("--url", envvar="SAGAS_URL", help="A running `sagas serve --http` to call instead of the database."),
]
TokenOption = Annotated[
    str | None, typer.Option("--token", envvar="SAGAS_TOKEN", help="Bearer token for --url (better: SAGAS_TOKEN).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
STATUSES = ("running", "compensating", "completed", "compensated", "failed")  # SagaStatus, checked by a test

dlq = typer.Typer(help="Dead letters: messages that could not be processed, with the reason.", no_args_is_help=True)
db = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")
app.add_typer(db, name="db")


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {_e(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@asynccontextmanager
async def _store(db_url: str) -> AsyncIterator[Store]:
    from sagas.adapters import open_store

    store = open_store(db_url)  # `db upgrade` is the explicit form; every command migrates a new database
    try:
        await store.initialize()
        yield store
    finally:
        await store.close()


def _run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(make())
    except SagaError as exc:
        raise fail(str(exc)) from None
    except (ModuleNotFoundError, ValueError, OSError) as exc:
        # Expected failures (bad URL, missing driver, unreadable file) get one line; bugs keep their traceback.
        raise fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _admin_call(db_url: str, call: Callable[[SagaAdmin], Awaitable[T]]) -> T:
    from pydantic import ValidationError

    from sagas.engine.admin import SagaAdmin
    from sagas.settings import SagasSettings

    try:
        reply_topic = SagasSettings().reply_topic  # SAGAS_REPLY_TOPIC: commands we write name the engine's topic
    except ValidationError as exc:
        raise fail(f"settings from SAGAS_* environment variables: {exc.errors()[0]['msg']}") from None

    missing = _missing_sqlite_file(db_url)
    if missing is not None:  # a typo must not create an empty database and report "0 sagas"
        raise fail(f"no database at {missing} (`sagas serve` or `sagas db upgrade` creates one)")

    async def go() -> T:
        async with _store(db_url) as store:
            return await call(SagaAdmin(store, reply_topic=reply_topic))

    return _run(go)


def _remote_call(url: str, token: str | None, method: str, path: str, body: Any = None, *, raw: bool = False,
                 **query: Any) -> Any:
    try:
        return Remote(url, token).call(method, path, body, raw=raw, **query)
    except RemoteError as exc:
        raise fail(str(exc)) from None


def _participant_call(db_url: str, call: Callable[[ParticipantDeadLetters], Awaitable[T]]) -> T:
    """Run `call` on the dead letters of the participant database at `db_url` (migrated first, as its worker
    would)."""
    from sagas.participant import ParticipantDeadLetters, participant_database  # SQLAlchemy's async part: ~0.1 s

    missing = _missing_sqlite_file(db_url)
    if missing is not None:
        raise fail(f"no participant database at {missing}")

    async def go() -> T:
        dead_letters = ParticipantDeadLetters(participant_database(db_url))
        try:
            await dead_letters.initialize()
            return await call(dead_letters)
        finally:
            await dead_letters.db.dispose()

    return _run(go)


def _missing_sqlite_file(db_url: str) -> str | None:
    """The path of a SQLite database file that does not exist, or None (it exists, or it is not a file)."""
    from sqlalchemy.engine import make_url

    from sagas.adapters import normalize_db_url

    url = make_url(normalize_db_url(db_url))
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") or url.query:
        return None
    return None if Path(url.database).exists() else url.database


def _shown(db_url: str) -> str:
    """A database URL fit to print: without its password."""
    from sqlalchemy.engine import make_url

    from sagas.adapters import normalize_db_url

    return make_url(normalize_db_url(db_url)).render_as_string(hide_password=True)


def _json_object(text: str, option: str) -> dict[str, Any]:
    """An option's value that must be a JSON object, or one clear line naming the option."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise fail(f"{option} must be a JSON object")
    return data


def _parse_since(value: str | None) -> float | None:
    if value is None:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m|h|d)", value.strip())
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return time.time() - float(match.group(1)) * unit
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"--since {value!r}: use a duration like 10m, 2h, 1d or an ISO date-time") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _status_option(value: str | None) -> str | None:
    if value is not None and value not in STATUSES:
        raise fail(f"--status {value!r}: use one of {', '.join(STATUSES)}")
    return value


# ---- db / serve / start -----------------------------------------------------------------------------


ParticipantDbOption = Annotated[
    str | None,
    typer.Option("--participant-db", help="A participant's own database (URL or SQLite file path) instead of --db."),
]


@db.command("upgrade")
def db_upgrade(
    db_url: DbOption = "sagas.db",
    queue: Annotated[bool, typer.Option("--queue", help="Also the db:// queue's tables in that database.")] = False,
    participant_db: ParticipantDbOption = None,
) -> None:
    """Create or migrate the schema to the latest version (the engine's, or a participant's)."""

    from sagas.adapters import normalize_db_url
    from sagas.adapters.sql import upgrade
    from sagas.adapters.sql.migrate import PARTICIPANT, QUEUE

    if participant_db is not None:
        _run(lambda: upgrade(normalize_db_url(participant_db), migrations=PARTICIPANT))
        out.print(f"participant schema up to date: {_e(_shown(participant_db))}")
        return

    async def both() -> None:
        await upgrade(normalize_db_url(db_url))
        if queue:
            await upgrade(normalize_db_url(db_url), migrations=QUEUE)

    _run(both)
    out.print(f"schema up to date: {_e(_shown(db_url))}")


def _operator_security(host: str) -> Security | None:
    """The API's and console's credentials (SAGAS_HTTP_TOKENS...), checked against the address to listen on; None
    without the web extra (then only /metrics, /healthz and /readyz are served)."""
    try:
        import fastapi  # noqa: F401 -- only asks whether the web extra is installed
        import jinja2  # noqa: F401
    except ImportError:
        err.print("the API and console need the web extra (pip install 'sagas-engine[web]'): serving metrics and "
                  "health only", highlight=False, soft_wrap=True)
        return None
    from sagas.web.security import Security, TokenError

    try:
        security = Security.from_env()
        security.check_listen(host)
    except (TokenError, ValueError) as exc:
        raise fail(str(exc)) from None
    if not security.tokens:
        err.print("no tokens (SAGAS_HTTP_TOKENS or SAGAS_HTTP_TOKENS_FILE): the API refuses every change and the "
                  "console signs nobody in", highlight=False, soft_wrap=True)
    return security


@app.command()
def serve(
    definitions: Annotated[list[Path], typer.Option("--definitions", "-d", help="Definition files or folders.")],
    db_url: Annotated[str | None, typer.Option("--db", help="Database URL or SQLite file (env SAGAS_DB).")] = None,
    broker_url: Annotated[
        str | None,
        typer.Option("--broker", help="memory://, db://, kafka://host:port, amqp://host:port (env SAGAS_BROKER)"),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Settings file (TOML or YAML).")] = None,
    json_logs: Annotated[bool | None, typer.Option("--json-logs/--console-logs")] = None,
    http: Annotated[
        str | None, typer.Option("--http", help="HOST:PORT for the API, the console, /metrics, /healthz, /readyz (env "
                                     "SAGAS_HTTP; tokens from SAGAS_HTTP_TOKENS or SAGAS_HTTP_TOKENS_FILE).")
    ] = None,
    tracing: Annotated[
        bool | None,
        typer.Option("--tracing/--no-tracing", help="OpenTelemetry traces to OTLP (env SAGAS_TRACING; default: on "
                     "when OTEL_TRACES_EXPORTER is set). Endpoint, service name, sampler: the OTEL_* variables."),
    ] = None,
) -> None:
    """Run the engine until SIGTERM or SIGINT, then shut down gracefully."""
    import signal

    from pydantic import ValidationError

    from sagas.adapters import normalize_db_url, open_broker, open_store
    from sagas.definitions import discover
    from sagas.engine.ports import Observer, Observers
    from sagas.engine.runtime import Engine
    from sagas.logs import configure_logging
    from sagas.settings import SagasSettings

    configure_logging(json=json_logs)
    try:
        settings = SagasSettings.load(config, db=db_url, broker=broker_url, http=http, tracing=tracing)
    except (ValidationError, OSError, ValueError) as exc:
        raise fail(f"settings: {exc}") from None
    from sagas.adapters.otel import TracingUnavailable, configure_tracing

    try:
        traced = configure_tracing(settings.tracing, service_name="sagas-engine", set_global=True)
    except TracingUnavailable as exc:
        raise fail(str(exc)) from None
    security = None
    if settings.http is not None:
        try:
            from sagas.web.server import parse_address

            host, _ = parse_address(settings.http)
        except ImportError:
            raise fail("--http needs the http extra: pip install 'sagas-engine[http]'") from None
        except ValueError as exc:
            raise fail(str(exc)) from None
        security = _operator_security(host)
    try:
        loaded = discover(definitions)
    except SagaError as exc:
        raise fail(str(exc)) from None
    if not loaded:
        raise fail("no saga definitions found in " + ", ".join(map(str, definitions)))

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        store = open_store(settings.db)
        options = settings.kafka.broker_options() if settings.broker.startswith("kafka://") else {}
        broker = open_broker(settings.broker, db_url=normalize_db_url(settings.db), **options)
        observers: list[Observer] = []
        metrics, tracing = None, None
        if settings.http is not None:
            from sagas.adapters.prometheus import EngineMetrics

            metrics = EngineMetrics(stuck_after=settings.stuck_after)
            observers.append(metrics)
        if traced is not None:
            from sagas.adapters.otel import messaging_system
            from sagas.adapters.tracing import EngineTracing

            tracing = EngineTracing(tracer_provider=traced.provider, ratio=traced.ratio,
                                    messaging_system=messaging_system(broker))
            observers.append(tracing)
        observer = None if not observers else observers[0] if len(observers) == 1 else Observers(*observers)
        engine = Engine(store=store, broker=broker, definitions=loaded, settings=settings.engine_settings(),
                        observer=observer)
        try:
            async with engine:
                if settings.http is None or metrics is None:
                    await stop.wait()
                    return
                from sagas.web.app import create_app
                from sagas.web.server import serving

                metrics.bind(engine)
                routes, middleware, served = [], [], "/metrics, /healthz, /readyz"
                if security is not None:
                    from sagas.engine.admin import SagaAdmin
                    from sagas.web.operations import Operations
                    from sagas.web.site import operator_middleware, operator_routes

                    admin = SagaAdmin(store, reply_topic=engine.settings.reply_topic)
                    routes = operator_routes(Operations(admin, engine), security)
                    middleware = operator_middleware(security)
                    served = "the API (/api), the console (/), " + served
                app = create_app(target=engine, metrics=metrics, routes=routes, middleware=middleware)
                async with serving(app, settings.http) as server:
                    err.print(f"serving {served} on {server.url}", highlight=False, soft_wrap=True)
                    await stop.wait()
        finally:
            await store.close()
            if tracing is not None:
                tracing.close()  # the attempts still waiting for a reply
            if traced is not None:
                await asyncio.to_thread(traced.shutdown)  # flushes the spans still batched

    _run(go)


@app.command()
def start(
    name: Annotated[str, typer.Argument(help="Saga definition name.")],
    input_json: Annotated[str, typer.Option("--input", help="The saga's input as a JSON object.")] = "{}",
    key: Annotated[str | None, typer.Option("--key", help="Idempotency key: the same key starts one saga.")] = None,
    db_url: DbOption = "sagas.db",
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a saga. With --url the serving engine publishes its first command at once; with --db its outbox
    relay does, within a few seconds."""
    data = _json_object(input_json, "--input")
    if url:
        started = _remote_call(url, token, "POST", "/api/sagas", {"definition": name, "input": data, "key": key})
        saga_id, created = started["id"], started["created"]
    else:
        saga_id, created = _admin_call(db_url, lambda admin: admin.start(name, data, key=key))
    if as_json:
        out.print_json(data={"id": saga_id, "created": created})
    else:
        out.print(f"{'started' if created else 'already started'} {_e(saga_id)}", soft_wrap=True)


# ---- inspect ----------------------------------------------------------------------------------------


def _instance_json(instance: SagaInstance) -> dict[str, Any]:
    return instance.model_dump(mode="json")


@app.command("list")
def list_sagas(
    status: Annotated[str | None, typer.Option("--status", help=" | ".join(STATUSES))] = None,
    name: Annotated[str | None, typer.Option("--name")] = None,
    since: Annotated[str | None, typer.Option("--since", help="e.g. 10m, 2h, 1d or an ISO date-time")] = None,
    key: Annotated[str | None, typer.Option("--key", help="The saga started with this idempotency key.")] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Text the failure reason contains.")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 100,
    db_url: DbOption = "sagas.db",
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List sagas, newest first: short id (the end of the id; every command takes a unique end or start of an id),
    saga, status, age and reason."""
    status = _status_option(status)
    since_at = _parse_since(since)
    if url:
        page = _remote_call(url, token, "GET", "/api/sagas", status=status, definition=name, created_from=since_at,
                            key=key, reason=reason, limit=limit, total=True)
        if as_json:
            out.print_json(data=page["items"])
            return
        found: list[Any] = [render.Listed.from_json(item) for item in page["items"]]
        total = page["total"]
    else:
        from sagas.engine.ports import SagaQuery

        query = SagaQuery(status=status, definition=name, created_from=since_at,  # type: ignore[arg-type]
                          key=key, reason=reason, limit=limit + 1)

        async def both(admin: SagaAdmin) -> tuple[list[SagaInstance], int]:
            listed = await admin.query(query)  # one more than shown: are there more (then count them)?
            return listed, (await admin.count(query) if len(listed) > limit else len(listed))

        found, total = _admin_call(db_url, both)
        found = found[:limit]
        if as_json:
            out.print_json(data=[_instance_json(i) for i in found])
            return
    render.saga_list(out, found, total=total, limit=limit)


@app.command()
def show(
    saga_id: Annotated[str, typer.Argument(help="Saga id, or its end or start that no other saga's id shares.")],
    history_limit: Annotated[int | None, typer.Option("--history-limit", help="Timeline entries to show.")] = None,
    db_url: DbOption = "sagas.db",
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """A saga's status, context, steps, compensation trail, pending timers and timeline."""
    from sagas.engine.ports import HistoryRecord
    from sagas.engine.state import HistoryEntry, SagaInstance, TimerSpec

    order: list[str] | None = None
    if url:
        detail = _remote_call(url, token, "GET", f"/api/sagas/{saga_id}", history_limit=history_limit)
        inst = SagaInstance.model_validate(detail["instance"])
        history = [HistoryRecord(inst.id, HistoryEntry.model_validate({k: v for k, v in item.items() if k != "seq"}),
                                 item["seq"]) for item in detail["history"]["items"]]
        timers = [TimerSpec.model_validate(t) for t in detail["timers"]]
        order = [step["name"] for step in detail["steps"]]
        more = detail["history"]["next_after"] is not None
    else:
        async def read(admin: SagaAdmin) -> tuple[Any, list[str] | None]:
            report = await admin.show(saga_id, history_limit=None if history_limit is None else history_limit + 1)
            try:
                definition = await admin.store.load_definition(report.instance.definition,
                                                               report.instance.definition_version)
            except SagaError:
                return report, None
            return report, [step.name for stage in definition.stages for step in stage]

        report, order = _admin_call(db_url, read)
        inst, history, timers = report.instance, report.history, report.timers
        more = history_limit is not None and len(history) > history_limit
        history = history[:history_limit] if history_limit is not None else history
    if as_json:
        out.print_json(data={
            "instance": _instance_json(inst),
            "history": [{"seq": r.seq, **r.entry.model_dump(mode="json")} for r in history],
            "timers": [t.model_dump(mode="json") for t in timers],
        })
        return
    render.saga_report(out, inst, history, timers, step_order=order, more_history=more)


# ---- repair -----------------------------------------------------------------------------------------

ReasonOption = Annotated[str, typer.Option("--reason", help="Why: recorded in the saga's history.")]
OperatorOption = Annotated[str, typer.Option(
    "--operator", envvar="USER", help="Who: recorded in the history (with --url: the token's name).")]


def _operate(db_url: str, url: str | None, token: str | None, saga_id: str, command: OperatorCommand,
             as_json: bool) -> None:
    if url:
        body: dict[str, Any] = {"reason": command.reason}
        if command.action == "skip":
            body.update(step=command.step, output=command.output)
        data = _remote_call(url, token, "POST", f"/api/sagas/{saga_id}/{command.action}", body)
        from sagas.engine.state import SagaInstance

        inst = SagaInstance.model_validate(data)
    else:
        inst = _admin_call(db_url, lambda admin: admin.operate(saga_id, command))
    if as_json:
        out.print_json(data=_instance_json(inst))
    else:
        out.print(f"{command.action}: {_e(inst.id)} is now {render.status(inst.status)}", soft_wrap=True)


@app.command()
def retry(saga_id: str, reason: ReasonOption = "", operator: OperatorOption = "operator",
          db_url: DbOption = "sagas.db", url: UrlOption = None, token: TokenOption = None,
          as_json: JsonOption = False) -> None:
    """Resume a parked (failed) saga: send its stuck step or compensation again."""
    from sagas.engine.state import OperatorCommand

    _operate(db_url, url, token, saga_id, OperatorCommand(action="retry", reason=reason, operator=operator), as_json)


@app.command()
def abort(saga_id: str, reason: ReasonOption = "", operator: OperatorOption = "operator",
          db_url: DbOption = "sagas.db", url: UrlOption = None, token: TokenOption = None,
          as_json: JsonOption = False) -> None:
    """Stop a running saga and compensate what it did (not possible after its pivot step)."""
    from sagas.engine.state import OperatorCommand

    _operate(db_url, url, token, saga_id, OperatorCommand(action="abort", reason=reason, operator=operator), as_json)


@app.command()
def skip(saga_id: str, step: str, reason: Annotated[str, typer.Option("--reason", help="Required: why.")],
         output: Annotated[str | None, typer.Option(
             "--output", help="The step's reply data as a JSON object, for later steps' payloads (steps.<step>).")
         ] = None,
         operator: OperatorOption = "operator", db_url: DbOption = "sagas.db", url: UrlOption = None,
         token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Mark a stuck step done (or its compensation done) by hand; recorded in the history with the reason."""
    from sagas.engine.state import OperatorCommand

    data = None if output is None else _json_object(output, "--output")
    command = OperatorCommand(action="skip", step=step, reason=reason, operator=operator, output=data)
    _operate(db_url, url, token, saga_id, command, as_json)


# ---- dead letters -----------------------------------------------------------------------------------


def _dead_from_json(data: dict[str, Any]) -> DeadLetter:
    from sagas.engine.ports import BrokerMessage, DeadLetter

    headers = tuple((k, str(v).encode()) for k, v in data["headers"].items())
    message = BrokerMessage(topic=data["topic"], value=str(data["value"]).encode(), key=data["key"], headers=headers)
    return DeadLetter(id=data["id"], reason=data["reason"], message=message, at=data["at"], saga_id=data["saga_id"],
                      replayed_at=data["replayed_at"])


@dlq.command("list")
def dlq_list(all_: Annotated[bool, typer.Option("--all", help="Include replayed ones.")] = False,
             limit: Annotated[int, typer.Option("--limit")] = 100,
             db_url: DbOption = "sagas.db", url: UrlOption = None, token: TokenOption = None,
             as_json: JsonOption = False, participant_db: ParticipantDbOption = None) -> None:
    """Dead letters, newest first, each with its whole id (what `dlq show` and `dlq replay` take): the engine's,
    or with --participant-db a participant's."""
    if participant_db is not None:
        found = _participant_call(participant_db, lambda dlq: dlq.list(limit=limit, include_replayed=all_))
    elif url:
        page = _remote_call(url, token, "GET", "/api/dead-letters", include_replayed=all_, limit=limit)
        found = [_dead_from_json(item) for item in page["items"]]
    else:
        found = _admin_call(db_url, lambda admin: admin.dead_letters(limit=limit, include_replayed=all_))
    if as_json:
        out.print_json(data=[dead_letter_json(d, LIST_PREVIEW_BYTES) for d in found])
        return
    render.dead_letter_list(out, found, total=None, limit=limit)


@dlq.command("show")
def dlq_show(
    dead_letter_id: str,
    full: Annotated[Path | None, typer.Option(
        "--full", help="Write the stored body, byte for byte, to this file instead of printing a preview.")] = None,
    db_url: DbOption = "sagas.db", url: UrlOption = None, token: TokenOption = None,
    participant_db: ParticipantDbOption = None,
) -> None:
    """One dead letter with a preview of its raw message (JSON); its size and SHA-256 say what arrived."""
    if participant_db is not None:
        dead = _participant_call(participant_db, lambda dlq: dlq.get(dead_letter_id))
    elif url:
        if full is not None:  # the stored bytes as they are, from the API's /body
            body = _remote_call(url, token, "GET", f"/api/dead-letters/{dead_letter_id}/body", raw=True)
            try:
                full.write_bytes(body)
            except OSError as exc:
                raise fail(f"cannot write {full}: {exc.strerror or exc}") from None
            out.print(f"wrote {len(body)} bytes to {_e(str(full))}: the stored body", highlight=False, soft_wrap=True)
            return
        out.print_json(data=_remote_call(url, token, "GET", f"/api/dead-letters/{dead_letter_id}"))
        return
    else:
        dead = _admin_call(db_url, lambda admin: admin.dead_letter(dead_letter_id))
    kept = len(dead.message.value)
    whole = "the whole body" if not dead.truncated else f"the first {kept} of {dead.size} bytes that arrived"
    if full is not None:
        try:
            full.write_bytes(dead.message.value)
        except OSError as exc:
            raise fail(f"cannot write {full}: {exc.strerror or exc}") from None
        out.print(f"wrote {kept} bytes to {_e(str(full))}: {whole}", highlight=False, soft_wrap=True)
        return
    out.print_json(data=dead_letter_json(dead, SHOW_PREVIEW_BYTES))
    notes = []
    if kept > SHOW_PREVIEW_BYTES:
        notes.append(f"value: preview of the first {SHOW_PREVIEW_BYTES} of {kept} stored bytes")
    if dead.truncated:
        digest = f"sha256 {dead.sha256}" if dead.sha256 else "sha256 not computed (never read whole)"
        notes.append(f"truncated: {kept} of {dead.size} bytes kept; {digest}")
    if notes:  # on stderr: stdout stays one JSON document
        err.print("; ".join(notes) + "; --full FILE writes the stored bytes", highlight=False, soft_wrap=True)


@dlq.command("replay")
def dlq_replay(
    dead_letter_id: str,
    db_url: DbOption = "sagas.db",
    url: UrlOption = None,
    token: TokenOption = None,
    participant_db: ParticipantDbOption = None,
    broker_url: Annotated[str | None, typer.Option(
        "--broker", envvar="SAGAS_BROKER", help="With --participant-db: the broker to publish the command to again "
        "(db:// is the queue in --db).")] = None,
) -> None:
    """Process a dead-lettered reply again (after fixing its cause); with --participant-db, publish a
    participant's dead-lettered command to its topic again."""
    if participant_db is not None:
        if broker_url is None:
            raise fail("replaying a participant's dead letter needs --broker (or SAGAS_BROKER)")
        chosen = broker_url

        async def publish(dlq: ParticipantDeadLetters) -> str:
            from sagas.adapters import normalize_db_url, open_broker

            broker = open_broker(chosen, db_url=normalize_db_url(db_url))
            await broker.start()
            try:
                return await dlq.replay(dead_letter_id, broker)
            finally:
                await broker.close()

        outcome = _participant_call(participant_db, publish)
    elif url:
        outcome = _remote_call(url, token, "POST", f"/api/dead-letters/{dead_letter_id}/replay")["outcome"]
    else:
        outcome = _admin_call(db_url, lambda admin: admin.replay(dead_letter_id))
    out.print(f"replayed {_e(dead_letter_id)}: {outcome}", soft_wrap=True)

