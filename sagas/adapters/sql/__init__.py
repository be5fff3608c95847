"""The SQL store: SQLite and PostgreSQL through SQLAlchemy Core, one schema, alembic migrations.

store = SqlStore("sqlite+aiosqlite:///sagas.db")      # or postgresql+asyncpg://user:pw@host/db
await store.initialize()                              # migrate to the latest schema, as upgrade(url) does
"""

from sagas.adapters.sql.migrate import upgrade
from sagas.adapters.sql.store import SqlStore

__all__ = ["SqlStore", "upgrade"]
