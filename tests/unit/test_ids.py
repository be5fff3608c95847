"""Time-ordered ids: what the engine mints sorts by creation, is a valid UUIDv7, and never repeats."""

from __future__ import annotations

import itertools
import threading
import time
import uuid

from sagas.engine.ids import new_id, uuid7


def test_ids_are_version_7_with_the_rfc_variant() -> None:
    """Every id is a UUID of version 7 and the RFC 9562 variant, in the 36-character text form."""
    for _ in range(1000):
        text = new_id()
        value = uuid.UUID(text)
        assert len(text) == 36
        assert value.version == 7
        assert value.variant == uuid.RFC_4122


def test_ids_carry_the_time_they_were_made() -> None:
    """The first 48 bits are the Unix time in milliseconds at which the id was minted."""
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert before <= value.int >> 80 <= after


def test_ids_made_one_after_another_sort_in_that_order() -> None:
    """Ids minted in a row, many within the same millisecond, are strictly increasing as text and as numbers."""
    ids = [new_id() for _ in range(50_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    values = [uuid.UUID(i).int for i in ids]
    assert all(a < b for a, b in itertools.pairwise(values))


def test_ids_from_several_threads_never_collide() -> None:
    """Threads minting at once get distinct ids."""
    found: list[list[str]] = [[] for _ in range(4)]

    def mint(bucket: list[str]) -> None:
        bucket.extend(new_id() for _ in range(10_000))

    threads = [threading.Thread(target=mint, args=(bucket,)) for bucket in found]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for bucket in found for i in bucket]
    assert len(set(every)) == len(every)
    for bucket in found:
        assert bucket == sorted(bucket)
