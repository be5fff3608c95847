"""How the engine talks to the world: stores and brokers, chosen by URL.

Stores: ``sqlite+aiosqlite:///path.db`` (default), ``sqlite+aiosqlite:///:memory:``, ``postgresql+asyncpg://...``.
Brokers: ``memory://`` (in-process), ``db://`` (a durable queue in the store's own database, for several processes
on one machine without a server), a database URL (a durable queue in that database), ``kafka://host:port[,...]``,
``amqp://`` / ``amqps://`` (RabbitMQ).
Optional drivers are imported only when their URL is used, with an install hint when missing.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from sagas.engine.ports import Broker, Store

_HINTS = {
    "asyncpg": "pip install 'sagas-engine[postgres]'",
    "aiokafka": "pip install 'sagas-engine[kafka]'",
    "aio_pika": "pip install 'sagas-engine[rabbitmq]'",
}


def _require(module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"{module} is needed for this URL: {_HINTS[module]}") from None


def normalize_db_url(url_or_path: str) -> str:
    """The one URL normaliser of the store, the `db://` queue and the participants: a plain file path is a
    SQLite database; ``sqlite:`` gets the aiosqlite driver and ``postgresql:`` / ``postgres:`` asyncpg (what
    `sagas.adapters.sql.connection` opens them with); other URLs are returned as they are."""
    if "://" not in url_or_path:
        return f"sqlite+aiosqlite:///{Path(url_or_path).expanduser()}"
    if url_or_path.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url_or_path[len("sqlite:"):]
    if url_or_path.startswith(("postgresql:", "postgres:")):
        return "postgresql+asyncpg:" + url_or_path.split(":", 1)[1]
    return url_or_path


def open_store(url: str) -> Store:
    url = normalize_db_url(url)
    if url.startswith("postgresql+asyncpg://"):
        _require("asyncpg")
    from sagas.adapters.sql import SqlStore

    return SqlStore(url)


def open_broker(url: str, *, db_url: str | None = None, **options: Any) -> Broker:
    if url == "memory://":
        from sagas.adapters.memory import MemoryBroker

        return MemoryBroker()
    if url.startswith("kafka://"):
        _require("aiokafka")
        from sagas.adapters.kafka import KafkaBroker

        return KafkaBroker.from_url(url, **options)
    if url.startswith(("amqp://", "amqps://")):
        _require("aio_pika")
        from sagas.adapters.rabbitmq import RabbitBroker

        return RabbitBroker.from_url(url, **options)
    if url == "db://":
        if db_url is None:
            raise ValueError("broker 'db://' uses the store's database, but no database URL was given")
        url = db_url
    elif not url.startswith(("sqlite", "postgresql")) and "://" in url:
        raise ValueError(f"unsupported broker URL {url!r}: use memory://, db://, kafka://host:port, "
                         "amqp://host:port, or a database URL")
    from sagas.adapters.sqlqueue import SqlQueueBroker

    return SqlQueueBroker(normalize_db_url(url))


__all__ = ["Broker", "Store", "normalize_db_url", "open_broker", "open_store"]
