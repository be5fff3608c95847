"""`sagas serve --http` as a user runs it: a real subprocess serving /metrics, /healthz and /readyz (the API it
serves is tested in test_api.py), refusing to start open or with bad tokens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
SAGAS = str(Path(sys.executable).parent / "sagas")
SAMPLE = ROOT / "samples" / "order_payment" / "saga.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_http_answers_on_loopback_until_sigterm(tmp_path: Path) -> None:
    """`sagas serve --http :PORT` listens on 127.0.0.1 only, answers /healthz, /readyz and /metrics while the engine
    runs, and still exits cleanly on SIGTERM; SAGAS_HTTP gives the same option."""
    port = free_port()
    env = {**os.environ, "SAGAS_HTTP": f":{port}"}
    proc = subprocess.Popen([SAGAS, "serve", "--definitions", str(SAMPLE), "--db", str(tmp_path / "s.db"),
                             "--broker", "db://", "--json-logs"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.1)
        assert health is not None, "the HTTP server never answered"
        assert health.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert "sagas_sagas{status=\"running\"} 0.0" in metrics.text
        assert metrics.headers["content-type"].startswith("text/plain")
        own = socket.gethostbyname(socket.gethostname())
        if not own.startswith("127."):  # only loopback listens: the host's own address is refused
            with socket.socket() as sock:
                sock.settimeout(2)
                assert sock.connect_ex((own, port)) != 0
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert f"on http://127.0.0.1:{port}" in stderr


@pytest.mark.parametrize(("env", "address", "message"), [
    ({"SAGAS_HTTP_OPEN_READS": "true"}, "0.0.0.0:0", "listen on 127.0.0.1"),
    ({"SAGAS_HTTP_TOKENS": "alice=short"}, "127.0.0.1:0", "shorter than 16"),
])
def test_serve_refuses_to_start_open_or_with_bad_tokens(tmp_path: Path, env: dict[str, str], address: str,
                                                         message: str) -> None:
    """Open reads on an address other machines reach, or a malformed token setting, stop `sagas serve --http`
    before it listens, with the reason on one line."""
    result = subprocess.run([SAGAS, "serve", "--definitions", str(SAMPLE), "--db", str(tmp_path / "s.db"),
                             "--broker", "db://", "--http", address], cwd=ROOT, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr.replace("\n", " ")
    assert not (tmp_path / "s.db").exists()  # refused before anything was opened
