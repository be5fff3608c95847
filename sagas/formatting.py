"""Formatting for people, shared by the CLI and the web console: rounded durations and short saga ids."""

from __future__ import annotations

from collections.abc import Sequence

SHORT_ID = 12
"""Characters of a saga id `sagas list` shows: its end. Saga ids are UUIDv7, which begin with the time (sagas of
one second share their first 10 or so characters) and end with 48 random bits: the last 12 characters tell one
saga among a million with a chance of a clash of 1 in ~500; a clash on one page is resolved by showing more."""


def short_ids(ids: Sequence[str], shortest: int = SHORT_ID) -> dict[str, str]:
    """For each id, its shortest ending (at least `shortest` characters) that no other id of `ids` ends with.

    Unique among the ids shown; every command accepts an id's end (or start) and refuses one that several sagas'
    ids share, naming two of them.
    """
    ordered = sorted({saga_id[::-1] for saga_id in ids})
    need: dict[str, int] = {}
    for index, reversed_id in enumerate(ordered):
        length = shortest
        for other in ordered[max(0, index - 1): index] + ordered[index + 1: index + 2]:
            common = next((i for i, (a, b) in enumerate(zip(reversed_id, other, strict=False)) if a != b),
                          min(len(reversed_id), len(other)))
            length = max(length, common + 1)
        need[reversed_id[::-1]] = length
    return {saga_id: saga_id[-need[saga_id]:] for saga_id in ids}


def duration(seconds: float | None) -> str:
    """Rounded for a person: 850ms, 1.09s, 42s, 3m05s, 2h10m, 3d4h."""
    if seconds is None:
        return "-"
    if seconds < 0:
        return "-" + duration(-seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"
