"""The auth role: the authentication service over RPC.

Every method is ``PUBLIC`` (any peer that completed the Noise handshake may
call it) and authenticates the caller from its params: a password, a
session token (``"token"``), an API key (``"api_key"``), or the gateway's
form ``"auth": {"token" | "api_key": ...}``; never from the peer id alone.
The one exception is ``as_operator`` (below), which a network member must
ask for explicitly. Param names are snake_case; the original API's
camelCase (``userId``, ``apiKey``, ``keyId``, ``refreshToken``,
``isActive``, ``isAdmin``, ``asOperator``) is accepted too. A missing,
unknown or ill-typed param is ``InvalidParams`` with ``data.field`` naming it.

``source`` (optional on every method): the client's address (e.g. the IP
the web role saw), used for per-source throttling and the audit trail. It
is honoured only from network members (the web role); for anyone else the
source is their peer id.

=================  ==============================================  ====================
method             params → result                                 errors (besides
                                                                   InvalidParams)
=================  ==============================================  ====================
registerUser       {username, email, password} → user              InvalidUsername,
                                                                   InvalidEmail,
                                                                   WeakPassword,
                                                                   UsernameTaken,
                                                                   EmailTaken,
                                                                   RegistrationLost,
                                                                   RateLimited
loginUser          {username | email, password} → session          InvalidCredentials
                                                                   (unknown user or wrong
                                                                   password: one error),
                                                                   InactiveUser,
                                                                   LoginThrottled
refreshToken       {refresh_token} → session (rotated)             InvalidToken,
                                                                   TokenExpired,
                                                                   TokenRevoked,
                                                                   UntrustedIssuer,
                                                                   InactiveUser
logoutUser         {token | refresh_token} → {session_id,          InvalidToken,
                   revoked, already_revoked}                       UntrustedIssuer
generateApiKey     {token, name?, user_id?} → {api_key, key_id,    token errors,
                   public_id, name, created_at, user_id}           PermissionDenied,
                                                                   NotFound,
                                                                   QuotaExceeded
validateApiKey     {api_key} → principal                           InvalidApiKey,
                                                                   RevokedApiKey,
                                                                   InactiveUser,
                                                                   UnknownUser,
                                                                   RegistrationLost
listApiKeys        {token | api_key, user_id?} → {keys: [key]}     credential errors,
                                                                   PermissionDenied
revokeApiKey       {token, key_id} → {key_id, revoked_at,          token errors,
                   already_revoked}                                NotFound,
                                                                   PermissionDenied
getUserUsage       {token | api_key, user_id?, since?, until?}     credential errors,
                   → {user_id, since, until, rows, per_key,        PermissionDenied,
                   total}                                          NotFound
getUser            {token | api_key, user_id?} → user              as above
setUserTier        {token | as_operator, user_id, tier} → user     PermissionDenied,
                                                                   NotMember, NotFound
setUserActive      {token | as_operator, user_id, is_active}       as above
                   → user
setUserAdmin       {token | as_operator, user_id, is_admin}        as above
                   → user
exportUserData     {token | as_operator, user_id?} → export        token errors,
                   (account, api_keys, usage, request_logs,        PermissionDenied,
                   audit: see p2pinfer.auth.privacy)               NotFound
eraseUser          {token, password} (own account), or             token errors,
                   {token | as_operator, user_id} (admins,         InvalidCredentials,
                   operators) → {user_id, erased_at,               LoginThrottled,
                   revoked_keys, redacted, already_erased}         PermissionDenied,
                                                                   NotFound
=================  ==============================================  ====================

- *user*: ``{user_id, username, email, tier, is_active, is_admin,
  created_at, updated_at}``;
- *session*: ``{token, token_type: "Bearer", expires_at, expires_in,
  refresh_token, refresh_expires_at, session_id, issuer, user}``;
- *principal*: ``{user_id, username, tier, is_admin, api_key_id, via}``;
- *key*: ``{key_id, public_id, name, created_at, last_used_at, is_active,
  revoked_at}``: never the key (shown once by ``generateApiKey``) or its hash;
  ``last_used_at`` is written at most once a minute per key, so it may lag.

A user acts on their own account; an admin may name another ``user_id``.
Key management (``generateApiKey``, ``revokeApiKey``) takes a session token
only, so a leaked API key cannot mint or revoke keys.

**Admins.** ``users.is_admin`` in the ledger. It is changed only through
``setUserAdmin``, by an existing admin (token) or by a network operator:
a caller that is a network member (its peer id holds an owner-signed
certificate; the operator's own node, or the CLI on it) and passes
``as_operator: true`` with no token. That is how the first admin is made.
Admins (and operators) may change any user's tier and active flag, and read
or manage any user's keys and usage. Every change is audited.

**Privacy** (:mod:`.privacy`): ``exportUserData`` returns everything the
ledger holds about a user; ``eraseUser`` erases an account everywhere
(a signed tombstone; usage totals stay). Both take a session token, never
an API key; erasing one's own account also takes the password.
"""

