"""How sagas reaches a SQL database: the one place that opens connections, for the store (`open_runner`), the
`db://` queue and the participants' own databases (`open_async_engine`), with one SQLite configuration
(`configure_sqlite`), one busy timeout, and the mapping of driver errors.

Every store operation is a plain synchronous function of a SQLAlchemy `Connection` (Core only). A runner runs
it in one transaction and awaits the result:

- PostgreSQL (asyncpg): an async engine; the function runs through `AsyncConnection.run_sync`.
- SQLite: a synchronous engine (the stdlib `sqlite3` driver) on ONE dedicated thread per connection; the whole
  transaction is a single hop between the event loop and that thread. Going through aiosqlite instead costs
  three or four thread hops per statement, which makes small commits several times slower
  (`bench/store_commit.py` prints both). A `sqlite+aiosqlite://` URL is accepted and served this way.

SQLite settings, and why:

- WAL journal: readers never block the writer and the writer never blocks readers (the CLI can read while the
  engine writes).
- ``synchronous=NORMAL``: a commit survives a crash of the process (what we promise); a power loss or OS crash
  may lose the last transactions, never corrupt the file. ``FULL`` would fsync on every commit.
- ``busy_timeout``: several processes share the file (engine, CLI, participants); a writer waits for the lock
  instead of failing at once.
- Write transactions start with ``BEGIN IMMEDIATE``: the write lock is taken up front, so two processes never
  both read under a shared lock and then deadlock upgrading it (SQLITE_BUSY that busy_timeout cannot resolve).
- The store's writer has automatic checkpoints off (``wal_autocheckpoint=0``): SQLite would otherwise copy the WAL
  back into the database inside the COMMIT that crosses 1,000 pages, on the engine's commit path. The store's
  `checkpoint()` does it instead, on a connection and thread of its own (the engine calls it from a supervised
  loop): PASSIVE once the WAL passes `WAL_CHECKPOINT_BYTES`, TRUNCATE once it passes `WAL_MAX_BYTES` (it waits
  for readers, blocking new writers for at most `_CHECKPOINT_BUSY_TIMEOUT`). ``journal_size_limit`` (half the
  PASSIVE threshold) shrinks the WAL file back when the writer restarts it. A process that writes without the
  loop (the CLI) writes little, and SQLite checkpoints when its last connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from sagas.errors import StoreError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")


class Encoded(str):
    """JSON text serialized already (snapshots by pydantic): bound to a JSON column as is, not dumped again."""

    __slots__ = ()


def json_serializer(value: Any) -> str:
    """The engines' JSON serializer: `Encoded` text passes through, anything else is `json.dumps`-ed."""
    if isinstance(value, Encoded):
        return value
    return json.dumps(value, separators=(",", ":"))


BUSY_TIMEOUT = 10.0
"""Seconds a SQLite writer waits for another process's write lock before a retriable error: one value for the
store, the `db://` queue and the participants, which may share one file."""

# PostgreSQL SQLSTATE classes after which the same call may succeed: connection exceptions (08), transaction
# rollbacks such as serialization failures and deadlocks (40), insufficient resources (53), operator
# intervention such as an admin shutdown (57P), lock not available (55P03).
_RETRIABLE_SQLSTATES = ("08", "40", "53", "57P", "55P03")
# SQLite primary result codes after which the same call may succeed: BUSY, LOCKED, IOERR, FULL, PROTOCOL.
_RETRIABLE_SQLITE_CODES = frozenset({5, 6, 10, 13, 15})


