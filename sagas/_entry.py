"""The `sagas` command's entry point.

`sagas start --url` is what services call in a loop, so it is answered with the standard library alone (the
package root and `sagas.remote`: a few milliseconds of imports). Every other command, and any `start` this parser
does not fully understand (`--db`, `--help`, an unknown option, an input that is not a JSON object), goes to the
full CLI, which loads typer, rich and the library (about half a second) and says what is wrong.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

_VALUED = {"--input": "input", "--key": "key", "--url": "url", "--token": "token"}


def _parse_start(argv: list[str]) -> dict[str, Any] | None:
    """The options of `start NAME [--input J] [--key K] [--url U] [--token T] [--json]`, or None when anything
    else is there (the full CLI then handles it)."""
    if not argv or argv[0] != "start":
        return None
    found: dict[str, Any] = {"input": "{}", "key": None, "url": None, "token": None, "json": False, "names": []}
    args = iter(argv[1:])
    for arg in args:
        if arg == "--json":
            found["json"] = True
            continue
        option, equals, value = arg.partition("=")
        if option in _VALUED:
            if not equals:
                following = next(args, None)
                if following is None:
                    return None
                value = following
            found[_VALUED[option]] = value
        elif arg.startswith("-"):
            return None  # --db, --help, or something the full CLI must judge
        else:
            found["names"].append(arg)
    if len(found["names"]) != 1:
        return None
    # As click does: an option given, even empty, wins over its environment variable.
    if found["url"] is None:
        found["url"] = os.environ.get("SAGAS_URL")
    if found["token"] is None:
        found["token"] = os.environ.get("SAGAS_TOKEN")
    if not found["url"]:
        return None
    try:
        found["input"] = json.loads(found["input"])
    except ValueError:
        return None
    return found if isinstance(found["input"], dict) else None


def fast_start(argv: list[str]) -> int | None:
    """Run `sagas start --url` without the full CLI: its exit code, or None when this is not such a call."""
    options = _parse_start(argv)
    if options is None:
        return None
    from sagas.remote import Remote, RemoteError

    body = {"definition": options["names"][0], "input": options["input"], "key": options["key"]}
    try:
        started = Remote(options["url"], options["token"]).call("POST", "/api/sagas", body)
    except RemoteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    saga_id, created = started["id"], started["created"]
    if options["json"]:
        print(json.dumps({"id": saga_id, "created": created}, indent=2))
    else:
        print(f"{'started' if created else 'already started'} {saga_id}")
    return 0


def main() -> None:
    code = fast_start(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from sagas.cli import main as cli_main

    cli_main()
