"""One settings object for the engine service, from environment variables (`SAGAS_*`) and an optional file.

    SAGAS_DB=postgresql+asyncpg://sagas:secret@db:5432/sagas
    SAGAS_BROKER=kafka://k1:9092,k2:9092
    SAGAS_KAFKA__SECURITY_PROTOCOL=SASL_SSL        # nested fields use a double underscore
    SAGAS_KAFKA__SASL_MECHANISM=SCRAM-SHA-512

A file (TOML or YAML, `sagas serve --config sagas.toml`) gives the same fields; environment variables win.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from ruamel.yaml import YAML

from sagas.engine.processor import DEAD_LETTER_MAX_BYTES, DEFAULT_KNOWN_MAX
from sagas.engine.runtime import DEFAULT_GROUP, DEFAULT_REPLY_TOPIC, EngineSettings


class KafkaSettings(BaseModel):
    """Passed through to aiokafka; see its documentation for each option."""

    partitions: int = Field(3, ge=1, description="Partitions of topics the engine creates (as KafkaBroker).")
    replication_factor: int = Field(1, ge=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    client_id: str = "sagas-engine"

    def broker_options(self) -> dict[str, Any]:
        """Keyword arguments for `KafkaBroker` (the SSL files become an ssl_context there)."""
        # Only what was set explicitly: the broker URL's own query (?partitions=6, credentials → SASL_SSL)
        # must not be overridden by these defaults.
        chosen = self.model_dump(exclude_unset=True, exclude_none=True)
        options: dict[str, Any] = {k: chosen.pop(k) for k in ("partitions", "replication_factor") if k in chosen}
        if chosen:
            options["client_options"] = chosen
        return options


class SagasSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAGAS_", env_nested_delimiter="__", extra="forbid")

    db: str = Field("sagas.db", description="Database URL, or a SQLite file path.")
    broker: str = Field("db://", description="memory://, db:// (queue in the database), kafka://host:port,..., "
                        "amqp://user:pw@host:port/vhost")
    reply_topic: str = DEFAULT_REPLY_TOPIC
    group: str = Field(DEFAULT_GROUP, description="Consumer group of the engine processes.")
    batch_max: int = Field(512, ge=1, le=10_000)
    known_max: int = Field(DEFAULT_KNOWN_MAX, ge=0, description="Running sagas an engine remembers between events.")
    timer_interval: float = Field(0.05, gt=0)
    relay_interval: float = Field(1.0, gt=0, description="Seconds between polls of the outbox for rows nobody "
                                  "published (written by `sagas start --db`, or left by a crash).")
    relay_grace: float = Field(2.0, ge=0, description="Age in seconds before the relay publishes a row: a row "
                               "younger may still be on its way out through the engine that wrote it (with several "
                               "engines, a short grace publishes their fresh rows twice: harmless, deduplicated).")
    retention: float | None = Field(
        7 * 86400.0, description="Seconds to keep inbox ids, sent outbox rows and finished sagas; off keeps all."
    )
    retention_interval: float = Field(600.0, gt=0, description="Seconds between retention clean-ups.")
    dead_letter_retention: float | None = Field(
        30 * 86400.0, gt=0, description="Seconds to keep dead letters (see docs/operations.md); off keeps all."
    )
    dead_letter_max_bytes: int = Field(
        DEAD_LETTER_MAX_BYTES, ge=0, le=1_000_000,
        description="Bytes of a dead letter's body that are kept (its full size and SHA-256 always are).",
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    http: str | None = Field(
        None, description="HOST:PORT to serve /metrics, /healthz and /readyz on (:PORT is 127.0.0.1); unset: off."
    )
    tracing: bool | None = Field(
        None, description="OpenTelemetry traces (the otlp extra): true, false, or unset to follow the standard "
        "OTEL_* environment (on when OTEL_TRACES_EXPORTER names an exporter). See docs/observability.md.",
    )
    stuck_after: float = Field(300.0, gt=0, description="Seconds without a transition after which a running or "
                               "compensating saga counts as stuck (metrics).")

    @classmethod
    def load(cls, file: Path | None = None, **overrides: Any) -> SagasSettings:
        """Settings from `file` (TOML/YAML), then the environment, then explicit `overrides` (CLI flags)."""
        data: dict[str, Any] = {}
        if file is not None:
            text = file.read_text()
            data = tomllib.loads(text) if file.suffix == ".toml" else dict(YAML(typ="safe").load(text) or {})
        env = cls()  # environment and defaults
        explicit_env = env.model_dump(exclude_unset=True)
        merged = _merged(_merged(data, explicit_env), {k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(merged)

    @field_validator("retention", "dead_letter_retention", mode="before")
    @classmethod
    def _retention_off(cls, value: Any) -> Any:
        """``off`` (or ``none``, ``null``, empty) keeps everything: environment variables and TOML have no null."""
        if isinstance(value, str) and value.strip().lower() in ("", "off", "none", "null"):
            return None
        return value

    def engine_settings(self) -> EngineSettings:
        return EngineSettings(
            reply_topic=self.reply_topic, group=self.group, batch_max=self.batch_max, known_max=self.known_max,
            timer_interval=self.timer_interval, relay_interval=self.relay_interval, relay_grace=self.relay_grace,
            retention=self.retention, retention_interval=self.retention_interval,
            dead_letter_retention=self.dead_letter_retention, dead_letter_max_bytes=self.dead_letter_max_bytes,
        )


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `top`, section by section: ``SAGAS_KAFKA__SASL_MECHANISM`` changes one field of a
    file's ``[kafka]`` section instead of replacing the section."""
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        merged[key] = _merged(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return merged
