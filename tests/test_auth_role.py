"""The auth role on real nodes (loopback libp2p, real SQLite ledgers): register,
login, keys and tokens valid from any node, every failure's own error,
throttling, sessions, admins, registration conflicts, params."""

from __future__ import annotations

import base64
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio

from p2pinfer import errors
from p2pinfer.auth import Authenticator, Principal
from p2pinfer.credentials.apikeys import generate_key
from p2pinfer.credentials.tokens import ACCESS, TokenIssuer, new_token_id
from p2pinfer.identity import Identity
from p2pinfer.node import Node
from p2pinfer.rpc import RpcClient, make_host

from .helpers import make_network, node_config

PASSWORD = "Tr0ub4dor&3x"
FAST = {"registration_wait": 0.2}


@asynccontextmanager
async def swarm(nursery: trio.Nursery, tmp_path: Path, certs: Sequence[Sequence[str]],
                roles: Sequence[Sequence[str]],
                auth: dict[str, Any] | None = None) -> AsyncIterator[list[Node]]:
    """Nodes of ONE network with per-node certificates and running roles;
    the first is the bootstrap of the others."""
    homes = make_network(tmp_path, len(certs), roles=[list(c) for c in certs])
    tables = {"auth": {**FAST, **(auth or {})}, "ledger": {"sync_interval": 1.0}}
    nodes: list[Node] = []
    try:
        for i, (home, node_roles) in enumerate(zip(homes, roles, strict=True)):
            extra = {"bootstrap": [nodes[0].addrs[0]]} if i else {}
            node = Node(node_config(home, roles=list(node_roles), tables=tables, **extra))
            await nursery.start(node.run)
            nodes.append(node)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@asynccontextmanager
async def client_of(nodes: Sequence[Node]) -> AsyncIterator[tuple[RpcClient, str]]:
    """A client peer that is NOT a network member, connected to ``nodes``."""
    host = make_host(Identity.generate())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        async with RpcClient.open(host) as client:
            for node in nodes:
                await client.connect(node.addrs[0])
            yield client, host.get_id().to_base58()


def auth_of(node: Node) -> Any:
    return node.roles["auth"]


async def replicated(nodes: Sequence[Node], predicate: Any) -> None:
    """Wait until ``predicate(node)`` holds on every node (re-checked on each commit)."""
    for node in nodes:
        await node.ledger.wait_until(lambda n=node: predicate(n))


def register_params(name: str, **extra: Any) -> dict[str, Any]:
    return {"username": name, "email": f"{name}@example.org", "password": PASSWORD, **extra}


def tamper_payload(token: str, **changes: Any) -> str:
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{body}.{sig}"


def no_secrets_in_audit(node: Node, *secrets: str) -> None:
    rows = node.ledger.audit(limit=1000)
    assert rows
    text = repr(rows)
    for secret in secrets:
        assert secret not in text


