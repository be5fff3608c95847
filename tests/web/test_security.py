"""Tokens, sessions and CSRF fields of the HTTP API and console."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagas.web.security import Security, TokenError, is_loopback, load_tokens, parse_tokens


def test_tokens_come_from_the_setting_and_the_file_with_their_names(tmp_path: Path) -> None:
    """`name=token` pairs and a file of `name token` lines give named tokens; comments and blank lines pass."""
    file = tmp_path / "tokens"
    file.write_text("# operators\ncarol carol-token-0123456789\n\n")
    tokens = load_tokens("alice=alice-token-0123456789, bob=bob-token-0123456789ab", file)
    assert tokens == {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab",
                      "carol": "carol-token-0123456789"}


@pytest.mark.parametrize(("text", "message"), [
    ("alice", "expected 'name=token'"),
    ("alice=short", "shorter than 16"),
    ("a=aaaaaaaaaaaaaaaaaaaa,a=bbbbbbbbbbbbbbbbbbbb", "given twice"),
])
def test_a_bad_token_setting_is_refused_with_the_reason(text: str, message: str) -> None:
    """A malformed, short or repeated token stops the server from starting (it never runs open)."""
    with pytest.raises(TokenError, match=message):
        parse_tokens(text)


def test_a_missing_token_file_is_a_clear_error(tmp_path: Path) -> None:
    """A token file that cannot be read names itself."""
    with pytest.raises(TokenError, match="token file"):
        load_tokens(None, tmp_path / "missing")


def test_a_token_is_known_by_its_name_and_sessions_cannot_be_forged() -> None:
    """The right token gives its name; a wrong one, a tampered session or one of another process gives nobody."""
    security = Security(tokens={"alice": "alice-token-0123456789"})
    assert security.operator("alice-token-0123456789") == "alice"
    assert security.operator("alice-token-012345678") is None
    assert security.operator(None) is None
    session = security.session("alice")
    assert security.session_operator(session) == "alice"
    assert security.session_operator("bob." + session.split(".", 1)[1]) is None
    assert Security(tokens=security.tokens).session_operator(session) is None  # another process's key
    assert security.csrf_ok(session, security.csrf(session))
    assert not security.csrf_ok(session, security.csrf(Security().session("alice")))
    assert not security.csrf_ok(session, None)


def test_loopback_is_recognised() -> None:
    """Only loopback addresses count as loopback."""
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert not is_loopback("10.0.0.1")
    assert not is_loopback(None)


def test_a_session_lasts_its_max_age() -> None:
    """A console session signed longer ago than `session_max_age` names nobody, nor one from the future."""
    security = Security(tokens={"alice": "alice-token-0123456789"}, session_max_age=3600)
    session = security.session("alice", now=1000.0)
    assert security.session_operator(session, now=1000.0 + 3599) == "alice"
    assert security.session_operator(session, now=1000.0 + 3600) is None
    assert security.session_operator(session, now=999.0) is None
    issued = session.rsplit(".", 1)[0]
    assert security.session_operator(f"{issued[:-1]}9.{session.rsplit('.', 1)[1]}", now=1000.0) is None  # resigned


@pytest.mark.parametrize(("host", "open_"), [
    (b"127.0.0.1:9464", True), (b"localhost:9464", True), (b"[::1]:9464", True), (b"127.0.0.1", True),
    (b"evil.example:9464", False), (b"evil.example", False), (b"", False),
])
def test_open_reads_need_a_loopback_name_in_host(host: bytes, open_: bool) -> None:
    """A page of another site whose name resolves to 127.0.0.1 (DNS rebinding) sends its own name in Host: it
    never reads without a token."""
    security = Security(open_reads=True)
    assert security.reads_open_to("127.0.0.1", [(b"host", host)]) is open_
    assert security.reads_open_to("10.0.0.1", [(b"host", host)]) is False


@pytest.mark.parametrize("value", ["inf", "nan", "0", "0.5", "-5", "1e12"])
def test_a_session_lifetime_that_is_not_a_sane_number_of_seconds_is_refused(value: str) -> None:
    """SAGAS_HTTP_SESSION_MAX_AGE must be from 1 s to ten years: infinity failed every sign-in with a 500, NaN or
    zero signed nobody in for long, and a fraction made the cookie expire at once."""
    with pytest.raises(ValueError, match="SAGAS_HTTP_SESSION_MAX_AGE"):
        Security.from_env({"SAGAS_HTTP_TOKENS": "alice=" + "a" * 32, "SAGAS_HTTP_SESSION_MAX_AGE": value})
    assert Security.from_env({"SAGAS_HTTP_TOKENS": "alice=" + "a" * 32,
                              "SAGAS_HTTP_SESSION_MAX_AGE": "3600"}).session_max_age == 3600
