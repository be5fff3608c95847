"""Under CI a missing PostgreSQL or Kafka fails the test that needs it; only on a developer's machine is it a skip."""

from __future__ import annotations

import pytest

from tests.conftest import service_url


@pytest.mark.parametrize("ci", ["true", "TRUE", "1", "yes"])
def test_a_missing_service_fails_under_ci(ci: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", ci)
    monkeypatch.delenv("SAGAS_TEST_PG_URL", raising=False)
    with pytest.raises(pytest.fail.Exception, match="SAGAS_TEST_PG_URL is not set"):
        service_url("SAGAS_TEST_PG_URL")


def test_a_missing_service_is_skipped_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("SAGAS_TEST_KAFKA_URL", raising=False)
    with pytest.raises(pytest.skip.Exception):
        service_url("SAGAS_TEST_KAFKA_URL")


def test_a_set_url_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAS_TEST_KAFKA_URL", "kafka://127.0.0.1:19092")
    assert service_url("SAGAS_TEST_KAFKA_URL") == "kafka://127.0.0.1:19092"