from __future__ import annotations

import datetime
import logging
import uuid
from typing import TYPE_CHECKING, Any

import trio

from ..credentials.authenticator import Principal, Via
from ..errors import InvalidParams, NotMember, PermissionDenied
from ..grants import OPERATOR, RELAYS
from ..rpc.server import Access, CallContext, rpc_method
from .privacy import Privacy
from .service import Actor, AuthService, key_view, user_view

if TYPE_CHECKING:
    from ..context import RoleContext

__all__ = ["AuthRole"]

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 60.0
MAX_SECRET_PARAM = 4096
_ALIASES = {
    "userId": "user_id", "apiKey": "api_key", "keyId": "key_id",
    "refreshToken": "refresh_token", "isActive": "is_active", "isAdmin": "is_admin",
    "asOperator": "as_operator", "currentPassword": "current_password",
    "newPassword": "new_password",
}
_CREDENTIALS = ("token", "api_key", "auth")


class Params:
    """The params of one call, checked field by field (``InvalidParams``
    names the field)."""

    def __init__(self, params: Any, allowed: tuple[str, ...]) -> None:
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidParams("params: must be a map", data={"field": "params"})
        out: dict[str, Any] = {}
        for key, value in params.items():
            name = _ALIASES.get(key, key) if isinstance(key, str) else key
            if name not in allowed and name != "source":
                shown = str(key)[:64]
                raise InvalidParams(f"{shown}: unknown parameter", data={"field": shown})
            if name in out:
                raise InvalidParams(f"{name}: given twice", data={"field": name})
            out[name] = value
        self.data = out

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def string(self, name: str, *, required: bool = True, max_len: int = 200,
               min_len: int = 1) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                raise InvalidParams(f"{name}: required", data={"field": name})
            return None
        if not isinstance(value, str) or not min_len <= len(value) <= max_len:
            raise InvalidParams(f"{name}: must be a string of {min_len}-{max_len} characters",
                                data={"field": name})
        return value

    def required(self, name: str, *, max_len: int = 200) -> str:
        value = self.string(name, max_len=max_len)
        assert value is not None
        return value

    def boolean(self, name: str, *, required: bool = True) -> bool | None:
        value = self.data.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, bool):
            raise InvalidParams(f"{name}: must be true or false", data={"field": name})
        return value

    def uuid(self, name: str, *, required: bool = True) -> str | None:
        value = self.string(name, required=required, max_len=36)
        if value is None:
            return None
        try:
            ok = str(uuid.UUID(value)) == value
        except ValueError:
            ok = False
        if not ok:
            raise InvalidParams(f"{name}: must be a lower-case UUID", data={"field": name})
        return value

    def required_uuid(self, name: str) -> str:
        value = self.uuid(name)
        assert value is not None
        return value

    def date(self, name: str) -> str | None:
        value = self.string(name, required=False, max_len=10)
        if value is None:
            return None
        try:
            datetime.date.fromisoformat(value)
        except ValueError:
            raise InvalidParams(f"{name}: must be a date YYYY-MM-DD",
                                data={"field": name}) from None
        if len(value) != 10:
            raise InvalidParams(f"{name}: must be a date YYYY-MM-DD", data={"field": name})
        return value

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.data.get(name)
        if value not in choices:
            raise InvalidParams(f"{name}: must be one of {', '.join(choices)}",
                                data={"field": name})
        return str(value)

    def key_name(self, name: str) -> str | None:
        value = self.string(name, required=False, max_len=100, min_len=0)
        if value is None:
            return None
        value = value.strip()
        if any(not ch.isprintable() for ch in value):
            raise InvalidParams(f"{name}: must be printable text", data={"field": name})
        return value or None


