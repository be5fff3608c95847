"""`sagas start --url` answers with the standard library alone; anything else goes to the full CLI."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sagas._entry import _parse_start

SAGAS = str(Path(sys.executable).with_name("sagas"))
PROBE = """
import sys
sys.argv = ["sagas", *sys.argv[1:]]
import sagas._entry
try:
    sagas._entry.main()
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("typer", "rich", "pydantic", "sqlalchemy", "sagas.cli", "sagas.engine") if m in sys.modules)
print("LOADED", ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


class Api:
    """A stand-in for `sagas serve --http`'s start endpoint that records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answer: tuple[int, dict[str, Any]] = (201, {"id": "0190-saga", "created": True})
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, answer = api.answer
                data = json.dumps(answer).encode()
                self.send_response(status)
                kind = "application/json" if status < 400 else "application/problem+json"
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def api() -> Iterator[Api]:
    served = Api()
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    yield served
    served.server.shutdown()
    served.server.server_close()


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    environment = {k: v for k, v in os.environ.items() if not k.startswith("SAGAS_")} | (env or {})
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60,
                          env=environment)


def test_start_with_a_url_posts_the_saga_without_loading_the_full_cli(api: Api) -> None:
    """The fast path sends definition, input, key and token, prints what the full CLI prints, and loads none of
    typer, rich, pydantic, SQLAlchemy or the engine."""
    done = probe("start", "order", "--input", '{"order_id": "o-1"}', "--key=k-1", "--url", api.url,
                 env={"SAGAS_TOKEN": "secret"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "started 0190-saga\n"
    assert "LOADED \n" in done.stderr
    assert api.requests == [{"path": "/api/sagas", "auth": "Bearer secret",
                             "body": {"definition": "order", "input": {"order_id": "o-1"}, "key": "k-1"}}]

    api.answer = (200, {"id": "0190-saga", "created": False})
    again = probe("start", "order", "--json", env={"SAGAS_URL": api.url})
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"id": "0190-saga", "created": False}
    assert api.requests[-1]["auth"] is None
    assert api.requests[-1]["body"]["input"] == {}


def test_a_refused_start_is_one_error_line_and_exit_code_one(api: Api) -> None:
    """A problem document from the server becomes `error: <detail>` on stderr, as the full CLI prints it."""
    api.answer = (409, {"title": "Conflict", "status": 409, "detail": "key k-1 started a saga with another input"})
    done = probe("start", "order", "--key", "k-1", "--url", api.url)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines()[0] == "error: key k-1 started a saga with another input"


def test_what_the_fast_path_does_not_understand_goes_to_the_full_cli(api: Api, tmp_path: Path) -> None:
    """--db, --help, an unknown option, two names or an input that is not an object are the full CLI's: the
    same messages as ever, and nothing posted."""
    for argv in (["start", "order", "--db", str(tmp_path / "x.db")], ["start", "--help"], ["start", "a", "b"],
                 ["start", "order", "--url", api.url, "--input", "[1]"], ["start", "order", "--bogus"],
                 ["start", "order", "--input"], ["list"]):
        assert _parse_start(argv) is None, argv
    assert _parse_start(["start", "order", "--url", api.url])["names"] == ["order"]  # type: ignore[index]
    done = probe("start", "order", "--url", api.url, "--input", "[1]")
    assert done.returncode != 0
    assert "JSON object" in done.stderr or "object" in done.stderr
    assert "sagas.cli" in done.stderr.splitlines()[-1]  # the full CLI answered
    assert api.requests == []


def test_the_installed_command_takes_the_fast_path(api: Api) -> None:
    """The `sagas` script on PATH is this entry point: a start through it reaches the server."""
    done = subprocess.run([SAGAS, "start", "order", "--url", api.url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "started 0190-saga"
    assert len(api.requests) == 1


def test_an_empty_url_or_token_option_wins_over_the_environment(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in the full CLI, `--url ""` means no URL (the database path, the full CLI's) and `--token ""` no token,
    whatever SAGAS_URL and SAGAS_TOKEN say."""
    monkeypatch.setenv("SAGAS_URL", api.url)
    monkeypatch.setenv("SAGAS_TOKEN", "from-env")
    assert _parse_start(["start", "order", "--url", ""]) is None
    parsed = _parse_start(["start", "order", "--token="])
    assert parsed is not None
    assert (parsed["url"], parsed["token"]) == (api.url, "")


def test_the_token_is_not_sent_to_where_a_redirect_points(api: Api) -> None:
    """A server that redirects the start elsewhere (303: urllib follows it with a GET) does not get the bearer
    token passed on to the other host."""
    from sagas.remote import Remote, RemoteError

    seen: list[str | None] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            data = b'{"id": "x", "created": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    threading.Thread(target=other.serve_forever, daemon=True).start()

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(303)
            self.send_header("Location", f"http://localhost:{other.server_address[1]}/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    api.server.RequestHandlerClass = Redirect
    try:
        with contextlib.suppress(RemoteError):
            Remote(api.url, "secret").call("POST", "/api/sagas", {"definition": "order", "input": {}})
        assert seen == [None]  # the redirect was followed, without the token
    finally:
        other.shutdown()
        other.server_close()
