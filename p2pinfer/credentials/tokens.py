"""Session tokens: JWTs signed with the issuing auth node's Ed25519 key.

A token is a compact JWS (PyJWT, ``alg: EdDSA``) signed with the node key of
the auth node that issued it (its 32-byte seed becomes a ``cryptography``
Ed25519 private key). Because a libp2p peer id of an Ed25519 key embeds the
public key, any node checks a token offline from the ``iss`` claim alone:
no key distribution, no call to the issuer.

Claims (times are integer seconds since the epoch)::

    iss        the issuing node's peer id
    aud        the network id (a token of another network is InvalidToken)
    sub        the user id
    typ        "access" or "refresh"
    jti        this token's id (random, 22 characters)
    sid        the session id: shared by every token of one login
    iat, exp   issued at, expires at
    auth_time  when the session's login happened (whole seconds)
    auth_at    the same to the microsecond (a password change ends the
               sessions authenticated before it)
    v          1 (claims version)

Lifetimes (``[auth]``): an access token lives ``token_ttl`` (1 h); a refresh
token ``refresh_ttl`` (14 d) and never beyond ``auth_time + session_max``
(30 d). What else makes a token valid (issuer membership, revocation, the
user's standing) needs the ledger and is checked by
:class:`~p2pinfer.credentials.authenticator.Authenticator`; this module only signs,
checks signatures and checks claims.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ..errors import InvalidParams, InvalidToken, TokenExpired
from ..identity import Identity, public_key_from_peer_id

__all__ = [
    "ACCESS",
    "REFRESH",
    "MAX_TOKEN_LENGTH",
    "Claims",
    "TokenIssuer",
    "TokenVerifier",
    "new_token_id",
]

ACCESS = "access"
REFRESH = "refresh"
CLAIMS_VERSION = 1
MAX_TOKEN_LENGTH = 4096
CACHE_SIZE = 4096
ALGORITHM = "EdDSA"
_REQUIRED = ["iss", "aud", "sub", "typ", "jti", "sid", "iat", "exp", "auth_time"]


def new_token_id() -> str:
    """A random token or session id (128 bits, base64url)."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class Claims:
    """The checked claims of a token."""

    issuer: str
    subject: str
    audience: str
    typ: str
    jti: str
    sid: str
    iat: int
    exp: int
    auth_time: int
    raw: dict[str, Any]

    @property
    def auth_at(self) -> float:
        """When the session was authenticated, to the microsecond (the
        ``auth_at`` claim; ``auth_time`` for tokens that lack it)."""
        value = self.raw.get("auth_at")
        return float(value) if value is not None else float(self.auth_time)


class TokenIssuer:
    """Signs tokens with a node key.

    Args:
        identity: the node identity whose seed signs (its peer id is ``iss``).
        network_id: the ``aud`` of every token.
    """

    def __init__(self, identity: Identity, network_id: str) -> None:
        self.peer_id = identity.peer_id
        self.network_id = network_id
        self._key = Ed25519PrivateKey.from_private_bytes(identity.seed)

    def issue(self, *, subject: str, typ: str, ttl: float, sid: str, auth_time: float,
              now: float, not_after: float | None = None) -> tuple[str, Claims]:
        """A signed token and its claims.

        Args:
            subject: the user id.
            typ: :data:`ACCESS` or :data:`REFRESH`.
            ttl: seconds until ``exp`` (rounded up to a whole second).
            sid: the session id.
            auth_time: when the session's login happened (``auth_time``, whole
                seconds, and ``auth_at``, to the microsecond).
            now: the issue time (seconds since the epoch).
            not_after: ``exp`` never goes beyond this time.
        """
        iat = int(now)
        exp = iat + math.ceil(ttl)
        if not_after is not None:
            exp = min(exp, int(not_after))
        payload: dict[str, Any] = {
            "iss": self.peer_id, "aud": self.network_id, "sub": subject, "typ": typ,
            "jti": new_token_id(), "sid": sid, "iat": iat, "exp": exp,
            "auth_time": int(auth_time), "auth_at": round(float(auth_time), 6),
            "v": CLAIMS_VERSION,
        }
        token = jwt.encode(payload, self._key, algorithm=ALGORITHM)
        return token, _claims(payload)


def _claims(payload: dict[str, Any]) -> Claims:
    return Claims(payload["iss"], payload["sub"], payload["aud"], payload["typ"],
                  payload["jti"], payload["sid"], payload["iat"], payload["exp"],
                  payload["auth_time"], payload)


