"""Who may use the dashboard, and which requests may change things.

- A client on the loopback interface may read and act (the dashboard binds to localhost unless told
  otherwise; such a client already has a shell on the fleet host).
- Any other client needs the token (``--http-token-file``): as ``Authorization: Bearer TOKEN`` (scripts)
  or a session cookie from ``POST /login`` (browsers: HttpOnly, SameSite=Strict, Secure over TLS).
  Without a configured token, non-local clients are refused outright.
- A state-changing request is a POST (the routes accept no other method for actions) and, unless it
  carries the bearer token (not an ambient credential a foreign page could borrow), must send the page's
  CSRF token in ``X-CSRF-Token`` — an HMAC of the session under a per-process secret — and, when the
  browser sends an ``Origin``, come from this very origin.

Written by hand: Starlette ships no authentication or CSRF middleware, and this is a dozen checks.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass, field

from edgeopt.errors import UserInputError

SESSION_COOKIE = "edgeopt_session"
SESSION_TTL_S = 12 * 3600
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
OPEN_PATHS = ("/login", "/static/")  # what a non-local client may load before logging in


def read_token(path) -> str:
    """The dashboard token from ``--http-token-file``: one line of at least 16 printable characters."""
    from pathlib import Path

    try:
        token = Path(path).read_text(errors="replace").strip()
    except OSError as exc:
        raise UserInputError(f"--http-token-file {path}: cannot read it ({exc.strerror})") from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise UserInputError(f"--http-token-file {path}: the token must be one line of at least 16 printable "
                             f"characters without spaces")
    return token


def is_local(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class Access:
    allowed: bool
    status: int = 200
    reason: str = ""
    session: str = "-"       # what the CSRF token is bound to
    bearer: bool = False     # authenticated by the Authorization header (no CSRF check)


@dataclass
class Guard:
    token: str | None = None
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    sessions: dict[str, float] = field(default_factory=dict)  # session id → expiry (monotonic)

    def csrf_token(self, session: str) -> str:
        return hmac.new(self.secret, session.encode(), hashlib.sha256).hexdigest()

    def login(self, offered: str) -> str | None:
        """A new session id for the right token, else None."""
        if self.token is None or not hmac.compare_digest(offered.encode(), self.token.encode()):
            return None
        now = time.monotonic()
        for sid, expiry in list(self.sessions.items()):
            if expiry < now:
                del self.sessions[sid]
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = now + SESSION_TTL_S
        return sid

    def check(self, method: str, path: str, client_host: str | None, headers, cookies, origin_expected: str) -> Access:
        """May this request go on? ``headers`` and ``cookies``: mappings with lower-case header names."""
        session, bearer = "-", False
        if not is_local(client_host):
            auth = headers.get("authorization", "")
            sid = cookies.get(SESSION_COOKIE, "")
            if self.token is not None and auth.startswith("Bearer ") and hmac.compare_digest(
                    auth[7:].strip().encode(), self.token.encode()):
                bearer = True
            elif sid and self.sessions.get(sid, 0) > time.monotonic():
                session = sid
            elif not path.startswith(OPEN_PATHS):
                if self.token is None:
                    return Access(False, 403, "this dashboard serves only clients on the fleet host itself; start "
                                              "it with --http-token-file to let other machines in")
                return Access(False, 401, "log in with the dashboard token (POST /login, or send "
                                          "'Authorization: Bearer TOKEN')")
            elif self.token is None:
                return Access(False, 403, "this dashboard serves only clients on the fleet host itself")
        if method not in SAFE_METHODS and not bearer:
            origin = headers.get("origin")
            if origin is not None and origin != origin_expected:
                return Access(False, 403, f"cross-origin request from {origin[:100]} refused")
            if not hmac.compare_digest(headers.get("x-csrf-token", "").encode(), self.csrf_token(session).encode()):
                return Access(False, 403, "missing or wrong X-CSRF-Token (reload the page)")
        return Access(True, session=session, bearer=bearer)
