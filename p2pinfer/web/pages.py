"""The server-rendered pages: landing, register, log in / out, dashboard,
API keys, playground and the system view.

No front-end build step, and every action is an HTML form (POST, with a
CSRF token, see :mod:`~p2pinfer.web.security`) answered with a page or a
redirect (303). One small script (``static/playground.js``) makes the
playground stream its answer as it is generated, posting the same form to
``/playground/stream`` (NDJSON); without scripts the form posts as usual.
Pages that show an account need a session
(:mod:`~p2pinfer.web.sessions`); without one they redirect to
``/login?next=...``. Errors that the user can act on (a taken username, a
weak password, too many failed logins, a rate limit) are shown on the page
with the matching status code.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ..errors import (
    AuthenticationRequired,
    EmailTaken,
    InactiveUser,
    InvalidCredentials,
    InvalidEmail,
    InvalidParams,
    InvalidUsername,
    LimitError,
    LoginThrottled,
    P2PInferError,
    UnknownUser,
    UsernameTaken,
    WeakPassword,
)
from ..health import health_reasons
from .api import NdjsonDialect, prepare_inference
from .charts import bar_chart, day_range, hbar_chart
from .inputs import read_form, source_of
from .responses import error_headers, http_status
from .sessions import Session
from .streaming import StreamResponse

if TYPE_CHECKING:  # pragma: no cover
    from .site import WebSite

__all__ = ["Pages"]

log = logging.getLogger(__name__)

DASHBOARD_DAYS = 14
ROLE_NAMES = ("auth", "gateway", "inference", "metrics", "web")


_FIELD_OF: dict[type[P2PInferError], str] = {
    InvalidUsername: "username", UsernameTaken: "username", InvalidEmail: "email",
    EmailTaken: "email", WeakPassword: "password",
}


def _safe_next(value: str | None) -> str:
    """A local path to go to after logging in (never another site)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/dashboard"


def _friendly(err: P2PInferError) -> str:
    """What a person should read for ``err`` on a page."""
    if isinstance(err, LoginThrottled):
        wait: float = err.retry_after or 60.0
        minutes = max(1, round(wait / 60))
        when = f"{minutes} minute{'s' if minutes != 1 else ''}" if wait >= 60 \
            else f"{max(1, round(wait))} seconds"
        return f"Too many failed login attempts. Please wait {when} and try again."
    if isinstance(err, UnknownUser | InvalidCredentials):
        return "Wrong username or password."
    if isinstance(err, InactiveUser):
        return "This account is deactivated."
    if isinstance(err, UsernameTaken):
        return "That username is taken: please choose another one."
    if isinstance(err, EmailTaken):
        return "An account with this email address exists already."
    if isinstance(err, LimitError):
        retry = err.retry_after
        return f"{err.message}" + (f" (retry in {retry:.0f} s)" if retry else "")
    return err.message


def public_health(health: dict[str, Any]) -> dict[str, Any]:
    """``getSystemHealth`` as a non-member gets it: no node list, alerts by
    name and severity only, reasons naming no peer."""
    out: dict[str, Any] = {k: health[k] for k in ("status", "time", "checked_by", "alerting",
                                                  "summary", "models") if k in health}
    out["alerts"] = [{"name": a.get("name"), "severity": a.get("severity"),
                      "since": a.get("since") or a.get("started_at")}
                     for a in health.get("alerts") or [] if isinstance(a, dict)]
    out["reasons"] = health_reasons(
        [n for n in health.get("nodes") or [] if isinstance(n, dict)],
        health.get("models") or {},
        [a for a in health.get("alerts") or [] if isinstance(a, dict)], member=False)
    return out