class AuthRole:
    """The auth role (see the module docstring for its RPC methods).

    Args:
        node: the node; its certificate must grant the ``auth`` role, or its
            ledger writes (users, keys, sessions, audit) are refused.

    Raises:
        ConfigError: a bad ``[auth]`` value, or no ledger.
    """

    name = "auth"

    def __init__(self, node: RoleContext) -> None:
        self.node = node
        self.service = AuthService(node)  # the node's [auth] settings and authenticator
        self.settings = self.service.settings
        self.authenticator = self.service.authenticator
        self.privacy = Privacy(self.service)

    # -- the role contract -----------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Prune the throttle tables now and then, until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(PRUNE_INTERVAL)
            self.service.prune()

    def describe(self) -> dict[str, Any]:
        return {"issuer": self.node.peer_id, "token_alg": "EdDSA",
                "token_ttl": self.settings.token_ttl}

    def topics(self) -> list[str]:
        return []

    # -- helpers ---------------------------------------------------------------------
    @staticmethod
    def _source(ctx: CallContext, p: Params) -> str:
        """Whom to throttle: the client a web or gateway member relays, else
        the connection's address (a peer id costs nothing to change)."""
        claimed = p.string("source", required=False, max_len=100)
        if claimed is not None and RELAYS & ctx.grants:
            return claimed
        return ctx.source

    def _principal(self, ctx: CallContext, p: Params,
                   allow: tuple[Via, ...] = ("api_key", "token")) -> Principal:
        if "auth" in p:
            creds = p.data["auth"]
            if not isinstance(creds, dict):
                raise InvalidParams('auth: must be {"token": ...} or {"api_key": ...}',
                                    data={"field": "auth"})
            if "token" in p or "api_key" in p:
                raise InvalidParams("auth: give auth or a token / api_key, not both",
                                    data={"field": "auth"})
        else:
            creds = {k: p.data[k] for k in ("token", "api_key") if k in p}
        for name, value in creds.items():
            if name in ("token", "api_key") and (
                    not isinstance(value, str) or len(value) > MAX_SECRET_PARAM):
                raise InvalidParams(f"{name}: must be a string", data={"field": name})
        return self.authenticator.authenticate(creds, source=self._source(ctx, p),
                                               allow=allow)

    def _actor(self, ctx: CallContext, p: Params) -> Actor:
        if p.boolean("as_operator", required=False):
            if any(c in p for c in _CREDENTIALS):
                raise InvalidParams("as_operator: acts as the network operator; give no "
                                    "token", data={"field": "as_operator"})
            if not ctx.is_member:
                raise NotMember("only network members may act as the operator")
            if OPERATOR not in ctx.grants:
                raise PermissionDenied(
                    "as_operator needs a certificate granting operator (p2pinfer network "
                    "admit PEER_ID --operator)", data={"needs": [OPERATOR]})
            return Actor.operator_peer(ctx.peer_id)
        return Actor.of(self._principal(ctx, p, allow=("token",)))

    # -- accounts and sessions --------------------------------------------------------
    @rpc_method("registerUser", access=Access.PUBLIC)
    async def rpc_register_user(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """Create an account: ``{username, email, password}`` → user."""
        p = Params(params, ("username", "email", "password"))
        username, email = p.required("username"), p.required("email")
        password = p.required("password", max_len=MAX_SECRET_PARAM)
        user = await self.service.register(username, email, password,
                                           source=self._source(ctx, p))
        return user_view(user)

    @rpc_method("loginUser", access=Access.PUBLIC)
    async def rpc_login_user(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{username | email, password}`` → session (access + refresh token)."""
        p = Params(params, ("username", "email", "password"))
        if ("username" in p) == ("email" in p):
            raise InvalidParams("username: give a username or an email",
                                data={"field": "username"})
        login = p.required("username" if "username" in p else "email")
        password = p.required("password", max_len=MAX_SECRET_PARAM)
        return await self.service.login(login, password, source=self._source(ctx, p))

    @rpc_method("refreshToken", access=Access.PUBLIC)
    async def rpc_refresh_token(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{refresh_token}`` → a new session pair (the old refresh token is spent)."""
        p = Params(params, ("refresh_token",))
        token = p.required("refresh_token", max_len=MAX_SECRET_PARAM)
        return self.service.refresh(token, source=self._source(ctx, p))

    @rpc_method("logoutUser", access=Access.PUBLIC)
    async def rpc_logout_user(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{token | refresh_token}``: end that session on every node."""
        p = Params(params, ("token", "refresh_token"))
        if ("token" in p) == ("refresh_token" in p):
            raise InvalidParams("token: give the access token or the refresh token",
                                data={"field": "token"})
        typ = "access" if "token" in p else "refresh"
        token = p.required("token" if typ == "access" else "refresh_token",
                           max_len=MAX_SECRET_PARAM)
        return self.service.logout(token, typ=typ, source=self._source(ctx, p))

    @rpc_method("changePassword", access=Access.PUBLIC)
    async def rpc_change_password(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{token, current_password, new_password}`` → a new session; every
        other session of the user ends, on every node."""
        p = Params(params, (*_CREDENTIALS, "current_password", "new_password"))
        current = p.required("current_password", max_len=MAX_SECRET_PARAM)
        new = p.required("new_password", max_len=MAX_SECRET_PARAM)
        principal = self._principal(ctx, p, allow=("token",))
        return await self.service.change_password(principal, current, new,
                                                  source=self._source(ctx, p))

    @rpc_method("logoutEverywhere", access=Access.PUBLIC)
    async def rpc_logout_everywhere(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{token}``: end every session of the caller's account, on every
        node → ``{user_id, sessions_ended_at}``. API keys stay valid."""
        p = Params(params, _CREDENTIALS)
        principal = self._principal(ctx, p, allow=("token",))
        return self.service.logout_everywhere(principal, source=self._source(ctx, p))

    @rpc_method("getUser", access=Access.PUBLIC)
    async def rpc_get_user(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """The caller's account (or, for an admin, ``user_id``'s)."""
        p = Params(params, (*_CREDENTIALS, "user_id"))
        user_id = p.uuid("user_id", required=False)
        principal = self._principal(ctx, p)
        return user_view(self.service.get_user(principal, user_id=user_id))

    # -- API keys ----------------------------------------------------------------------
    @rpc_method("generateApiKey", access=Access.PUBLIC)
    async def rpc_generate_api_key(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{token, name?, user_id?}`` → the new key, shown this once."""
        p = Params(params, (*_CREDENTIALS, "name", "user_id"))
        name = p.key_name("name")
        user_id = p.uuid("user_id", required=False)
        principal = self._principal(ctx, p, allow=("token",))
        return self.service.issue_key(principal, name=name, user_id=user_id,
                                      source=self._source(ctx, p))

    @rpc_method("validateApiKey", access=Access.PUBLIC)
    async def rpc_validate_api_key(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{api_key}`` → the principal it stands for."""
        p = Params(params, ("api_key", "source"))
        key = p.required("api_key", max_len=MAX_SECRET_PARAM)
        return self.authenticator.authenticate({"api_key": key}, source=self._source(ctx, p),
                                               allow=("api_key",)).to_wire()

    @rpc_method("listApiKeys", access=Access.PUBLIC)
    async def rpc_list_api_keys(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """The caller's keys (or ``user_id``'s, for an admin), revoked ones too."""
        p = Params(params, (*_CREDENTIALS, "user_id"))
        user_id = p.uuid("user_id", required=False)
        principal = self._principal(ctx, p)
        keys = self.service.list_keys(principal, user_id=user_id)
        return {"keys": [key_view(k) for k in keys]}

    @rpc_method("revokeApiKey", access=Access.PUBLIC)
    async def rpc_revoke_api_key(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{token, key_id}``: revoke one of the caller's keys (any, for an admin)."""
        p = Params(params, (*_CREDENTIALS, "key_id"))
        key_id = p.required_uuid("key_id")
        principal = self._principal(ctx, p, allow=("token",))
        return self.service.revoke_key(principal, key_id, source=self._source(ctx, p))

    @rpc_method("getUserUsage", access=Access.PUBLIC)
    async def rpc_get_user_usage(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """Usage per day and key, from this node's ledger copy."""
        p = Params(params, (*_CREDENTIALS, "user_id", "since", "until"))
        user_id = p.uuid("user_id", required=False)
        since, until = p.date("since"), p.date("until")
        principal = self._principal(ctx, p)
        return self.service.usage(principal, user_id=user_id, since=since, until=until)

    # -- admin -------------------------------------------------------------------------
    @rpc_method("setUserTier", access=Access.PUBLIC)
    async def rpc_set_user_tier(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{token | as_operator, user_id, tier}`` (admins and operators)."""
        p = Params(params, (*_CREDENTIALS, "as_operator", "user_id", "tier"))
        user_id = p.required_uuid("user_id")
        tier = p.choice("tier", ("default", "premium"))
        actor = self._actor(ctx, p)
        user = self.service.set_user(actor, user_id, tier=tier, source=self._source(ctx, p))
        return user_view(user)

    @rpc_method("setUserActive", access=Access.PUBLIC)
    async def rpc_set_user_active(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{token | as_operator, user_id, is_active}`` (admins and operators)."""
        p = Params(params, (*_CREDENTIALS, "as_operator", "user_id", "is_active"))
        user_id = p.required_uuid("user_id")
        active = p.boolean("is_active")
        actor = self._actor(ctx, p)
        user = self.service.set_user(actor, user_id, is_active=active,
                                     source=self._source(ctx, p))
        return user_view(user)

    @rpc_method("setUserAdmin", access=Access.PUBLIC)
    async def rpc_set_user_admin(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{token | as_operator, user_id, is_admin}`` (admins and operators)."""
        p = Params(params, (*_CREDENTIALS, "as_operator", "user_id", "is_admin"))
        user_id = p.required_uuid("user_id")
        admin = p.boolean("is_admin")
        actor = self._actor(ctx, p)
        user = self.service.set_user(actor, user_id, is_admin=admin,
                                     source=self._source(ctx, p))
        return user_view(user)

    # -- privacy -----------------------------------------------------------------------
    def _privacy_actor(self, ctx: CallContext, p: Params) -> tuple[Actor, str | None]:
        """Who asks, and their own user id (None for an operator)."""
        if p.boolean("as_operator", required=False):
            return self._actor(ctx, p), None
        principal = self._principal(ctx, p, allow=("token",))
        return Actor.of(principal), principal.user_id

    @rpc_method("exportUserData", access=Access.PUBLIC)
    async def rpc_export_user_data(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{token | as_operator, user_id?}`` → everything the ledger holds
        about the user (one's own; anyone's for admins and operators)."""
        p = Params(params, (*_CREDENTIALS, "as_operator", "user_id"))
        user_id = p.uuid("user_id", required=False)
        actor, self_id = self._privacy_actor(ctx, p)
        target = user_id or self_id
        if target is None:
            raise InvalidParams("user_id: required with as_operator", data={"field": "user_id"})
        return await self.privacy.export(actor, target, self_id=self_id,
                                         source=self._source(ctx, p))

    @rpc_method("eraseUser", access=Access.PUBLIC)
    async def rpc_erase_user(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{token, password}``: erase one's own account everywhere; or
        ``{token | as_operator, user_id}`` for admins and operators."""
        p = Params(params, (*_CREDENTIALS, "as_operator", "user_id", "password"))
        user_id = p.uuid("user_id", required=False)
        password = p.string("password", required=False, max_len=MAX_SECRET_PARAM)
        actor, self_id = self._privacy_actor(ctx, p)
        target = user_id or self_id
        if target is None:
            raise InvalidParams("user_id: required with as_operator", data={"field": "user_id"})
        source = self._source(ctx, p)
        if target == self_id:
            if password is None:
                raise InvalidParams("password: erasing your own account needs your password",
                                    data={"field": "password"})
            await self.privacy.check_password(target, password, source=source)
        return self.privacy.erase(actor, target, self_id=self_id, source=source)
