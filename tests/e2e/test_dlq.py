"""`sagas dlq` on dead letters of any size: bounded previews, the stored body on request, no faithless replay."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from sagas.adapters.sql import SqlStore
from sagas.engine.ports import BrokerMessage, UnitOfWork
from sagas.engine.processor import DEAD_LETTER_MAX_BYTES, bounded_letter
from tests.e2e.test_cli import as_json, one_clear_line, sagas

BIG = b'{"blob": "' + b"x" * 5_000_000 + b'"}'


def seed(db: Path) -> None:
    """Two dead letters as the engine records them: a 5 MB reply cut to the default prefix, and a small one."""
    headers = (("ce_id", b"r-big"), ("ce_sagakind", b"reply"), ("ce_subject", b"s-1"))

    async def go() -> None:
        store = SqlStore(f"sqlite+aiosqlite:///{db}")
        await store.initialize()
        letters = [
            bounded_letter("dl/big", "message of 5000012 bytes exceeds the limit of 1000000",
                           BrokerMessage(topic="sagas.replies", value=BIG, headers=headers), 1.0e9, saga_id="s-1",
                           max_bytes=DEAD_LETTER_MAX_BYTES),
            bounded_letter("dl/small", "value is not JSON", BrokerMessage(topic="sagas.replies", value=b"{nope"),
                           1.0e9 + 1, saga_id=None, max_bytes=DEAD_LETTER_MAX_BYTES),
        ]
        await store.commit(UnitOfWork(dead_letters=letters))
        await store.close()

    asyncio.run(go())


def test_show_prints_a_bounded_preview_and_says_what_was_cut(tmp_path: Path) -> None:
    """`dlq show` of a 5 MB message prints a preview of a few KiB, its full size and SHA-256, and says on stderr
    that the body was truncated; stdout stays one JSON document."""
    db = tmp_path / "d.db"
    seed(db)
    result = sagas("dlq", "show", "dl/big", "--db", str(db))
    assert len(result.stdout) < 16_000
    shown = as_json(result)
    assert shown["size"] == len(BIG)
    assert shown["sha256"] == hashlib.sha256(BIG).hexdigest()
    assert (shown["truncated"], shown["kept_bytes"]) == (True, DEAD_LETTER_MAX_BYTES)
    assert "truncated" in result.stderr
    assert str(len(BIG)) in result.stderr
    small = sagas("dlq", "show", "dl/small", "--db", str(db))
    assert as_json(small)["value"] == "{nope"
    assert small.stderr == ""


def test_show_full_writes_the_stored_body_to_a_file(tmp_path: Path) -> None:
    """`--full FILE` writes the stored bytes exactly (the prefix of a truncated letter) and says how many."""
    db = tmp_path / "d.db"
    seed(db)
    out = tmp_path / "body.bin"
    result = sagas("dlq", "show", "dl/big", "--full", str(out), "--db", str(db))
    assert out.read_bytes() == BIG[:DEAD_LETTER_MAX_BYTES]
    assert f"wrote {DEAD_LETTER_MAX_BYTES} bytes" in result.stdout
    assert f"of {len(BIG)} bytes" in result.stdout


def test_list_json_stays_bounded_whatever_the_letters_hold(tmp_path: Path) -> None:
    """`dlq list --json` prints a short preview of each body, with its size and digest."""
    db = tmp_path / "d.db"
    seed(db)
    result = sagas("dlq", "list", "--json", "--db", str(db))
    assert len(result.stdout) < 8_000
    listed = {d["id"]: d for d in json.loads(result.stdout)}
    assert listed["dl/big"]["size"] == len(BIG)
    assert listed["dl/small"]["truncated"] is False


def test_replay_of_a_truncated_letter_is_refused_in_one_clear_line(tmp_path: Path) -> None:
    """A letter that kept only a prefix cannot be replayed faithfully: one line says so, nothing is marked."""
    db = tmp_path / "d.db"
    seed(db)
    one_clear_line(sagas("dlq", "replay", "dl/big", "--db", str(db), check=False), "cannot be replayed faithfully")
    assert as_json(sagas("dlq", "show", "dl/big", "--db", str(db)))["replayed_at"] is None
