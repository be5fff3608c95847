"""Formatting for people, shared by the CLI, the HTTP API and the web console: rounded durations, short saga ids,
dead letters in bounded form."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sagas.engine.ports import DeadLetter

LIST_PREVIEW_BYTES = 512
"""Body bytes a dead letter shows in a list."""
SHOW_PREVIEW_BYTES = 4096
"""Body bytes a dead letter shows on its own."""
HEADER_PREVIEW_CHARS = 300

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


def dead_letter_json(dead: DeadLetter, preview: int) -> dict[str, Any]:
    """A dead letter in bounded form: at most `preview` bytes of its body and a bounded part of each header, with
    the size and SHA-256 of what arrived, so that neither a list nor one letter is larger than a screenful, whatever
    the message was (the whole stored body is asked for on its own: `dlq show --full`, the API's `/body`)."""
    value = dead.message.value
    return {
        "id": dead.id, "reason": dead.reason, "saga_id": dead.saga_id, "at": dead.at, "replayed_at": dead.replayed_at,
        "topic": dead.message.topic, "key": dead.message.key,
        "headers": {k: v[:HEADER_PREVIEW_CHARS * 4].decode("utf-8", "replace")[:HEADER_PREVIEW_CHARS]
                    for k, v in dead.message.headers},
        "value": value[:preview].decode("utf-8", "replace"),
        "size": dead.size, "sha256": dead.sha256, "kept_bytes": len(value), "truncated": dead.truncated,
        "preview_bytes": min(len(value), preview),
    }
