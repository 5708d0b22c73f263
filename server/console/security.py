"""The console's request guards: Host (DNS rebinding), access token, CSRF, same-origin redirects.

Why each (issue 26, class 8):

- **Host**: a page on ``attacker.example`` whose name is re-pointed at 127.0.0.1 (DNS rebinding)
  reads every console page with the browser's own access, since the browser thinks it talks to
  ``attacker.example``. Only a request whose ``Host`` is the address the console was started for is
  answered (:class:`HostGuard`; ``localhost`` and the other loopback spellings too when it binds to
  loopback); anything else gets 421 and nothing else.
- **CSRF**: a cross-site form POST from a page the operator visits changed what the privacy page
  showed. Every POST must carry the form field ``csrf``, an HMAC (a per-process secret) of the
  browser's session cookie (``rpe_session``: random, HttpOnly, SameSite=Strict), and, when the
  browser sends them, ``Origin`` must be the console's own and ``Sec-Fetch-Site`` same-origin.
- **Redirects**: ``?token=`` redirected to ``request.url.path``, so ``//attacker.example?token=…``
  went off-site; :func:`same_origin_path` only ever gives a path on this origin.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

SESSION_COOKIE = "rpe_session"
CSRF_FIELD = "csrf"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_HOST_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,300}$")


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The ``Host`` values a console bound to ``host``:``port`` answers (lower case)."""
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    names = {name.lower()}
    if name.lower() in LOOPBACK_NAMES or host.startswith("127."):
        names |= set(LOOPBACK_NAMES)
    out = {f"{n}:{port}" for n in names}
    if port in (80, 443):
        out |= names
    return frozenset(out)


class HostGuard:
    """Pure ASGI middleware: 421 for any request whose Host header is not one of ``hosts``."""

    def __init__(self, app: Any, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = frozenset(h.lower() for h in hosts)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        values = [v for k, v in scope.get("headers", []) if k == b"host"]
        host = values[0].decode("latin-1").strip().lower() if len(values) == 1 else ""
        if not _HOST_RE.match(host) or host not in self.hosts:
            shown = host[:80] if _HOST_RE.match(host) else "(missing or malformed)"
            msg = (
                f"this console answers only requests for {', '.join(sorted(self.hosts))}; Host {shown} is "
                "refused (a name re-pointed at this address, DNS rebinding, must not read the console)\n"
            )
            resp = Response(msg, status_code=421, media_type="text/plain; charset=utf-8")
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)


def same_origin_path(path: str, query: str = "") -> str:
    """A redirect target on this origin only: one leading ``/``, no scheme or authority, every
    character that could start one (``\\``, a second ``/``) escaped."""
    safe = quote(path.replace("\\", "/"), safe="/-._~!$&'()*+,;=:@%")
    out = "/" + safe.lstrip("/")
    return out + (f"?{query}" if query else "")


class Csrf:
    """The per-process secret and the session-bound token every POST form carries."""

    def __init__(self) -> None:
        self.secret = secrets.token_bytes(32)

    def token(self, session: str) -> str:
        return hmac.new(self.secret, b"csrf\x00" + session.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def session(request: Request) -> str | None:
        value = request.cookies.get(SESSION_COOKIE)
        return value if value and len(value) <= 128 else None

    def origin_problem(self, request: Request) -> str | None:
        """Why a POST's Origin / Sec-Fetch-Site headers show it comes from another site (None: fine)."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return f"the form was sent from another site (Sec-Fetch-Site: {site[:40]})"
        origin = request.headers.get("origin")
        if origin == "null" and site == "same-origin":
            origin = None  # a browser under a strict referrer policy hides its own origin on a same-origin POST
        if origin is not None:
            own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
            if origin.lower() != own:
                return f"the form was sent from {origin[:80]!r}, not from this console ({own})"
        return None

    def check(self, request: Request, field: str | None) -> str | None:
        """Why this POST is refused (None when its token matches the browser's session)."""
        why = self.origin_problem(request)
        if why:
            return why
        session = self.session(request)
        if session is None or not field or not hmac.compare_digest(field, self.token(session)):
            return "the form's security token is missing or stale: reload the page and send the form again"
        return None
