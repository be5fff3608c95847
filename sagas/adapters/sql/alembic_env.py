"""What every chain's ``env.py`` runs (the store's, the queue's, the participants'): one alembic environment.

Online, the caller (`sagas.adapters.sql.migrate.upgrade_connection`) has opened the transaction and passes its
connection in ``config.attributes["connection"]``; there is no alembic.ini. Offline mode (``--sql``) renders the
DDL for the URL in ``sqlalchemy.url``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context


def run(metadata: sa.MetaData) -> None:
    """Run the migrations of the chain whose `Config` alembic loaded, against `metadata` (for autogenerate)."""
    config = context.config
    version_table = config.get_main_option("version_table")
    if not version_table:
        raise RuntimeError("run the sagas migrations with sagas.adapters.sql.migrate (no version table configured)")
    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            target_metadata=metadata,
            version_table=version_table,
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run the sagas migrations with sagas.adapters.sql.upgrade(url) or `sagas db upgrade`")
    context.configure(connection=connection, target_metadata=metadata, version_table=version_table)
    with context.begin_transaction():
        context.run_migrations()