class Runner(Protocol):
    dialect: str

    async def write(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in a write transaction; commit when it returns, roll back when it raises."""
        ...

    async def read(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in a read transaction (a consistent snapshot on both databases)."""
        ...

    async def close(self) -> None: ...


def open_runner(url: str, *, schema: str | None = None) -> Runner:
    """The runner for `url`: ``sqlite[+aiosqlite|+pysqlite]:///path`` (or ``/:memory:``) or
    ``postgresql+asyncpg://...``. `schema` (PostgreSQL only) is the schema the tables live in."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if schema is not None:
            raise ValueError("schema= is only supported on PostgreSQL")
        return SqliteRunner(parsed)
    if backend == "postgresql":
        return PostgresRunner(parsed, schema=schema)
    raise ValueError(
        f"unsupported store URL {parsed.render_as_string(hide_password=True)!r}: "
        "use sqlite+aiosqlite:///path.db or postgresql+asyncpg://..."
    )


# ---- SQLite -------------------------------------------------------------------------------------------


def configure_sqlite(dbapi_connection: sqlite3.Connection, *, memory: bool) -> None:
    """The one SQLite configuration of every connection sagas opens (store, `db://` queue, participants)."""
    # Hand transaction control to us (the "begin" listener) instead of the sqlite3 module's own.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    if not memory:  # an in-memory database has no WAL
        cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


WRITE = "sagas_write"
"""Execution option that makes a connection's transactions ``BEGIN IMMEDIATE`` on an engine opened with
``begin=None``: the queue reads and writes through one engine."""


WAL_CHECKPOINT_BYTES = 4 * 1024 * 1024
"""WAL size from which `SqliteRunner.checkpoint` runs a PASSIVE checkpoint (about SQLite's own automatic
checkpoint, 1,000 pages of 4 KiB); half of it is the writer's ``journal_size_limit``."""
WAL_MAX_BYTES = 64 * 1024 * 1024
"""WAL size from which `SqliteRunner.checkpoint` runs a TRUNCATE checkpoint, which waits for readers to move on."""
_CHECKPOINT_BUSY_TIMEOUT = 1.0
"""Seconds a TRUNCATE checkpoint may wait for readers (new writers wait meanwhile); busy, it is tried again."""


def _configured(engine: Engine, url: URL, *, begin: str | None) -> None:
    """Apply `configure_sqlite` to every new connection of `engine` and start its transactions with `begin`
    (``None``: ``BEGIN IMMEDIATE`` when the connection has the `WRITE` execution option, else ``BEGIN``)."""
    memory = url.database in (None, "", ":memory:")

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # aiosqlite's adapter exposes the sqlite3 connection's attributes and methods.
        configure_sqlite(dbapi_connection, memory=memory)

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        if begin is not None:
            connection.exec_driver_sql(begin)
        else:
            write = connection.get_execution_options().get(WRITE, False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _sqlite_engine(url: URL, *, begin: str, writer: bool = False) -> Engine:
    """The engine of one lane; `writer`: the store's writer, whose checkpoints `SqliteRunner.checkpoint` runs."""
    engine = sa.create_engine(
        url.set(drivername="sqlite+pysqlite"),
        # One connection per engine, used only by the runner's own thread; :memory: must keep its connection.
        poolclass=StaticPool,
        connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT},
        json_serializer=json_serializer,
    )
    _configured(engine, url, begin=begin)
    if writer:

        @event.listens_for(engine, "connect")
        def _no_autocheckpoint(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute("PRAGMA wal_autocheckpoint = 0")
            # Under the checkpoint threshold: a WAL reset truncates the file to this size, and at the threshold itself
            # the file would stay there and look due for a checkpoint on every tick.
            dbapi_connection.execute(f"PRAGMA journal_size_limit = {WAL_CHECKPOINT_BYTES // 2}")

    return engine


def open_async_engine(url: str | URL, *, begin: str | None = "BEGIN IMMEDIATE", **options: Any) -> AsyncEngine:
    """An async SQLAlchemy engine for `url` (normalised by `normalize_db_url`): what the `db://` queue and the
    participants use, where callers need an `AsyncConnection`. SQLite connections get `configure_sqlite` and
    `begin` (see `_configured`); an in-memory database keeps its one connection."""
    from sqlalchemy.ext.asyncio import create_async_engine  # with SQLAlchemy's ORM: ~0.1 s, not for the CLI's reads

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(parsed, json_serializer=json_serializer, **options)
    if parsed.database in (None, "", ":memory:"):
        options.setdefault("poolclass", StaticPool)
    engine = create_async_engine(
        parsed.set(drivername="sqlite+aiosqlite"),
        connect_args={"timeout": BUSY_TIMEOUT},
        json_serializer=json_serializer,
        **options,
    )
    _configured(engine.sync_engine, parsed, begin=begin)
    return engine


class _OwnThread(ABC):
    """A connection used by one thread only: its `_close` runs there, once."""

    def __init__(self, name: str) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.closed = False

    @abstractmethod
    def _close(self) -> None:
        """Close the connection (on the owning thread)."""

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._close)
        self.executor.shutdown(wait=True)


class _Lane(_OwnThread):
    """One SQLite connection and the single thread that owns it."""

    def __init__(self, engine: Engine, name: str) -> None:
        super().__init__(name)
        self.engine = engine
        self.connection: Connection | None = None

    def _run(self, work: Callable[[Connection], T]) -> T:
        if self.connection is None:
            self.connection = self.engine.connect()
        connection = self.connection
        try:
            with connection.begin():
                return work(connection)
        except exc.DBAPIError as error:
            if error.connection_invalidated:
                self.connection = None
            raise

    async def run(self, work: Callable[[Connection], T]) -> T:
        if self.closed:
            raise StoreError("the store is closed", retriable=False)
        loop = asyncio.get_running_loop()
        with _mapped_errors():
            return await loop.run_in_executor(self.executor, self._run, work)

    def _close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        self.engine.dispose()


class SqliteRunner:
    """Writes on one thread and connection (``BEGIN IMMEDIATE``), reads on another (``BEGIN``, a WAL
    snapshot), so that a long listing does not delay commits. An in-memory database has one connection for
    both."""

    dialect = "sqlite"

    def __init__(self, url: URL) -> None:
        memory = url.database in (None, "", ":memory:")
        self._writer = _Lane(_sqlite_engine(url, begin="BEGIN IMMEDIATE", writer=not memory), "sagas-sqlite-write")
        self._reader = self._writer if memory else _Lane(_sqlite_engine(url, begin="BEGIN"), "sagas-sqlite-read")
        self._checkpointer = None if memory else _Checkpointer(str(url.database))

    async def write(self, work: Callable[[Connection], T]) -> T:
        return await self._writer.run(work)

    async def read(self, work: Callable[[Connection], T]) -> T:
        return await self._reader.run(work)

    async def checkpoint(self) -> str | None:
        """Checkpoint the WAL if it is large enough to need it (see the module's docstring); which mode ran, or None
        (nothing to do: a look at the file's size, no thread hop)."""
        if self._checkpointer is None or self._writer.closed:
            return None
        return await self._checkpointer.run()

    async def close(self) -> None:
        await self._writer.close()
        if self._reader is not self._writer:
            await self._reader.close()
        if self._checkpointer is not None:
            await self._checkpointer.close()


class _Checkpointer(_OwnThread):
    """WAL checkpoints of one database file, on a plain sqlite3 connection (autocommit: a checkpoint cannot run
    inside a transaction) and a thread of their own, off the writer's commits."""

    def __init__(self, path: str) -> None:
        super().__init__("sagas-sqlite-checkpoint")
        self.path = path
        self.wal = path + "-wal"
        self.connection: sqlite3.Connection | None = None
        self.done: tuple[int, int] | None = None  # the WAL's (size, mtime) after a checkpoint that copied all of it
        self.stats = {"passive": 0, "truncate": 0, "busy": 0}

    async def run(self) -> str | None:
        try:
            stat = os.stat(self.wal)
        except FileNotFoundError:
            return None
        size = stat.st_size
        if self.closed or size < WAL_CHECKPOINT_BYTES or (size, stat.st_mtime_ns) == self.done:
            return None
        mode = "TRUNCATE" if size >= WAL_MAX_BYTES else "PASSIVE"
        loop = asyncio.get_running_loop()
        with _mapped_errors():
            return await loop.run_in_executor(self.executor, self._checkpoint, mode)

    def _checkpoint(self, mode: str) -> str:
        if self.connection is None:
            connection = sqlite3.connect(self.path, timeout=_CHECKPOINT_BUSY_TIMEOUT, check_same_thread=False)
            connection.isolation_level = None
            connection.execute(f"PRAGMA busy_timeout = {int(_CHECKPOINT_BUSY_TIMEOUT * 1000)}")
            self.connection = connection
        try:
            busy, frames, copied = self.connection.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except sqlite3.Error as error:
            self._close()
            raise exc.DBAPIError.instance(f"PRAGMA wal_checkpoint({mode})", None, error, sqlite3.Error) from error
        self.stats["truncate" if mode == "TRUNCATE" else "passive"] += 1
        if busy:
            self.stats["busy"] += 1
        elif frames == copied:  # until the writer appends again (the file's mtime changes), nothing to do
            with contextlib.suppress(FileNotFoundError):
                stat = os.stat(self.wal)
                self.done = (stat.st_size, stat.st_mtime_ns)
        return mode

    def _close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


# ---- PostgreSQL ---------------------------------------------------------------------------------------


class PostgresRunner:
    dialect = "postgresql"

    def __init__(self, url: URL, *, schema: str | None) -> None:
        connect_args: dict[str, Any] = {}
        if schema is not None:
            connect_args["server_settings"] = {"search_path": _quote_ident(schema)}
        self.schema = schema
        self.engine: AsyncEngine = open_async_engine(
            url, connect_args=connect_args, pool_size=10
        )

    async def write(self, work: Callable[[Connection], T]) -> T:
        with _mapped_errors():
            async with self.engine.begin() as connection:
                return await connection.run_sync(work)

    async def read(self, work: Callable[[Connection], T]) -> T:
        with _mapped_errors():
            async with self.engine.connect() as connection:
                return await connection.run_sync(work)

    async def close(self) -> None:
        await self.engine.dispose()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ---- errors -------------------------------------------------------------------------------------------


def is_retriable(error: BaseException) -> bool:
    """Whether the same call may succeed later: lost connection, lock timeout, deadlock, server restarting."""
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        sqlstate = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
        if isinstance(sqlstate, str):
            return sqlstate.startswith(_RETRIABLE_SQLSTATES)
        if isinstance(error.orig, sqlite3.Error):
            # "no such table" is an OperationalError too: only these primary result codes may clear up.
            code = getattr(error.orig, "sqlite_errorcode", None)
            return isinstance(code, int) and code & 0xFF in _RETRIABLE_SQLITE_CODES
        return isinstance(error, exc.OperationalError | exc.InterfaceError)
    if _raw_driver_error(error):
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str):
            return sqlstate.startswith(_RETRIABLE_SQLSTATES)
    return isinstance(error, exc.DisconnectionError | exc.TimeoutError | OSError | TimeoutError)


def _raw_driver_error(error: BaseException) -> bool:
    """An asyncpg exception that SQLAlchemy did not wrap: those raised while the pool opens a connection
    (sqlalchemy/sqlalchemy#11956), e.g. CannotConnectNowError (57P03) while the server shuts down or starts up."""
    return type(error).__module__.split(".")[0] == "asyncpg"


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    """Turn driver and pool failures into `StoreError` (the SQLAlchemy error is its `__cause__`)."""
    try:
        yield
    except (exc.SQLAlchemyError, OSError, TimeoutError) as error:
        raise StoreError(f"store failed: {_describe(error)}", retriable=is_retriable(error)) from error
    except Exception as error:
        if not _raw_driver_error(error):
            raise
        raise StoreError(f"store failed: {_describe(error)}", retriable=is_retriable(error)) from error


def _describe(error: BaseException) -> str:
    if isinstance(error, exc.DBAPIError):
        return f"{type(error.orig).__name__}: {error.orig}".strip()
    return f"{type(error).__name__}: {error}".strip()
