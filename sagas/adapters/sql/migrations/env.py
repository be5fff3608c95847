"""Alembic environment of the `sagas` schema.

Run through `sagas.adapters.sql.upgrade(url)` (what `sagas db upgrade` calls), which opens the transaction and
passes its connection in ``config.attributes["connection"]``; there is no alembic.ini. Offline mode
(``--sql``) renders the DDL for the URL in ``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context

from sagas.adapters.sql.tables import VERSION_TABLE, metadata

config = context.config

if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run the sagas migrations with sagas.adapters.sql.upgrade(url) or `sagas db upgrade`")
    context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()
