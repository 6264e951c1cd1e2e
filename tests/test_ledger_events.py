"""Ledger events, the hybrid clock and membership documents, without I/O."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from p2pinfer import errors
from p2pinfer.identity import Identity
from p2pinfer.ledger import events, membership
from p2pinfer.ledger.clock import MAX_DRIFT_MS, HybridClock, hlc_from_wall, wall_of
from p2pinfer.wire import canonical_pack, unpack

NET = "p2p-test"
USER = "0b8f2a1e-6c3d-4f5a-8b9c-1d2e3f4a5b6c"


def registered(**over: Any) -> dict[str, Any]:
    body = {"user_id": USER, "username": "alice", "email": "alice@example.org",
            "password_hash": "$argon2id$x", "created_at": 1.7e9}
    body.update(over)
    return body


def test_sign_and_decode_roundtrip() -> None:
    ident = Identity.generate()
    ev = events.sign_event(ident, NET, 1, hlc_from_wall(1.7e9), "user.registered", registered())
    back = events.decode(ev.raw, NET)
    assert back == ev and back.hash == ev.hash and back.raw == ev.raw
    assert back.author == ident.peer_id and back.wall == pytest.approx(1.7e9)
    assert back.rank < events.rank_of(back.hlc, back.author, back.seq + 1)


def test_non_canonical_encoding_gets_the_same_identity() -> None:
    """A peer may re-encode (e.g. other map key order): same hash, same raw."""
    ident = Identity.generate()
    ev = events.sign_event(ident, NET, 1, 5 << 16, "user.registered", registered())
    fields = unpack(ev.raw)
    fields[6] = dict(reversed(list(fields[6].items())))
    import msgpack

    other = msgpack.packb(fields, use_bin_type=True)
    assert other != ev.raw
    back = events.decode(other, NET)
    assert back.hash == ev.hash and back.raw == ev.raw


def _resign(ident: Identity, fields: list[Any]) -> bytes:
    fields = list(fields[:7])
    return canonical_pack([*fields, ident.sign(canonical_pack(fields))])


@pytest.mark.parametrize("mutate, error", [
    (lambda f: f[:7], errors.InvalidEvent),                        # missing signature
    (lambda f: [2, *f[1:]], errors.InvalidEvent),                  # unknown version
    (lambda f: [f[0], "p2p-other", *f[2:]], errors.WrongNetwork),  # other network
    (lambda f: [*f[:3], 0, *f[4:]], errors.InvalidEvent),          # seq must be >= 1
    (lambda f: [*f[:5], "user.hacked", *f[6:]], errors.InvalidEvent),
    (lambda f: [*f[:6], {**f[6], "username": "mallory"}, f[7]], errors.BadSignature),
    (lambda f: [*f[:7], b"\x00" * 64], errors.BadSignature),
])
def test_decode_rejects(mutate: Any, error: type[Exception]) -> None:
    ident = Identity.generate()
    ev = events.sign_event(ident, NET, 1, 5 << 16, "user.registered", registered())
    raw = canonical_pack(mutate(unpack(ev.raw)))
    with pytest.raises(error) as info:
        events.decode(raw, NET)
    assert type(info.value) is error


def test_decode_rejects_garbage_and_oversize() -> None:
    for raw in (b"", b"\xc1", canonical_pack({"a": 1}), b"x" * (events.MAX_EVENT_BYTES + 1)):
        with pytest.raises(errors.InvalidEvent):
            events.decode(raw, NET)


@pytest.mark.parametrize("kind, body", [
    ("user.registered", registered(user_id="not-a-uuid")),
    ("user.registered", registered(user_id=USER.upper())),
    ("user.registered", registered(email="")),
    ("user.registered", registered(tier="gold")),
    ("user.registered", registered(extra=1)),
    ("user.registered", {k: v for k, v in registered().items() if k != "email"}),
    ("user.registered", registered(created_at=float("nan"))),
    ("user.updated", {"user_id": USER, "updated_at": 1.0}),
    ("apikey.issued", {"key_id": USER, "user_id": USER, "public_id": "a b!", "key_hash": "h",
                       "name": None, "created_at": 1.0}),
    ("usage", {"entries": [{"user_id": USER, "key_id": None, "hour": 3601, "requests": 1,
                            "tokens": 2}]}),
    ("usage", {"entries": [{"user_id": USER, "key_id": None, "hour": 3600, "requests": -1,
                            "tokens": 2}]}),
    ("usage", {"entries": []}),
    ("request.logged", {"rows": [{"id": USER, "user_id": USER, "api_key_id": None,
                                  "prompt_hash": "NOT HEX!", "model_used": "m",
                                  "response_time_ms": 1, "tokens_used": 1, "status": "ok",
                                  "created_at": 1.0}]}),
    ("audit", {"actor": "a", "action": "x", "outcome": "ok", "time": 1.0,
               "detail": {"blob": b"x" * 5000}}),
    ("apikey.used", {"entries": [{"key_id": USER, "at": True}]}),
    ("member.admitted", {"cert": {"doc": {}, "sig": "not bytes"}}),
])
def test_malformed_bodies_are_refused_before_signing(kind: str, body: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidEvent):
        events.sign_event(Identity.generate(), NET, 1, 1 << 16, kind, body)


def test_signed_but_malformed_body_is_refused_on_decode() -> None:
    ident = Identity.generate()
    raw = _resign(ident, [1, NET, ident.peer_id, 1, 1 << 16, "usage", {"entries": "lots"}])
    with pytest.raises(errors.InvalidEvent, match="entries"):
        events.decode(raw, NET)


def test_oversized_local_event_is_refused() -> None:
    rows = [{"id": USER, "user_id": USER, "api_key_id": None, "prompt_hash": "ab" * 64,
             "model_used": "m" * 200, "response_time_ms": 1.5, "tokens_used": 1,
             "status": "ok", "created_at": 1.0}] * 500
    with pytest.raises(errors.InvalidEvent, match="split"):
        events.sign_event(Identity.generate(), NET, 1, 1 << 16, "request.logged", {"rows": rows})


def test_hybrid_clock() -> None:
    now = [1000.0]
    clock = HybridClock(lambda: now[0])
    a = clock.now()
    b = clock.now()
    assert a < b and wall_of(a) == 1000.0 and b == a + 1
    now[0] = 999.0  # the wall clock steps back: timestamps still increase
    assert clock.now() > b
    clock.observe(hlc_from_wall(1005.0))  # a peer slightly ahead: adopted
    assert clock.now() > hlc_from_wall(1005.0)
    far = hlc_from_wall(999.0 + MAX_DRIFT_MS / 1000 + 10)
    clock.observe(far)  # too far in the future: ignored
    assert clock.now() < far


# --- membership ---------------------------------------------------------------------
def test_network_certificates_and_join_token(tmp_path: Path) -> None:
    owner = membership.create_network(tmp_path / "owner", name="lab")
    net = owner.network
    assert net.network_id == membership.network_id_for(net.owner_public_key)
    assert (tmp_path / "owner" / "owner.key").stat().st_mode & 0o777 == 0o600
    assert membership.load_network(tmp_path / "owner") == net
    with pytest.raises(errors.ConfigError):
        membership.create_network(tmp_path / "owner")

    node = Identity.load_or_create(tmp_path / "node")
    cert = membership.admit(owner, node.peer_id, ["gateway"], days=1)
    token = membership.make_join_token(net, cert, ["/ip4/10.0.0.1/tcp/4001/p2p/x"])
    with pytest.raises(errors.ConfigError, match="admits"):
        membership.import_join_token(tmp_path / "node", token, peer_id=Identity.generate().peer_id)
    joined = membership.import_join_token(tmp_path / "node", token, peer_id=node.peer_id)
    assert joined.network_id == net.network_id and joined.bootstrap
    assert membership.load_member_cert(tmp_path / "node") == cert
    payload = unpack(membership._unb64(token[len("p2pj1."):]))
    payload["cert"]["doc"]["roles"] = ["auth", "gateway"]  # self-promotion
    with pytest.raises(errors.ConfigError, match="owner"):
        membership.parse_join_token("p2pj1." + membership._b64(canonical_pack(payload)))
    with pytest.raises(errors.ConfigError):
        membership.parse_join_token("p2pj1.bm9wZQ")


def test_membership_rules() -> None:
    owner_ident = Identity.generate()
    net = membership.NetworkInfo(membership.network_id_for(owner_ident.public_key),
                                 owner_ident.public_key)
    owner = membership.Owner(owner_ident, net)
    auth, gw = Identity.generate().peer_id, Identity.generate().peer_id
    m = membership.Membership(net)
    now = time.time()
    assert m.add(membership.admit(owner, auth, ["auth"])) == (auth, None)
    assert m.add(membership.admit(owner, auth, ["auth"], now=now - 10)) == (auth, None)
    assert m.add(membership.admit(owner, gw, ["gateway"], days=1, now=now - 86400 * 2))
    digest = m.digest()
    assert m.is_member(auth) and not m.is_member(gw)  # gw's certificate expired
    m.check_author(auth, "user.registered", 5, now)
    with pytest.raises(errors.KindNotAllowed):
        m.check_author(auth, "usage", 5, now)
    m.check_author(gw, "usage", 1, now - 86400 * 1.5)  # written while it was valid
    with pytest.raises(errors.UnauthorizedAuthor, match="expired"):
        m.check_author(gw, "usage", 2, now)
    with pytest.raises(errors.UnauthorizedAuthor) as info:
        m.check_author(Identity.generate().peer_id, "audit", 1, now)
    assert type(info.value) is errors.UnauthorizedAuthor
    # removals: the lowest cutoff wins, whatever the order
    assert m.add(membership.make_removal(owner, auth, 7)) == (auth, 7)
    assert m.add(membership.make_removal(owner, auth, 9, now=now + 1)) is None
    assert m.add(membership.make_removal(owner, auth, 3, now=now + 2)) == (auth, 3)
    assert not m.is_member(auth) and m.cutoff(auth) == 3
    m.check_author(auth, "audit", 3, now)
    with pytest.raises(errors.UnauthorizedAuthor, match="removed"):
        m.check_author(auth, "audit", 4, now)
    assert m.digest() != digest
    # documents of another owner, or tampered, are refused
    other = membership.Owner(owner_ident, net)
    forged = other.sign({**membership.admit(owner, gw, ["auth"]).doc, "roles": ["auth", "web"]})
    tampered = {"doc": {**forged.doc, "roles": ["web"]}, "sig": forged.sig}
    with pytest.raises(errors.BadSignature):
        m.add(tampered)
    stranger = Identity.generate()
    wrong_owner = membership.SignedDoc(forged.doc, stranger.sign(canonical_pack(forged.doc)))
    with pytest.raises(errors.BadSignature):
        m.add(wrong_owner)
    with pytest.raises(errors.WrongNetwork):
        m.add(owner.sign({**forged.doc, "net": "p2p-elsewhere"}))
    with pytest.raises(errors.InvalidEvent):
        m.add(owner.sign({**forged.doc, "roles": ["wizard"]}))


def test_package_exports() -> None:
    import p2pinfer.ledger as ledger_pkg

    assert set(ledger_pkg.__all__) >= {"Ledger", "Event", "Store", "create_network", "admit",
                                       "import_join_token", "make_join_token", "ApiKey", "User"}
    for name in ledger_pkg.__all__:
        assert getattr(ledger_pkg, name) is not None, name
    assert ledger_pkg.KINDS == set(ledger_pkg.KIND_ROLES) | {"member.admitted", "member.removed"}
