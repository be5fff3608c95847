"""Tracing switched on as OpenTelemetry users do it, end to end: a real `sagas serve --tracing` process and a
participant process configured only by the standard OTEL_* environment export over OTLP/HTTP (protobuf) to a
collector this test runs, which decodes what they sent: one trace per saga, parented across the processes."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from sagas.adapters import open_store
from sagas.adapters.tracing import saga_context
from sagas.definitions import load_file
from sagas.engine.admin import SagaAdmin
from sagas.engine.state import SagaStatus
from tests.integration.test_crash import DEFINITION, PARTICIPANT_SCRIPT, SAGAS_CLI

DEADLINE = 60.0


class Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP receiver on 127.0.0.1: every span posted to /v1/traces, with its resource's service.name."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Receive)
        self.spans: list[tuple[str, ProtoSpan]] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def received(self) -> list[tuple[str, ProtoSpan]]:
        with self.lock:
            return list(self.spans)


class _Receive(http.server.BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        ok = self.path == "/v1/traces" and self.headers.get("Content-Type") == "application/x-protobuf"
        if ok:
            request = ExportTraceServiceRequest.FromString(body)
            with self.server.lock:
                for resource_spans in request.resource_spans:
                    service = next((a.value.string_value for a in resource_spans.resource.attributes
                                    if a.key == "service.name"), "")
                    for scope in resource_spans.scope_spans:
                        self.server.spans.extend((service, span) for span in scope.spans)
        answer = ExportTraceServiceResponse().SerializeToString() if ok else b""
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def attributes(span: ProtoSpan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attribute in span.attributes:
        value = attribute.value
        out[attribute.key] = value.int_value if value.HasField("int_value") else value.string_value
    return out


async def test_serve_and_a_participant_export_one_trace_per_saga_over_otlp(tmp_path: Path) -> None:
    """`sagas serve --tracing` and a participant process with only OTEL_TRACES_EXPORTER=otlp export every span of
    two sagas to an OTLP/HTTP collector: per saga one trace, each participant's `process` span (service named by
    OTEL_SERVICE_NAME) the child of the engine's `send` span (service `sagas-engine`), and stopping both
    processes flushes what was batched."""
    db = tmp_path / "engine.db"
    store = open_store(str(db))
    await store.initialize()
    await store.save_definition(load_file(DEFINITION))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SAGAS_", "OTEL_"))}
    with collector() as otlp:
        common = {**base, "SAGAS_RELAY_INTERVAL": "0.2", "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
                  "OTEL_BSP_SCHEDULE_DELAY": "200"}
        ready = tmp_path / "participants.ready"
        with (tmp_path / "participants.log").open("wb") as log:
            participants = await asyncio.create_subprocess_exec(
                sys.executable, str(PARTICIPANT_SCRIPT), "--db", str(db), "--ledger", str(tmp_path / "ledger.db"),
                "--names", "inventory,payment,shipping", "--transient", "0", "--ready", str(ready),
                stdout=log, stderr=asyncio.subprocess.STDOUT,
                env={**common, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_SERVICE_NAME": "shop-participants"},
            )
        with (tmp_path / "engine.log").open("wb") as log:
            engine = await asyncio.create_subprocess_exec(
                *SAGAS_CLI, "serve", "--definitions", str(DEFINITION), "--db", str(db), "--broker", "db://",
                "--tracing", "--json-logs", stdout=asyncio.subprocess.DEVNULL, stderr=log, env=common,
            )
        try:
            deadline = time.monotonic() + DEADLINE
            while not ready.exists():
                assert participants.returncode is None, "participants exited: see participants.log"
                assert time.monotonic() < deadline, "participants not ready"
                await asyncio.sleep(0.05)  # polling the ready file
            admin = SagaAdmin(store)
            ids = [(await admin.start("crash_order", {"order_id": f"o-{n}", "amount": 10 + n}, key=f"o-{n}"))[0]
                   for n in range(2)]
            while True:
                found = await store.load(ids)
                if all(found[i].status == SagaStatus.COMPLETED for i in ids):
                    break
                assert engine.returncode is None, "engine exited: see engine.log"
                assert time.monotonic() < deadline, {i: found[i].status for i in ids}
                await asyncio.sleep(0.1)
        finally:
            for proc in (engine, participants):
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            codes = [await asyncio.wait_for(proc.wait(), DEADLINE) for proc in (engine, participants)]
            await store.close()
        assert codes == [0, 0], (codes, (tmp_path / "engine.log").read_text()[-2000:])
        spans = otlp.received()  # both processes flushed on SIGTERM: nothing more to wait for

    assert {service for service, _ in spans} == {"sagas-engine", "shop-participants"}
    for saga_id in ids:
        trace_id = trace_id_of(saga_id)
        mine = [(service, span) for service, span in spans if attributes(span).get("sagas.saga.id") == saga_id]
        assert {span.trace_id for _, span in mine} == {trace_id}
        sends = {(attributes(s)["sagas.step"], attributes(s)["sagas.attempt"]): s for service, s in mine
                 if service == "sagas-engine" and s.kind == ProtoSpan.SPAN_KIND_PRODUCER}
        handled = {(attributes(s)["sagas.step"], attributes(s)["sagas.attempt"]): s for service, s in mine
                   if service == "shop-participants" and s.kind == ProtoSpan.SPAN_KIND_CONSUMER}
        # The first command was written by SagaAdmin.start (no engine span, no headers): its handling is a child
        # of the saga's root; every later one (a retry too, should the loaded machine make a step time out) was
        # sent by the engine, and its handling is the child of its `send` span.
        assert ("reserve", 1) not in sends
        assert {step for step, _ in sends} >= {"charge", "ship"}
        assert {step for step, _ in handled} == {"reserve", "charge", "ship"}
        root = root_span_id(saga_id)
        for key, span in handled.items():
            assert span.parent_span_id == (root if key == ("reserve", 1) else sends[key].span_id)
            assert span.name == f"process {attributes(span)['messaging.destination.name']}"
            assert attributes(span)["messaging.system"] == "sagas.db"
        assert all(attributes(span)["messaging.system"] == "sagas.db" for span in sends.values())


def trace_id_of(saga_id: str) -> bytes:
    return trace.get_current_span(saga_context(saga_id)).get_span_context().trace_id.to_bytes(16, "big")


def root_span_id(saga_id: str) -> bytes:
    return trace.get_current_span(saga_context(saga_id)).get_span_context().span_id.to_bytes(8, "big")