# ----------------------------------------------------------------------------------------
async def test_register_on_a_login_on_b_key_on_b_validated_on_c_then_revoked_everywhere(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with swarm(nursery, tmp_path, certs=[["auth"], ["auth"], ["gateway", "operator"]],
                         roles=[["auth"], ["auth"], []]) as nodes:
            a, b, c = nodes
            async with client_of([a, b]) as (client, _):
                user = await client.call(a.peer_id, "registerUser",
                                         register_params(" Alice ", email="Alice@Example.org"))
                assert user["username"] == "alice" and user["email"] == "alice@example.org"
                assert user["tier"] == "default" and not user["is_admin"]
                uid = user["user_id"]
                await replicated([b], lambda n: n.ledger.user(uid) is not None)

                session = await client.call(b.peer_id, "loginUser",
                                            {"username": "ALICE", "password": PASSWORD})
                assert session["issuer"] == b.peer_id and session["token_type"] == "Bearer"
                assert session["user"]["user_id"] == uid
                assert 3590 <= session["expires_in"] <= 3600
                key = await client.call(b.peer_id, "generateApiKey",
                                        {"token": session["token"], "name": "my cli"})
                assert key["api_key"].startswith(f"p2p_{key['public_id']}_")

                # node C: a gateway member without the auth role, from its own ledger copy
                await replicated([c], lambda n: n.ledger.api_key(key["public_id"]) is not None)
                gateway = Authenticator(c)
                p = gateway.validate_api_key(key["api_key"])
                assert p == Principal(uid, "alice", "default", False, key["key_id"], "api_key")
                assert gateway.authenticate({"api_key": key["api_key"]}) == p
                by_token = gateway.authenticate({"token": session["token"]})
                assert (by_token.user_id, by_token.via, by_token.api_key_id) == (uid, "token", None)
                assert by_token.claims is not None and by_token.claims.issuer == b.peer_id
                # the design document's validateApiKey, over RPC on the other auth node
                await replicated([a], lambda n: n.ledger.api_key(key["public_id"]) is not None)
                remote = await client.call(a.peer_id, "validateApiKey",
                                           {"apiKey": key["api_key"]})
                assert remote["user_id"] == uid and remote["api_key_id"] == key["key_id"]

                listed = await client.call(a.peer_id, "listApiKeys", {"token": session["token"]})
                assert [k["key_id"] for k in listed["keys"]] == [key["key_id"]]
                assert listed["keys"][0]["name"] == "my cli" and listed["keys"][0]["is_active"]
                assert key["api_key"] not in repr(listed) and "hash" not in repr(listed)

                # C's authenticator remembers the validated key; the revocation
                # must still reach it the moment the event is applied
                queries = 0
                real_lookup = c.ledger.api_key

                def counted(public_id: str) -> Any:
                    nonlocal queries
                    queries += 1
                    return real_lookup(public_id)

                c.ledger.api_key = counted  # type: ignore[method-assign]
                assert gateway.validate_api_key(key["api_key"]) == p
                assert queries == 0  # remembered: no ledger query
                k = key["api_key"]
                wrong = k[:-5] + ("A" if k[-5] != "A" else "B") + k[-4:]
                with pytest.raises(errors.InvalidApiKey) as ei:  # still compared every time
                    gateway.validate_api_key(wrong)
                assert ei.value.data["reason"] == "mismatch"
                c.ledger.api_key = real_lookup  # type: ignore[method-assign]
                before = c.ledger.store.credentials_version
                revoked = await client.call(b.peer_id, "revokeApiKey",
                                            {"token": session["token"], "keyId": key["key_id"]})
                assert revoked["already_revoked"] is False
                await replicated(nodes, lambda n: n.ledger.api_key(
                    key["public_id"]).revoked_at is not None)
                assert c.ledger.store.credentials_version > before
                with pytest.raises(errors.RevokedApiKey):
                    gateway.validate_api_key(key["api_key"])
                for node in nodes:
                    with pytest.raises(errors.RevokedApiKey):
                        Authenticator(node).validate_api_key(key["api_key"])
                with pytest.raises(errors.RevokedApiKey):
                    await client.call(a.peer_id, "validateApiKey", {"api_key": key["api_key"]})
                again = await client.call(a.peer_id, "revokeApiKey",
                                          {"token": session["token"], "key_id": key["key_id"]})
                assert again["already_revoked"] is True

                # every step is in the audit trail, everywhere, without a secret in it
                actions = {"user.register", "user.login", "apikey.issue", "apikey.revoke"}
                await replicated([c], lambda n: actions <= {
                    r.action for r in n.ledger.audit(actor=f"user:{uid}", limit=100)})
                rows = c.ledger.audit(actor=f"user:{uid}", limit=100)
                # the connection's address, not the peer id (free to change)
                assert {r.source for r in rows} == {"ip:127.0.0.1"}
                assert all(r.outcome == "success" for r in rows)
                no_secrets_in_audit(c, PASSWORD, key["api_key"], session["token"],
                                    session["refresh_token"], "alice@example.org")


def client_peer(client: RpcClient) -> str:
    return str(client.host.get_id().to_base58())


async def test_a_key_made_a_moment_ago_elsewhere_is_accepted_at_once(
        tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway node checks a key its ledger has not received yet by
    waiting (up to a second) for it to replicate, counting one failure of
    the client however long it waits; its gateway, auth and web roles
    share one authenticator (one set of throttles per node). (Replication
    on loopback outruns the client, so node C's ledger is made to see the
    new key 0.3 s late.)"""
    with trio.fail_after(60):
        async with swarm(nursery, tmp_path, certs=[["auth"], ["auth", "gateway"]],
                         roles=[["auth"], ["auth", "gateway"]]) as nodes:
            a, c = nodes
            shared = c.authenticator
            assert c.roles["gateway"].auth is shared  # type: ignore[attr-defined]
            assert auth_of(c).authenticator is shared
            async with client_of([a]) as (client, _):
                user = await client.call(a.peer_id, "registerUser", register_params("carol"))
                session = await client.call(a.peer_id, "loginUser",
                                            {"username": "carol", "password": PASSWORD})
                key = await client.call(a.peer_id, "generateApiKey",
                                        {"token": session["token"], "name": "new"})
            arrives = trio.current_time() + 0.3
            real_lookup = c.ledger.api_key
            monkeypatch.setattr(c.ledger, "api_key", lambda public_id: None
                                if trio.current_time() < arrives else real_lookup(public_id))
            p = await shared.authenticate_waiting({"api_key": key["api_key"]},
                                                  source="ip:10.0.0.1")
            assert p.user_id == user["user_id"] and trio.current_time() >= arrives
            # its first try counted (the key was unknown then), the re-checks not
            assert shared.key_failures.count("ip:10.0.0.1|?", time.time()) == 1
            started = trio.current_time()
            with pytest.raises(errors.InvalidApiKey):
                await shared.authenticate_waiting({"api_key": generate_key().key},
                                                  source="ip:10.0.0.1", wait=0.3)
            assert trio.current_time() - started >= 0.3
            assert shared.key_failures.count("ip:10.0.0.1|?", time.time()) == 2
            with pytest.raises(errors.InvalidApiKey) as ei:  # a wrong secret: no wait
                await shared.authenticate_waiting(
                    {"api_key": key["api_key"][:-4] + "AAAA"}, source="ip:10.0.0.1")
            assert ei.value.data["reason"] == "mismatch"


async def test_each_failure_has_its_own_error(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with swarm(nursery, tmp_path, certs=[["auth"], ["auth"], ["gateway", "operator"]],
                         roles=[["auth"], ["auth"], []]) as nodes:
            a, b, c = nodes
            seen: dict[str, type[errors.P2PInferError]] = {}

            async def fails(case: str, exc_type: type[errors.P2PInferError], call: Any,
                            reason: str | None = None) -> errors.P2PInferError:
                with pytest.raises(exc_type) as info:
                    result = call()
                    if hasattr(result, "__await__"):
                        await result
                assert type(info.value) is exc_type, case
                if reason is not None:
                    assert info.value.data.get("reason") == reason, case
                seen[case] = exc_type
                return info.value

            async with client_of([a, b]) as (client, _):
                call = client.call
                user = await call(a.peer_id, "registerUser", register_params("alice"))
                uid = user["user_id"]
                await replicated(nodes, lambda n: n.ledger.user(uid) is not None)
                session = await call(b.peer_id, "loginUser",
                                     {"username": "alice", "password": PASSWORD})
                key = await call(b.peer_id, "generateApiKey", {"token": session["token"]})
                await replicated(nodes, lambda n: n.ledger.api_key(key["public_id"]) is not None)
                gw = Authenticator(c)

                # registration
                await fails("weak password", errors.WeakPassword, lambda: call(
                    a.peer_id, "registerUser", {**register_params("bob"), "password": "bob"}),
                    reason="too_short")
                await fails("duplicate username", errors.UsernameTaken, lambda: call(
                    b.peer_id, "registerUser", register_params("ALICE", email="new@example.org")))
                await fails("duplicate email", errors.EmailTaken, lambda: call(
                    b.peer_id, "registerUser", register_params("alicia",
                                                               email="Alice@example.ORG")))
                await fails("malformed email", errors.InvalidEmail, lambda: call(
                    a.peer_id, "registerUser", register_params("carl", email="carl@@example")))
                await fails("bad username", errors.InvalidUsername, lambda: call(
                    a.peer_id, "registerUser", register_params("no spaces allowed")))
                # login
                await fails("wrong password", errors.InvalidCredentials, lambda: call(
                    b.peer_id, "loginUser", {"username": "alice", "password": PASSWORD + "!"}))
                # an unknown user gets the same error as a wrong password
                await fails("unknown user", errors.InvalidCredentials, lambda: call(
                    a.peer_id, "loginUser", {"username": "nobody", "password": PASSWORD}))
                # tokens, checked offline on the gateway member C and over RPC on A
                net = a.ledger.network_id
                expired, _ = TokenIssuer(a.identity, net).issue(
                    subject=uid, typ=ACCESS, ttl=60, sid=new_token_id(),
                    auth_time=int(time.time()) - 7200, now=time.time() - 7200)
                await fails("expired token", errors.TokenExpired,
                            lambda: gw.verify_token(expired))
                await fails("expired token (rpc)", errors.TokenExpired, lambda: call(
                    a.peer_id, "generateApiKey", {"token": expired}))
                for signer in (Identity.generate(), c.identity):  # a stranger; a non-auth member
                    forged, _ = TokenIssuer(signer, net).issue(
                        subject=uid, typ=ACCESS, ttl=60, sid=new_token_id(),
                        auth_time=int(time.time()), now=time.time())
                    await fails("token signed by a non-member", errors.UntrustedIssuer,
                                lambda t=forged: gw.verify_token(t))
                    await fails("token signed by a non-member (rpc)", errors.UntrustedIssuer,
                                lambda t=forged: call(a.peer_id, "listApiKeys", {"token": t}))
                tampered = tamper_payload(session["token"], sub=str(uuid.uuid4()))
                await fails("tampered token", errors.InvalidToken,
                            lambda: gw.verify_token(tampered), reason="signature")
                await fails("tampered token (rpc)", errors.InvalidToken, lambda: call(
                    a.peer_id, "generateApiKey", {"token": tampered}))
                # API keys
                k = key["api_key"]
                flipped = k[:-5] + ("A" if k[-5] != "A" else "B") + k[-4:]
                await fails("tampered api key", errors.InvalidApiKey,
                            lambda: gw.validate_api_key(flipped), reason="mismatch")
                await fails("unknown api key", errors.InvalidApiKey,
                            lambda: gw.validate_api_key(generate_key().key), reason="unknown")
                await fails("malformed api key", errors.InvalidApiKey,
                            lambda: gw.validate_api_key("sk-" + k), reason="malformed")
                await fails("unknown api key (rpc)", errors.InvalidApiKey, lambda: call(
                    a.peer_id, "validateApiKey", {"api_key": generate_key().key}))
                # a session token cannot stand in for an API key where one is required
                await fails("api key instead of token", errors.AuthenticationRequired,
                            lambda: call(a.peer_id, "generateApiKey", {"api_key": k}))
                # revoked key
                spare = await call(b.peer_id, "generateApiKey", {"token": session["token"]})
                await call(b.peer_id, "revokeApiKey",
                           {"token": session["token"], "key_id": spare["key_id"]})
                await replicated([c], lambda n: n.ledger.api_key(
                    spare["public_id"]) is not None and n.ledger.api_key(
                    spare["public_id"]).revoked_at is not None)
                await fails("revoked key", errors.RevokedApiKey,
                            lambda: gw.validate_api_key(spare["api_key"]))
                # inactive user: deactivated by an operator (member C, as_operator)
                await c.rpc.call(a.peer_id, "setUserActive",
                                 {"as_operator": True, "user_id": uid, "is_active": False})
                await replicated(nodes, lambda n: not n.ledger.user(uid).is_active)
                await fails("inactive user (login)", errors.InactiveUser, lambda: call(
                    b.peer_id, "loginUser", {"username": "alice", "password": PASSWORD}))
                for node in nodes:
                    await fails("inactive user (key)", errors.InactiveUser,
                                lambda n=node: Authenticator(n).validate_api_key(k))
                    await fails("inactive user (token)", errors.InactiveUser,
                                lambda n=node: Authenticator(n).verify_token(session["token"]))

            distinct = {seen[c] for c in ("weak password", "duplicate username",
                                          "duplicate email", "malformed email",
                                          "wrong password", "expired token",
                                          "token signed by a non-member", "tampered token",
                                          "tampered api key", "revoked key",
                                          "inactive user (login)")}
            # (an unknown user and a wrong password are one error on purpose)
            assert seen["unknown user"] is seen["wrong password"]
            assert len(distinct) == 11
            codes = {cls.code for cls in distinct}
            assert len(codes) == 11


async def test_login_throttling_per_account_swarm_wide_and_per_source(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    settings = {"max_failures_per_account": 3, "max_failures_per_source": 2,
                "throttle_window": 1.0}
    with trio.fail_after(60):
        async with swarm(nursery, tmp_path, certs=[["auth"], ["auth"], ["web"]],
                         roles=[["auth"], ["auth"], []], auth=settings) as nodes:
            a, b, web = nodes
            await web.connect(b.addrs[0])  # web bootstrapped through a only
            user = await web.rpc.call(a.peer_id, "registerUser", register_params("dora"))
            uid = user["user_id"]
            await replicated(nodes, lambda n: n.ledger.user(uid) is not None)

            # -- per account, with a frozen clock on both auth nodes (no sleeping)
            now = [time.time()]
            for node in (a, b):
                auth_of(node).service.clock = lambda: now[0]
            sources = iter(f"198.51.100.{i}" for i in range(1, 100))  # no per-source limit here

            async def login(node: Node, password: str) -> dict[str, Any]:
                result: dict[str, Any] = await web.rpc.call(
                    node.peer_id, "loginUser",
                    {"username": "dora", "password": password, "source": next(sources)})
                return result

            for _ in range(3):
                with pytest.raises(errors.InvalidCredentials):
                    await login(b, "Wrong-password-1")
            with pytest.raises(errors.LoginThrottled) as exc:
                await login(b, PASSWORD)  # even the right password, from a new source
            assert exc.value.data["scope"] == "account"
            assert 0.99 <= exc.value.retry_after <= 1.0  # type: ignore[operator]
            # the failures are in the replicated audit trail: node A throttles too
            await replicated([a], lambda n: len([r for r in n.ledger.audit(
                actor=f"user:{uid}", action="user.login") if r.outcome == "failure"]) >= 3)
            with pytest.raises(errors.LoginThrottled):
                await login(a, PASSWORD)
            now[0] += 0.5
            with pytest.raises(errors.LoginThrottled) as exc:
                await login(a, PASSWORD)
            assert 0.49 <= exc.value.retry_after <= 0.5  # type: ignore[operator]
            now[0] += exc.value.retry_after + 0.001  # type: ignore[operator]
            session = await login(a, PASSWORD)  # the window has passed
            assert session["user"]["user_id"] == uid
            with pytest.raises(errors.InvalidCredentials):  # a success starts a new count
                await login(a, "Wrong-password-2")
            throttled = a.ledger.audit(action="user.login_throttled", limit=10)
            assert throttled and all(r.outcome == "throttled" for r in throttled)

            # -- per source, in real time: a member (the web role) names the client's IP
            for node in (a, b):
                auth_of(node).service.clock = time.time
            params = {"username": "nobody", "password": PASSWORD, "source": "203.0.113.7"}
            for _ in range(2):
                with pytest.raises(errors.InvalidCredentials):
                    await web.rpc.call(b.peer_id, "loginUser", params)
            with pytest.raises(errors.LoginThrottled) as exc:
                await web.rpc.call(b.peer_id, "loginUser",
                                   {**params, "username": "dora"})
            assert exc.value.data["scope"] == "source"
            wait = exc.value.retry_after
            assert wait is not None and 0 < wait <= 1.0
            # another source is not affected; a non-member cannot borrow a source
            await web.rpc.call(b.peer_id, "loginUser",
                               {"username": "dora", "password": PASSWORD,
                                "source": "203.0.113.8"})
            async with client_of([b]) as (client, _):
                await client.call(b.peer_id, "loginUser",
                                  {"username": "dora", "password": PASSWORD,
                                   "source": "203.0.113.7"})
            await trio.sleep(wait)  # the window the error named, not a settling sleep
            await web.rpc.call(b.peer_id, "loginUser", {**params, "username": "dora"})


async def test_refresh_rotates_and_logout_ends_the_session_everywhere(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with swarm(nursery, tmp_path, certs=[["auth"], ["auth"], ["gateway", "operator"]],
                         roles=[["auth"], ["auth"], []]) as nodes:
            a, b, c = nodes
            async with client_of([a, b]) as (client, _):
                user = await client.call(a.peer_id, "registerUser", register_params("erin"))
                uid = user["user_id"]
                first = await client.call(a.peer_id, "loginUser",
                                          {"email": "ERIN@example.org", "password": PASSWORD})
                await replicated([b, c], lambda n: n.ledger.user(uid) is not None)
                second = await client.call(b.peer_id, "refreshToken",
                                           {"refreshToken": first["refresh_token"]})
                assert second["session_id"] == first["session_id"]
                assert second["issuer"] == b.peer_id
                assert second["refresh_token"] != first["refresh_token"]
                assert Authenticator(c).verify_token(second["token"]).user_id == uid
                # an access token is not a refresh token, nor the reverse
                with pytest.raises(errors.InvalidToken):
                    await client.call(b.peer_id, "refreshToken",
                                      {"refresh_token": second["token"]})
                with pytest.raises(errors.InvalidToken):
                    Authenticator(c).verify_token(second["refresh_token"])
                # replaying the spent refresh token ends the whole session (it was copied)
                await replicated([a], lambda n: n.ledger.is_session_revoked(
                    Authenticator(n).tokens.decode(first["refresh_token"], typ="refresh").jti))
                with pytest.raises(errors.TokenRevoked) as exc:
                    await client.call(a.peer_id, "refreshToken",
                                      {"refresh_token": first["refresh_token"]})
                assert exc.value.data["reason"] == "reuse"
                await replicated(nodes, lambda n: n.ledger.is_session_revoked(
                    first["session_id"]))
                for node in nodes:
                    for token in (first["token"], second["token"]):
                        with pytest.raises(errors.TokenRevoked):
                            Authenticator(node).verify_token(token)

                # logout: every node refuses the session's tokens once replicated
                third = await client.call(b.peer_id, "loginUser",
                                          {"username": "erin", "password": PASSWORD})
                assert Authenticator(c).verify_token(third["token"]).session_id == \
                    third["session_id"]
                out = await client.call(a.peer_id, "logoutUser", {"token": third["token"]})
                assert out == {"session_id": third["session_id"], "revoked": True,
                               "already_revoked": False}
                await replicated(nodes, lambda n: n.ledger.is_session_revoked(
                    third["session_id"]))
                for node in nodes:
                    with pytest.raises(errors.TokenRevoked):
                        Authenticator(node).verify_token(third["token"])
                with pytest.raises(errors.TokenRevoked):
                    await client.call(a.peer_id, "refreshToken",
                                      {"refresh_token": third["refresh_token"]})
                again = await client.call(b.peer_id, "logoutUser",
                                          {"refresh_token": third["refresh_token"]})
                assert again["already_revoked"] is True
                wanted = {("session.refresh", "success"), ("session.refresh", "failure"),
                          ("session.logout", "success")}
                await replicated([c], lambda n: wanted <= {
                    (r.action, r.outcome) for r in n.ledger.audit(actor=f"user:{uid}")})


async def test_admins_are_made_by_operators_and_manage_other_users(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with swarm(nursery, tmp_path, certs=[["auth"], ["gateway", "operator"]],
                         roles=[["auth"], []]) as nodes:
            a, c = nodes
            async with client_of([a]) as (client, _):
                alice = await client.call(a.peer_id, "registerUser", register_params("alice"))
                bob = await client.call(a.peer_id, "registerUser", register_params("bob"))
                s_alice = await client.call(a.peer_id, "loginUser",
                                            {"username": "alice", "password": PASSWORD})
                s_bob = await client.call(a.peer_id, "loginUser",
                                          {"username": "bob", "password": PASSWORD})
                a_key = await client.call(a.peer_id, "generateApiKey",
                                          {"token": s_alice["token"]})
                # a plain user may not change anyone, nor act for another user
                with pytest.raises(errors.PermissionDenied):
                    await client.call(a.peer_id, "setUserTier",
                                      {"token": s_bob["token"], "user_id": alice["user_id"],
                                       "tier": "premium"})
                with pytest.raises(errors.PermissionDenied):
                    await client.call(a.peer_id, "listApiKeys",
                                      {"token": s_bob["token"], "user_id": alice["user_id"]})
                with pytest.raises(errors.PermissionDenied):
                    await client.call(a.peer_id, "revokeApiKey",
                                      {"token": s_bob["token"], "key_id": a_key["key_id"]})
                # a non-member cannot claim to be the operator
                with pytest.raises(errors.NotMember):
                    await client.call(a.peer_id, "setUserAdmin",
                                      {"as_operator": True, "user_id": bob["user_id"],
                                       "is_admin": True})
                # a member (the operator's node C) makes bob an admin
                made = await c.rpc.call(a.peer_id, "setUserAdmin",
                                        {"asOperator": True, "userId": bob["user_id"],
                                         "isAdmin": True})
                assert made["is_admin"] is True
                await replicated(nodes, lambda n: n.ledger.user(bob["user_id"]).is_admin)
                assert Authenticator(c).verify_token(s_bob["token"]).is_admin
                # the admin changes alice's tier, lists and revokes her key, reads her usage
                changed = await client.call(a.peer_id, "setUserTier",
                                            {"token": s_bob["token"], "user_id": alice["user_id"],
                                             "tier": "premium"})
                assert changed["tier"] == "premium"
                await replicated([c], lambda n: n.ledger.user(alice["user_id"]).tier == "premium")
                await replicated([c], lambda n: n.ledger.api_key(a_key["public_id"]) is not None)
                assert Authenticator(c).validate_api_key(a_key["api_key"]).tier == "premium"
                keys = await client.call(a.peer_id, "listApiKeys",
                                         {"token": s_bob["token"], "user_id": alice["user_id"]})
                assert [k["key_id"] for k in keys["keys"]] == [a_key["key_id"]]
                await client.call(a.peer_id, "revokeApiKey",
                                  {"token": s_bob["token"], "key_id": a_key["key_id"]})
                usage = await client.call(a.peer_id, "getUserUsage",
                                          {"token": s_bob["token"], "user_id": alice["user_id"]})
                assert usage["user_id"] == alice["user_id"] and usage["total"] == {
                    "requests": 0, "tokens": 0}
                # alice, not an admin, reads her own account and usage with an API key
                key2 = await client.call(a.peer_id, "generateApiKey",
                                         {"token": s_alice["token"], "name": "second"})
                me = await client.call(a.peer_id, "getUser", {"api_key": key2["api_key"]})
                assert me["user_id"] == alice["user_id"] and me["tier"] == "premium"
                mine = await client.call(a.peer_id, "getUserUsage",
                                         {"auth": {"api_key": key2["api_key"]}})
                assert mine["rows"] == []
                # the audit trail names who did what
                rows = a.ledger.audit(limit=100)
                by_action = {(r.action, r.outcome): r for r in rows}
                assert by_action[("user.set_admin", "success")].actor == f"peer:{c.peer_id}"
                assert by_action[("user.set_tier", "success")].actor == f"user:{bob['user_id']}"
                assert by_action[("user.set_tier", "success")].detail == {
                    "from": "default", "to": "premium"}
                assert by_action[("user.set_tier", "denied")].actor == f"user:{bob['user_id']}"


async def test_a_concurrent_registration_that_loses_gets_registration_lost(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """Two auth nodes that cannot see each other both accept "frank"; once
    they meet, the earlier registration wins everywhere and the later one's
    caller, still watching, gets RegistrationLost."""
    homes = make_network(tmp_path, 2, roles=["auth"])
    with trio.fail_after(60):
        a = Node(node_config(homes[0], roles=["auth"], tables={"auth": {"registration_wait": 0}}))
        b = Node(node_config(homes[1], roles=["auth"],  # no bootstrap: partitioned
                             tables={"auth": {"registration_wait": 30}}))
        await nursery.start(a.run)
        await nursery.start(b.run)
        try:
            winner = await a.rpc.call(a.peer_id, "registerUser", register_params("frank"))
            outcome: list[BaseException] = []

            async def register_on_b() -> None:
                try:
                    await b.rpc.call(b.peer_id, "registerUser",
                                     register_params("Frank", email="frank2@example.org"))
                except errors.P2PInferError as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as inner:
                inner.start_soon(register_on_b)
                # b accepted it locally (it knows no rival) and now watches ...
                await b.ledger.wait_until(lambda: b.ledger.user_by_username("frank") is not None)
                loser_id = b.ledger.user_by_username("frank").id
                assert loser_id != winner["user_id"]
                await b.connect(a.addrs[0])  # ... until the partition heals
            assert len(outcome) == 1 and type(outcome[0]) is errors.RegistrationLost
            assert outcome[0].data["winner"] == winner["user_id"]
            for node in (a, b):
                await node.ledger.wait_until(
                    lambda n=node: n.ledger.registration(loser_id) is not None)
                assert node.ledger.user_by_username("frank").id == winner["user_id"]
                with pytest.raises(errors.RegistrationLost):
                    node.ledger.check_registration(loser_id)
            # a token issued to the loser before the conflict resolved is refused
            token, _ = TokenIssuer(b.identity, b.ledger.network_id).issue(
                subject=loser_id, typ=ACCESS, ttl=60, sid=new_token_id(),
                auth_time=int(time.time()), now=time.time())
            with pytest.raises(errors.RegistrationLost):
                Authenticator(a).verify_token(token)
            lost = [r for r in b.ledger.audit(action="user.register") if r.outcome == "failure"]
            assert lost and lost[0].detail == {"reason": "lost"}
        finally:
            a.stop()
            b.stop()


async def test_a_refresh_token_spent_on_two_partitioned_auth_nodes_ends_the_session(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """A stolen refresh token used on one auth node while its owner uses it on
    another that cannot see the first: both rotations succeed locally, and
    once the two meet, the session is over on both (and the audit trail
    shows both refreshes)."""
    homes = make_network(tmp_path, 2, roles=["auth"])
    with trio.fail_after(60):
        a = Node(node_config(homes[0], roles=["auth"], tables={"auth": FAST}))
        b = Node(node_config(homes[1], roles=["auth"], tables={"auth": FAST}))  # partitioned
        await nursery.start(a.run)
        await nursery.start(b.run)
        try:
            user = await a.rpc.call(a.peer_id, "registerUser", register_params("gina"))
            session = await a.rpc.call(a.peer_id, "loginUser",
                                       {"username": "gina", "password": PASSWORD})
            # b learns the account as if it had synced once, then stays apart
            for author in a.ledger.version_vector():
                b.ledger.ingest(a.ledger.store.read_range(author, 0, 10_000))
            assert b.ledger.user(user["user_id"]) is not None
            spend = {"refresh_token": session["refresh_token"]}
            on_a = await a.rpc.call(a.peer_id, "refreshToken", spend)
            on_b = await b.rpc.call(b.peer_id, "refreshToken", spend)
            sid = session["session_id"]
            assert on_a["session_id"] == on_b["session_id"] == sid
            # each alone thinks all is well
            assert Authenticator(a).verify_token(on_a["token"]).user_id == user["user_id"]
            assert Authenticator(b).verify_token(on_b["token"]).user_id == user["user_id"]
            await b.connect(a.addrs[0])  # the partition heals
            for node in (a, b):
                await node.ledger.wait_until(lambda n=node: n.ledger.is_session_revoked(sid))
                for fresh in (on_a, on_b):
                    with pytest.raises(errors.TokenRevoked):
                        Authenticator(node).verify_token(fresh["token"])
                with pytest.raises(errors.TokenRevoked):
                    await node.rpc.call(node.peer_id, "refreshToken",
                                        {"refresh_token": on_a["refresh_token"]})
            refreshes = [r for r in a.ledger.audit(action="session.refresh")
                         if r.outcome == "success"]
            assert len(refreshes) == 2
        finally:
            a.stop()
            b.stop()


async def test_params_are_validated_and_name_the_field(tmp_path: Path,
                                                       nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        async with swarm(nursery, tmp_path, certs=[["auth"]], roles=[["auth"]],
                         auth={"registrations_per_source": 2}) as nodes:
            (a,) = nodes
            user = await a.rpc.call(a.peer_id, "registerUser", register_params("gina"))
            session = await a.rpc.call(a.peer_id, "loginUser",
                                       {"username": "gina", "password": PASSWORD})
            tok = session["token"]
            cases: list[tuple[str, Any, str]] = [
                ("registerUser", ["gina", "x"], "params"),
                ("registerUser", {"email": "h@example.org", "password": PASSWORD}, "username"),
                ("registerUser", {**register_params("hank"), "role": "admin"}, "role"),
                ("registerUser", {**register_params("hank"), "password": 12345}, "password"),
                ("loginUser", {"password": PASSWORD}, "username"),
                ("loginUser", {"username": "gina", "email": "gina@example.org",
                               "password": PASSWORD}, "username"),
                ("loginUser", {"username": "gina"}, "password"),
                ("generateApiKey", {"token": tok, "name": "a" * 101}, "name"),
                ("generateApiKey", {"token": tok, "name": "bell\x07"}, "name"),
                ("generateApiKey", {"token": tok, "user_id": "not-a-uuid"}, "user_id"),
                ("generateApiKey", {"token": tok, "userId": user["user_id"],
                                    "user_id": user["user_id"]}, "user_id"),
                ("revokeApiKey", {"token": tok}, "key_id"),
                ("getUserUsage", {"token": tok, "since": "2025-13-01"}, "since"),
                ("getUserUsage", {"token": tok, "until": "yesterday"}, "until"),
                ("getUserUsage", {"token": tok, "api_key": "k"}, "auth"),
                ("getUserUsage", {"auth": "token"}, "auth"),
                ("setUserTier", {"token": tok, "user_id": user["user_id"], "tier": "gold"},
                 "tier"),
                ("setUserActive", {"token": tok, "user_id": user["user_id"], "is_active": 1},
                 "is_active"),
                ("setUserAdmin", {"as_operator": True, "token": tok,
                                  "user_id": user["user_id"], "is_admin": True}, "as_operator"),
                ("validateApiKey", {}, "api_key"),
                ("logoutUser", {}, "token"),
                ("refreshToken", {"refresh_token": None}, "refresh_token"),
            ]
            for method, params, field in cases:
                with pytest.raises(errors.InvalidParams) as exc:
                    await a.rpc.call(a.peer_id, method, params)
                assert exc.value.data.get("field") == field, (method, params)
            # registrations per source (none of the refused calls above counted)
            await a.rpc.call(a.peer_id, "registerUser", register_params("ivan"))
            with pytest.raises(errors.RateLimited) as exc:
                await a.rpc.call(a.peer_id, "registerUser", register_params("jack"))
            assert exc.value.retry_after is not None and 3590 < exc.value.retry_after <= 3600
            await a.rpc.call(a.peer_id, "registerUser",  # a member may name the client's IP
                             register_params("jack", source="192.0.2.9"))
            # a password too long for the policy is just a wrong password at login
            with pytest.raises(errors.InvalidCredentials):
                await a.rpc.call(a.peer_id, "loginUser",
                                 {"username": "gina", "password": PASSWORD * 100})
            with pytest.raises(errors.AuthenticationRequired):
                await a.rpc.call(a.peer_id, "listApiKeys", {})
            with pytest.raises(errors.NotFound):
                await a.rpc.call(a.peer_id, "revokeApiKey",
                                 {"token": tok, "key_id": str(uuid.uuid4())})
            with pytest.raises(errors.NotFound):
                await a.rpc.call(a.peer_id, "setUserTier", {"as_operator": True,
                                                            "user_id": str(uuid.uuid4()),
                                                            "tier": "premium"})


def test_the_package_exports_what_roles_use() -> None:
    import p2pinfer.auth as auth
    from p2pinfer.node import load_role_class

    assert sorted(auth.__all__) == ["Actor", "AuthRole", "AuthService", "AuthSettings",
                                    "Authenticator", "Claims", "IssuedKey", "Principal"]
    assert all(hasattr(auth, name) for name in auth.__all__)
    assert load_role_class("auth") is auth.AuthRole and auth.AuthRole.name == "auth"


async def test_a_password_change_ends_every_session_everywhere(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """changePassword on B: the old password and every earlier session
    (tokens and refresh tokens, issued by A or B) are refused on every node
    once the event has replicated; the new session works everywhere; wrong
    or weak input changes nothing; an erasure leaves no copy of the hash."""
    new_password = "c0rrect-h0rse-battery"
    with trio.fail_after(90):
        async with swarm(nursery, tmp_path, certs=[["auth"], ["auth"], ["gateway", "operator"]],
                         roles=[["auth"], ["auth"], []]) as nodes:
            a, b, c = nodes
            async with client_of([a, b]) as (client, _):
                user = await client.call(a.peer_id, "registerUser", register_params("carol"))
                uid = user["user_id"]
                await replicated(nodes, lambda n: n.ledger.user(uid) is not None)
                on_a = await client.call(a.peer_id, "loginUser",
                                         {"username": "carol", "password": PASSWORD})
                on_b = await client.call(b.peer_id, "loginUser",
                                         {"username": "carol", "password": PASSWORD})
                key = await client.call(b.peer_id, "generateApiKey", {"token": on_b["token"]})

                async def refused(error: type[Exception], params: dict[str, Any],
                                  reason: str | None = None) -> None:
                    with pytest.raises(error) as ei:
                        await client.call(b.peer_id, "changePassword", params)
                    if reason is not None:
                        assert ei.value.data.get("reason") == reason  # type: ignore[attr-defined]

                await refused(errors.InvalidCredentials, {
                    "token": on_b["token"], "current_password": "not it at all 9",
                    "new_password": new_password})
                await refused(errors.WeakPassword, {
                    "token": on_b["token"], "current_password": PASSWORD,
                    "new_password": "short"}, reason="too_short")
                await refused(errors.AuthenticationRequired, {
                    "api_key": key["api_key"], "current_password": PASSWORD,
                    "new_password": new_password})
                await refused(errors.InvalidParams, {"token": on_b["token"],
                                                     "current_password": PASSWORD})
                assert all(n.ledger.user(uid).sessions_after is None for n in nodes)

                session = await client.call(b.peer_id, "changePassword", {
                    "token": on_b["token"], "currentPassword": PASSWORD,
                    "newPassword": new_password})
                assert session["user"]["user_id"] == uid and session["token"]
                await replicated(nodes, lambda n: n.ledger.user(uid).sessions_after is not None)
                for node in nodes:  # the sessions before the change are over everywhere
                    for old in (on_a, on_b):
                        with pytest.raises(errors.TokenRevoked) as ei:
                            Authenticator(node).verify_token(old["token"])
                        assert ei.value.data["reason"] == "sessions_ended"
                    assert Authenticator(node).verify_token(session["token"]).user_id == uid
                with pytest.raises(errors.TokenRevoked):
                    await client.call(a.peer_id, "refreshToken",
                                      {"refresh_token": on_a["refresh_token"]})
                renewed = await client.call(a.peer_id, "refreshToken",
                                            {"refresh_token": session["refresh_token"]})
                assert Authenticator(c).verify_token(renewed["token"]).user_id == uid
                with pytest.raises(errors.InvalidCredentials):
                    await client.call(a.peer_id, "loginUser",
                                      {"username": "carol", "password": PASSWORD})
                again = await client.call(a.peer_id, "loginUser",
                                          {"username": "carol", "password": new_password})
                assert again["user"]["user_id"] == uid
                # API keys are credentials of their own: revoke them to end them
                assert Authenticator(c).validate_api_key(key["api_key"]).user_id == uid
                await replicated([a], lambda n: any(
                    r.action == "user.password" and r.outcome == "success"
                    for r in n.ledger.audit(actor=f"user:{uid}", limit=100)))
                no_secrets_in_audit(a, PASSWORD, new_password)

                # erasure redacts the password change too: no node keeps the hash
                new_hash = a.ledger.user(uid).password_hash
                await c.rpc.call(a.peer_id, "eraseUser", {"as_operator": True,
                                                          "user_id": uid})

                def scrubbed(n: Node) -> bool:
                    rows = n.ledger.store.conn.execute("SELECT raw FROM events").fetchall()
                    return not any(new_hash.encode() in raw for (raw,) in rows)

                await replicated(nodes, scrubbed)


async def test_logout_everywhere_ends_every_session_on_every_node(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """logoutEverywhere on A: sessions from A and B (this one too) are refused
    on every node once replicated; a new login works at once; API keys stay."""
    with trio.fail_after(60):
        async with swarm(nursery, tmp_path, certs=[["auth"], ["auth"], ["gateway", "operator"]],
                         roles=[["auth"], ["auth"], []]) as nodes:
            a, b, c = nodes
            async with client_of([a, b]) as (client, _):
                user = await client.call(a.peer_id, "registerUser", register_params("dora"))
                uid = user["user_id"]
                await replicated(nodes, lambda n: n.ledger.user(uid) is not None)
                sessions = [await client.call(n.peer_id, "loginUser",
                                              {"username": "dora", "password": PASSWORD})
                            for n in (a, b)]
                key = await client.call(b.peer_id, "generateApiKey",
                                        {"token": sessions[1]["token"]})
                with pytest.raises(errors.AuthenticationRequired):
                    await client.call(a.peer_id, "logoutEverywhere",
                                      {"api_key": key["api_key"]})
                ended = await client.call(a.peer_id, "logoutEverywhere",
                                          {"token": sessions[0]["token"]})
                assert ended["user_id"] == uid
                await replicated(nodes, lambda n: n.ledger.user(uid).sessions_after
                                 == ended["sessions_ended_at"])
                for node in nodes:
                    for session in sessions:
                        with pytest.raises(errors.TokenRevoked):
                            Authenticator(node).verify_token(session["token"])
                    assert Authenticator(node).validate_api_key(key["api_key"]).user_id == uid
                with pytest.raises(errors.TokenRevoked):
                    await client.call(b.peer_id, "refreshToken",
                                      {"refresh_token": sessions[1]["refresh_token"]})
                again = await client.call(b.peer_id, "loginUser",
                                          {"username": "dora", "password": PASSWORD})
                assert Authenticator(c).verify_token(again["token"]).user_id == uid


async def test_unknown_user_and_wrong_password_look_the_same(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """Same error code, and medians of 50 attempts each within 20 % (the real
    argon2id parameters, attempts interleaved): a guesser learns nothing
    about which usernames exist."""
    lenient = {"argon2_time_cost": 2, "argon2_memory_kib": 19456,
               "max_failures_per_account": 1000, "max_failures_per_source": 1000}
    with trio.fail_after(180):
        async with swarm(nursery, tmp_path, certs=[["auth"]], roles=[["auth"]],
                         auth=lenient) as (a,):
            async with client_of([a]) as (client, _):
                await client.call(a.peer_id, "registerUser", register_params("erin"))
                times: dict[str, list[float]] = {"unknown": [], "wrong": []}
                codes: set[int] = set()
                for i in range(100):
                    which = ("unknown", "wrong")[i % 2]
                    name = "erin" if which == "wrong" else f"nobody{i}"
                    started = trio.current_time()
                    with pytest.raises(errors.P2PInferError) as info:
                        await client.call(a.peer_id, "loginUser",
                                          {"username": name, "password": f"not it {i}"})
                    times[which].append(trio.current_time() - started)
                    codes.add(info.value.code)
                    assert info.value.message == "wrong username or password"
            assert codes == {errors.InvalidCredentials.code}
            unknown, wrong = (statistics.median(times[k]) for k in ("unknown", "wrong"))
            assert 0.8 <= unknown / wrong <= 1.25, (unknown, wrong)
            # 50 unknown-user failures from one source: one replicated audit row
            rows = [r for r in a.ledger.audit(action="user.login", limit=200)
                    if r.actor == "anonymous"]
            assert len(rows) == 1, rows
