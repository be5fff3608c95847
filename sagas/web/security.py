"""Who may call the HTTP API and the console: named bearer tokens, CSRF for the console's forms, body limits.

The model (docs/operations.md, "HTTP API and console"):
- Every mutating call needs `Authorization: Bearer <token>`; the token's *name* is recorded in the saga's history as
  the operator. Tokens come from `SAGAS_HTTP_TOKENS` ("name=token,name2=token2") or a file of `name token` lines
  (`SAGAS_HTTP_TOKENS_FILE`, the better place: not in the environment of every child process). They are compared
  with `hmac.compare_digest`, against every known token, so the time taken says nothing about which one matched.
- Reads need a token too, unless `open_reads` is set and the caller is on the loopback interface.
- The console signs the operator in with a token once: it sets an HttpOnly, SameSite=Strict cookie holding the
  token's name and an HMAC of it under a key of this process (never the token). Every console form carries a CSRF
  field derived from the session (HMAC again); a form without it is refused.
- Request bodies are capped (`max_body`, 1 MiB by default), whatever Content-Length says.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = "sagas_session"
DEFAULT_MAX_BODY = 1 << 20


class TokenError(ValueError):
    """The token setting or file cannot be read: the server refuses to start rather than run open."""


def parse_tokens(text: str, *, separator: str = "=") -> dict[str, str]:
    """`name=token` pairs separated by commas or new lines (`name token` lines in a file); '#' starts a comment."""
    tokens: dict[str, str] = {}
    for raw in text.replace(",", "\n").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, token = (line.partition(separator) if separator != " " else line.partition(" "))
        name, token = name.strip(), token.strip()
        if not sep or not name or not token:
            raise TokenError(f"token line {line[:20]!r}...: expected 'name{separator}token'")
        if len(token) < 16:
            raise TokenError(f"token {name!r} is shorter than 16 characters: too easy to guess")
        if name in tokens:
            raise TokenError(f"token name {name!r} is given twice")
        tokens[name] = token
    return tokens


def load_tokens(setting: str | None = None, file: str | Path | None = None) -> dict[str, str]:
    """The named tokens of `setting` ("name=token,...") and of `file` (`name token` lines)."""
    tokens = parse_tokens(setting or "")
    if file:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise TokenError(f"token file {file}: {exc.strerror or exc}") from None
        for name, token in parse_tokens(text, separator=" ").items():
            if name in tokens:
                raise TokenError(f"token name {name!r} is given twice")
            tokens[name] = token
    return tokens


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class Security:
    """The server's credentials and rules."""

    tokens: Mapping[str, str] = field(default_factory=dict)
    open_reads: bool = False
    """Reads without a token from the loopback interface."""
    max_body: int = DEFAULT_MAX_BODY
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    """Signs console sessions and CSRF fields; a new one per process (a restart signs everyone out)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Security:
        env = os.environ if environ is None else environ
        tokens = load_tokens(env.get("SAGAS_HTTP_TOKENS"), env.get("SAGAS_HTTP_TOKENS_FILE"))
        open_reads = env.get("SAGAS_HTTP_OPEN_READS", "").strip().lower() in ("1", "true", "yes", "on")
        max_body = int(env.get("SAGAS_HTTP_MAX_BODY", DEFAULT_MAX_BODY))
        return cls(tokens=tokens, open_reads=open_reads, max_body=max_body)

    def operator(self, token: str | None) -> str | None:
        """The name of the token, or None. Every token is compared, each in constant time."""
        if not token:
            return None
        given = token.encode()
        found = None
        for name, known in self.tokens.items():
            if hmac.compare_digest(given, known.encode()):
                found = name
        return found

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self.key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def session(self, operator: str) -> str:
        return f"{operator}.{self._sign('session', operator)}"

    def session_operator(self, cookie: str | None) -> str | None:
        """The operator a session cookie names, if this process signed it and the token still exists."""
        if not cookie or "." not in cookie:
            return None
        operator, signature = cookie.rsplit(".", 1)
        if not hmac.compare_digest(signature, self._sign("session", operator)):
            return None
        return operator if operator in self.tokens else None

    def csrf(self, session: str) -> str:
        return self._sign("csrf", session)

    def csrf_ok(self, session: str | None, given: str | None) -> bool:
        return bool(session and given) and hmac.compare_digest(self.csrf(session or ""), given or "")


class BodyLimit:
    """ASGI middleware: a request whose body passes `limit` bytes gets 413 (problem+json), read no further.

    The body (at most `limit` bytes) is read before the app runs and handed to it as one message, so that the
    refusal never arrives half way through an app's own response.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(send, self.limit)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await _too_large(send, self.limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    body = (b'{"type":"about:blank","title":"Request body too large","status":413,"detail":"the body is larger '
            b'than ' + str(limit).encode() + b' bytes"}')
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
