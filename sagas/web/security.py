"""Who may call the HTTP API and the console: named bearer tokens, CSRF for the console's forms, body limits.

The model (docs/operations.md, "HTTP API and console"):
- Every mutating call needs `Authorization: Bearer <token>`; the token's *name* is recorded in the saga's history as
  the operator. Tokens come from `SAGAS_HTTP_TOKENS` ("name=token,name2=token2") or a file of `name token` lines
  (`SAGAS_HTTP_TOKENS_FILE`, the better place: not in the environment of every child process). They are compared
  with `hmac.compare_digest`, against every known token, so the time taken says nothing about which one matched.
- Reads need a token too, unless `open_reads` is set and the caller is on the loopback interface. That is decided
  by the TCP peer, which a reverse proxy on the same host turns into loopback for everyone: a request that carries
  proxy headers (Forwarded, X-Forwarded-For, X-Real-IP) never counts as loopback, and a server bound to another
  address than loopback refuses to start with open reads (`check_listen`).
- The console signs the operator in with a token once: it sets an HttpOnly, SameSite=Strict cookie holding the
  token's name, the time of signing in and an HMAC of both under a key of this process (never the token); it
  lasts `session_max_age` (12 h). Every console form carries a CSRF
  field derived from the session (HMAC again); a form without it is refused. The sign-in form itself, before any
  session, carries one derived from a random pre-session cookie (so another site cannot sign a browser in); after
  signing in the browser goes only to a path of this site (`safe_next`).
- Every response carries nosniff, frame-denying and a strict Content-Security-Policy (`SecurityHeaders`).
- Request bodies are capped (`max_body`, 1 MiB by default), whatever Content-Length says.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = "sagas_session"
LOGIN_COOKIE = "sagas_login"
"""A random pre-session value the sign-in form's CSRF field is derived from."""
PROXY_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_SESSION_MAX_AGE = 12 * 3600.0


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


