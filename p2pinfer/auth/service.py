"""The auth operations, on a node whose certificate grants the ``auth`` role.

:class:`AuthService` is the library behind the ``AuthRole`` RPC methods (and
what a role on the same node may call directly): register, log in, refresh,
log out, change one's password (which ends every other session), issue /
list / revoke API keys, change a user's tier, active flag and admin flag,
read usage. Each write is a ledger event signed by this
node, in one transaction with its ``audit`` event, so it replicates to every
member.

**Registration conflicts.** Two auth nodes may accept the same username or
email at the same moment; the ledger keeps the registration with the lowest
``(hlc, author, seq)`` on every node (see :mod:`p2pinfer.ledger.views`).
:meth:`AuthService.register` therefore appends, then watches the ledger for
``[auth] registration_wait`` seconds (default 1 s, well above gossip's
delivery time): if a rival wins in that time the caller gets
:class:`~p2pinfer.errors.RegistrationLost`. (The wait also applies on a
node that knows no other auth member: a node that has not synced yet cannot
tell. Set ``registration_wait = 0`` on a single-node network.) A rival that
only arrives later (a partition longer than the wait) still wins on every
node: from then on the loser's tokens and API keys are refused with
``RegistrationLost``, and its username resolves to the winner.

**Login throttling.** Two limits, each ``max failures within
throttle_window`` seconds, refuse further attempts with
:class:`~p2pinfer.errors.LoginThrottled` (``data.retry_after`` seconds,
``data.scope`` = ``"account"`` or ``"source"``), even with the right
password:

- *per account* (``max_failures_per_account``, default 5 per 15 min),
  counted from the ``user.login`` audit rows of the replicated ledger since
  the account's last successful login, plus attempts still being checked
  here: it holds across every auth node of the swarm, and survives restarts;
- *per source* (``max_failures_per_source``, default 20 per 15 min),
  counted in memory on this node. The source is the caller's peer id, or,
  for a network member (the web role) that passes one, the client's IP
  (``source`` param). Peer ids cost nothing to make, so for direct libp2p
  clients the per-account limit is the one that stops password guessing.

Registrations are limited per source the same way
(``registrations_per_source`` per ``registration_window``, RateLimited).

**Audit.** Every registration (success, name taken, lost), login (success,
failure with its reason, throttled: once per account or source per window),
refresh, logout, password change (a wrong current password counts as a
failed login), key issue and revoke, and tier / active / admin change
writes an ``audit`` event: ``actor`` (``user:<id>``, ``peer:<peer id>`` for
an operator, or ``anonymous``), ``action``, ``target`` (``user:<id>``,
``apikey:<key id>``, ``session:<sid>``), ``outcome`` (``success``,
``failure``, ``denied``, ``throttled``), ``source`` and ``time``; ``detail``
holds a reason or the old and new value. Never a password, key or token,
never a username or email (so erasure needs no audit rewrite).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..credentials.apikeys import generate_key
from ..credentials.authenticator import Authenticator, Principal, check_session_current
from ..credentials.settings import AuthSettings
from ..credentials.throttle import SlidingWindow, retry_after
from ..credentials.tokens import ACCESS, REFRESH, Claims, TokenIssuer, new_token_id
from ..errors import (
    EmailTaken,
    InactiveUser,
    InvalidCredentials,
    InvalidEmail,
    InvalidUsername,
    LoginThrottled,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    TokenExpired,
    TokenRevoked,
    UnknownUser,
    UntrustedIssuer,
    UsernameTaken,
)
from ..ledger.queries import ApiKey, User
from .passwords import (
    PasswordHasher,
    check_password,
    normalise_email,
    normalise_password,
    normalise_username,
)

if TYPE_CHECKING:
    from ..context import RoleContext

__all__ = ["Actor", "AuthService", "user_view", "key_view"]

log = logging.getLogger(__name__)
T = TypeVar("T")

LOGIN = "user.login"
PASSWORD = "user.password"
MAX_LOGIN_PASSWORD = 4096
UNKNOWN_AUDIT_WINDOW = 60.0
# What a login that fails says, whether the user is unknown or the password
# wrong: the two must not tell a guesser which usernames exist.
LOGIN_FAILED = "wrong username or password"
LOGIN_THROTTLED = "user.login_throttled"


def _ceil_ms(seconds: float) -> float:
    """Seconds rounded *up* to the millisecond: waiting that long is enough."""
    return math.ceil(seconds * 1000) / 1000


@dataclass(frozen=True)
class Actor:
    """Who performs an admin operation: an admin user or a network operator.

    Attributes:
        name: the audit ``actor`` (``user:<id>`` or ``peer:<peer id>``).
        is_admin: an admin user.
        operator: a network member acting as the operator (see the role).
    """

    name: str
    is_admin: bool = False
    operator: bool = False

    @classmethod
    def of(cls, principal: Principal) -> Actor:
        return cls(principal.actor, is_admin=principal.is_admin)

    @classmethod
    def operator_peer(cls, peer_id: str) -> Actor:
        return cls(f"peer:{peer_id}", operator=True)


def user_view(user: User) -> dict[str, Any]:
    """What the RPC methods return about a user (never the password hash)."""
    return {"user_id": user.id, "username": user.username, "email": user.email,
            "tier": user.tier, "is_active": user.is_active, "is_admin": user.is_admin,
            "created_at": user.created_at, "updated_at": user.updated_at}


def key_view(key: ApiKey) -> dict[str, Any]:
    """What listings show of an API key (never the key or its hash)."""
    return {"key_id": key.id, "public_id": key.public_id, "name": key.name,
            "created_at": key.created_at, "last_used_at": key.last_used_at,
            "is_active": key.is_active and key.revoked_at is None,
            "revoked_at": key.revoked_at}


class AuthService:
    """Register, log in, sessions, API keys and admin changes (see the module
    docstring).

    Args:
        node: the node (its ledger, identity and config).
        settings: ``[auth]`` settings (default: from ``node.config``).
        clock: wall-clock seconds (stored times and throttle windows).
    """

    def __init__(self, node: RoleContext, settings: AuthSettings | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = s = settings or AuthSettings.from_config(node.config)
        self.clock = clock
        # the node's own, unless these settings are not the node's (tests)
        self.authenticator = (node.authenticator if settings is None
                              else Authenticator(node, settings=s))
        self.ledger = self.authenticator.ledger
        self.peer_id = node.peer_id
        self.issuer = TokenIssuer(node.identity, self.ledger.network_id)
        self.hasher = PasswordHasher(s.argon2_time_cost, s.argon2_memory_kib,
                                     s.argon2_parallelism)
        self._hash_limiter = trio.CapacityLimiter(s.max_concurrent_hashes)
        self.source_failures = SlidingWindow(s.max_failures_per_source, s.throttle_window)
        self.registrations = SlidingWindow(s.registrations_per_source, s.registration_window)
        # one "throttled" audit row per account or source per window, not per attempt
        self._throttle_noted = SlidingWindow(1, s.throttle_window)
        # Failed logins of unknown users: one replicated audit row per source
        # and minute (with the count since the last), not one per attempt,
        # which let anyone write to every node's ledger as fast as it asked.
        self._unknown_noted = SlidingWindow(1, UNKNOWN_AUDIT_WINDOW)
        self._unknown_since: dict[str, int] = {}
        self._dummy_hash: str | None = None
        self._pending: dict[str, int] = {}

    # -- helpers ---------------------------------------------------------------------
    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._hash_limiter)

    def _audit(self, action: str, outcome: str, *, actor: str, target: str | None = None,
               source: str | None = None,
               detail: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"actor": actor[:200], "action": action, "outcome": outcome,
                                "time": self.clock()}
        if target is not None:
            body["target"] = target[:200]
        if source is not None:
            body["source"] = source[:200]
        if detail:
            body["detail"] = detail
        return ("audit", body)

    def _write(self, *items: tuple[str, dict[str, Any]]) -> None:
        self.ledger.append_many(list(items))

    def prune(self) -> None:
        """Forget throttle entries older than their window (called periodically)."""
        now = self.clock()
        for window in (self.source_failures, self.registrations, self._throttle_noted):
            window.prune(now)

    # -- registration ----------------------------------------------------------------
    async def register(self, username: Any, email: Any, password: Any, *,
                       source: str) -> User:
        """Create a user (see the module docstring for conflicts).

        Raises:
            InvalidUsername, InvalidEmail, WeakPassword: the input (``data.reason``).
            RateLimited: too many registrations from ``source``.
            UsernameTaken, EmailTaken: already held, as far as this node knows.
            RegistrationLost: a concurrent registration of the same name won.
        """
        name = normalise_username(username)
        mail = normalise_email(email)
        secret = normalise_password(password)
        check_password(secret, username=name, email=mail,
                       min_length=self.settings.password_min_length)
        now = self.clock()
        wait = self.registrations.retry_after(source, now)
        if wait is not None:
            raise RateLimited("too many registrations from this source; try later",
                              data={"retry_after": _ceil_ms(wait)})
        self.registrations.hit(source, now)
        self._check_available(name, mail, source)
        password_hash = await self._in_thread(self.hasher.hash, secret)
        self._check_available(name, mail, source)  # it may have changed during the hash
        user_id = str(uuid.uuid4())
        actor = f"user:{user_id}"
        self._write(
            ("user.registered", {"user_id": user_id, "username": name, "email": mail,
                                 "password_hash": password_hash, "created_at": self.clock(),
                                 "tier": "default", "is_active": True}),
            self._audit("user.register", "success", actor=actor, target=actor, source=source),
        )
        await self._watch_registration(user_id, source)
        user = self.ledger.user(user_id)
        if user is None:  # pragma: no cover - check_registration raised already
            raise UnknownUser("the registration was not kept")
        log.info("registered user %s", user_id)
        return user

    def _check_available(self, username: str, email: str, source: str) -> None:
        try:
            self.ledger.check_available(username, email)
        except (UsernameTaken, EmailTaken) as exc:
            reason = "username_taken" if isinstance(exc, UsernameTaken) else "email_taken"
            self._write(self._audit("user.register", "failure", actor="anonymous",
                                    source=source, detail={"reason": reason}))
            raise

    async def _watch_registration(self, user_id: str, source: str) -> None:
        def lost() -> bool:
            reg = self.ledger.registration(user_id)
            return reg is not None and reg.status == "lost"

        if self.settings.registration_wait > 0:
            with trio.move_on_after(self.settings.registration_wait):
                await self.ledger.wait_until(lost)
        if lost():
            actor = f"user:{user_id}"
            self._write(self._audit("user.register", "failure", actor=actor, target=actor,
                                    source=source, detail={"reason": "lost"}))
            self.ledger.check_registration(user_id)

    # -- login and sessions ------------------------------------------------------------
    def _find_user(self, login: str) -> User | None:
        try:
            if "@" in login:
                return self.ledger.user_by_email(normalise_email(login))
            return self.ledger.user_by_username(normalise_username(login))
        except (InvalidUsername, InvalidEmail):
            return None  # a name no one can hold is simply not a user

    def _account_retry_after(self, user_id: str, now: float) -> float | None:
        limit, window = self.settings.max_failures_per_account, self.settings.throttle_window
        failures: list[float] = []
        for row in self.ledger.audit(actor=f"user:{user_id}", action=LOGIN,
                                     since=now - window, limit=limit):
            if row.outcome == "success":
                break  # newest first: failures before a success do not count
            if row.outcome == "failure":
                failures.append(row.time)
        failures += [now] * self._pending.get(user_id, 0)
        return retry_after(failures, limit, window, now)

    def _throttled(self, scope: str, key: str, wait: float, *, actor: str,
                   source: str) -> LoginThrottled:
        now = self.clock()
        if self._throttle_noted.retry_after(f"{scope}:{key}", now) is None:
            self._throttle_noted.hit(f"{scope}:{key}", now)
            self._write(self._audit(LOGIN_THROTTLED, "throttled", actor=actor,
                                    target=actor if scope == "account" else None,
                                    source=source, detail={"scope": scope}))
        return LoginThrottled(
            f"too many failed logins {'for this account' if scope == 'account' else 'from here'}"
            f"; retry in {wait:.1f} s", data={"retry_after": _ceil_ms(wait), "scope": scope})

    async def login(self, login: str, password: Any, *, source: str) -> dict[str, Any]:
        """Check a username (or email) and password; start a session.

        Returns:
            the session: ``token``, ``token_type``, ``expires_at``,
            ``expires_in``, ``refresh_token``, ``refresh_expires_at``,
            ``session_id``, ``issuer``, ``user``.

        Raises:
            LoginThrottled: too many failures for the account or the source.
            InvalidCredentials: no user with this username or email, or a
                wrong password: the same error, after the same argon2id work
                (an unknown user's password is checked against a dummy hash).
            InactiveUser: right password, deactivated account.
        """
        # no policy here: a too-long password is just a wrong one (and counts)
        secret = normalise_password(password, max_len=MAX_LOGIN_PASSWORD)
        now = self.clock()
        wait = self.source_failures.retry_after(source, now)
        if wait is not None:
            raise self._throttled("source", source, wait, actor="anonymous", source=source)
        user = self._find_user(login)
        if user is None:
            self.source_failures.hit(source, now)
            await self._verify_dummy(secret)
            self._note_unknown(source, now)
            raise InvalidCredentials(LOGIN_FAILED)
        actor = f"user:{user.id}"
        wait = self._account_retry_after(user.id, now)
        if wait is not None:
            self.source_failures.hit(source, now)
            raise self._throttled("account", user.id, wait, actor=actor, source=source)
        ok = await self._verify(user, secret)
        reason = None if ok else "password"
        if ok and not user.is_active:
            reason = "inactive"
        if reason is not None:
            self.source_failures.hit(source, now)
            self._write(self._audit(LOGIN, "failure", actor=actor, target=actor,
                                    source=source, detail={"reason": reason}))
        if reason == "password":
            raise InvalidCredentials(LOGIN_FAILED)
        if reason == "inactive":
            raise InactiveUser("this account is deactivated")
        session = self._new_session(user, self.clock())
        self._write(self._audit(LOGIN, "success", actor=actor, target=actor, source=source,
                                detail={"session": session["session_id"]}))
        return session

    async def change_password(self, principal: Principal, current: Any, new: Any, *,
                              source: str) -> dict[str, Any]:
        """Change the caller's password: every session of the user ends (on
        every node, once the event has replicated) and a new one starts.

        Returns:
            the new session (as :meth:`login`).

        Raises:
            LoginThrottled: too many wrong passwords for the account or the source.
            InvalidCredentials: ``current`` is not the password.
            WeakPassword: ``new`` breaks the password policy (``data.reason``).
        """
        user = self.ledger.user(principal.user_id)
        if user is None:
            self.authenticator._missing_user(principal.user_id)
        actor = f"user:{user.id}"
        fresh = normalise_password(new)
        check_password(fresh, username=user.username, email=user.email,
                       min_length=self.settings.password_min_length)
        await self.confirm_password(user, current, source=source, purpose="password_change",
                                    refused="the password was not changed")
        password_hash = await self._in_thread(self.hasher.hash, fresh)
        now = round(self.clock(), 6)  # as tokens carry auth_at: the new session is not before
        self._write(("user.updated", {"user_id": user.id, "updated_at": now,
                                      "password_hash": password_hash, "sessions_after": now}),
                    self._audit(PASSWORD, "success", actor=actor, target=actor, source=source))
        updated = self.ledger.user(user.id)
        assert updated is not None
        session = self._new_session(updated, now)  # authenticated at sessions_after
        log.info("password changed for user %s; its other sessions are over", user.id)
        return session

    async def _verify_dummy(self, secret: str) -> None:
        """The work of a password check, for a login that names no user."""
        if self._dummy_hash is None:
            self._dummy_hash = await self._in_thread(self.hasher.hash, "not a password: " +
                                                     uuid.uuid4().hex)
        await self._in_thread(self.hasher.verify, self._dummy_hash, secret)

    def _note_unknown(self, source: str, now: float) -> None:
        """Audit failed logins of unknown users, one row per source per
        :data:`UNKNOWN_AUDIT_WINDOW` with how many there were."""
        self._unknown_since[source] = self._unknown_since.get(source, 0) + 1
        if self._unknown_noted.retry_after(source, now) is not None:
            return
        self._unknown_noted.hit(source, now)
        count = self._unknown_since.pop(source)
        if len(self._unknown_since) > 100_000:  # sources that never came back
            self._unknown_since.clear()
        self._write(self._audit(LOGIN, "failure", actor="anonymous", source=source,
                                detail={"reason": "unknown_user", "attempts": count}))

    async def _verify(self, user: User, secret: str) -> bool:
        """``secret`` against the user's hash, in a worker thread; while it
        runs the attempt counts toward the account's limit
        (:meth:`_account_retry_after`), so parallel guesses cannot slip past."""
        self._pending[user.id] = self._pending.get(user.id, 0) + 1
        try:
            return bool(await self._in_thread(self.hasher.verify, user.password_hash, secret))
        finally:
            left = self._pending[user.id] - 1
            if left:
                self._pending[user.id] = left
            else:
                del self._pending[user.id]

    async def confirm_password(self, user: User, password: Any, *, source: str, purpose: str,
                               refused: str) -> None:
        """Check the account's password as a login would, before an action
        that needs it (a password change, an erasure): throttled per source
        and per account, and a wrong password is a failed login (audited with
        ``detail.for = purpose``), so guessing through here is limited too.

        Raises:
            LoginThrottled: too many failures for the account or the source.
            InvalidCredentials: ``wrong password: <refused>``.
        """
        secret = normalise_password(password, max_len=MAX_LOGIN_PASSWORD)
        actor = f"user:{user.id}"
        now = self.clock()
        for scope, key, wait in (
                ("source", source, self.source_failures.retry_after(source, now)),
                ("account", user.id, self._account_retry_after(user.id, now))):
            if wait is not None:
                raise self._throttled(scope, key, wait, actor=actor, source=source)
        if not await self._verify(user, secret):
            self.source_failures.hit(source, now)
            self._write(self._audit(LOGIN, "failure", actor=actor, target=actor,
                                    source=source,
                                    detail={"reason": "password", "for": purpose}))
            raise InvalidCredentials(f"wrong password: {refused}")

    def _new_session(self, user: User, now: float, *, sid: str | None = None,
                     auth_time: float | None = None) -> dict[str, Any]:
        s = self.settings
        sid = sid or new_token_id()
        if auth_time is None:
            # never before the user's sessions_after: a login that already
            # knows of a password change is a session after it
            auth_time = max(now, user.sessions_after or 0.0)
        not_after = auth_time + s.session_max
        access, a = self.issuer.issue(subject=user.id, typ=ACCESS, ttl=s.token_ttl, sid=sid,
                                      auth_time=auth_time, now=now, not_after=not_after)
        refresh, r = self.issuer.issue(subject=user.id, typ=REFRESH, ttl=s.refresh_ttl,
                                       sid=sid, auth_time=auth_time, now=now,
                                       not_after=not_after)
        return {"token": access, "token_type": "Bearer", "expires_at": a.exp,
                "expires_in": a.exp - a.iat, "refresh_token": refresh,
                "refresh_expires_at": r.exp, "session_id": sid, "issuer": self.issuer.peer_id,
                "user": user_view(user)}

    def _session_end(self, claims: Claims) -> float:
        return float(claims.auth_time + self.settings.session_max)

    def refresh(self, refresh_token: Any, *, source: str) -> dict[str, Any]:
        """Trade a refresh token for a new access token and a new refresh
        token of the same session; the old refresh token is revoked
        (rotation). Presenting an already-rotated refresh token again ends
        the whole session (it was copied), here at once, and on every node
        when two auth nodes were each handed the same token before they
        heard of each other's rotation.

        Raises:
            InvalidToken, TokenExpired, UntrustedIssuer, TokenRevoked,
            UnknownUser, RegistrationLost, InactiveUser.
        """
        auth = self.authenticator
        claims = auth.tokens.decode(refresh_token, typ=REFRESH)
        if not auth.is_trusted_issuer(claims.issuer):
            raise UntrustedIssuer("the token was not issued by an auth node of this network",
                                  data={"issuer": claims.issuer})
        actor, target = f"user:{claims.subject}", f"session:{claims.sid}"
        if self.ledger.is_session_revoked(claims.sid):
            raise TokenRevoked("this session has ended", data={"reason": "session"})
        if self.ledger.is_session_revoked(claims.jti):
            self._write(
                ("session.revoked", {"jti": claims.sid, "exp": self._session_end(claims)}),
                self._audit("session.refresh", "failure", actor=actor, target=target,
                            source=source, detail={"reason": "reuse"}))
            raise TokenRevoked("this refresh token was already used; the session is ended",
                               data={"reason": "reuse"})
        user = self.ledger.user(claims.subject)
        if user is None:
            auth._missing_user(claims.subject)
        check_session_current(user, claims)
        if not user.is_active:
            raise InactiveUser("this account is deactivated")
        now = self.clock()
        if now >= self._session_end(claims):
            raise TokenExpired("the session reached its maximum lifetime",
                               data={"reason": "session_max"})
        session = self._new_session(user, now, sid=claims.sid, auth_time=claims.auth_at)
        # "sid" marks a rotation: if another auth node spends this refresh
        # token too before hearing of this, the ledger ends the session
        # everywhere once both events meet (see ledger.views).
        self._write(("session.revoked", {"jti": claims.jti, "exp": float(claims.exp),
                                         "sid": claims.sid,
                                         "session_exp": self._session_end(claims)}),
                    self._audit("session.refresh", "success", actor=actor, target=target,
                                source=source))
        return session

    def logout(self, token: Any, *, typ: str = ACCESS, source: str) -> dict[str, Any]:
        """End the session of ``token`` (an access or refresh token, expired
        or not): every token of the session is refused once the
        ``session.revoked`` event has replicated.

        Raises:
            InvalidToken, UntrustedIssuer.
        """
        auth = self.authenticator
        claims = auth.tokens.decode(token, typ=typ, verify_exp=False)
        if not auth.is_trusted_issuer(claims.issuer):
            raise UntrustedIssuer("the token was not issued by an auth node of this network",
                                  data={"issuer": claims.issuer})
        if self.ledger.is_session_revoked(claims.sid):
            return {"session_id": claims.sid, "revoked": True, "already_revoked": True}
        self._write(("session.revoked", {"jti": claims.sid, "exp": self._session_end(claims)}),
                    self._audit("session.logout", "success", actor=f"user:{claims.subject}",
                                target=f"session:{claims.sid}", source=source))
        return {"session_id": claims.sid, "revoked": True, "already_revoked": False}

    def logout_everywhere(self, principal: Principal, *, source: str) -> dict[str, Any]:
        """End every session of the caller's account, on every node once the
        event has replicated (a lost or shared device). API keys stay valid.

        Returns:
            ``{user_id, sessions_ended_at}``.
        """
        user = self.ledger.user(principal.user_id)
        if user is None:
            self.authenticator._missing_user(principal.user_id)
        now = round(self.clock(), 6)
        actor = f"user:{user.id}"
        self._write(("user.updated", {"user_id": user.id, "updated_at": now,
                                      "sessions_after": now}),
                    self._audit("session.logout_all", "success", actor=actor, target=actor,
                                source=source))
        return {"user_id": user.id, "sessions_ended_at": now}

    # -- API keys ----------------------------------------------------------------------
    def _target_user(self, principal: Principal, user_id: str | None, what: str) -> User:
        target = user_id or principal.user_id
        if target != principal.user_id and not principal.is_admin:
            raise PermissionDenied(f"only admins may {what} of another user")
        user = self.ledger.user(target)
        if user is None:
            raise NotFound("no such user", data={"user_id": target})
        return user

    def issue_key(self, principal: Principal, *, name: str | None = None,
                  user_id: str | None = None, source: str) -> dict[str, Any]:
        """Issue an API key; the result holds the key, shown this once.

        Raises:
            PermissionDenied: for another user, by a non-admin.
            NotFound: no such user. InactiveUser: the user is deactivated.
            QuotaExceeded: the user holds ``max_keys_per_user`` active keys.
        """
        user = self._target_user(principal, user_id, "issue keys")
        if not user.is_active:
            raise InactiveUser("this account is deactivated")
        active = sum(1 for k in self.ledger.api_keys_of(user.id) if k.is_active)
        limit = self.settings.max_keys_per_user
        if active >= limit:
            raise QuotaExceeded(f"at most {limit} active API keys per user; revoke one first",
                                data={"limit": limit, "reason": "max_keys"})
        issued = generate_key()
        key_id = str(uuid.uuid4())
        created = self.clock()
        self._write(
            ("apikey.issued", {"key_id": key_id, "user_id": user.id,
                               "public_id": issued.public_id, "key_hash": issued.key_hash,
                               "name": name, "created_at": created}),
            self._audit("apikey.issue", "success", actor=principal.actor,
                        target=f"apikey:{key_id}", source=source,
                        detail={"user": f"user:{user.id}"}),
        )
        return {"api_key": issued.key, "key_id": key_id, "public_id": issued.public_id,
                "name": name, "created_at": created, "user_id": user.id}

    def list_keys(self, principal: Principal, *, user_id: str | None = None) -> list[ApiKey]:
        """The user's API keys, revoked ones included, oldest first."""
        user = self._target_user(principal, user_id, "list the keys")
        return list(self.ledger.api_keys_of(user.id))

    def revoke_key(self, principal: Principal, key_id: str, *, source: str) -> dict[str, Any]:
        """Revoke an API key (the owner's or, for an admin, anyone's);
        revoking a revoked key changes nothing.

        Raises:
            NotFound: no such key. PermissionDenied: another user's key.
        """
        key = self.ledger.api_key_by_id(key_id)
        if key is None:
            raise NotFound("no such API key", data={"key_id": key_id})
        if key.user_id != principal.user_id and not principal.is_admin:
            self._write(self._audit("apikey.revoke", "denied", actor=principal.actor,
                                    target=f"apikey:{key_id}", source=source))
            raise PermissionDenied("this API key belongs to another user")
        if key.revoked_at is not None:
            return {"key_id": key_id, "revoked_at": key.revoked_at, "already_revoked": True}
        now = self.clock()
        self._write(("apikey.revoked", {"key_id": key_id, "revoked_at": now}),
                    self._audit("apikey.revoke", "success", actor=principal.actor,
                                target=f"apikey:{key_id}", source=source,
                                detail={"user": f"user:{key.user_id}"}))
        return {"key_id": key_id, "revoked_at": now, "already_revoked": False}

    # -- users ---------------------------------------------------------------------------
    def get_user(self, principal: Principal, *, user_id: str | None = None) -> User:
        return self._target_user(principal, user_id, "read the account")

    def usage(self, principal: Principal, *, user_id: str | None = None,
              since: str | None = None, until: str | None = None) -> dict[str, Any]:
        """The user's usage per day and key (``since``/``until``: ``YYYY-MM-DD``)."""
        user = self._target_user(principal, user_id, "read the usage")
        rows = self.ledger.usage(user_id=user.id, since=since, until=until)
        per_key: dict[str, dict[str, int]] = {}
        for r in rows:
            entry = per_key.setdefault(r.api_key_id or "", {"requests": 0, "tokens": 0})
            entry["requests"] += r.request_count
            entry["tokens"] += r.tokens_used
        return {
            "user_id": user.id, "since": since, "until": until,
            "rows": [{"date": r.date, "api_key_id": r.api_key_id,
                      "request_count": r.request_count, "tokens_used": r.tokens_used}
                     for r in rows],
            "per_key": [{"api_key_id": k or None, **v} for k, v in sorted(per_key.items())],
            "total": {"requests": sum(r.request_count for r in rows),
                      "tokens": sum(r.tokens_used for r in rows)},
        }

    def set_user(self, actor: Actor, user_id: str, *, tier: str | None = None,
                 is_active: bool | None = None, is_admin: bool | None = None,
                 source: str) -> User:
        """Change a user's tier, active flag and/or admin flag.

        Raises:
            PermissionDenied: the actor is neither an admin nor an operator.
            NotFound: no such user.
        """
        changes = {k: v for k, v in (("tier", tier), ("is_active", is_active),
                                     ("is_admin", is_admin)) if v is not None}
        if not changes:
            raise ValueError("nothing to change")
        target = f"user:{user_id}"
        if not (actor.is_admin or actor.operator):
            self._write(*(self._audit(f"user.set_{k.removeprefix('is_')}", "denied",
                                      actor=actor.name, target=target, source=source)
                          for k in changes))
            raise PermissionDenied("only admins and network operators may change users")
        user = self.ledger.user(user_id)
        if user is None:
            raise NotFound("no such user", data={"user_id": user_id})
        now = self.clock()
        audits = [self._audit(f"user.set_{k.removeprefix('is_')}", "success", actor=actor.name,
                              target=target, source=source,
                              detail={"from": getattr(user, k), "to": v})
                  for k, v in changes.items()]
        self._write(("user.updated", {"user_id": user_id, "updated_at": now, **changes}),
                    *audits)
        updated = self.ledger.user(user_id)
        assert updated is not None
        return updated
