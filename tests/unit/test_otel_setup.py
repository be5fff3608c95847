"""How tracing is switched on from the standard OTEL_* environment, the option or the setting (sagas.adapters.otel),
and the clear error, with the install hint, when what it needs is missing."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from typer.testing import CliRunner

import sagas.logs
from sagas.adapters.otel import (
    TracingUnavailable,
    configure_tracing,
    messaging_system,
    sampling_ratio,
    tracing_wanted,
)
from sagas.adapters.sqlqueue import SqlQueueBroker
from sagas.adapters.tracing import ParticipantTracing, saga_context, sampled
from sagas.cli import app
from sagas.engine.ids import new_id

OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


@pytest.mark.parametrize(("enabled", "env", "wanted"), [
    (None, {}, False),
    (None, {"OTEL_TRACES_EXPORTER": "none"}, False),
    (None, {"OTEL_TRACES_EXPORTER": "otlp"}, True),
    (None, {"OTEL_TRACES_EXPORTER": " none , console"}, True),
    (True, {}, True),
    (False, {"OTEL_TRACES_EXPORTER": "otlp"}, False),
    (True, {"OTEL_SDK_DISABLED": "true"}, False),
    (None, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
])
def test_tracing_is_off_by_default_and_on_by_option_or_exporter(
    enabled: bool | None, env: dict[str, str], wanted: bool
) -> None:
    """Off unless the option/setting says so or OTEL_TRACES_EXPORTER names an exporter; OTEL_SDK_DISABLED wins."""
    assert tracing_wanted(enabled, env) is wanted


def test_off_builds_nothing() -> None:
    """With tracing off no provider is built: the default costs nothing."""
    assert configure_tracing(None, service_name="x", environ={}) is None


def test_the_service_name_defaults_and_the_environment_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider's resource names the service as asked, unless OTEL_SERVICE_NAME does; the OTLP exporter is the
    default once on, a ratio sampler is honoured and the provider is owned (shut down by its user)."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    setup = configure_tracing(True, service_name="sagas-engine", environ=env)
    assert setup is not None
    assert setup.owned
    assert setup.ratio == 1.0
    assert setup.provider.resource.attributes["service.name"] == "sagas-engine"
    setup.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing")  # Resource.create reads the process's environment
    env = {**env, "OTEL_SERVICE_NAME": "billing", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
           "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    setup = configure_tracing(True, service_name="sagas-engine", environ=env)
    assert setup is not None
    assert setup.ratio == 0.25
    assert setup.provider.resource.attributes["service.name"] == "billing"
    assert isinstance(setup.provider.sampler, sampling.ParentBased)
    setup.shutdown()


@pytest.mark.parametrize(("env", "ratio"), [
    ({}, 1.0),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}, 0.1),
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "7"}, 1.0),
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}, 1.0),
    ({"OTEL_TRACES_SAMPLER": "always_off"}, 0.0),
    ({"OTEL_TRACES_SAMPLER": "parentbased_always_on", "OTEL_TRACES_SAMPLER_ARG": "0.5"}, 1.0),
])
def test_the_sampling_ratio_comes_from_the_standard_sampler_variables(env: dict[str, str], ratio: float) -> None:
    """OTEL_TRACES_SAMPLER(_ARG) gives the engine's ratio: clamped to [0, 1]; unparsable or not a ratio: 1."""
    assert sampling_ratio(env) == ratio


def test_the_engine_samples_about_the_ratio_of_its_saga_ids_even_in_bursts() -> None:
    """About `ratio` of the engine's saga ids are sampled, at every ratio, in every run of 200 ids minted in a burst
    (UUIDv7 ids of one millisecond count up from one random start: a decision on their own bits would take or
    leave a whole burst)."""
    for ratio in (0.1, 0.5, 0.9):
        for _ in range(10):
            burst = [new_id() for _ in range(200)]
            share = sum(sampled(i, ratio) for i in burst) / len(burst)
            assert abs(share - ratio) < 0.15, (ratio, share)
    assert not any(sampled(new_id(), 0.0) for _ in range(100))


