"""Findings of a security review of the console and API, each fixed: open redirects after sign-in, CSRF on sign-in
and sign-out, bounded dead letters, open reads behind a proxy, and the headers every response carries."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sagas.engine.ports import BrokerMessage, DeadLetter, UnitOfWork
from sagas.web.security import Security, safe_next
from tests.web.live import live_stack
from tests.web.served import TOKENS, Stack, alice
from tests.web.test_console import csrf_of, sign_in

SAGAS = str(Path(sys.executable).parent / "sagas")
HOSTILE_NEXT = ["/\\evil.example", "/%5Cevil.example", "/%5cevil.example", "\\\\evil.example", "//evil.example",
                "/%2F/evil.example", "/\t/evil.example", "/\n/evil.example", "/%09/evil.example",
                "http://evil.example/", "https:evil.example", "javascript:alert(1)", " /x", "evil.example/x"]


@pytest.mark.parametrize("target", HOSTILE_NEXT)
def test_a_sign_in_never_redirects_off_the_site(target: str) -> None:
    """A `next` with a backslash, a control character (also percent-encoded), a scheme or a host becomes "/"."""
    assert safe_next(target) == "/"


def test_a_path_of_the_site_is_kept_with_its_query() -> None:
    """A path of this site, with its query, is where the operator goes after signing in."""
    assert safe_next("/sagas?status=failed&reason=a%20b") == "/sagas?status=failed&reason=a%20b"
    assert safe_next("/sagas/0191") == "/sagas/0191"
    assert safe_next(None) == "/"


@pytest.mark.parametrize("target", ["/\\evil.example", "/%5Cevil.example", "/\t/evil.example"])
async def test_the_sign_in_form_redirects_a_hostile_next_home(served: Stack, target: str) -> None:
    """Signing in through the form with a hostile `next` lands on the overview, not on another site."""
    response = await sign_in(served, next_url=target)
    assert response.headers["location"] == "/"


async def test_signing_in_needs_the_forms_csrf_field(served: Stack) -> None:
    """A sign-in posted without the form's CSRF field and pre-session cookie (another site's form) signs nobody in."""
    blind = await served.client.post("/login", data={"token": TOKENS["alice"], "next": "/"})
    assert blind.status_code == 403
    assert "sagas_session" not in served.client.cookies
    form = await served.client.get("/login")
    served.client.cookies.delete("sagas_login")
    no_cookie = await served.client.post("/login", data={"token": TOKENS["alice"], "csrf": csrf_of(form.text)})
    assert no_cookie.status_code == 403
    assert "sagas_session" not in served.client.cookies


async def test_signing_out_needs_the_sessions_csrf_field(served: Stack) -> None:
    """A sign-out without the CSRF field leaves the operator signed in; with it, signs them out."""
    await sign_in(served)
    refused = await served.client.post("/logout")
    assert refused.status_code == 403
    page = await served.client.get("/")
    assert 'id="operator">alice<' in page.text
    out = await served.client.post("/logout", data={"csrf": csrf_of(page.text)})
    assert out.status_code == 303
    assert (await served.client.get("/")).status_code == 303  # back to sign in


async def test_every_response_carries_the_security_headers(served: Stack) -> None:
    """Console pages, API answers and static files say nosniff, may not be framed, load nothing from elsewhere;
    pages with saga data are not cached."""
    for path in ("/login", "/api/sagas", "/static/console.css", "/no-such-page"):
        response = await served.client.get(path, headers=alice())
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["x-frame-options"] == "DENY", path
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], path
        assert "script-src" not in response.headers["content-security-policy"]  # default-src 'none' covers it
    assert (await served.client.get("/api/sagas", headers=alice())).headers["cache-control"] == "no-store"
    assert "no-store" not in (await served.client.get("/static/console.css")).headers.get("cache-control", "")


async def test_open_reads_do_not_reach_a_request_that_came_through_a_proxy(served: Stack) -> None:
    """With open reads, a loopback caller reads without a token, but not one whose request a proxy forwarded."""
    served.security.open_reads = True
    assert (await served.client.get("/api/sagas")).status_code == 200
    assert (await served.client.get("/sagas")).status_code == 200
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        proxied = await served.client.get("/api/sagas", headers={header: "203.0.113.9"})
        assert proxied.status_code == 401, header
        console = await served.client.get("/sagas", headers={header: "203.0.113.9"})
        assert console.status_code == 303, header  # to sign in


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.internal"])
def test_open_reads_refuse_an_address_other_machines_reach(host: str) -> None:
    """A server with open reads refuses to listen anywhere but loopback; without open reads any address is fine."""
    with pytest.raises(ValueError, match=r"listen on 127\.0\.0\.1"):
        Security(open_reads=True).check_listen(host)
    Security(open_reads=False).check_listen(host)
    Security(open_reads=True).check_listen("127.0.0.1")
    Security(open_reads=True).check_listen("::1")


async def test_a_dead_letter_is_shown_bounded_and_its_body_fetched_whole(served: Stack) -> None:
    """The API's dead letters hold a preview, the size and SHA-256 of the body; `/body` answers the stored bytes."""
    body = b'{"big": "' + b"x" * 100_000 + b'"}'
    dead = DeadLetter(id="dl-big-1", reason="undecodable", message=BrokerMessage(topic="replies", value=body),
                      at=1.0)
    await served.store.commit(UnitOfWork(dead_letters=[dead]))
    one = (await served.client.get("/api/dead-letters/dl-big-1", headers=alice())).json()
    assert len(one["value"]) == one["preview_bytes"] == 4096
    assert one["size"] == one["kept_bytes"] == len(body)
    assert one["sha256"] == hashlib.sha256(body).hexdigest()
    assert one["truncated"] is False
    listed = (await served.client.get("/api/dead-letters", headers=alice())).json()["items"]
    assert [len(d["value"]) for d in listed if d["id"] == "dl-big-1"] == [512]
    raw = await served.client.get("/api/dead-letters/dl-big-1/body", headers=alice())
    assert raw.status_code == 200
    assert raw.content == body
    assert raw.headers["x-sagas-sha256"] == hashlib.sha256(body).hexdigest()
    assert (await served.client.get("/api/dead-letters/dl-big-1/body")).status_code == 401
    assert (await served.client.get("/api/dead-letters/nope/body", headers=alice())).status_code == 404


