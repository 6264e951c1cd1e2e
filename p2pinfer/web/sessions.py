"""Browser sessions: the auth role's session tokens kept in cookies.

The access token and the refresh token each live in an HttpOnly,
SameSite=Lax cookie (Secure under TLS), so page scripts never see them.
On each page the access token is checked offline against this node's
ledger (:class:`~p2pinfer.auth.Authenticator`); once it has expired the
refresh token is traded for a new pair (``refreshToken``, which rotates
it) and the new cookies go out with the page. Logging out ends the session
on every node (``logoutUser``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from ..credentials import Principal
from ..errors import AccessError, P2PInferError, TokenExpired
from .inputs import source_of

if TYPE_CHECKING:  # pragma: no cover
    from .site import WebSite

__all__ = ["Session", "SessionManager"]

log = logging.getLogger(__name__)


@dataclass
class Session:
    """A logged-in browser: who, the access token, and new cookies to set."""

    principal: Principal
    token: str
    renewed: dict[str, Any] | None = None

    @property
    def auth(self) -> dict[str, str]:
        return {"token": self.token}


class SessionManager:
    """Reads, renews, sets and clears the session cookies of ``web``."""

    def __init__(self, web: WebSite) -> None:
        self.web = web
        self.settings = web.settings

    @property
    def secure(self) -> bool:
        return self.web.secure

    async def load(self, request: Request) -> Session | None:
        """The request's session, renewed if its access token expired;
        None when there is none or it is no longer valid."""
        token = request.cookies.get(self.settings.session_cookie)
        if not token:
            return None
        try:
            # (a login on another auth node gets a second to replicate here)
            return Session(await self.web.upstream.session(token), token)
        except TokenExpired:
            pass
        except AccessError:
            return None
        refresh = request.cookies.get(self.settings.refresh_cookie)
        if not refresh:
            return None
        try:
            renewed = await self.web.upstream.call(
                "auth", "refreshToken",
                {"refresh_token": refresh, "source": source_of(request)})
            principal = await self.web.upstream.session(renewed["token"])
        except P2PInferError as exc:
            log.debug("session refresh refused: %s", exc.message)
            return None
        return Session(principal, renewed["token"], renewed)

    async def wait_for_user(self, user_id: str) -> None:
        """Wait (briefly) until this node's ledger knows ``user_id``."""
        await self.web.upstream.wait_for_user(user_id)

    def set_cookies(self, response: Response, session: dict[str, Any]) -> None:
        """Put a session (``loginUser`` / ``refreshToken`` result) in cookies."""
        now = time.time()
        lifetime = int(max(60, float(session.get("refresh_expires_at") or now + 3600) - now))
        for name, value in ((self.settings.session_cookie, session["token"]),
                            (self.settings.refresh_cookie, session["refresh_token"])):
            response.set_cookie(name, value, max_age=lifetime, httponly=True, samesite="lax",
                                secure=self.secure, path="/")

    def clear(self, response: Response) -> None:
        for name in (self.settings.session_cookie, self.settings.refresh_cookie):
            response.delete_cookie(name, path="/", httponly=True, samesite="lax",
                                   secure=self.secure)

    def apply(self, response: Response, session: Session | None) -> None:
        """Set renewed cookies on ``response`` if the session was renewed."""
        if session is not None and session.renewed is not None:
            self.set_cookies(response, session.renewed)
