"""Browser-facing protections: security headers, a request body limit and
CSRF tokens for the HTML forms.

- :class:`SecurityHeaders` (ASGI middleware) adds to every response:
  ``Content-Security-Policy`` (no inline script, no framing: ``frame-ancestors
  'none'``), ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
  ``Referrer-Policy: same-origin``, ``Cross-Origin-Opener-Policy`` and a
  ``Permissions-Policy`` that turns off what the pages never use.
- :class:`BodyLimit` (ASGI middleware): a body larger than
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
from collections.abc import Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from ..errors import FrameTooLarge, InvalidParams, P2PInferError, PermissionDenied

__all__ = ["BodyLimit", "CSP", "CsrfGuard", "SecurityHeaders"]

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

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]


class SecurityHeaders:
    """ASGI middleware: the security headers above on every HTTP response."""

    def __init__(self, app: ASGIApp, *, hsts: bool = False) -> None:
        self.app = app
        self.headers = dict(HEADERS)
        if hsts:
            self.headers["strict-transport-security"] = "max-age=31536000"
        self._raw = [(name.encode(), value.encode()) for name, value in self.headers.items()]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                # ASGI header names are lower-case bytes; a response's own
                # value of one of ours (a page's CSP, say) is kept
                headers = list(message.get("headers") or ())
                present = {name.lower() for name, _ in headers}
                headers += [item for item in self._raw if item[0] not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """ASGI middleware: bodies over ``limit`` bytes get 413, and bodies that
    take more than ``timeout`` seconds to arrive get 422 (InvalidParams,
    ``data.field = "body"``); either answer says ``Connection: close``, so
    the server drops the connection rather than read the rest of the body.

    HTTP servers stop timing a connection once a request's headers are in,
    so without the second rule a client sending its body a byte at a time
    (a slow-loris) would hold a connection and a task for ever.

    Args:
        app: the app.
        limit: the largest body accepted, in bytes.
        render: makes the error response for a request (its dialect).
        timeout: seconds from the first read of the body to its last byte.
    """

    def __init__(self, app: ASGIApp, *, limit: int,
                 render: Callable[[Scope, P2PInferError], Response],
                 timeout: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.render = render
        self.timeout = timeout

    def error(self) -> FrameTooLarge:
        return FrameTooLarge(f"the request body is larger than {self.limit} bytes",
                             data={"limit": self.limit})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    response = self.render(scope, self.error())
                    response.headers["connection"] = "close"
                    await response(scope, receive, send)
                    return
        seen = 0
        deadline: float | None = None
        complete = False
        refused = False

        async def limited() -> dict[str, Any]:
            nonlocal seen, deadline, complete, refused
            if complete:  # later reads wait for the disconnect: no deadline
                message: dict[str, Any] = await receive()
                return message
            if deadline is None:
                deadline = anyio.current_time() + self.timeout
            with anyio.CancelScope(deadline=deadline):
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:
                        refused = True
                        raise self.error()
                    complete = not message.get("more_body", False)
                return message
            refused = True
            raise InvalidParams(f"the request body did not arrive within {self.timeout:g} s",
                                data={"field": "body", "timeout": self.timeout})

        async def closing(message: dict[str, Any]) -> None:
            if refused and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited, closing)


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
