"""Shared fixtures.

Tests that need PostgreSQL, Apache Kafka, RabbitMQ or Prometheus are marked `postgres` / `kafka` / `rabbitmq` /
`prometheus` and read the servers' URLs from SAGAS_TEST_PG_URL / SAGAS_TEST_KAFKA_URL / SAGAS_TEST_AMQP_URL /
SAGAS_TEST_PROMETHEUS_URL (set by `scripts/services.sh env`).
When a URL is missing the test is skipped on a developer's machine, but under CI=true it FAILS: CI must never pass
without the real services.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """CI=true (or 1/yes, any case), read at call time."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def service_url(variable: str) -> str:
    url = os.environ.get(variable)
    if not url:
        message = f"{variable} is not set: run `eval \"$(scripts/services.sh env)\"` after `scripts/services.sh start`"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return url


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