async def test_a_path_with_a_control_character_is_a_problem_not_a_page(served: Stack) -> None:
    """An API path with a new line or a tab in it is a 404 problem+json (it used to fall through to the console)."""
    for path in ("/api/sagas/a%0Ab/abort", "/api/sagas/a%09b", "/sagas/a%0Ab"):
        response = await served.client.post(path, headers=alice(), json={"reason": "x"})
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json", path


def test_dlq_show_full_through_the_api_writes_the_stored_bytes(tmp_path: Path) -> None:
    """`sagas dlq show ID --url ... --full FILE` writes the dead letter's stored body byte for byte (the API's
    JSON holds a preview only)."""
    body = bytes(range(256)) * 40  # not UTF-8: a text round trip would change it
    with live_stack(f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}", tmp_path) as live:
        dead = DeadLetter(id="dl-raw-1", reason="undecodable", message=BrokerMessage(topic="replies", value=body),
                          at=1.0)

        async def store(served: Stack) -> None:
            await served.store.commit(UnitOfWork(dead_letters=[dead]))

        live.run(store)
        target = tmp_path / "body.bin"
        result = subprocess.run([SAGAS, "dlq", "show", "dl-raw-1", "--url", live.url, "--full", str(target)],
                                env={**os.environ, "SAGAS_TOKEN": TOKENS["alice"]}, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        assert target.read_bytes() == body
        refused = subprocess.run([SAGAS, "dlq", "show", "dl-raw-1", "--url", live.url, "--full", str(target)],
                                 env={**os.environ, "SAGAS_TOKEN": "wrong-token-0000000000"}, capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode != 0
        assert "bearer token" in refused.stderr