class TokenVerifier:
    """Checks a token's signature (against its issuer's peer id) and claims.

    Args:
        audience: the network id tokens must be issued for.
        leeway: seconds of clock skew tolerated on ``exp`` and ``iat``.
    """

    def __init__(self, audience: str, *, leeway: float = 30.0,
                 cache_size: int = CACHE_SIZE) -> None:
        self.audience = audience
        self.leeway = leeway
        self.cache_size = cache_size
        self._keys: dict[str, Ed25519PublicKey] = {}
        # token -> claims of tokens whose signature checked out: the Ed25519
        # verification (~130 us) is the cost of a check and its result never
        # changes; expiry and type are checked again on every hit.
        self._verified: dict[str, Claims] = {}

    def _public_key(self, peer_id: str) -> Ed25519PublicKey:
        key = self._keys.get(peer_id)
        if key is None:
            try:
                raw = public_key_from_peer_id(peer_id)
            except InvalidParams as exc:
                raise InvalidToken("the token's issuer is not a peer id",
                                   data={"reason": "issuer"}) from exc
            key = Ed25519PublicKey.from_public_bytes(raw)
            if len(self._keys) >= 1024:
                self._keys.clear()
            self._keys[peer_id] = key
        return key

    def decode(self, token: Any, *, typ: str, verify_exp: bool = True) -> Claims:
        """The claims of a token whose signature and claims check out.

        Args:
            token: the compact JWS.
            typ: the token type expected (:data:`ACCESS` or :data:`REFRESH`).
            verify_exp: False to accept an expired token (logout does, so
                that a session can be ended with an expired access token).

        Raises:
            InvalidToken: malformed, tampered (bad signature), another
                network, wrong type, or missing / malformed claims;
                ``data.reason`` says which.
            TokenExpired: ``exp`` is past (beyond the leeway).
        """
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            raise InvalidToken(f"a token is a string of at most {MAX_TOKEN_LENGTH} characters",
                               data={"reason": "malformed"})
        cached = self._verified.get(token)
        if cached is not None:
            if cached.typ != typ:
                raise InvalidToken(f"not an {typ} token", data={"reason": "type"})
            if verify_exp and time.time() >= cached.exp + self.leeway:  # as PyJWT
                raise TokenExpired("the token has expired", data={"reason": "expired"})
            return cached
        claims = self._decode(token, typ=typ, verify_exp=verify_exp)
        if len(self._verified) >= self.cache_size:
            self._verified.clear()
        self._verified[token] = claims
        return claims

    def _decode(self, token: str, *, typ: str, verify_exp: bool) -> Claims:
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise InvalidToken("malformed token", data={"reason": "malformed"}) from exc
        issuer = unverified.get("iss")
        if not isinstance(issuer, str):
            raise InvalidToken("the token names no issuer", data={"reason": "issuer"})
        key = self._public_key(issuer)
        try:
            payload = jwt.decode(
                token, key, algorithms=[ALGORITHM], audience=self.audience, issuer=issuer,
                leeway=self.leeway,
                options={"require": _REQUIRED, "verify_exp": verify_exp},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenExpired("the token has expired", data={"reason": "expired"}) from exc
        except jwt.InvalidSignatureError as exc:
            raise InvalidToken("the token's signature does not match its issuer",
                               data={"reason": "signature"}) from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken("the token was issued for another network",
                               data={"reason": "audience"}) from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidToken("the token is not valid yet", data={"reason": "immature"}) from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"invalid token: {type(exc).__name__}",
                               data={"reason": "claims"}) from exc
        if payload.get("typ") != typ:
            raise InvalidToken(f"not an {typ} token", data={"reason": "type"})
        _check_shape(payload)
        return _claims(payload)


def _check_shape(payload: dict[str, Any]) -> None:
    sub = payload.get("sub")
    try:
        if not isinstance(sub, str) or str(uuid.UUID(sub)) != sub:
            raise ValueError
    except ValueError:
        raise InvalidToken("sub must be a user id", data={"reason": "claims"}) from None
    for name in ("jti", "sid"):
        value = payload.get(name)
        if not isinstance(value, str) or not 8 <= len(value) <= 128:
            raise InvalidToken(f"{name} must be a string of 8-128 characters",
                               data={"reason": "claims"})
    for name in ("iat", "exp", "auth_time"):
        if type(payload.get(name)) is not int:
            raise InvalidToken(f"{name} must be an integer time", data={"reason": "claims"})
    auth_at = payload.get("auth_at")
    if auth_at is not None and (
            type(auth_at) not in (int, float)
            or not payload["auth_time"] <= auth_at < payload["auth_time"] + 1):
        raise InvalidToken("auth_at must be the time auth_time rounds down from",
                           data={"reason": "claims"})
