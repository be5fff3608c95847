"""Tracing switched on the way OpenTelemetry users expect, for `sagas serve` and `Participant.serve`.

Off by default. On with ``--tracing`` (the setting ``tracing``, ``SAGAS_TRACING=true``), or when the standard
environment names an exporter (``OTEL_TRACES_EXPORTER=otlp``); ``--no-tracing`` / ``SAGAS_TRACING=false`` and
``OTEL_SDK_DISABLED=true`` keep it off. The rest is the standard environment, read by the SDK and its exporters:

- ``OTEL_TRACES_EXPORTER``: ``otlp`` (the default once on), ``console``, ``none``, or several, comma-separated;
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``..._HEADERS``, ``..._TIMEOUT``;
  ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL``: ``http/protobuf`` (default; the ``otlp`` extra) or ``grpc``
  (``opentelemetry-exporter-otlp-proto-grpc``, installed apart);
- ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the service name defaults to `service_name`);
- ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: ``parentbased_traceidratio`` (or ``traceidratio``) with
  ``0.1`` traces one saga in ten, decided by the engine from a hash of the saga id (`sagas.adapters.tracing.sampled`)
  and carried in the trace context; the sampler built here is always parent based, so every process follows that
  decision and an unsampled saga records no span anywhere;
- ``OTEL_BSP_*``: the batch span processor's delay and queue.

A process already instrumented (``opentelemetry-instrument``, or an application that set an SDK tracer provider)
keeps its provider: the spans go there, and this module neither replaces nor shuts it down.

The SDK and the OTLP exporter are the ``otlp`` extra (``pip install 'sagas-engine[otlp]'``); without them, turning
tracing on fails at once with that hint (`TracingUnavailable`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from sagas.errors import SagaError

__all__ = ["TracingSetup", "TracingUnavailable", "configure_tracing", "messaging_system", "tracing_wanted"]

INSTALL_HINT = "pip install 'sagas-engine[otlp]'"
_RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
_OFF_SAMPLERS = ("always_off", "parentbased_always_off")


class TracingUnavailable(SagaError, RuntimeError):
    """Tracing was asked for, but the SDK or an exporter is not installed, or the environment names an unknown
    exporter or protocol. Not retriable: install what the message says, or fix the variable."""


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def tracing_wanted(enabled: bool | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether tracing is on: `enabled` (the option or setting) when given, else whether ``OTEL_TRACES_EXPORTER``
    names an exporter; ``OTEL_SDK_DISABLED=true`` turns it off whatever else says."""
    env = os.environ if environ is None else environ
    if _true(env.get("OTEL_SDK_DISABLED")):
        return False
    if enabled is not None:
        return enabled
    exporters = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    return any(e != "none" for e in exporters)


def sampling_ratio(environ: Mapping[str, str] | None = None) -> float:
    """The share of sagas traced, from ``OTEL_TRACES_SAMPLER`` / ``_ARG`` (1.0 unless a ratio or off sampler)."""
    env = os.environ if environ is None else environ
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if sampler in _OFF_SAMPLERS:
        return 0.0
    if sampler not in _RATIO_SAMPLERS:
        return 1.0
    try:
        ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    except ValueError:
        return 1.0  # what the SDK does with an unparsable argument
    return min(max(ratio, 0.0), 1.0)


def messaging_system(broker: Any) -> str:
    """The broker as the OpenTelemetry messaging conventions name it (``messaging.system``)."""
    return {"KafkaBroker": "kafka", "RabbitBroker": "rabbitmq", "SqlQueueBroker": "sagas.db",
            "MemoryBroker": "memory"}.get(type(broker).__name__, "sagas")


@dataclass
class TracingSetup:
    """The tracer provider spans go to, the engine's sampling ratio, and whether this process owns the provider
    (then `shutdown` flushes and closes its exporters)."""

    provider: Any
    ratio: float
    owned: bool

    def shutdown(self) -> None:
        if self.owned:
            self.provider.shutdown()


def _exporters(env: Mapping[str, str]) -> list[Any]:
    names = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()] or ["otlp"]
    found: list[Any] = []
    for name in names:
        if name == "none":
            continue
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            found.append(ConsoleSpanExporter())
        elif name == "otlp":
            found.append(_otlp(env))
        else:
            raise TracingUnavailable(f"OTEL_TRACES_EXPORTER={env.get('OTEL_TRACES_EXPORTER')!r}: unknown exporter "
                                     f"{name!r} (sagas knows otlp, console and none)")
    return found


def _otlp(env: Mapping[str, str]) -> Any:
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol == "http/protobuf":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise TracingUnavailable(f"the OTLP exporter is not installed: {INSTALL_HINT}") from None
        return OTLPSpanExporter()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError:
            raise TracingUnavailable("OTLP over gRPC needs its exporter: pip install "
                                     "opentelemetry-exporter-otlp-proto-grpc") from None
        return GrpcSpanExporter()
    raise TracingUnavailable(f"OTLP protocol {protocol!r} is not supported (http/protobuf or grpc)")


def _sampler(env: Mapping[str, str], ratio: float) -> Any:
    """``OTEL_TRACES_SAMPLER`` read from `env` (the SDK would read only the process's environment), always parent
    based: a saga's spans follow the decision its root context carries (`sagas.adapters.tracing.sampled`, by the
    saga id), so the processes of a trace agree whichever ratio sampler was named."""
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    root = (sampling.ALWAYS_OFF if name.endswith("always_off") else
            sampling.TraceIdRatioBased(ratio) if name.endswith("traceidratio") else sampling.ALWAYS_ON)
    return sampling.ParentBased(root)


def configure_tracing(enabled: bool | None, *, service_name: str, set_global: bool = False,
                      environ: Mapping[str, str] | None = None) -> TracingSetup | None:
    """The tracing of this process, or None when off (see the module docstring). `set_global`: make a provider
    built here the process's global one (what `sagas serve` does; a library call leaves the global alone)."""
    env = os.environ if environ is None else environ
    if not tracing_wanted(enabled, env):
        return None
    ratio = sampling_ratio(env)
    current = trace.get_tracer_provider()
    if type(current).__module__.startswith("opentelemetry.sdk"):  # already instrumented: spans go there
        return TracingSetup(current, ratio, owned=False)
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise TracingUnavailable(f"tracing needs the OpenTelemetry SDK: {INSTALL_HINT}") from None
    exporters = _exporters(env)
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; what is passed to it wins over them.
    provider = TracerProvider(resource=Resource.create({} if named else {SERVICE_NAME: service_name}),
                              sampler=_sampler(env, ratio))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if set_global:
        trace.set_tracer_provider(provider)
    return TracingSetup(provider, ratio, owned=True)
