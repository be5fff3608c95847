"""Shared fixtures.

Tests that need PostgreSQL, Apache Kafka, RabbitMQ or Prometheus are marked `postgres` / `kafka` / `rabbitmq` /
`prometheus` and read the servers' URLs from SAGAS_TEST_PG_URL / SAGAS_TEST_KAFKA_URL / SAGAS_TEST_AMQP_URL /
SAGAS_TEST_PROMETHEUS_URL (set by `scripts/services.sh env`).
When a URL is missing the test is skipped on a developer's machine, but under CI=true it FAILS: CI must never pass
without the real services.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """CI=true (or 1/yes, any case), read at call time."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(message: str) -> NoReturn:
    """Something a test needs is not here: a failure under CI, a skip on a developer's machine."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def service_url(variable: str) -> str:
    url = os.environ.get(variable)
    if not url:
        missing(f"{variable} is not set: run `eval \"$(scripts/services.sh env)\"` after `scripts/services.sh start`")
    return url


@contextlib.asynccontextmanager
async def pg_database(pg_url: str, prefix: str = "test") -> AsyncIterator[str]:
    """The URL of a new PostgreSQL database (a subprocess or the CLI takes a URL, not a schema), dropped after."""
    import asyncpg
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
def pg_url() -> str:
    return service_url("SAGAS_TEST_PG_URL")


@pytest.fixture(scope="session")
def kafka_url() -> str:
    return service_url("SAGAS_TEST_KAFKA_URL")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return service_url("SAGAS_TEST_AMQP_URL")


@pytest.fixture(scope="session")
def prometheus_url() -> str:
    return service_url("SAGAS_TEST_PROMETHEUS_URL")


@pytest.fixture(scope="session")
def prometheus_targets() -> str:
    """The directory the test Prometheus reads scrape targets from (file_sd, one JSON file per test)."""
    return service_url("SAGAS_TEST_PROMETHEUS_TARGETS")


@pytest.fixture(scope="session")
def amqp_management_url() -> str:
    return service_url("SAGAS_TEST_AMQP_MANAGEMENT_URL")
