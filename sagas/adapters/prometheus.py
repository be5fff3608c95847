"""Prometheus metrics of an engine, as an observer (`sagas.engine.ports.Observer`): `EngineMetrics`.

    metrics = EngineMetrics(stuck_after=300)
    engine = Engine(store=store, broker=broker, definitions=[...], observer=metrics)
    metrics.bind(engine)           # the scrape-time gauges read its store and broker
    app = create_app(target=engine, metrics=metrics)

Each engine has its own `CollectorRegistry` (never the process-global one), so two engines in a process, or a test
after another, never share a series. Counters and histograms are updated by the observer calls, after the commit or
publish they describe, in O(entries) with no I/O. Gauges of what the database holds (sagas by status, parked,
stuck, outbox backlog and age, due timers, stored dead letters) and the consumer lag are read when `/metrics` is
scraped, in a few grouped queries, and cached for `cache_seconds`: the cost of a scrape does not grow with the
sagas run, and several engines on one database report the same numbers (aggregate them with `max`, not `sum`).
Labels are of low cardinality only: definition, version, step, kind, outcome, status, topic, partition, reason
class, loop and component; never a saga id. docs/observability.md lists every metric.
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sagas.engine.ports import (
    Backlog,
    Broker,
    Delivery,
    Gauges,
    NoObserver,
    OutboxMessage,
    Partition,
    Store,
    UnitOfWork,
)
from sagas.engine.state import SagaInstance, SagaStatus, TimerSpec

__all__ = ["EngineMetrics", "ParticipantMetrics", "dead_letter_class"]

# Round trips run from milliseconds (a local participant) to minutes (a human in the loop).
_ROUND_TRIP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86400)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

_SETTLED = {"saga.completed": SagaStatus.COMPLETED, "saga.compensated": SagaStatus.COMPENSATED,
            "saga.parked": SagaStatus.FAILED}
# History entries that end a command's or compensation's attempt, with the round trip's outcome.
_ANSWERED = {
    "step.succeeded": ("command", "success"), "step.failed": ("command", "failure"),
    "step.retry_scheduled": ("command", "retry"), "step.unknown": ("command", "retry"),
    "step.timed_out": ("command", "timeout"),
    "compensation.succeeded": ("compensation", "success"), "compensation.failed": ("compensation", "failure"),
    "compensation.retry_scheduled": ("compensation", "retry"),
    "compensation.timed_out": ("compensation", "timeout"),
}
_SENT = {"step.sent": "command", "compensation.sent": "compensation"}
_SENT_MAX = 100_000
"""Attempts in flight whose send time is remembered for their round trip; beyond, the oldest are forgotten."""


def dead_letter_class(reason: str, saga_id: str | None) -> str:
    """A dead letter's reason as one of a few classes (a label: the reasons themselves are unbounded)."""
    if reason.startswith("processing failed"):
        return "processing_failed"
    if reason.startswith("refused by the broker"):
        return "broker_refused"
    if reason.startswith("unknown saga"):
        return "unknown_saga"
    return "rejected" if saga_id is not None else "malformed"


