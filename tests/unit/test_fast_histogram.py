"""The engine's histograms (plain integers, turned into the Prometheus form when scraped) expose exactly what a
prometheus-client Histogram exposes for the same observations, boundary values included."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from sagas.adapters.prometheus import _Histogram

BUCKETS = (0.005, 0.01, 0.1, 1, 2.5, 10)


def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {(s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
            for family in registry.collect() for s in family.samples if not s.name.endswith("_created")}


def test_the_same_observations_expose_the_same_samples() -> None:
    """Labelled and unlabelled, one by one or in a batch: every bucket, count and sum as prometheus-client's."""
    rng = random.Random(3)
    values = [*BUCKETS, 0.0, 11.0, *(rng.uniform(0, 12) for _ in range(500))]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    labelled = _Histogram("x_seconds", "X.", ["step"], BUCKETS, ours)
    unlabelled = _Histogram("y_seconds", "Y.", (), BUCKETS, ours)
    reference_x = Histogram("x_seconds", "X.", ["step"], buckets=BUCKETS, registry=theirs)
    reference_y = Histogram("y_seconds", "Y.", buckets=BUCKETS, registry=theirs)
    assert samples(ours) == samples(theirs)  # the unlabelled series exists, at zero, before any observation
    for n, value in enumerate(values):
        labelled.observe(value, f"s{n % 3}")
        reference_x.labels(f"s{n % 3}").observe(value)
    unlabelled.observe_all(values)
    for value in values:
        reference_y.observe(value)
    assert samples(ours) == samples(theirs)
