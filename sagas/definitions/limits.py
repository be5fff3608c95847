"""Every bound on what a definition or a saga's start may carry, named once.

The definition model, the start checks and the store's tables (`sagas.adapters.sql.tables`) all read these, so a
value the model accepts always fits its column on every store (SQLite does not enforce a VARCHAR's length itself,
PostgreSQL refuses the whole commit), and a value one past a limit is refused with a clear error before anything is
written. docs/definitions.md lists them in one table; a test checks that table against this module.
"""

from __future__ import annotations

NAME_CHARS = 100
"""Saga names, step and group names, participant names: the ``definition`` and ``step`` columns hold 100."""

REPLY_TYPE_CHARS = 200
"""Reply types (a step's ``success`` and ``failure`` lists): a participant records them in a 200-character column."""

DEFAULT_REPLY_SUFFIXES = (".succeeded", ".failed")
COMMAND_TYPE_CHARS = REPLY_TYPE_CHARS - max(map(len, DEFAULT_REPLY_SUFFIXES))
"""Command and compensation types: short enough that the default reply types, ``<command>.succeeded`` and
``<command>.failed``, are still reply types."""

TOPIC_CHARS = 249
"""A step's ``topic``: Apache Kafka's own limit on a topic name (the outbox's ``topic`` column holds 300)."""

VERSION_MAX = 2**31 - 1
"""A definition's ``version``: the largest value of the INTEGER columns that store it (PostgreSQL's 32 bits)."""

IDEMPOTENCY_KEY_CHARS = 200
"""An idempotency key given at start (``saga_instances.idempotency_key``)."""

MESSAGE_ID_CHARS = 300
"""The store's columns of message and timer ids (outbox, inbox, timers, dead letters) and of message keys."""

STORED_SAGA_ID_CHARS = 200
"""The store's saga id columns: what a reply's ``ce_subject`` may hold (it names a saga, known or not)."""

SAGA_ID_CHARS = 100
"""A saga id given at start. A saga's id begins each of its message and timer ids
(``<saga id>/timer/compensation_timeout/<step>/<attempt>``), which must fit `MESSAGE_ID_CHARS`; with a step name
of up to `NAME_CHARS` an id of 100 leaves room to spare. (Generated ids are UUIDs, 36 characters.)"""

INPUT_BYTES = 256 * 1024
"""A saga's input, as compact JSON (UTF-8). It is stored with the saga and commands copy parts of it; a command must
stay well under the broker's message limit (1,000,000 bytes)."""

INPUT_DEPTH = 64
"""Nesting of a saga's input (objects and lists within each other), as for a definition file."""
