"""Who may act on the dashboard, and the CSRF check of every action.

Two ways to be an admin (allowed to kick and purge):

- **the admin token** (``[dashboard] token`` or ``DRAMATURG_DASHBOARD_TOKEN``): the sign-in
  form takes it and a name; the answer is a session cookie ``name|issued|signature``,
  signed with the token itself (HMAC-SHA256), so changing the token signs everyone out
  and nothing is stored on the server. It is ``HttpOnly`` and ``SameSite=Strict`` and
  lasts :data:`SESSION_S`.
- **the mounting site's hook** (``app(settings, admin=hook)``): ``hook(request)`` returns
  the name of the signed-in admin, or None; the site's own login decides.

Without either the dashboard is read-only. Every comparison of a secret runs in
constant time (:func:`hmac.compare_digest`).

CSRF: every page carries a random ``dramaturg_csrf`` cookie, and every form a field
derived from it with the app's key (HMAC). A POST whose field does not match its cookie
is refused (403) before anything else is looked at: another site can make a browser send
the cookie, but can neither read it nor compute the field.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from starlette.requests import Request

#: How long a sign-in lasts (seconds).
SESSION_S = 12 * 3600
SESSION_COOKIE = "dramaturg_admin"
CSRF_COOKIE = "dramaturg_csrf"
CSRF_FIELD = "csrf_token"

#: A mounting site's admin hook: the request -> the admin's name, or None.
AdminHook = Callable[[Request], str | None]


def _sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


class Guard:
    """The admin check and the CSRF tokens of one dashboard app."""

    def __init__(self, token: str | None, hook: AdminHook | None = None) -> None:
        self.token = token or None
        self.hook = hook
        # The CSRF key: derived from the token when there is one (stable across
        # processes behind one address), else random for this process.
        self._csrf_key = (
            hashlib.sha256(b"dramaturg-csrf|" + self.token.encode()).digest() if self.token else secrets.token_bytes(32)
        )

    @property
    def can_sign_in(self) -> bool:
        """A token is configured, so the sign-in form can make an admin."""
        return self.token is not None

    @property
    def read_only(self) -> bool:
        """No one can act: no token, no hook."""
        return self.token is None and self.hook is None

    # -- the admin ---------------------------------------------------------------------

    def token_matches(self, given: str) -> bool:
        if self.token is None:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def session_cookie(self, name: str) -> str:
        """The signed value of a session for ``name`` (no ``|`` in it), issued now."""
        assert self.token is not None
        body = f"{name}|{int(time.time())}"
        return f"{body}|{_sign(self.token.encode(), body)}"

    def admin(self, request: Request) -> str | None:
        """The name of the admin making ``request``, or None (read-only)."""
        if self.hook is not None:
            name = self.hook(request)
            if name:
                return name
        cookie = request.cookies.get(SESSION_COOKIE)
        if self.token is None or not cookie:
            return None
        body, _, signature = cookie.rpartition("|")
        if not hmac.compare_digest(signature.encode(), _sign(self.token.encode(), body).encode()):
            return None
        name, _, issued = body.rpartition("|")
        if not issued.isdigit() or time.time() - int(issued) > SESSION_S:
            return None
        return name

    # -- CSRF --------------------------------------------------------------------------

    @staticmethod
    def csrf_cookie(request: Request) -> tuple[str, bool]:
        """The request's CSRF cookie, and whether it is new (to be set on the answer)."""
        value = request.cookies.get(CSRF_COOKIE)
        if value and len(value) == 43:
            return value, False
        return secrets.token_urlsafe(32), True

    def csrf_token(self, cookie: str) -> str:
        """The form field that goes with the CSRF cookie ``cookie``."""
        return hmac.new(self._csrf_key, cookie.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, request: Request, given: str | None) -> bool:
        cookie = request.cookies.get(CSRF_COOKIE)
        if not cookie or not given:
            return False
        return hmac.compare_digest(given.encode(), self.csrf_token(cookie).encode())
