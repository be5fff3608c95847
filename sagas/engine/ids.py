"""Time-ordered ids (UUIDv7, RFC 9562) for everything the engine mints: saga ids, operator command ids, dead letters.

Random UUIDv4 saga ids scatter every index they key (instances, history, outbox, inbox, timers): each insert lands
on a random B-tree page. UUIDv7 starts with the Unix time in milliseconds, so new rows go to the right-hand end of
the indexes, as with a sequence, while ids stay unguessable enough (74 random bits) and need no coordination
between engines. Within one millisecond a process keeps its ids increasing (RFC 9562 §6.2, method 3: the random
bits are taken as a counter and advanced), so ids minted by one engine sort in the order they were made.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_last_rand = 0
_RAND_BITS = 74
_RAND_MAX = (1 << _RAND_BITS) - 1


def uuid7() -> uuid.UUID:
    """A new UUIDv7: 48 bits of Unix milliseconds, version 7, variant 10, 74 bits increasing within a millisecond."""
    global _last_ms, _last_rand
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            rand = int.from_bytes(os.urandom(10), "big") & _RAND_MAX
            rand &= ~(1 << (_RAND_BITS - 1))  # top bit clear: room to count up within the millisecond
        else:  # same millisecond (or the clock stepped back): count up from the last id
            ms = _last_ms
            rand = _last_rand + 1 + (int.from_bytes(os.urandom(2), "big") & 0xFFF)
            if rand > _RAND_MAX:  # ~2^73 ids in one millisecond: borrow the next one
                ms += 1
                rand = int.from_bytes(os.urandom(10), "big") & (_RAND_MAX >> 1)
        _last_ms, _last_rand = ms, rand
    rand_a = rand >> 62  # 12 bits
    rand_b = rand & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)


def new_id() -> str:
    """A new time-ordered id in the canonical text form (36 characters)."""
    return str(uuid7())