def test_the_sdk_sampler_follows_the_saga_decision_whichever_ratio_sampler_is_named() -> None:
    """`traceidratio` and `parentbased_traceidratio` both build a parent-based sampler: a saga's spans follow the
    flag of its root context (the engine's decision), never a second decision of their own."""
    for name in ("traceidratio", "parentbased_traceidratio"):
        env = {"OTEL_TRACES_SAMPLER": name, "OTEL_TRACES_SAMPLER_ARG": "0.5",
               "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
        setup = configure_tracing(True, service_name="x", environ=env)
        assert setup is not None
        assert isinstance(setup.provider.sampler, sampling.ParentBased)
        for _ in range(50):
            saga_id = str(uuid.uuid4())
            for flag in (True, False):
                parent = saga_context(saga_id, flag)
                span_context = trace.get_current_span(parent).get_span_context()
                decision = setup.provider.sampler.should_sample(parent, span_context.trace_id, "x").decision
                assert decision.is_sampled() is flag
        setup.shutdown()


def test_unknown_exporter_or_protocol_is_a_clear_error() -> None:
    """An exporter or OTLP protocol the process cannot honour fails at start with the variable named."""
    with pytest.raises(TracingUnavailable, match="OTEL_TRACES_EXPORTER='zipkin'"):
        configure_tracing(None, service_name="x", environ={"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TracingUnavailable, match="http/json"):
        configure_tracing(True, service_name="x", environ={"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_a_missing_exporter_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the OTLP exporter package, turning tracing on raises TracingUnavailable with the extra to install."""
    monkeypatch.setitem(sys.modules, OTLP_MODULE, None)  # import fails as if not installed
    with pytest.raises(TracingUnavailable, match=r"pip install 'sagas-engine\[otlp\]'"):
        configure_tracing(True, service_name="x", environ={})


def test_serve_with_tracing_but_no_exporter_fails_with_the_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`sagas serve --tracing` without the exporter exits non-zero at once with the install hint, before it runs."""
    monkeypatch.setitem(sys.modules, OTLP_MODULE, None)
    monkeypatch.setattr(sagas.logs, "configure_logging", lambda **_: None)  # it would log to the runner's stream
    definition = tmp_path / "d.yaml"
    definition.write_text("name: d\nversion: 1\nsteps:\n  - {name: a, participant: p, command: C}\n")
    result = CliRunner().invoke(app, ["serve", "-d", str(definition), "--db", str(tmp_path / "s.db"), "--tracing"])
    assert result.exit_code != 0
    assert "sagas-engine[otlp]" in result.output


def test_an_application_provider_is_used_and_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the process already has an SDK tracer provider (opentelemetry-instrument, or the application's), tracing
    uses it and never shuts it down."""
    provider = TracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    setup = configure_tracing(None, service_name="x", environ={"OTEL_TRACES_EXPORTER": "otlp"})
    assert setup is not None
    assert setup.provider is provider
    assert not setup.owned
    setup.shutdown()
    exporter = InMemorySpanExporter()
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ParticipantTracing(tracer_provider=setup.provider).tracer.start_span("still recording").end()
    assert [s.name for s in exporter.get_finished_spans()] == ["still recording"]


def test_the_messaging_system_is_named_after_the_broker() -> None:
    """db:// brokers are `sagas.db`; an unknown broker class is `sagas`."""
    assert messaging_system(SqlQueueBroker.__new__(SqlQueueBroker)) == "sagas.db"
    assert messaging_system(object()) == "sagas"


def test_the_tracing_setting_comes_from_the_environment_a_file_or_the_option(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`tracing` is unset by default (the OTEL_* environment decides), true from SAGAS_TRACING, and the option
    (`--tracing/--no-tracing`) wins over the file and the environment."""
    from sagas.settings import SagasSettings

    monkeypatch.delenv("SAGAS_TRACING", raising=False)
    assert SagasSettings.load(None).tracing is None
    monkeypatch.setenv("SAGAS_TRACING", "true")
    assert SagasSettings.load(None).tracing is True
    monkeypatch.delenv("SAGAS_TRACING")
    file = tmp_path / "sagas.toml"
    file.write_text("tracing = true\n")
    assert SagasSettings.load(file).tracing is True
    assert SagasSettings.load(file, tracing=False).tracing is False
