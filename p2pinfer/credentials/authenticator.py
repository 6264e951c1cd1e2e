"""Authenticating a request on any node, from its own ledger copy.

:class:`Authenticator` is what the gateway and web roles call on every
request; it makes no network call::

    auth = Authenticator(node)
    p = auth.authenticate({"api_key": "p2p_..."})   # or {"token": "<jwt>"}
    p.user_id, p.username, p.tier, p.is_admin, p.api_key_id, p.via

**API keys** (:meth:`Authenticator.validate_api_key`): parse, one indexed
ledger query by public id, constant-time hash comparison, then the key's and
its user's standing (a second indexed query). Each way to fail has its own
error:

=====================================  =========================================
the key                                error
=====================================  =========================================
not ``p2p_<12>_<43>``                  InvalidApiKey, ``data.reason="malformed"``
unknown public id                      InvalidApiKey, ``data.reason="unknown"``
known id, wrong secret (tampered)      InvalidApiKey, ``data.reason="mismatch"``
revoked                                RevokedApiKey
its user's registration lost           RegistrationLost
its user unknown here or erased        UnknownUser
its user deactivated                   InactiveUser
=====================================  =========================================

The secret is checked before anything about the key's standing is said, so a
caller without the secret learns nothing but "unknown" or "mismatch".

**Guessing is throttled.** When the caller's ``source`` is given (the
gateway passes the connection's IP address, the auth role its caller), more
than ``[auth] max_failures_per_source`` invalid keys within
``throttle_window`` seconds are refused with LoginThrottled (``retry_after``)
until the window has passed, counted apart by what was guessed: wrong
secrets of one key id (that key from that source is then refused, valid or
not: a guesser learns nothing more), and malformed or unknown keys (further
unknown keys from that source are refused). So one client's typo locks out
neither its own valid key nor anybody else's key from the same address.

**Session tokens** (:meth:`Authenticator.verify_token`): the signature is
checked against the public key inside the ``iss`` peer id
(:mod:`~p2pinfer.credentials.tokens`); then:

- InvalidToken: malformed, tampered, another network, wrong type;
- TokenExpired: past ``exp`` (``[auth] clock_skew`` of leeway);
- UntrustedIssuer: ``iss`` is not a current member of the network whose
  certificate grants the ``auth`` role (a removed or expired auth node's
  tokens stop working everywhere as soon as its removal replicates);
- TokenRevoked: its ``jti`` or its session ``sid`` is in the ledger's
  revoked sessions (logout, refresh rotation), or the session was
  authenticated before the user's sessions were ended: a password change
  or "log out everywhere" (``data.reason="sessions_ended"``);
- RegistrationLost / UnknownUser / InactiveUser: as for keys.

Revocations, deactivations and key revocations take effect on a node as
soon as the event has replicated to it: tokens are checked against the
ledger on every call, and a validated API key is remembered (its hash and
principal, never the key) only until the ledger applies any event that could
change a user, key, session or member (``Store.credentials_version``); the
key itself is still compared with its hash, in constant time, on every call.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import trio
from cachetools import LRUCache

from ..errors import (
    AuthenticationRequired,
    InactiveUser,
    InvalidApiKey,
    InvalidParams,
    LoginThrottled,
    RevokedApiKey,
    TokenRevoked,
    UnknownUser,
    UntrustedIssuer,
)
from .apikeys import KEY_LENGTH, key_matches, parse_key
from .settings import AuthSettings
from .throttle import SlidingWindow
from .tokens import ACCESS, Claims, TokenVerifier

if TYPE_CHECKING:  # pragma: no cover
    from ..context import RoleContext
    from ..ledger import Ledger
    from ..ledger.queries import User

__all__ = ["REPLICATION_WAIT", "Authenticator", "Principal", "check_session_current"]

log = logging.getLogger(__name__)

KEY_CACHE_SIZE = 10_000  # validated keys remembered (hash and principal, not the key)
# Seconds a request with a key or user this node does not know yet waits for
# it to replicate (Authenticator.authenticate_waiting).
REPLICATION_WAIT = 1.0

Via = Literal["api_key", "token"]


@dataclass(frozen=True)
class Principal:
    """Who a request is from.

    Attributes:
        user_id: the user's id.
        username: the user's (normalised) username.
        tier: ``"default"`` or ``"premium"``.
        is_admin: whether the user is an admin.
        api_key_id: the key's id (not the key) when authenticated by an API
            key; None for a session token.
        via: ``"api_key"`` or ``"token"``.
        claims: the token's claims (None for an API key).
    """

    user_id: str
    username: str
    tier: str
    is_admin: bool
    api_key_id: str | None
    via: Via
    claims: Claims | None = field(default=None, repr=False, compare=False)

    @property
    def session_id(self) -> str | None:
        return self.claims.sid if self.claims is not None else None

    @property
    def actor(self) -> str:
        """How audit rows name this principal (users by id, never by name)."""
        return f"user:{self.user_id}"

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "user_id": self.user_id, "username": self.username, "tier": self.tier,
            "is_admin": self.is_admin, "api_key_id": self.api_key_id, "via": self.via,
        }
        if self.claims is not None:
            out["session_id"] = self.claims.sid
            out["expires_at"] = self.claims.exp
            out["issuer"] = self.claims.issuer
        return out


class Authenticator:
    """Validates API keys and session tokens against the node's ledger copy.

    A node keeps one (``RoleContext.authenticator``), which its gateway, web
    and auth roles share, so a client guessing keys is throttled by the same
    counts whichever of them it calls. Every method but
    :meth:`authenticate_waiting` is synchronous and safe to call on the trio
    thread.

    Args:
        node: the node (its ledger and config).
        settings: the ``[auth]`` settings (default: read from ``node.config``).
    """

    def __init__(self, node: RoleContext, *, settings: AuthSettings | None = None) -> None:
        self.ledger: Ledger = node.ledger
        self.settings = settings or AuthSettings.from_config(node.config)
        self.tokens = TokenVerifier(self.ledger.network_id, leeway=self.settings.clock_skew)
        self.key_failures = SlidingWindow(self.settings.max_failures_per_source,
                                          self.settings.throttle_window)
        # public id -> (store, credentials version, key hash, principal)
        self._keys: LRUCache[str, tuple[Any, int, str, Principal]] = LRUCache(KEY_CACHE_SIZE)

    # -- the one entry point ---------------------------------------------------------
    def authenticate(self, credentials: Any, *, source: str | None = None,
                     allow: tuple[Via, ...] = ("api_key", "token")) -> Principal:
        """The principal behind ``{"api_key": ...}`` or ``{"token": ...}``.

        Args:
            credentials: a map with exactly one of ``api_key`` / ``token``.
            source: where the request came from (a peer id or an IP), for logs.
            allow: which kinds of credential are acceptable here.

        Raises:
            AuthenticationRequired: no credential (or one not allowed here).
            InvalidParams: not a map, or both kinds at once.
            AccessError: the specific error of :meth:`validate_api_key` or
                :meth:`verify_token`.
        """
        if not isinstance(credentials, Mapping):
            raise InvalidParams('auth: must be {"api_key": ...} or {"token": ...}',
                                data={"field": "auth"})
        has_key, has_token = "api_key" in credentials, "token" in credentials
        if has_key and has_token:
            raise InvalidParams("auth: give an API key or a token, not both",
                                data={"field": "auth"})
        if has_key and "api_key" in allow:
            return self._api_key(credentials["api_key"], source)
        if has_token and "token" in allow:
            return self._logged(self.verify_token, credentials["token"], source)
        wanted = " or ".join("an API key" if a == "api_key" else "a session token"
                             for a in allow)
        raise AuthenticationRequired(f"{wanted} is required", data={"field": "auth"})

    async def authenticate_waiting(self, credentials: Any, *, source: str | None = None,
                                   wait: float = REPLICATION_WAIT) -> Principal:
        """:meth:`authenticate`, giving a key or user this node does not know
        yet up to ``wait`` seconds to replicate (an auth node elsewhere made
        it a moment ago: a client may use its new key at once on any node).

        Only the first try counts as a failure of ``source``; the re-checks
        while waiting count for nothing (they once made a single mistyped
        key 20 failures).
        """
        try:
            return self.authenticate(credentials, source=source)
        except (InvalidApiKey, UnknownUser) as exc:
            if isinstance(exc, InvalidApiKey) and exc.data.get("reason") != "unknown":
                raise
            first = exc
        with trio.move_on_after(wait):
            while True:
                await trio.sleep(0.05)
                try:
                    return self.authenticate(credentials, source=None)
                except (InvalidApiKey, UnknownUser):
                    continue
        raise first

    def _api_key(self, key: Any, source: str | None) -> Principal:
        """:meth:`validate_api_key`, throttled per ``source`` (module docstring)."""
        if source is None:
            return self._logged(self.validate_api_key, key, source)
        now = time.time()
        scope = f"{source}|{self._guessed(key)}"
        wait = self.key_failures.retry_after(scope, now)
        if wait is not None:
            raise LoginThrottled(
                f"too many invalid API keys from here; retry in {wait:.0f} s",
                data={"retry_after": math.ceil(wait * 1000) / 1000, "scope": "source"})
        try:
            return self._logged(self.validate_api_key, key, source)
        except InvalidApiKey:
            self.key_failures.hit(scope, now)
            raise

    def _guessed(self, key: Any) -> str:
        """What a failure with ``key`` guesses at: the secret of a known key
        id (that id), or some key (``?``: malformed or unknown)."""
        public_id = parse_key(key)
        if public_id is None:
            return "?"
        if public_id in self._keys or self.ledger.api_key(public_id) is not None:
            return public_id
        return "?"

    def _logged(self, check: Any, secret: Any, source: str | None) -> Principal:
        try:
            principal: Principal = check(secret)
        except Exception as exc:
            # never log the key or token itself
            log.debug("authentication from %s refused: %s", source or "?",
                      type(exc).__name__)
            raise
        return principal

    # -- API keys ----------------------------------------------------------------------
    def validate_api_key(self, key: Any) -> Principal:
        """The principal of an API key (see the module docstring for errors)."""
        public_id = parse_key(key)
        if public_id is None:
            raise InvalidApiKey(f"an API key is p2p_<id>_<secret>, {KEY_LENGTH} characters",
                                data={"reason": "malformed"})
        store = self.ledger.store
        version = store.credentials_version
        hit = self._keys.get(public_id)
        if hit is not None and hit[0] is store and hit[1] == version:
            if not key_matches(key, hit[2]):
                raise InvalidApiKey("API key does not match", data={"reason": "mismatch"})
            return hit[3]
        row = self.ledger.api_key(public_id)
        if row is None:
            raise InvalidApiKey("unknown API key", data={"reason": "unknown"})
        # constant time: how long it takes says nothing about where hashes differ
        if not key_matches(key, row.key_hash):
            raise InvalidApiKey("API key does not match", data={"reason": "mismatch"})
        if not row.is_active or row.revoked_at is not None:
            raise RevokedApiKey("this API key has been revoked",
                                data={"key_id": row.id, "revoked_at": row.revoked_at})
        user = self.ledger.user(row.user_id)
        if user is None:
            self._missing_user(row.user_id)
        if not user.is_active:
            raise InactiveUser("this account is deactivated")
        principal = Principal(user.id, user.username, user.tier, user.is_admin, row.id,
                              "api_key")
        self._keys[public_id] = (store, version, row.key_hash, principal)
        return principal

    # -- session tokens ------------------------------------------------------------------
    def decode_token(self, token: Any, *, typ: str = ACCESS,
                     verify_exp: bool = True) -> Claims:
        """Check signature, claims, issuer trust and revocation, not the user.

        Raises:
            InvalidToken, TokenExpired, UntrustedIssuer, TokenRevoked.
        """
        claims = self.tokens.decode(token, typ=typ, verify_exp=verify_exp)
        if not self.is_trusted_issuer(claims.issuer):
            raise UntrustedIssuer("the token was not issued by an auth node of this network",
                                  data={"issuer": claims.issuer})
        if self.ledger.is_session_revoked(claims.sid):
            raise TokenRevoked("this session has ended", data={"reason": "session"})
        if self.ledger.is_session_revoked(claims.jti):
            raise TokenRevoked("this token has been revoked", data={"reason": "token"})
        return claims

    def verify_token(self, token: Any, *, typ: str = ACCESS) -> Principal:
        """The principal of a session token (see the module docstring)."""
        claims = self.decode_token(token, typ=typ)
        user = self.ledger.user(claims.subject)
        if user is None:
            self._missing_user(claims.subject)
        check_session_current(user, claims)
        if not user.is_active:
            raise InactiveUser("this account is deactivated")
        return Principal(user.id, user.username, user.tier, user.is_admin, None, "token",
                         claims)

    def is_trusted_issuer(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is a current member whose certificate grants
        the ``auth`` role."""
        return bool(self.ledger.is_member(peer_id)) and "auth" in self.ledger.roles_of(peer_id)

    # -- shared --------------------------------------------------------------------------
    def _missing_user(self, user_id: str) -> NoReturn:
        """Raise the error for a user id that has no ``users`` row."""
        self.ledger.check_registration(user_id)  # RegistrationLost if a rival won
        reg = self.ledger.registration(user_id)
        if reg is not None and reg.status == "erased":
            raise UnknownUser("this account has been erased", data={"reason": "erased"})
        raise UnknownUser("unknown user", data={"reason": "unknown"})


def check_session_current(user: User, claims: Claims) -> None:
    """Raise TokenRevoked if the session of ``claims`` was authenticated
    before the user's sessions were ended (a password change or "log out
    everywhere")."""
    if user.sessions_after is not None and claims.auth_at < user.sessions_after:
        raise TokenRevoked("this session was ended on every device (a password change or "
                           "'log out everywhere')",
                           data={"reason": "sessions_ended"})
