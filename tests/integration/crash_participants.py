"""Participant services for the crash test, run as their own OS process.

    python tests/integration/crash_participants.py --db ENGINE.db --ledger LEDGER.db --names inventory,payment \
        [--seed 1] [--transient 0.1] [--ready FILE] [--stats FILE]

Each named participant (inventory, payment, shipping) consumes its commands from the engine's durable queue
(``db://``: the broker tables in the engine's SQLite file) and records every effect in the ``ledger`` table of
its own database (tests/engine/support.py: no unique constraint, so a duplicate effect shows as a second row).
Payment declines amounts over 100 and shipping declines amounts ending in 7 (business failures, so those sagas
are compensated); any handler fails transiently with probability ``--transient`` (seeded), after writing its
ledger row, which the participant must roll back. Runs until SIGTERM or SIGINT, then writes its stats as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.engine.support`

from sagas.adapters import Broker, normalize_db_url, open_broker
from sagas.engine.wire import CommandMessage
from sagas.participant import BusinessFailure, Participant
from tests.engine.support import ledger_participant

COMMANDS = {
    "inventory": ("Reserve", "UndoReserve"),
    "payment": ("Charge", "UndoCharge"),
    "shipping": ("Ship", "UndoShip"),
}


def declined_by(amount: int) -> str | None:
    """The participant that declines an order of `amount`, if any (the saga's expected fate)."""
    if amount > 100:
        return "payment"
    if amount % 10 == 7:
        return "shipping"
    return None


class TransientError(Exception):
    """Not a declared business error: the participant rolls the effect back and replies 'retry'."""


def build(name: str, rng: random.Random, transient: float) -> Participant:
    command, compensation = COMMANDS[name]

    def act(message: CommandMessage) -> dict[str, Any]:
        if rng.random() < transient:
            raise TransientError(f"injected transient failure of {message.type}")
        if message.type == command and declined_by(int(message.data["amount"])) == name:
            raise BusinessFailure("declined", {"by": name})
        return {"by": name, "order": message.data["order"]}

    return ledger_participant(name, {command: act, compensation: act})


async def run(args: argparse.Namespace) -> None:
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    unknown = set(names) - set(COMMANDS)
    if unknown:
        raise SystemExit(f"unknown participant(s): {sorted(unknown)}; choose from {sorted(COMMANDS)}")
    rng = random.Random(args.seed)
    participants = [build(name, rng, args.transient) for name in names]
    broker = open_broker("db://", db_url=normalize_db_url(args.db))
    await serve_until_stopped(participants, broker, normalize_db_url(args.ledger), args,
                              banner=f"participants {names} serving; ledger {args.ledger}")


async def serve_until_stopped(
    participants: list[Participant], broker: Broker, database_url: str, args: argparse.Namespace, *, banner: str
) -> None:
    """Serve until SIGTERM/SIGINT; write `args.ready` once consuming and the stats to `args.stats` on exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for participant in participants:
                await stack.enter_async_context(participant.serve(broker=broker, database_url=database_url))
            if args.ready:
                await asyncio.to_thread(Path(args.ready).write_text, "ready\n")
            print(banner, flush=True)
            await stop.wait()
    finally:
        await broker.close()
    if args.stats:
        await asyncio.to_thread(Path(args.stats).write_text, json.dumps({p.name: p.stats for p in participants}))


def add_participant_arguments(parser: argparse.ArgumentParser, *, transient: float) -> None:
    """The options of `serve_until_stopped`'s processes (this script's and kafka_participants.py's)."""
    parser.add_argument("--ledger", required=True, help="This process's own SQLite file (ledger + dedup).")
    parser.add_argument("--names", required=True, help="Comma-separated: inventory, payment, shipping.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the transient-failure RNG.")
    parser.add_argument("--transient", type=float, default=transient, help="Probability a handler fails transiently.")
    parser.add_argument("--ready", help="File written once every participant is consuming.")
    parser.add_argument("--stats", help="File the participants' stats are written to (JSON) on exit.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="The engine's SQLite file (its db:// queue).")
    add_participant_arguments(parser, transient=0.1)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
