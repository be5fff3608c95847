"""How messages are grouped on their way to Kafka (the real broker is in tests/contract)."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner

from sagas.adapters.kafka import _partition


def test_keys_land_in_the_partition_of_kafkas_default_partitioner() -> None:
    rng = random.Random(7)
    for _ in range(500):
        key = rng.randbytes(rng.randint(0, 40))
        partitions = sorted(rng.sample(range(12), rng.randint(1, 12)))
        assert _partition(key, partitions) == DefaultPartitioner()(key, partitions, partitions)