class _Histogram(Collector):
    """A histogram family kept as plain integers per label values, turned into the Prometheus form when scraped.
    Observing is a `bisect` and two additions, with no lock: every observer call runs on the event loop's thread
    (a prometheus-client `Histogram.observe` takes two locks and walks the bounds). The series and buckets are those
    a prometheus-client `Histogram` would expose, without its ``_created`` samples."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._labels = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]
        self.series: dict[tuple[str, ...], list[Any]] = {}
        """Label values -> [count per bucket (the last: above every bound), sum]."""
        if not self.labelnames:
            self.child()
        registry.register(self)

    def child(self, *values: str) -> list[Any]:
        found = self.series.get(values)
        if found is None:
            found = self.series[values] = [[0] * (len(self.bounds) + 1), 0.0]
        return found

    def observe(self, value: float, *values: str) -> None:
        series = self.child(*values)
        series[0][bisect_left(self.bounds, value)] += 1
        series[1] += value

    def observe_all(self, values: Sequence[float]) -> None:
        """Several observations of the unlabelled series, in one call."""
        counts, bounds = self.child()[0], self.bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        self.series[()][1] += sum(values)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def describe(self) -> Any:
        yield self._family()

    def collect(self) -> Any:
        family = self._family()
        for values, (counts, total) in list(self.series.items()):
            cumulative = list(itertools.accumulate(counts))  # the last, above every bound, is +Inf's
            family.add_metric(list(values), [*zip(self._labels, cumulative[:-1], strict=True),
                                             ("+Inf", cumulative[-1])], total)
        yield family


class EngineMetrics(NoObserver):
    """The engine's metrics in their own registry; an `Observer`, and what `/metrics` serves."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        stuck_after: float = 300.0,
        cache_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`stuck_after`: seconds without a transition after which a running or compensating saga counts as stuck;
        `cache_seconds`: how long one reading of the store's gauges serves scrapes."""
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.stuck_after = stuck_after
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._store: Store | None = None
        self._broker: Broker | None = None
        self._consumed: tuple[list[str], str] | None = None
        self._sampled_at = -float("inf")
        self._sent: OrderedDict[tuple[str, str, str, int], float] = OrderedDict()
        self._lag_series: set[Partition] = set()
        # Labelled children by label values: `labels()` takes a lock and builds a key on every call.
        self._children: dict[tuple[Any, ...], Any] = {}
        r = self.registry
        self.started = Counter("sagas_started_total", "Sagas started.", ["definition", "version"], registry=r)
        self.settled = Counter("sagas_settled_total", "Sagas settled (completed, compensated, or parked as failed).",
                               ["definition", "status"], registry=r)
        self.duration = _Histogram("sagas_saga_duration_seconds", "Saga start to settled.",
                                   ["definition", "status"], _DURATION_BUCKETS, r)
        self.round_trip = _Histogram(
            "sagas_step_round_trip_seconds", "A step attempt's command (or compensation) committed to its reply "
            "applied (or its timeout fired).", ["definition", "step", "kind", "outcome"], _ROUND_TRIP_BUCKETS, r)
        self.publish_latency = _Histogram("sagas_publish_latency_seconds",
                                          "Outbox message committed to acknowledged by the broker.", (),
                                          _FAST_BUCKETS, r)
        self.published_total = Counter("sagas_messages_published_total", "Messages acknowledged by the broker.",
                                 registry=r)
        self.fetched_total = Counter("sagas_replies_fetched_total", "Replies fetched by the engine's consumer.",
                               ["topic"], registry=r)
        self.commit_seconds = _Histogram("sagas_commit_duration_seconds", "One unit of work's transaction.", (),
                                         _FAST_BUCKETS, r)
        self.commit_batch = _Histogram("sagas_commit_batch_sagas", "Sagas written by one transaction.", (),
                                       _BATCH_BUCKETS, r)
        self.dead_letters_total = Counter("sagas_dead_letters_total", "Messages put in the dead letters.",
                                          ["reason"], registry=r)
        self.duplicates = Counter("sagas_duplicate_replies_total", "Replies dropped as already applied.",
                                  registry=r)
        self.late = Counter("sagas_ignored_replies_total",
                            "Replies ignored: late (a superseded attempt) or for a settled saga.", registry=r)
        self.timers_fired_total = Counter("sagas_timers_fired_total", "Due timers fired.", registry=r)
        self.timer_lateness = _Histogram("sagas_timer_lateness_seconds", "A timer's firing after its due time.",
                                         (), _FAST_BUCKETS, r)
        self.outages = Counter("sagas_outages_total", "Store or broker outages begun.", ["component"], registry=r)
        self.down = Gauge("sagas_component_down", "1 while the store or broker is out.", ["component"], registry=r)
        self.restarts = Counter("sagas_loop_restarts_total", "Engine loops restarted after failing.", ["loop"],
                                registry=r)
        # Sampled at scrape time.
        self.by_status = Gauge("sagas_sagas", "Sagas in the database by status.", ["status"], registry=r)
        self.parked = Gauge("sagas_parked_sagas", "Sagas parked (failed) until an operator acts.", registry=r)
        self.stuck = Gauge("sagas_stuck_sagas", "Running or compensating sagas without a transition for longer "
                           "than the stuck threshold.", registry=r)
        self.stuck_threshold = Gauge("sagas_stuck_threshold_seconds", "The stuck threshold.", registry=r)
        self.outbox_pending = Gauge("sagas_outbox_pending_messages", "Committed messages not yet published.",
                                    registry=r)
        self.outbox_age = Gauge("sagas_outbox_oldest_age_seconds", "Age of the oldest unpublished message "
                                "(0 when none waits).", registry=r)
        self.timers_due = Gauge("sagas_timers_due", "Timers due and not yet fired.", registry=r)
        self.dead_letters_stored = Gauge("sagas_dead_letters_stored", "Dead letters stored, not replayed.",
                                         registry=r)
        self.lag = Gauge("sagas_consumer_lag_messages", "Messages of the engine's reply topic not yet committed by "
                         "its group (Kafka: end offset - committed offset; db://: messages waiting).",
                         ["topic", "partition"], registry=r)
        self.scrape_errors = Counter("sagas_metrics_sample_errors_total",
                                     "Scrape-time readings of the store or broker that failed.", ["component"],
                                     registry=r)
        self.stuck_threshold.set(stuck_after)
        for component in ("store", "broker"):
            self.down.labels(component).set(0)
            self.outages.labels(component)

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def bind(self, engine: Any) -> None:
        """Sample `engine`'s store and broker at scrape time (its reply topic and group for the lag)."""
        self.bind_components(engine.store, engine.broker, [engine.settings.reply_topic], engine.settings.group)

    def bind_components(self, store: Store | None, broker: Broker | None, topics: Sequence[str], group: str) -> None:
        self._store, self._broker = store, broker
        self._consumed = (list(topics), group)

    # ---- observer -----------------------------------------------------------------------------------

    def committed(self, work: UnitOfWork, seconds: float) -> None:
        self.commit_seconds.observe(seconds)
        written = len(work.inserts) + len(work.updates)
        if written:
            self.commit_batch.observe(written)
        for instance in work.inserts:
            self._child(self.started, instance.definition, str(instance.definition_version)).inc()
        if work.history:
            self._history(work)
        for dead in work.dead_letters:
            self.dead_letters_total.labels(dead_letter_class(dead.reason, dead.saga_id)).inc()

    def _history(self, work: UnitOfWork) -> None:
        instances: dict[str, SagaInstance] | None = None
        sent = self._sent
        for record in work.history:
            entry = record.entry
            kind_type = entry.type
            if kind_type in _SENT and entry.step is not None and entry.attempt is not None:
                key = (record.saga_id, entry.step, _SENT[kind_type], entry.attempt)
                sent[key] = entry.at
                sent.move_to_end(key)
                if len(sent) > _SENT_MAX:
                    sent.popitem(last=False)
                continue
            answered = _ANSWERED.get(kind_type)
            if answered is not None:
                if entry.step is None or entry.attempt is None:
                    continue
                at = sent.pop((record.saga_id, entry.step, answered[0], entry.attempt), None)
                if at is None:
                    continue  # sent before this engine started, or already answered (retry after a timeout)
                if instances is None:
                    instances = {i.id: i for i in (*work.inserts, *work.updates)}
                instance = instances.get(record.saga_id)
                definition = instance.definition if instance is not None else "unknown"
                self.round_trip.observe(max(entry.at - at, 0.0), definition, entry.step, answered[0], answered[1])
                continue
            status = _SETTLED.get(kind_type)
            if status is not None:
                if instances is None:
                    instances = {i.id: i for i in (*work.inserts, *work.updates)}
                instance = instances.get(record.saga_id)
                if instance is None:
                    continue
                self._child(self.settled, instance.definition, status.value).inc()
                self.duration.observe(max(entry.at - instance.created_at, 0.0), instance.definition, status.value)
            elif kind_type == "message.duplicate":
                self.duplicates.inc()
            elif kind_type == "message.ignored":
                self.late.inc()

    def published(self, messages: Sequence[OutboxMessage], seconds: float) -> None:
        now = self.clock()
        self.published_total.inc(len(messages))
        self.publish_latency.observe_all([max(now - message.created_at, 0.0) for message in messages])

    def outage(self, component: Literal["store", "broker"], down: bool) -> None:
        if down:
            self.outages.labels(component).inc()
        self.down.labels(component).set(1 if down else 0)

    def loop_failed(self, loop: str, error: BaseException) -> None:
        self.restarts.labels(loop).inc()

    def timers_fired(self, timers: Sequence[TimerSpec], now: float) -> None:
        self.timers_fired_total.inc(len(timers))
        self.timer_lateness.observe_all([max(now - timer.due_at, 0.0) for timer in timers])

    def fetched(self, deliveries: Sequence[Delivery]) -> None:
        if len(deliveries) == 1 or len({d.message.topic for d in deliveries}) == 1:
            self._child(self.fetched_total, deliveries[0].message.topic).inc(len(deliveries))
            return
        for delivery in deliveries:
            self._child(self.fetched_total, delivery.message.topic).inc()

    # ---- scrape -------------------------------------------------------------------------------------

    async def sample(self) -> None:
        """Read the store's gauges and the consumer lag, unless read within the last `cache_seconds`."""
        now = self.clock()
        if now - self._sampled_at < self.cache_seconds:
            return
        self._sampled_at = now
        if isinstance(self._store, Gauges):
            try:
                gauges = await self._store.gauges(now, self.stuck_after)
            except Exception:  # a scrape during an outage still serves the counters (and sagas_component_down)
                self.scrape_errors.labels("store").inc()
            else:
                for status, count in gauges.by_status.items():
                    self.by_status.labels(status.value).set(count)
                self.parked.set(gauges.by_status.get(SagaStatus.FAILED, 0))
                self.stuck.set(gauges.stuck)
                self.outbox_pending.set(gauges.outbox_pending)
                oldest = gauges.outbox_oldest_at
                self.outbox_age.set(0.0 if oldest is None else max(now - oldest, 0.0))
                self.timers_due.set(gauges.timers_due)
                self.dead_letters_stored.set(gauges.dead_letters)
        if isinstance(self._broker, Backlog) and self._consumed is not None:
            topics, group = self._consumed
            await self._sample_lag(self._broker, topics, group)

    async def _sample_lag(self, broker: Backlog, topics: list[str], group: str) -> None:
        try:
            backlog = await broker.backlog(topics, group)
        except Exception:
            self.scrape_errors.labels("broker").inc()
            return
        for partition in self._lag_series - backlog.keys():  # a partition no longer reported: drop its series
            self.lag.remove(partition[0], str(partition[1]))
        for (topic, number), lag in backlog.items():
            self.lag.labels(topic, str(number)).set(lag)
        self._lag_series = set(backlog)

    async def exposition(self) -> tuple[bytes, str]:
        """What `/metrics` serves: the Prometheus text format, gauges sampled first."""
        await self.sample()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StatsCollector(Collector):
    """The participant's own counters (`Participant.stats`), read when scraped: the worker keeps counting them
    whether or not anything scrapes, so nothing is added to its hot path."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def collect(self) -> Any:
        participant = self.worker.participant
        family = CounterMetricFamily("sagas_participant_commands", "Commands handled by a participant, by outcome "
                                     "(handled, deduplicated, failed, retryable, malformed).",
                                     labels=["participant", "outcome"])
        for outcome, count in sorted(participant.stats.items()):
            family.add_metric([participant.name, outcome], count)
        yield family


class ParticipantMetrics:
    """A participant worker's metrics: its command counters and its command consumer's lag, in their own
    registry (what its `/metrics` serves)."""

    def __init__(self, worker: Any, *, registry: CollectorRegistry | None = None, cache_seconds: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.worker = worker
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._sampled_at = -float("inf")
        self._lag_series: set[Partition] = set()
        self.registry.register(_StatsCollector(worker))
        self.lag = Gauge("sagas_participant_consumer_lag_messages", "Commands of the participant's topic not yet "
                         "committed by its group.", ["participant", "topic", "partition"], registry=self.registry)
        self.scrape_errors = Counter("sagas_metrics_sample_errors_total",
                                     "Scrape-time readings of the broker that failed.", ["component"],
                                     registry=self.registry)

    async def sample(self) -> None:
        now = self.clock()
        if now - self._sampled_at < self.cache_seconds:
            return
        self._sampled_at = now
        broker, participant = self.worker.broker, self.worker.participant
        if not isinstance(broker, Backlog):
            return
        try:
            backlog = await broker.backlog([participant.topic], participant.group)
        except Exception:
            self.scrape_errors.labels("broker").inc()
            return
        for topic, number in self._lag_series - backlog.keys():
            self.lag.remove(participant.name, topic, str(number))
        for (topic, number), lag in backlog.items():
            self.lag.labels(participant.name, topic, str(number)).set(lag)
        self._lag_series = set(backlog)

    async def exposition(self) -> tuple[bytes, str]:
        await self.sample()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
