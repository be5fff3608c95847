"""The wire codec per message, side by side with the stdlib's json doing the same JSON work in the same run.

A three-step saga moves six messages (three commands, three replies), each encoded once and decoded once, so the
codec's cost per saga is about six encodes and six decodes. The message bodies here are the benchmark saga's
(`bench/saga_throughput.py`): a small object per command, a small reply.

    .venv/bin/python bench/codec.py [--rounds 200000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sagas.engine.state import MessageKind, Outcome, OutgoingCommand, message_id
from sagas.engine.wire import decode_command, decode_reply, encode_body, encode_command, encode_reply

_STDLIB = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def per_call(call: Callable[[], Any], rounds: int) -> float:
    """Microseconds per call, best of three runs (the machine is shared: the best run is the least disturbed)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(rounds):
            call()
        best = min(best, time.perf_counter() - started)
    return best / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100_000)
    rounds = parser.parse_args().rounds

    command = OutgoingCommand(
        id=message_id("0f8c2d4e-5b6a-4c3d-9e8f-7a6b5c4d3e2f", "charge", MessageKind.COMMAND, 1),
        saga_id="0f8c2d4e-5b6a-4c3d-9e8f-7a6b5c4d3e2f", saga_name="order", step="charge", kind=MessageKind.COMMAND,
        attempt=1, topic="payment.commands", type="Charge", payload={"order": "o-123", "amount": 50},
    )
    sent = encode_command(command, reply_topic="sagas.replies", at=1_767_225_600.0)
    received = decode_command(sent)
    reply = encode_reply(received, outcome=Outcome.SUCCESS, type="Charge.succeeded", data={"by": "Charge"},
                         source="payment", at=1_767_225_600.5)
    body = {"order": "o-123", "amount": 50}
    raw = encode_body(body)

    def command_round_trip() -> Any:
        return decode_command(encode_command(command, reply_topic="sagas.replies", at=1.0))

    def reply_round_trip() -> Any:
        return decode_reply(encode_reply(received, outcome=Outcome.SUCCESS, type="Charge.succeeded",
                                         data={"by": "Charge"}, source="payment", at=1.0))

    ours_encode = per_call(lambda: encode_body(body), rounds)
    stdlib_encode = per_call(lambda: _STDLIB.encode(body).encode(), rounds)
    ours_decode = per_call(lambda: decode_reply(reply), rounds)
    stdlib_decode = per_call(lambda: json.loads(raw), rounds)
    print(f"python {sys.version.split()[0]}, {rounds:,} rounds, best of 3 runs")
    print(f"command encode + decode:  {per_call(command_round_trip, rounds):6.2f} µs")
    print(f"reply encode + decode:    {per_call(reply_round_trip, rounds):6.2f} µs")
    print(f"body encode:              {ours_encode:6.2f} µs   (stdlib json: {stdlib_encode:.2f} µs, "
          f"ratio {ours_encode / stdlib_encode:.2f})")
    print(f"reply decode, whole:      {ours_decode:6.2f} µs   (stdlib json.loads of its body alone: "
          f"{stdlib_decode:.2f} µs)")


if __name__ == "__main__":
    main()
