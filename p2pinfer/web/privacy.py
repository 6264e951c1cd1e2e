"""Data export and account erasure over HTTP: REST routes and the account page.

The auth role does the work (``exportUserData``, ``eraseUser``, see
:mod:`p2pinfer.auth.privacy`); these routes only carry it.

====================================  ===============  ===============================
route                                 credentials      answer
====================================  ===============  ===============================
GET  /api/auth/export[?user_id=]      session token    the export (JSON); another
                                                       user's for admins
DELETE /api/auth/me ``{password}``    session token    {user_id, erased_at,
                                                       revoked_keys, redacted, ...}
DELETE /api/auth/users/{user_id}      session token    the same, for admins
                                      (an admin's)
====================================  ===============  ===============================

Pages (session cookie; forms carry the CSRF token):

- ``GET /account``: the account, the form that changes the password, a
  link to download the export and the form that deletes the account
  (password required);
- ``POST /account/password``: changes the password; this browser gets the
  new session (every other session of the account ends);
- ``POST /account/logout-all``: ends every session of the account, this
  one included (a lost or shared device);
- ``GET /account/export``: the export as a file download;
- ``POST /account/delete``: erases the account, ends the session (the
  cookies are cleared) and shows a confirmation.
"""

from __future__ import annotations

import datetime
import json
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ..errors import InvalidParams, P2PInferError, WeakPassword
from .credentials import credentials_from_headers
from .inputs import only_keys, read_json, source_of
from .responses import error_headers, http_status

if TYPE_CHECKING:  # pragma: no cover
    from .site import WebSite

__all__ = ["privacy_routes"]

NO_STORE = {"Cache-Control": "no-store"}


def _export_filename() -> str:
    return f"p2pinfer-export-{datetime.date.today().isoformat()}.json"


def privacy_routes(web: WebSite) -> list[Route]:
    """The REST routes and pages of data export and erasure."""
    up = web.upstream
    pages = web.pages

    def token(request: Request) -> dict[str, str]:
        return credentials_from_headers(request.headers, allow=("token",))

    # -- REST ----------------------------------------------------------------------------
    async def export(request: Request) -> Response:
        query = only_keys(dict(request.query_params), ("user_id",))
        result = await up.call("auth", "exportUserData", {
            **token(request), **query, "source": source_of(request)})
        return JSONResponse(result, headers=NO_STORE)

    async def erase_me(request: Request) -> Response:
        body = only_keys(await read_json(request), ("password",))
        if "password" not in body:
            raise InvalidParams("password: required to delete your own account",
                                data={"field": "password"})
        result = await up.call("auth", "eraseUser", {
            **token(request), "password": body["password"], "source": source_of(request)})
        return JSONResponse(result, headers=NO_STORE)

    async def erase_user(request: Request) -> Response:
        result = await up.call("auth", "eraseUser", {
            **token(request), "user_id": request.path_params["user_id"],
            "source": source_of(request)})
        return JSONResponse(result, headers=NO_STORE)

    # -- pages ---------------------------------------------------------------------------
    async def account(request: Request) -> Response:
        session = await pages._session_or_login(request)
        if isinstance(session, Response):
            return session
        context: dict[str, Any] = {"account": None, "erased": None}
        if request.query_params.get("password") == "changed":
            context["notice"] = ("Your password was changed. Every other session of your "
                                 "account has ended; API keys still work.")
        try:
            context["account"] = await up.call("auth", "getUser", session.auth)
        except P2PInferError as err:
            context["error"] = err.message
        return pages.render(request, "account.html", context, session=session)

    async def account_export(request: Request) -> Response:
        session = await pages._session_or_login(request)
        if isinstance(session, Response):
            return session
        result = await up.call("auth", "exportUserData", {
            **session.auth, "source": source_of(request)})
        response = Response(json.dumps(result, indent=2, sort_keys=True),
                            media_type="application/json", headers={
                                **NO_STORE, "Content-Disposition":
                                f'attachment; filename="{_export_filename()}"'})
        web.sessions.apply(response, session)
        return response

    async def account_refused(request: Request, session: Any, err: P2PInferError,
                              field: str) -> Response:
        """The account page again, with ``err`` shown and ``field`` marked."""
        account_view: dict[str, Any] | None = None
        try:
            account_view = await up.call("auth", "getUser", session.auth)
        except P2PInferError:
            pass
        return pages.render(request, "account.html", {
            "account": account_view, "erased": None, "error": err.message, "field": field},
            session=session, status=http_status(err), headers=error_headers(err))

    async def account_password(request: Request) -> Response:
        session = await pages._session_or_login(request)
        if isinstance(session, Response):
            return session
        form = await pages._form(request)
        try:
            new = form.get("new_password", "")
            if new != form.get("confirm_password", ""):
                raise InvalidParams("The two new passwords differ.",
                                    data={"field": "confirm_password"})
            result = await up.call("auth", "changePassword", {
                **session.auth, "current_password": form.get("current_password", ""),
                "new_password": new, "source": source_of(request)})
        except P2PInferError as err:
            return await account_refused(request, session, err, err.data.get("field") or (
                "new_password" if isinstance(err, WeakPassword) else "current_password"))
        # this browser continues with the new session; every other one is over
        response = RedirectResponse("/account?password=changed", status_code=303)
        web.sessions.set_cookies(response, result)
        pages.csrf.set_cookie(response, pages.csrf.seed_new())
        return response

    async def account_logout_all(request: Request) -> Response:
        session = await pages._session_or_login(request)
        if isinstance(session, Response):
            return session
        await pages._form(request)  # the CSRF check
        await up.call("auth", "logoutEverywhere", {**session.auth,
                                                   "source": source_of(request)})
        response = RedirectResponse("/login?ended=all", status_code=303)
        web.sessions.clear(response)
        return response

    async def account_delete(request: Request) -> Response:
        session = await pages._session_or_login(request)
        if isinstance(session, Response):
            return session
        form = await pages._form(request)
        try:
            if form.get("confirm") != "yes":
                raise InvalidParams("Tick the box to confirm that the account goes for good.",
                                    data={"field": "confirm"})
            erased = await up.call("auth", "eraseUser", {
                **session.auth, "password": form.get("password", ""),
                "source": source_of(request)})
        except P2PInferError as err:
            return await account_refused(request, session, err,
                                         err.data.get("field") or "password")
        response = pages.render(request, "account.html", {"account": None, "erased": erased},
                                session=None)
        web.sessions.clear(response)
        return response

    return [
        Route("/api/auth/export", export, methods=["GET"]),
        Route("/api/auth/me", erase_me, methods=["DELETE"]),
        Route("/api/auth/users/{user_id}", erase_user, methods=["DELETE"]),
        Route("/account", account, methods=["GET"]),
        Route("/account/export", account_export, methods=["GET"]),
        Route("/account/password", account_password, methods=["POST"]),
        Route("/account/logout-all", account_logout_all, methods=["POST"]),
        Route("/account/delete", account_delete, methods=["POST"]),
    ]