def proxied(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a request says it came through a proxy (then its TCP peer is the proxy, not the caller)."""
    return any(name.lower() in PROXY_HEADERS for name, _ in headers)


def _host_name(host: str) -> str:
    """The name of a Host header without its port: `127.0.0.1:9464` -> `127.0.0.1`, `[::1]:80` -> `::1`."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def safe_next(target: str | None) -> str:
    """`target` if it is a path of this site, else "/": never a redirect to another site after signing in.

    Browsers read `/\\evil.example` as `//evil.example` and drop tabs and new lines from a URL, so a backslash or
    a control character anywhere (also percent-encoded) refuses the target, as does a scheme or a host.
    """
    if not target:
        return "/"
    decoded = unquote(target)
    if any(c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in target + decoded) or any(
            c.isspace() for c in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    if decoded.startswith("//"):
        return "/"
    return target


@dataclass
class Security:
    """The server's credentials and rules."""

    tokens: Mapping[str, str] = field(default_factory=dict)
    open_reads: bool = False
    """Reads without a token from the loopback interface."""
    max_body: int = DEFAULT_MAX_BODY
    session_max_age: float = DEFAULT_SESSION_MAX_AGE
    """Seconds a console sign-in lasts (the cookie is signed with its time)."""
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    """Signs console sessions and CSRF fields; a new one per process (a restart signs everyone out)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Security:
        env = os.environ if environ is None else environ
        tokens = load_tokens(env.get("SAGAS_HTTP_TOKENS"), env.get("SAGAS_HTTP_TOKENS_FILE"))
        open_reads = env.get("SAGAS_HTTP_OPEN_READS", "").strip().lower() in ("1", "true", "yes", "on")
        try:
            max_body = int(env.get("SAGAS_HTTP_MAX_BODY", DEFAULT_MAX_BODY))
            max_age = float(env.get("SAGAS_HTTP_SESSION_MAX_AGE", DEFAULT_SESSION_MAX_AGE))
        except ValueError as exc:
            raise ValueError(f"SAGAS_HTTP_MAX_BODY / SAGAS_HTTP_SESSION_MAX_AGE: {exc}") from None
        if not 1 <= max_age < 10 * 365 * 86400:  # NaN fails too
            raise ValueError(f"SAGAS_HTTP_SESSION_MAX_AGE: {max_age} is not a number of seconds from 1 to ten years")
        return cls(tokens=tokens, open_reads=open_reads, max_body=max_body, session_max_age=max_age)

    def check_listen(self, host: str) -> None:
        """Refuse (ValueError) to serve open reads on an address other machines reach: behind it, "loopback"
        would not mean the operator's own machine."""
        if self.open_reads and not is_loopback(host):
            raise ValueError(
                f"SAGAS_HTTP_OPEN_READS lets loopback callers read without a token, but the server would listen on "
                f"{host}: listen on 127.0.0.1 (behind a proxy, keep reads authenticated), or turn open reads off")

    def reads_open_to(self, client: str | None, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """Whether this caller may read without a token: open reads, a loopback peer, no proxy between, and a
        loopback name in Host (a page of another site that rebinds its name to 127.0.0.1 sends its own name)."""
        if not (self.open_reads and is_loopback(client)) or proxied(headers):
            return False
        host = next((value for name, value in headers if name.lower() == b"host"), b"").decode("latin-1")
        return is_loopback(_host_name(host))

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

    def session(self, operator: str, *, now: float | None = None) -> str:
        issued = f"{operator}.{int(time.time() if now is None else now)}"
        return f"{issued}.{self._sign('session', issued)}"

    def session_operator(self, cookie: str | None, *, now: float | None = None) -> str | None:
        """The operator a session cookie names, if this process signed it less than `session_max_age` ago and the
        token still exists."""
        if not cookie or cookie.count(".") < 2:
            return None
        issued, signature = cookie.rsplit(".", 1)
        if not hmac.compare_digest(signature, self._sign("session", issued)):
            return None
        operator, at = issued.rsplit(".", 1)
        age = (time.time() if now is None else now) - int(at)
        if not 0 <= age < self.session_max_age:
            return None
        return operator if operator in self.tokens else None

    def csrf(self, session: str) -> str:
        return self._sign("csrf", session)

    def csrf_ok(self, session: str | None, given: str | None) -> bool:
        return bool(session and given) and hmac.compare_digest(self.csrf(session or ""), given or "")

    def login_csrf(self, nonce: str) -> str:
        return self._sign("login", nonce)

    def login_csrf_ok(self, nonce: str | None, given: str | None) -> bool:
        return bool(nonce and given) and hmac.compare_digest(self.login_csrf(nonce or ""), given or "")


CONSOLE_POLICY = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
                  "frame-ancestors 'none'; base-uri 'none'")
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"content-security-policy", CONSOLE_POLICY.encode()),
]


class SecurityHeaders:
    """ASGI middleware: every response says nosniff, may not be framed, loads nothing from elsewhere and runs no
    script (the console has none); responses other than static files are not cached (they hold saga data)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                added = [(n, v) for n, v in _HEADERS if n not in present]
                if not static and b"cache-control" not in present:
                    added.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        await self.app(scope, receive, sending)


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


class PathGuard:
    """ASGI middleware: a path with a control character (a new line, a tab...) names nothing here: 404 problem+json
    at once (the routers' patterns would pass it to the console instead of the API, or match part of it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(ord(c) < 0x20 or ord(c) == 0x7F for c in str(scope.get("path", ""))):
            body = b'{"type":"about:blank","title":"Not found","status":404,"detail":"no such path"}'
            headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 404, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


async def _too_large(send: Send, limit: int) -> None:
    body = (b'{"type":"about:blank","title":"Request body too large","status":413,"detail":"the body is larger '
            b'than ' + str(limit).encode() + b' bytes"}')
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