class Pages:
    """The HTML routes of ``web`` (see the module docstring)."""

    def __init__(self, web: WebSite) -> None:
        self.web = web
        self.sessions = web.sessions
        self.csrf = web.csrf
        self.env = web.templates

    # -- rendering -------------------------------------------------------------------
    def render(self, request: Request, name: str, context: dict[str, Any], *,
               session: Session | None, status: int = 200,
               headers: dict[str, str] | None = None) -> HTMLResponse:
        seed, new_seed = self.csrf.seed(request)
        ctx = {"path": request.url.path, "user": session.principal if session else None,
               "csrf_token": self.csrf.token(seed), "notice": None, "error": None,
               "field": None, "origin": f"{request.url.scheme}://{request.url.netloc}",
               **context}
        html = self.env.get_template(name).render(ctx)
        response = HTMLResponse(html, status_code=status,
                                headers={"Cache-Control": "no-store", **(headers or {})})
        if new_seed:
            self.csrf.set_cookie(response, seed)
        self.sessions.apply(response, session)
        return response

    def error_page(self, request: Request, err: P2PInferError) -> HTMLResponse:
        """An error no page handled itself (a failed CSRF check, a bad form)."""
        status = http_status(err)
        return self.render(request, "error.html", {"status": status, "message": _friendly(err)},
                           session=None, status=status, headers=error_headers(err))

    async def _form(self, request: Request) -> dict[str, str]:
        form = await read_form(request)
        self.csrf.check(request, form.get(self.csrf.FIELD))
        return form

    async def _session_or_login(self, request: Request) -> Session | Response:
        session = await self.sessions.load(request)
        if session is None:
            target = quote(request.url.path, safe="/")
            response = RedirectResponse(f"/login?next={target}", status_code=303)
            if request.cookies.get(self.web.settings.session_cookie):
                self.sessions.clear(response)
            return response
        return session

    # -- public pages ------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        session = await self.sessions.load(request)
        return self.render(request, "index.html", {}, session=session)

    async def register(self, request: Request) -> Response:
        session = await self.sessions.load(request)
        values = {"username": "", "email": ""}
        if request.method == "GET":
            return self.render(request, "register.html", {"values": values}, session=session)
        form = await self._form(request)
        values = {"username": form.get("username", "")[:200],
                  "email": form.get("email", "")[:200]}
        try:
            await self.web.upstream.call("auth", "registerUser", {
                "username": form.get("username", ""), "email": form.get("email", ""),
                "password": form.get("password", ""), "source": source_of(request)})
        except P2PInferError as err:
            return self.render(request, "register.html",
                               {"values": values, "error": _friendly(err),
                                "field": err.data.get("field") or _FIELD_OF.get(type(err))},
                               session=session, status=http_status(err),
                               headers=error_headers(err))
        return RedirectResponse(f"/login?registered={quote(values['username'])}",
                                status_code=303)

    async def login(self, request: Request) -> Response:
        session = await self.sessions.load(request)
        if request.method == "GET":
            registered = request.query_params.get("registered", "")[:64]
            notice = "Account created: log in to continue." if registered else None
            if request.query_params.get("ended") == "all":
                notice = "Every session of your account has ended: log in again."
            return self.render(request, "login.html", {
                "values": {"login": registered},
                "next": _safe_next(request.query_params.get("next")),
                "notice": notice}, session=session)
        form = await self._form(request)
        login = form.get("login", "").strip()
        target = _safe_next(form.get("next"))
        try:
            if not login:
                raise InvalidParams("Enter your username or email.", data={"field": "login"})
            field = "email" if "@" in login else "username"
            result = await self.web.upstream.call("auth", "loginUser", {
                field: login, "password": form.get("password", ""),
                "source": source_of(request)})
        except P2PInferError as err:
            return self.render(request, "login.html", {
                "values": {"login": login[:200]}, "next": target, "error": _friendly(err)},
                session=None, status=http_status(err), headers=error_headers(err))
        await self.sessions.wait_for_user(result["user"]["user_id"])
        response = RedirectResponse(target, status_code=303)
        self.sessions.set_cookies(response, result)
        # a new CSRF value for the new session (no fixation across the login)
        self.csrf.set_cookie(response, self.csrf.seed_new())
        return response

    async def logout(self, request: Request) -> Response:
        await self._form(request)
        token = request.cookies.get(self.web.settings.session_cookie)
        if token:
            try:
                await self.web.upstream.call("auth", "logoutUser",
                                             {"token": token, "source": source_of(request)})
            except P2PInferError as err:
                log.info("logout: %s", err.message)
        response = RedirectResponse("/", status_code=303)
        self.sessions.clear(response)
        return response

    # -- account pages -------------------------------------------------------------------
    async def dashboard(self, request: Request) -> Response:
        session = await self._session_or_login(request)
        if isinstance(session, Response):
            return session
        uid = session.principal.user_id
        days = day_range(DASHBOARD_DAYS)
        account = await self.web.upstream.account(uid, since=days[0], logs=15)
        requests = dict.fromkeys(days, 0)
        tokens = dict.fromkeys(days, 0)
        keys = {k["id"]: k for k in account["keys"]}
        per_key: dict[str, dict[str, Any]] = {}
        for row in account["usage"]:
            if row["date"] in requests:
                requests[row["date"]] += row["request_count"]
                tokens[row["date"]] += row["tokens_used"]
            entry = per_key.setdefault(row["api_key_id"] or "", {"requests": 0, "tokens": 0})
            entry["requests"] += row["request_count"]
            entry["tokens"] += row["tokens_used"]

        def key_label(key_id: str | None) -> str:
            if not key_id:
                return "browser session"
            key = keys.get(key_id)
            if key is None:
                return key_id[:8]
            return str(key["name"] or f"p2p_{key['public_id']}…")

        key_rows = sorted(({"label": key_label(k), "revoked": bool(
            keys.get(k) and keys[k]["revoked_at"] is not None), **v}
            for k, v in per_key.items()), key=lambda r: -int(r["tokens"]))
        logs = [{"row": r, "key": key_label(r["api_key_id"])} for r in account["logs"]]
        quota: dict[str, Any] | None = None
        quota_error = None
        try:
            quota = await self.web.upstream.call("gateway", "getUserQuota",
                                                 {"auth": session.auth})
        except P2PInferError as err:
            quota_error = _friendly(err)
        charts = {
            "requests": bar_chart(list(requests.items()), title="Requests per day"),
            "tokens": bar_chart(list(tokens.items()), title="Tokens per day"),
            "keys": hbar_chart([(r["label"], r["tokens"]) for r in key_rows],
                               title="Tokens per API key") if key_rows else None,
        }
        totals = {"requests": sum(requests.values()), "tokens": sum(tokens.values())}
        return self.render(request, "dashboard.html", {
            "charts": charts, "totals": totals, "key_rows": key_rows, "logs": logs,
            "quota": quota, "quota_error": quota_error, "days": DASHBOARD_DAYS,
            "active_keys": sum(1 for k in keys.values()
                               if k["is_active"] and k["revoked_at"] is None),
        }, session=session)

    async def api_keys(self, request: Request) -> Response:
        session = await self._session_or_login(request)
        if isinstance(session, Response):
            return session
        context: dict[str, Any] = {"created": None}
        status = 200
        if request.method == "POST":
            form = await self._form(request)
            try:
                context["created"] = await self.web.upstream.call("auth", "generateApiKey", {
                    **session.auth, "name": form.get("name", "").strip()[:100],
                    "source": source_of(request)})
                status = 201
            except P2PInferError as err:
                context["error"] = _friendly(err)
                status = http_status(err)
        elif request.query_params.get("revoked"):
            context["notice"] = "The key was revoked: requests with it are refused from now on."
        return await self._keys_page(request, session, context, status)

    async def _keys_page(self, request: Request, session: Session, context: dict[str, Any],
                         status: int) -> Response:
        try:
            listed = await self.web.upstream.call("auth", "listApiKeys", session.auth)
            keys = sorted(listed.get("keys", []), key=lambda k: -float(k["created_at"]))
        except P2PInferError as err:
            keys = []
            context["error"] = context.get("error") or _friendly(err)
        return self.render(request, "api_keys.html", {"keys": keys, **context},
                           session=session, status=status)

    async def revoke_key(self, request: Request) -> Response:
        session = await self._session_or_login(request)
        if isinstance(session, Response):
            return session
        await self._form(request)
        try:
            await self.web.upstream.call("auth", "revokeApiKey", {
                **session.auth, "key_id": request.path_params["key_id"],
                "source": source_of(request)})
        except P2PInferError as err:
            return await self._keys_page(request, session, {"error": _friendly(err),
                                                            "created": None},
                                         http_status(err))
        response = RedirectResponse("/api-keys?revoked=1", status_code=303)
        self.sessions.apply(response, session)
        return response

    async def playground(self, request: Request) -> Response:
        session = await self._session_or_login(request)
        if isinstance(session, Response):
            return session
        values = {"prompt": "", "model": "", "max_tokens": "128", "temperature": "0.7"}
        context: dict[str, Any] = {"result": None}
        status = 200
        if request.method == "POST":
            form = await self._form(request)
            values = {k: form.get(k, v)[:100_000] for k, v in values.items()}
            try:
                params = self._prompt_params(values)
                params = await prepare_inference(self.web, params, session.auth)
                call = await self.web.upstream.inference(params, session.auth,
                                                          stream=False)
                try:
                    text = await call.collect()
                finally:
                    await call.aclose()
                context["result"] = {"text": text, "trailer": call.trailer}
            except P2PInferError as err:
                context["error"] = _friendly(err)
                status = http_status(err)
        try:  # the models that chat (not an embedding model)
            models = [m for m in await self.web.upstream.catalog.models(session.auth)
                      if "chat" in (m.get("capabilities") or ["chat"])]
        except P2PInferError:
            models = []
        return self.render(request, "playground.html",
                           {"values": values, "models": models, **context},
                           session=session, status=status)

    async def playground_stream(self, request: Request) -> Response:
        """The playground form's answer as it is generated, for the page's
        script: NDJSON lines ``{"delta"}``, then ``{"done", ...trailer}`` (an
        ``{"error"}`` line if it fails midway). Errors before the answer
        starts are a JSON ``{"error"}`` with their status code."""
        session = await self.sessions.load(request)
        try:
            if session is None:
                raise AuthenticationRequired("Your session has ended: log in again.")
            form = await self._form(request)
            values = {k: form.get(k, "")[:100_000]
                      for k in ("prompt", "model", "max_tokens", "temperature")}
            params = self._prompt_params(values)
            params = await prepare_inference(self.web, params, session.auth)
            call = await self.web.upstream.inference(params, session.auth)
        except P2PInferError as err:
            failed = JSONResponse({"error": {**err.to_dict(), "message": _friendly(err)}},
                                  status_code=http_status(err),
                                  headers={"Cache-Control": "no-store", **error_headers(err)})
            self.sessions.apply(failed, session)
            return failed
        response = StreamResponse(call, NdjsonDialect())
        self.sessions.apply(response, session)
        return response

    @staticmethod
    def _prompt_params(values: dict[str, str]) -> dict[str, Any]:
        if not values["prompt"].strip():
            raise InvalidParams("Write a prompt first.", data={"field": "prompt"})
        params: dict[str, Any] = {"prompt": values["prompt"]}
        if values["model"]:
            params["model"] = values["model"]
        try:
            params["max_tokens"] = int(values["max_tokens"])
            params["temperature"] = float(values["temperature"])
        except ValueError:
            raise InvalidParams("Max tokens must be a whole number and temperature a number.",
                                data={"field": "max_tokens"}) from None
        return params

    async def system(self, request: Request) -> Response:
        session = await self._session_or_login(request)
        if isinstance(session, Response):
            return session
        up = self.web.upstream
        # The member list and per-node health are the operator's view: a
        # user who is not an admin sees what getSystemHealth shows to
        # non-members (status, counts, models, alert names).
        admin = session.principal.is_admin
        online: dict[str, set[str]] = {}
        if admin:
            with anyio.move_on_after(3):
                for role in ROLE_NAMES:
                    online[role] = set(await up.peers(role))
        members = []
        for m in sorted(await up.members() if admin else [], key=lambda m: m["admitted_at"]):
            seen = [r for r in m["roles"] if m["peer_id"] in online.get(r, set())]
            members.append({"peer_id": m["peer_id"], "roles": m["roles"],
                            "admitted_at": m["admitted_at"], "expires_at": m["expires_at"],
                            "removed": m["removed_after"] is not None, "online": seen,
                            "self": m["peer_id"] == self.web.peer_id})
        context: dict[str, Any] = {"members": members, "models": [], "gateway": None,
                                   "swarm": None, "problems": [], "admin": admin}
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "models": lambda: up.catalog.models(session.auth),
            "gateway": lambda: up.call("gateway", "getServiceHealth", {}),
            "swarm": lambda: up.call("metrics", "getSystemHealth", {}),
        }
        for key, call in calls.items():
            try:
                context[key] = await call()
            except P2PInferError as err:
                context["problems"].append(f"{key}: {err.message}")
        if not admin and context["swarm"]:
            context["swarm"] = public_health(context["swarm"])
        return self.render(request, "system.html", context, session=session)

    def routes(self) -> list[Route]:
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/register", self.register, methods=["GET", "POST"]),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/dashboard", self.dashboard, methods=["GET"]),
            Route("/api-keys", self.api_keys, methods=["GET", "POST"]),
            Route("/api-keys/{key_id}/revoke", self.revoke_key, methods=["POST"]),
            Route("/playground", self.playground, methods=["GET", "POST"]),
            Route("/playground/stream", self.playground_stream, methods=["POST"]),
            Route("/system", self.system, methods=["GET"]),
        ]
