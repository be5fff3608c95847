"""Configuration and failure plumbing that operators depend on: settings, error mapping, logs."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg
import pytest

from sagas.adapters.kafka import KafkaBroker
from sagas.adapters.sql.connection import _mapped_errors
from sagas.errors import StoreError
from sagas.logs import RateLimit
from sagas.settings import SagasSettings


def test_postgres_restarting_is_a_retriable_store_error() -> None:
    """asyncpg's "server is starting up / shutting down" error, which SQLAlchemy leaves unwrapped while a pool
    connects, becomes a retriable StoreError, so the engine waits the outage out instead of crashing its loops."""
    with pytest.raises(StoreError) as caught, _mapped_errors():
        raise asyncpg.exceptions.CannotConnectNowError("the database system is shutting down")
    assert caught.value.retriable is True


def test_unrelated_errors_are_not_disguised_as_store_errors() -> None:
    """A bug (a plain exception) is not turned into a store error: it must surface as what it is."""
    with pytest.raises(KeyError), _mapped_errors():
        raise KeyError("bug")


def test_settings_do_not_override_what_the_broker_url_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without explicit Kafka settings, the partitions and credentials in the kafka:// URL win."""
    monkeypatch.delenv("SAGAS_KAFKA__PARTITIONS", raising=False)
    settings = SagasSettings.load(None, broker="kafka://127.0.0.1:19092?partitions=6")
    broker = KafkaBroker.from_url(settings.broker, **settings.kafka.broker_options())
    assert broker.partitions == 6


def test_explicit_kafka_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAGAS_KAFKA__* variables reach the broker (nested settings use a double underscore)."""
    monkeypatch.setenv("SAGAS_KAFKA__PARTITIONS", "9")
    monkeypatch.setenv("SAGAS_KAFKA__CLIENT_ID", "billing-engine")
    settings = SagasSettings.load(None, broker="kafka://127.0.0.1:19092")
    options = settings.kafka.broker_options()
    assert options["partitions"] == 9
    assert options["client_options"] == {"client_id": "billing-engine"}


def test_settings_file_is_read_and_flags_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TOML settings file gives values; explicit flags override it."""
    monkeypatch.delenv("SAGAS_DB", raising=False)
    path = tmp_path / "sagas.toml"
    path.write_text('db = "from-file.db"\nreply_topic = "billing.replies"\n[kafka]\npartitions = 3\n')
    settings = SagasSettings.load(path, db="from-flag.db")
    assert settings.db == "from-flag.db"
    assert settings.reply_topic == "billing.replies"
    assert settings.kafka.partitions == 3
    assert settings.engine_settings().reply_topic == "billing.replies"


def test_log_rate_limit_drops_floods_and_says_how_many() -> None:
    """A logger repeating itself is cut to a few lines a second, and the next kept line counts what was dropped."""
    limit = RateLimit(per_second=3)

    def record(n: int) -> logging.LogRecord:
        return logging.LogRecord("aiokafka", logging.WARNING, __file__, 1, f"lost {n}", None, None)

    kept = [r for r in (record(i) for i in range(50)) if limit.filter(r)]
    assert len(kept) == 3
    name, (second, _, dropped) = next(iter(limit._windows.items()))
    assert name == "aiokafka"
    assert dropped == 47
    limit._windows["aiokafka"] = (second - 1, 3, dropped)  # as if a second passed
    later = record(99)
    assert limit.filter(later)
    assert "(47 similar lines dropped)" in later.getMessage()


def test_engine_tuning_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAS_KNOWN_MAX", "123")
    monkeypatch.setenv("SAGAS_BATCH_MAX", "64")
    engine = SagasSettings.load().engine_settings()
    assert (engine.known_max, engine.batch_max) == (123, 64)


def test_an_environment_variable_changes_one_field_of_a_file_section(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`SAGAS_KAFKA__SECURITY_PROTOCOL` overrides that field of the file's [kafka] section, not the section."""
    config = tmp_path / "sagas.toml"
    config.write_text('reply_topic = "from-file"\n[kafka]\npartitions = 6\nsecurity_protocol = "SSL"\n')
    monkeypatch.setenv("SAGAS_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    settings = SagasSettings.load(config)
    assert (settings.kafka.partitions, settings.kafka.security_protocol) == (6, "SASL_SSL")
    assert settings.reply_topic == "from-file"


@pytest.mark.parametrize("value", ["off", "", "null", "None"])
def test_retention_can_be_turned_off_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SAGAS_RETENTION", value)
    assert SagasSettings.load(None).retention is None
    assert SagasSettings.load(None).engine_settings().retention is None


def test_dead_letter_bounds_come_from_the_environment_and_reach_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dead letters default to 30 days and a 64 KiB prefix; SAGAS_DEAD_LETTER_* change both, `off` keeps them all,
    and a prefix over the message-size limit is refused."""
    defaults = SagasSettings.load(None).engine_settings()
    assert (defaults.dead_letter_retention, defaults.dead_letter_max_bytes) == (30 * 86400.0, 65536)
    monkeypatch.setenv("SAGAS_DEAD_LETTER_RETENTION", "off")
    monkeypatch.setenv("SAGAS_DEAD_LETTER_MAX_BYTES", "1024")
    engine = SagasSettings.load(None).engine_settings()
    assert (engine.dead_letter_retention, engine.dead_letter_max_bytes) == (None, 1024)
    monkeypatch.setenv("SAGAS_DEAD_LETTER_MAX_BYTES", "2000000")
    with pytest.raises(ValueError, match="dead_letter_max_bytes"):
        SagasSettings.load(None)


def test_database_urls_are_printed_without_their_password() -> None:
    from sagas.cli.operate import _shown

    shown = _shown("postgresql://sagas:s3cret@db.internal:5432/sagas")
    assert "s3cret" not in shown
    assert "sagas:***@db.internal:5432/sagas" in shown
