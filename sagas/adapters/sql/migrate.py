"""Schema migrations, run programmatically with alembic (no alembic.ini).

Three chains, each with its own scripts and version table, because their tables may live in different databases:
`STORE` (the engine's tables), `QUEUE` (the `db://` queue's, in the store's database or another) and `PARTICIPANT`
(a participant's dedup records and dead letters, in its own database). Every function takes the chain
(`migrations=`, the store's by default) and works the same way for each.

`upgrade(url)` is what `sagas db upgrade` calls; `SqlStore.initialize()` runs the same migration
(`upgrade_connection`) on its own connection when the database is not at `HEAD` yet. A migration runs in one
transaction that also serializes concurrent upgrades: ``BEGIN IMMEDIATE`` on SQLite, a transaction-level advisory
lock on PostgreSQL, so several engine processes may start at once against a fresh database.

alembic is imported only to migrate: a database already at `HEAD` (every start but the first, and every CLI
command) is recognised by one read of the version table, without alembic's import (a few hundred milliseconds)
and without a write transaction (on SQLite, the write lock an engine's writer would wait for).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from sagas.adapters.sql.connection import open_runner
from sagas.adapters.sql.tables import VERSION_TABLE
from sagas.errors import StoreError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
HEAD = "0006_reason_index"
"""The newest migration's revision: a test checks it against the scripts in `migrations/versions/`."""
_UPGRADE_LOCK = 0x5A6A5_0001  # arbitrary constant key of pg_advisory_xact_lock, shared by the chains


@dataclass(frozen=True)
class Migrations:
    """One chain of migrations: its scripts, its version table and its newest revision."""

    name: str
    location: Path
    version_table: str
    head_revision: str | None
    """None: the module's `HEAD` (the store's, read when used: the integrator bumps it, tests patch it)."""

    @property
    def head(self) -> str:
        return HEAD if self.head_revision is None else self.head_revision


STORE = Migrations("store", MIGRATIONS, VERSION_TABLE, None)
QUEUE = Migrations("queue", Path(__file__).parent / "queue_migrations", "sagas_queue_version", "queue_0001")
PARTICIPANT = Migrations(
    "participant", Path(__file__).parent / "participant_migrations", "sagas_participant_version", "participant_0001"
)


def alembic_config(migrations: Migrations = STORE) -> Config:
    """An alembic `Config` pointing at the packaged migrations (for `command.revision` when adding one)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations.location))
    config.set_main_option("version_table", migrations.version_table)
    return config


def at_head(connection: Connection, migrations: Migrations = STORE) -> bool:
    """Whether the database is at `HEAD`, by plain reads that cannot fail on a new database (where the version
    table does not exist yet, and a failed statement would abort a PostgreSQL transaction)."""
    table = migrations.version_table
    if connection.dialect.name == "postgresql":
        exists = connection.execute(sa.text("SELECT to_regclass(:table) IS NOT NULL"), {"table": table})
    else:
        exists = connection.execute(
            sa.text("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = :table"),
            {"table": table},
        )
    if not exists.scalar():
        return False
    versions = connection.execute(sa.text(f"SELECT version_num FROM {table}")).scalars().all()
    return list(versions) == [migrations.head]


def head_revision(migrations: Migrations = STORE) -> str:
    """The newest revision, as alembic reads it from the scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(migrations)).get_current_head()
    assert head is not None, f"the {migrations.name} migrations have no head"
    return head


def current_revision(connection: Connection, migrations: Migrations = STORE) -> str | None:
    """The revision the database is at; None before the first upgrade."""
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table": migrations.version_table})
    return context.get_current_revision()


def ensure_current(connection: Connection, migrations: Migrations, *, schema: str | None = None) -> None:
    """Migrate to the head of `migrations` unless the database is there already (one read, no alembic import)."""
    if not at_head(connection, migrations):
        upgrade_connection(connection, schema=schema, migrations=migrations)


def upgrade_connection(
    connection: Connection, *, schema: str | None = None, revision: str = "head", migrations: Migrations = STORE
) -> None:
    """Migrate through `connection`, inside the transaction the caller opened."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
        # IF NOT EXISTS still needs CREATE on the database: a role that only owns its schema could not start.
        exists = sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :schema")
        if schema is not None and connection.execute(exists, {"schema": schema}).first() is None:
            quoted = connection.dialect.identifier_preparer.quote_identifier(schema)
            connection.execute(sa.text(f"CREATE SCHEMA {quoted}"))
    from alembic import command
    from alembic.script import ScriptDirectory

    config = alembic_config(migrations)
    current = current_revision(connection, migrations)
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    if current is not None and current not in known:
        raise StoreError(
            f"the database's {migrations.name} schema is at revision {current!r}, which this version of sagas does"
            f" not know (its newest is {migrations.head!r}): a newer sagas migrated it. Run that version, or restore"
            " a backup from before then.",
            retriable=False,
        )
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def upgrade(
    url: str, *, schema: str | None = None, revision: str = "head", migrations: Migrations = STORE
) -> None:
    """Bring the database at `url` to `revision` (the latest by default). Safe to run concurrently."""
    runner = open_runner(url, schema=schema)
    try:
        await runner.write(
            lambda connection: upgrade_connection(connection, schema=schema, revision=revision, migrations=migrations)
        )
    finally:
        await runner.close()
