"""How rows and messages are grouped on their way to PostgreSQL and Kafka (the real servers are in tests/contract)."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner

from sagas.adapters.kafka import _partition
from sagas.adapters.sql.writes import _multi_row_dollar, _row_groups


def test_keys_land_in_the_partition_of_kafkas_default_partitioner() -> None:
    rng = random.Random(7)
    for _ in range(500):
        key = rng.randbytes(rng.randint(0, 40))
        partitions = sorted(rng.sample(range(12), rng.randint(1, 12)))
        assert _partition(key, partitions) == DefaultPartitioner()(key, partitions, partitions)


def test_a_one_row_insert_becomes_a_multi_row_one_with_renumbered_parameters() -> None:
    sql = "INSERT INTO outbox (id, value) VALUES ($1::VARCHAR, $2::BYTEA) RETURNING outbox.seq"
    assert _multi_row_dollar(sql, 3) == (
        "INSERT INTO outbox (id, value) VALUES ($1::VARCHAR, $2::BYTEA), ($3::VARCHAR, $4::BYTEA), "
        "($5::VARCHAR, $6::BYTEA)"
    )
    upsert = "INSERT INTO timers (id, due) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET due = excluded.due"
    assert _multi_row_dollar(upsert, 2) == (
        "INSERT INTO timers (id, due) VALUES ($1, $2), ($3, $4) ON CONFLICT (id) DO UPDATE SET due = excluded.due"
    )


def test_rows_are_grouped_in_order_and_none_is_lost() -> None:
    sql = "INSERT INTO t (a, b) VALUES ($1, $2)"
    for count in (1, 2, 63, 64, 65, 100, 129, 500):
        rows = [(n, str(n)) for n in range(count)]
        groups = list(_row_groups(sql, rows))
        flat = [value for _, values in groups for value in values]
        assert flat == [value for row in rows for value in row]
        for statement, values in groups:
            assert statement.count("(") - 1 == len(values) // 2  # one group of parameters per row
