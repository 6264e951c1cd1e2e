"""Browser-facing protections: security headers, a request body limit and
CSRF tokens for the HTML forms.

- :func:`security_headers`, added to every response by the app's edge:
  ``Content-Security-Policy`` (no inline script, no framing: ``frame-ancestors
  'none'``), ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
  ``Referrer-Policy: same-origin``, ``Cross-Origin-Opener-Policy`` and a
  ``Permissions-Policy`` that turns off what the pages never use.
- :class:`BodyLimit` (applied by the app's edge): a body larger than
  ``[web] max_body_bytes`` is refused with 413, from ``Content-Length``
  before it is read, or while reading a chunked body.
- :class:`CsrfGuard`: a random value in an HttpOnly, SameSite=Strict cookie,
  and in every form an HMAC of it under a key derived from the node key; a
  POST must carry the HMAC of its own cookie, and a request whose
  ``Origin`` (or ``Sec-Fetch-Site``) says it came from another site is
  refused whatever it carries.

Session cookies (HttpOnly, SameSite=Lax, Secure under TLS) are set by the
pages module; the JSON API never reads cookies, so it needs no CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import MutableMapping
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from ..errors import FrameTooLarge, InvalidParams, PermissionDenied

__all__ = ["BodyLimit", "BodyReader", "CSP", "CsrfGuard", "add_security_headers",
           "security_headers"]

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=()",
}

Scope = MutableMapping[str, Any]


def security_headers(*, hsts: bool = False) -> list[tuple[bytes, bytes]]:
    """The headers above as ASGI pairs (lower-case bytes), with
    ``Strict-Transport-Security`` when the site is served over TLS."""
    headers = dict(HEADERS)
    if hsts:
        headers["strict-transport-security"] = "max-age=31536000"
    return [(name.encode(), value.encode()) for name, value in headers.items()]


def add_security_headers(headers: list[tuple[bytes, bytes]],
                         ours: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` (a response's) with each of ``ours`` it does not set
    itself: a page's own CSP, say, is kept."""
    present = {name.lower() for name, _ in headers}
    return headers + [item for item in ours if item[0] not in present]


class BodyLimit:
    """The request body rules: bodies over ``limit`` bytes get 413, and
    bodies that take more than ``timeout`` seconds to arrive get 422
    (InvalidParams, ``data.field = "body"``); either answer says
    ``Connection: close``, so the server drops the connection rather than
    read the rest of the body.

    HTTP servers stop timing a connection once a request's headers are in,
    so without the second rule a client sending its body a byte at a time
    (a slow-loris) would hold a connection and a task for ever. The web
    app's edge (:class:`~p2pinfer.web.app.Edge`) applies them: a declared
    length over the limit is refused before the body is read
    (:meth:`declared_too_big`), and every read goes through a
    :class:`BodyReader`.

    Args:
        limit: the largest body accepted, in bytes.
        timeout: seconds from the first read of the body to its last byte.
    """

    def __init__(self, *, limit: int, timeout: float = 30.0) -> None:
        self.limit = limit
        self.timeout = timeout

    def error(self) -> FrameTooLarge:
        return FrameTooLarge(f"the request body is larger than {self.limit} bytes",
                             data={"limit": self.limit})

    def declared_too_big(self, scope: Scope) -> bool:
        """Whether the request's ``Content-Length`` is over the limit."""
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value) > self.limit
                except ValueError:
                    return False
        return False


class BodyReader:
    """One request's ``receive``, under ``rules``; ``refused`` says the body
    was refused (the response must close the connection)."""

    __slots__ = ("_receive", "_rules", "_seen", "_deadline", "_complete", "refused")

    def __init__(self, receive: Any, rules: BodyLimit) -> None:
        self._receive = receive
        self._rules = rules
        self._seen = 0
        self._deadline: float | None = None
        self._complete = False
        self.refused = False

    async def __call__(self) -> dict[str, Any]:
        if self._complete:  # later reads wait for the disconnect: no deadline
            message: dict[str, Any] = await self._receive()
            return message
        if self._deadline is None:
            self._deadline = anyio.current_time() + self._rules.timeout
        with anyio.CancelScope(deadline=self._deadline):
            message = await self._receive()
            if message["type"] == "http.request":
                self._seen += len(message.get("body", b""))
                if self._seen > self._rules.limit:
                    self.refused = True
                    raise self._rules.error()
                self._complete = not message.get("more_body", False)
            return message
        self.refused = True
        timeout = self._rules.timeout
        raise InvalidParams(f"the request body did not arrive within {timeout:g} s",
                            data={"field": "body", "timeout": timeout})


class CsrfGuard:
    """CSRF tokens for the HTML forms (see the module docstring).

    Args:
        key: the HMAC key (derive it from something secret and stable).
        cookie: the name of the cookie holding the random value.
        secure: mark the cookie Secure (TLS).
    """

    FIELD = "csrf_token"

    def __init__(self, key: bytes, *, cookie: str, secure: bool) -> None:
        self.key = key
        self.cookie = cookie
        self.secure = secure

    def _sign(self, seed: str) -> str:
        return hmac.new(self.key, f"csrf:{seed}".encode(), hashlib.sha256).hexdigest()

    def seed(self, request: Request) -> tuple[str, bool]:
        """The request's CSRF cookie value, or a new one (``True``: set it)."""
        seed = request.cookies.get(self.cookie, "")
        if len(seed) == 43 and seed.replace("-", "a").replace("_", "a").isalnum():
            return seed, False
        return self.seed_new(), True

    @staticmethod
    def seed_new() -> str:
        """A fresh random value (after a login, so a planted value is dropped)."""
        return secrets.token_urlsafe(32)

    def token(self, seed: str) -> str:
        """The form token for ``seed``."""
        return self._sign(seed)

    def set_cookie(self, response: Response, seed: str) -> None:
        response.set_cookie(self.cookie, seed, httponly=True, samesite="strict",
                            secure=self.secure, path="/")

    def check(self, request: Request, form_token: Any) -> None:
        """Refuse a form post that is not from one of our pages.

        Raises:
            PermissionDenied: cross-site origin, no cookie, or a wrong token.
        """
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin is not None and origin != "null" and origin != own:
            raise PermissionDenied("cross-site form post refused", data={"reason": "csrf"})
        if request.headers.get("sec-fetch-site") == "cross-site":
            raise PermissionDenied("cross-site form post refused", data={"reason": "csrf"})
        seed = request.cookies.get(self.cookie)
        if not seed or not isinstance(form_token, str) or \
                not hmac.compare_digest(self._sign(seed), form_token):
            raise PermissionDenied("this form has expired or did not come from this site; "
                                   "reload the page and try again", data={"reason": "csrf"})
