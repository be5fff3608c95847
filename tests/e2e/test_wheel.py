"""The wheel ships what it needs: built with `python -m build --wheel` from a clean copy of the sources, installed
into a fresh venv outside the repository, and run from there as a user runs it (migrations, templates and static
files come from the installed package, never from the checkout)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from sagas.adapters.sql.migrate import PARTICIPANT, QUEUE, STORE

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "wheel-token-0123456789"
DEFINITION = """\
name: greeting
version: 1
description: One step, enough to start a saga from the installed package.
steps:
  - name: greet
    participant: greeter
    kind: retriable
    command: greet.hello
    payload:
      name: input.name
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """The environment without anything that would put the checkout on sys.path or configure sagas."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SAGAS_", "PYTHON", "VIRTUAL_ENV", "OTEL_"))}  # PIP_* stays: its cache, its links


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    """A wheel built from a copy of what the sdist would hold, so that no stale build/ of the checkout leaks in."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "sagas", source / "sagas", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)], tmp_path, env)
    (wheel,) = dist.glob("sagas_engine-*.whl")
    return wheel


def _package_files() -> set[str]:
    """Every file of the `sagas` package in the checkout, as a path inside the wheel."""
    return {path.relative_to(ROOT).as_posix() for path in (ROOT / "sagas").rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


def _version(database: Path, table: str) -> list[str]:
    with sqlite3.connect(database) as conn:
        return [row[0] for row in conn.execute(f"SELECT version_num FROM {table}")]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_installed_wheel_migrates_serves_the_console_and_starts_a_saga(tmp_path: Path) -> None:
    """From a fresh venv holding only the wheel, `sagas db upgrade` runs the three migration chains and
    `sagas serve --http` serves the console's pages and static files and starts a saga through the API."""
    env = _clean_env()
    wheel = _build_wheel(tmp_path, env)
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    assert _package_files() - shipped == set(), "files of the sagas package missing from the wheel"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python, sagas = str(venv / "bin" / "python"), str(venv / "bin" / "sagas")
    _run([python, "-m", "pip", "install", "-q", f"{wheel}[web]"], tmp_path, env)
    work = tmp_path / "work"  # outside the repository: nothing there to import by accident
    work.mkdir()
    located = _run([python, "-c", "import sagas, sagas.web; print(sagas.__file__)"], work, env).strip()
    assert Path(located).is_relative_to(venv), located
    assert not Path(located).is_relative_to(ROOT)

    database, participant_db = work / "sagas.db", work / "participant.db"
    assert "schema up to date" in _run([sagas, "db", "upgrade", "--db", str(database), "--queue"], work, env)
    _run([sagas, "db", "upgrade", "--participant-db", str(participant_db)], work, env)
    assert _version(database, STORE.version_table) == [STORE.head]
    assert _version(database, QUEUE.version_table) == [QUEUE.head]
    assert _version(participant_db, PARTICIPANT.version_table) == [PARTICIPANT.head]

    definition = work / "greeting.yaml"
    definition.write_text(DEFINITION)
    port = _free_port()
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sagas, "serve", "--definitions", str(definition), "--db", str(database),
                             "--broker", "db://", "--http", f"127.0.0.1:{port}"], cwd=work,
                            env={**env, "SAGAS_HTTP_TOKENS": f"wheel={TOKEN}"}, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "sagas serve never became ready"
                time.sleep(0.1)

            # Sign in to the console with the token (its form carries a CSRF field), then open the overview.
            sign_in = client.get("/login")
            assert sign_in.status_code == 200, sign_in.text
            csrf = re.search(r'name="csrf" value="([^"]+)"', sign_in.text)
            assert csrf is not None, sign_in.text
            signed = client.post("/login", data={"csrf": csrf.group(1), "token": TOKEN, "next": "/"})
            assert signed.status_code == 303, signed.text
            page = client.get("/")
            assert page.status_code == 200, page.text
            assert "wheel" in page.text  # the signed-in operator's name, rendered by the installed templates
            links = re.findall(r'(?:href|src)="(/static/[^"]+)"', page.text)
            assert links, page.text
            for link in links:
                static = client.get(link)
                assert static.status_code == 200, link
                assert static.content.strip(), link
                assert static.content == (ROOT / "sagas" / "web" / link.removeprefix("/")).read_bytes()

            bearer = {"Authorization": f"Bearer {TOKEN}"}
            started = client.post("/api/sagas", headers=bearer,
                                  json={"definition": "greeting", "input": {"name": "wheel"}, "key": "w-1"})
            assert started.status_code == 201, started.text
            saga_id = started.json()["id"]
            saga = client.get(f"/api/sagas/{saga_id}", headers=bearer)
            assert saga.status_code == 200, saga.text
            assert saga.json()["instance"]["definition"] == "greeting"
            assert saga.json()["instance"]["input"] == {"name": "wheel"}
            assert [step["name"] for step in saga.json()["steps"]] == ["greet"]
            saga_page = client.get(f"/sagas/{saga_id}")
            assert saga_page.status_code == 200, saga_page.text
            assert 'id="graph"' in saga_page.text  # the saga page, with the definition's graph
            assert "<svg" in saga_page.text

        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()
