"""Session tokens: EdDSA signatures by a node key, claims, tampering (no network)."""

from __future__ import annotations

import base64
import json
import time
import uuid

import jwt
import pytest

from p2pinfer import errors
from p2pinfer.credentials.tokens import ACCESS, REFRESH, TokenIssuer, TokenVerifier, new_token_id
from p2pinfer.identity import Identity, public_key_from_peer_id

NET = "p2p-testnetwork"
USER = str(uuid.uuid4())


def issue(identity: Identity, *, now: float | None = None, ttl: float = 3600, typ: str = ACCESS,
          network: str = NET) -> str:
    token, _ = TokenIssuer(identity, network).issue(
        subject=USER, typ=typ, ttl=ttl, sid=new_token_id(), auth_time=int(time.time()),
        now=time.time() if now is None else now)
    return token


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_token_is_an_eddsa_jwt_signed_by_the_node_key() -> None:
    ident = Identity.generate()
    token = issue(ident)
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    claims = TokenVerifier(NET).decode(token, typ=ACCESS)
    assert claims.issuer == ident.peer_id and claims.subject == USER
    assert claims.audience == NET and claims.exp - claims.iat == 3600
    assert set(claims.raw) >= {"iss", "aud", "sub", "typ", "jti", "sid", "iat", "exp",
                               "auth_time", "auth_at"}
    assert claims.auth_time <= claims.auth_at < claims.auth_time + 1
    # the signature checks with the public key inside the peer id, and nothing else
    head, payload, sig = token.split(".")
    from nacl.signing import VerifyKey

    VerifyKey(public_key_from_peer_id(ident.peer_id)).verify(
        f"{head}.{payload}".encode(), unb64(sig))


def test_not_after_caps_the_expiry() -> None:
    now = time.time()
    _, claims = TokenIssuer(Identity.generate(), NET).issue(
        subject=USER, typ=REFRESH, ttl=10_000, sid=new_token_id(), auth_time=int(now), now=now,
        not_after=now + 50)
    assert claims.exp == int(now + 50)


def reason(exc: pytest.ExceptionInfo[errors.P2PInferError]) -> str:
    return str(exc.value.data.get("reason"))


def test_tampered_payload_is_invalid() -> None:
    ident = Identity.generate()
    head, payload, sig = issue(ident).split(".")
    claims = json.loads(unb64(payload))
    claims["sub"] = str(uuid.uuid4())
    forged = ".".join([head, b64(json.dumps(claims).encode()), sig])
    with pytest.raises(errors.InvalidToken) as exc:
        TokenVerifier(NET).decode(forged, typ=ACCESS)
    assert reason(exc) == "signature"
    # claiming another issuer does not help either
    claims = json.loads(unb64(payload))
    claims["iss"] = Identity.generate().peer_id
    with pytest.raises(errors.InvalidToken):
        TokenVerifier(NET).decode(".".join([head, b64(json.dumps(claims).encode()), sig]),
                                  typ=ACCESS)


def test_each_bad_token_has_its_reason() -> None:
    ident = Identity.generate()
    verifier = TokenVerifier(NET, leeway=5)
    cases = {
        "malformed": ["", "a.b.c", "x" * 5000, 42],
        "audience": [issue(ident, network="p2p-other")],
        "type": [issue(ident, typ=REFRESH)],
        "immature": [issue(ident, now=time.time() + 3600)],
        "issuer": [jwt.encode({"iss": "not-a-peer-id", "sub": USER}, "k" * 32,
                              algorithm="HS256")],
    }
    for want, tokens in cases.items():
        for token in tokens:
            with pytest.raises(errors.InvalidToken) as exc:
                verifier.decode(token, typ=ACCESS)
            assert reason(exc) == want, (want, token)
    with pytest.raises(errors.TokenExpired):
        verifier.decode(issue(ident, now=time.time() - 7200), typ=ACCESS)
    # an expired token is accepted where expiry does not matter (logout)
    assert verifier.decode(issue(ident, now=time.time() - 7200), typ=ACCESS,
                           verify_exp=False).subject == USER


def test_other_algorithms_are_refused() -> None:
    """alg=none and HS256 keyed with the public key (the classic confusion
    attack) are both refused: only EdDSA is accepted."""
    ident = Identity.generate()
    now = int(time.time())
    claims = {"iss": ident.peer_id, "aud": NET, "sub": USER, "typ": ACCESS,
              "jti": new_token_id(), "sid": new_token_id(), "iat": now, "exp": now + 60,
              "auth_time": now}
    none_token = b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(json.dumps(claims).encode()) + "."
    hs_token = jwt.encode(claims, public_key_from_peer_id(ident.peer_id), algorithm="HS256")
    for token in (none_token, hs_token):
        with pytest.raises(errors.InvalidToken):
            TokenVerifier(NET).decode(token, typ=ACCESS)


def test_claim_shapes_are_checked() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ident = Identity.generate()
    key = Ed25519PrivateKey.from_private_bytes(ident.seed)
    now = int(time.time())
    base = {"iss": ident.peer_id, "aud": NET, "sub": USER, "typ": ACCESS,
            "jti": new_token_id(), "sid": new_token_id(), "iat": now, "exp": now + 60,
            "auth_time": now}
    for change in ({"sub": "alice"}, {"jti": "short"}, {"auth_time": "yesterday"},
                   {"sid": None}, {"auth_at": now + 1.5}, {"auth_at": now - 0.5},
                   {"auth_at": "now"}):
        token = jwt.encode({**base, **change}, key, algorithm="EdDSA")
        with pytest.raises(errors.InvalidToken):
            TokenVerifier(NET).decode(token, typ=ACCESS)
    for missing in ("sid", "jti", "exp", "aud"):
        token = jwt.encode({k: v for k, v in base.items() if k != missing}, key,
                           algorithm="EdDSA")
        with pytest.raises(errors.InvalidToken):
            TokenVerifier(NET).decode(token, typ=ACCESS)


def test_verified_tokens_are_cached_but_expiry_and_type_still_apply(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pinfer.credentials import tokens

    ident = Identity.generate()
    verifier = TokenVerifier(NET, leeway=0)
    token = issue(ident, ttl=60)
    first = verifier.decode(token, typ=ACCESS)
    assert verifier.decode(token, typ=ACCESS) is first  # no second signature check
    with pytest.raises(errors.InvalidToken):
        verifier.decode(token, typ=REFRESH)
    later = time.time() + 61
    monkeypatch.setattr(tokens.time, "time", lambda: later)
    with pytest.raises(errors.TokenExpired):
        verifier.decode(token, typ=ACCESS)
    assert verifier.decode(token, typ=ACCESS, verify_exp=False) is first
    # a tampered copy is a different string: it is checked, and refused
    with pytest.raises(errors.InvalidToken):
        verifier.decode(token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB"), typ=ACCESS,
                        verify_exp=False)
