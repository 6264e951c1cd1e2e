"""Auth benchmark: API key validation from the local ledger, token checks, login.

Prints ONE JSON object:

    validate_api_key_us      median microseconds of Authenticator.validate_api_key on a
                             valid key (parse, one indexed query, SHA-256, constant-time
                             compare, the user's row), on a node's real SQLite ledger
                             holding `keys_in_ledger` keys of `users_in_ledger` users
    validate_api_key_p99_us  99th percentile of the same
    reject_unknown_key_us    median for a well-formed key with an unknown public id
    reject_tampered_key_us   median for a known public id with a wrong secret
    verify_token_us          median of Authenticator.verify_token on a token not seen
                             before (EdDSA signature, claims, issuer membership, two
                             revocation lookups, the user's row)
    verify_token_cached_us   the same token again (signature result cached; expiry,
                             issuer, revocation and user are checked every time)
    login_ms                 median of loginUser over RPC from a non-member client on
                             loopback (Noise + yamux), argon2id verify included
    login_service_ms         median of AuthService.login in-process (argon2id included)
    argon2_hash_ms           median of one argon2id hash with the default parameters
    argon2_params            the parameters used
    machine                  nproc, CPU model, Python, date

Usage: python benchmarks/bench_auth.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import multiaddr
import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, median, pct  # noqa: E402

from p2pinfer.auth.passwords import PasswordHasher  # noqa: E402
from p2pinfer.config import NodeConfig  # noqa: E402
from p2pinfer.credentials import Authenticator  # noqa: E402
from p2pinfer.credentials.apikeys import generate_key  # noqa: E402
from p2pinfer.credentials.tokens import new_token_id  # noqa: E402
from p2pinfer.identity import Identity  # noqa: E402
from p2pinfer.node import Node  # noqa: E402
from p2pinfer.rpc import RpcClient, make_host  # noqa: E402

PASSWORD = "Tr0ub4dor&3x-bench"


def populate(node: Node, users: int, keys_per_user: int) -> list[str]:
    """``users`` users with ``keys_per_user`` keys each, written as ledger
    events (one shared password hash: table size is what matters here)."""
    password_hash = PasswordHasher().hash(PASSWORD)
    keys: list[str] = []
    batch: list[tuple[str, dict[str, Any]]] = []
    now = time.time()
    for u in range(users):
        user_id = str(uuid.uuid4())
        batch.append(("user.registered", {
            "user_id": user_id, "username": f"user{u:06d}", "email": f"user{u:06d}@example.org",
            "password_hash": password_hash, "created_at": now}))
        for _ in range(keys_per_user):
            issued = generate_key()
            keys.append(issued.key)
            batch.append(("apikey.issued", {
                "key_id": str(uuid.uuid4()), "user_id": user_id, "public_id": issued.public_id,
                "key_hash": issued.key_hash, "name": None, "created_at": now}))
        if len(batch) >= 500:
            node.ledger.append_many(batch)
            batch = []
    if batch:
        node.ledger.append_many(batch)
    return keys


def time_calls(fn: Any, args: list[Any], *, expect: type[BaseException] | None = None
               ) -> list[float]:
    """Microseconds per call of ``fn(arg)`` for each arg."""
    out = []
    clock = time.perf_counter_ns
    for arg in args:
        t0 = clock()
        try:
            fn(arg)
        except BaseException as exc:
            if expect is None or not isinstance(exc, expect):
                raise
        out.append((clock() - t0) / 1000)
    return out


async def bench(quick: bool) -> dict[str, Any]:
    users, per_user = (1000, 5) if quick else (5000, 4)
    n_validate = 5000 if quick else 30000
    n_login = 8 if quick else 25
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "node"
        config = NodeConfig.from_mapping(
            {"node": {"home": str(home), "roles": ["auth"],
                      "listen": ["/ip4/127.0.0.1/tcp/0"]},
             "auth": {"max_failures_per_source": 100_000, "registrations_per_source": 100_000}},
            env={})
        node = Node(config)
        keys = populate(node, users, per_user)
        auth = Authenticator(node)
        rng = random.Random(7)
        sample = [rng.choice(keys) for _ in range(n_validate)]
        for key in sample[:200]:  # warm SQLite's page cache and the statement cache
            auth.validate_api_key(key)
        valid = time_calls(auth.validate_api_key, sample)
        from p2pinfer.errors import InvalidApiKey

        unknown = time_calls(auth.validate_api_key,
                             [generate_key().key for _ in range(n_validate // 5)],
                             expect=InvalidApiKey)
        tampered = time_calls(auth.validate_api_key,
                              [k[:-6] + "AAAAAA" for k in sample[: n_validate // 5]],
                              expect=InvalidApiKey)

        hasher = PasswordHasher()
        hash_ms = []
        for _ in range(5 if quick else 15):
            t0 = time.perf_counter()
            hasher.hash(PASSWORD)
            hash_ms.append((time.perf_counter() - t0) * 1000)

        service = node.roles["auth"].service
        login_service, login_rpc, tokens = [], [], []
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            for i in range(n_login):
                t0 = time.perf_counter()
                session = await service.login(f"user{i:06d}", PASSWORD, source="bench")
                login_service.append((time.perf_counter() - t0) * 1000)
                tokens.append(session["token"])
            client_host = make_host(Identity.generate())
            async with client_host.run(
                    listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                async with RpcClient.open(client_host) as client:
                    peer = await client.connect(node.addrs[0])
                    await client.call(peer, "ping")
                    for i in range(n_login):
                        t0 = time.perf_counter()
                        session = await client.call(peer, "loginUser", {
                            "username": f"user{n_login + i:06d}", "password": PASSWORD})
                        login_rpc.append((time.perf_counter() - t0) * 1000)
                        tokens.append(session["token"])
            # distinct tokens: the first check of each verifies its Ed25519
            # signature (cold); the second finds it in the verifier's cache (warm)
            user_ids = [auth.verify_token(t).user_id for t in tokens]
            fresh = [service.issuer.issue(subject=rng.choice(user_ids), typ="access",
                                          ttl=3600, sid=new_token_id(),
                                          auth_time=int(time.time()), now=time.time())[0]
                     for _ in range(2000)]  # fits the verifier cache (4096)
            verify_cold = time_calls(auth.verify_token, fresh)
            verify_warm = time_calls(auth.verify_token, fresh)
            node.stop()
        s = service.settings
        return {
            "validate_api_key_us": round(median(valid), 2),
            "validate_api_key_p99_us": round(pct(valid, 0.99), 2),
            "validate_api_key_calls": len(valid),
            "reject_unknown_key_us": round(median(unknown), 2),
            "reject_tampered_key_us": round(median(tampered), 2),
            "verify_token_us": round(median(verify_cold), 2),
            "verify_token_cached_us": round(median(verify_warm), 2),
            "login_ms": round(median(login_rpc), 2),
            "login_p_max_ms": round(max(login_rpc), 2),
            "login_service_ms": round(median(login_service), 2),
            "argon2_hash_ms": round(median(hash_ms), 2),
            "argon2_params": {"type": "argon2id", "time_cost": s.argon2_time_cost,
                              "memory_kib": s.argon2_memory_kib,
                              "parallelism": s.argon2_parallelism},
            "users_in_ledger": users,
            "keys_in_ledger": len(keys),
            "quick": quick,
            "machine": machine(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller run (under a minute)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    for name in ("libp2p", "multiaddr", "p2pinfer"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    started = time.perf_counter()
    result = trio.run(bench, args.quick)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
