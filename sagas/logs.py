"""structlog set-up: readable lines on a terminal, JSON lines otherwise (files, pipes, log shippers).

Standard-library logging (aiokafka, SQLAlchemy, alembic) goes through the same renderer, so `--json-logs` output is
JSON throughout, and a rate limit keeps a client library from flooding the log during an outage (aiokafka writes
thousands of lines while a broker is down).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog


class RateLimit(logging.Filter):
    """At most `per_second` records per logger per second; the number dropped is reported with the next one."""

    def __init__(self, per_second: int = 5) -> None:
        super().__init__()
        self.per_second = per_second
        self._windows: dict[str, tuple[int, int, int]] = {}  # logger → (second, kept, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        second = int(time.monotonic())
        window, kept, dropped = self._windows.get(record.name, (second, 0, 0))
        if window != second:
            if dropped:
                record.msg = f"{record.msg} ({dropped} similar lines dropped)"
            window, kept, dropped = second, 0, 0
        if kept >= self.per_second:
            self._windows[record.name] = (window, kept, dropped + 1)
            return False
        self._windows[record.name] = (window, kept + 1, dropped)
        return True


def add_trace_ids(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """With tracing on (OpenTelemetry imported by a tracing adapter), the ids of the span current when the line is
    logged. Without it nothing is imported and nothing added: a log line costs a dict look-up more."""
    otel = sys.modules.get("opentelemetry.trace")
    if otel is not None:
        context = otel.get_current_span().get_span_context()
        if context.is_valid:
            event.setdefault("trace_id", f"{context.trace_id:032x}")
            event.setdefault("span_id", f"{context.span_id:016x}")
    return event


def configure_logging(*, json: bool | None = None, level: str = "INFO") -> None:
    """Configure structlog and the standard library's logging. `json=None` picks JSON when stderr is not a TTY."""
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))  # libraries' INFO chatter is not the engine's business
