"""The CLI's client for a running `sagas serve --http` (`--url` / SAGAS_URL): the standard library only.

`sagas start --url` must return fast, and most of a command's time is imports: urllib costs nothing to import,
where an HTTP library would cost a tenth of a second. Errors come back as RFC 9457 problem documents; their
`detail` becomes the CLI's one line.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class RemoteError(Exception):
    """The server refused the call (its problem document's detail) or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class Remote:
    """Calls the HTTP API at `url` with the bearer `token` (None: no Authorization header)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 30.0) -> None:
        self.base = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, *, raw: bool = False, **query: Any) -> Any:
        """The answer's JSON, or with `raw` its bytes; a RemoteError with the problem's detail otherwise."""
        params = {k: str(v).lower() if isinstance(v, bool) else v for k, v in query.items() if v is not None}
        target = self.base + urllib.parse.quote(path, safe="/:@") + (
            "?" + urllib.parse.urlencode(params) if params else "")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(target, data=data, method=method)
        request.add_header("Accept", "application/json, application/problem+json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_unredirected_header("Authorization", f"Bearer {self.token}")  # never to a redirect's host
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                content = response.read()
                return content if raw else json.loads(content or b"null")
        except urllib.error.HTTPError as error:
            raise RemoteError(_problem(error), error.code) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            raise RemoteError(f"cannot reach {self.base}: {reason}") from None


def _problem(error: urllib.error.HTTPError) -> str:
    try:
        problem = json.loads(error.read())
    except (ValueError, OSError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(problem, dict):
        return str(problem.get("detail") or problem.get("title") or f"HTTP {error.code}")
    return f"HTTP {error.code}"
