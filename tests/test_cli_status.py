"""``usage``, ``quota``, ``peers``, ``health`` and the operator commands
``metrics``, ``audit`` and ``users`` against a real swarm, including acting as
a network member with the node home's keys."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pinfer.cli.errors import EXIT_AUTH, EXIT_USAGE
from p2pinfer.cli.store import Credentials, CredentialStore
from p2pinfer.client import SyncClient

from .test_cli_main import cli_env, invoke  # noqa: F401 - cli_env is autouse
from .test_sdk import FAKE, BackgroundSwarm


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSwarm]:
    bg = BackgroundSwarm(tmp_path_factory.mktemp("cli-status"), tokens=6).start()
    try:
        yield bg
    finally:
        bg.stop()


def login_as(swarm: BackgroundSwarm, name: str, requests: int = 0) -> dict[str, str]:
    user = swarm.account(name)
    CredentialStore().save(Credentials(bootstrap=[swarm.addr], username=name,
                                       api_key=user["api_key"], api_key_id=user["key_id"],
                                       token=user["token"],
                                       refresh_token=user["refresh_token"]))
    if requests:
        with SyncClient(bootstrap=[swarm.addr], api_key=user["api_key"]) as client:
            for _ in range(requests):
                client.inference("count me", model=FAKE, max_tokens=4)
    return user


def test_usage_table_chart_and_json(swarm: BackgroundSwarm) -> None:
    user = login_as(swarm, "uma", requests=3)
    ledger = swarm.hub.ledger

    async def flushed() -> None:
        from .helpers import wait_for

        await wait_for(lambda: sum(r.request_count for r in ledger.usage(
            user_id=user["user_id"])) == 3)

    swarm.run(flushed)
    out = invoke("usage").stdout
    today = datetime.datetime.now(datetime.UTC).date()
    assert today.isoformat() in out and "test" in out  # the key's name
    assert "total" in out and "Tokens per day" in out and "█" in out
    rows = json.loads(invoke("usage", "--json").stdout)
    assert sum(r["requests"] for r in rows) == 3
    assert sum(r["tokens"] for r in rows) == sum(r.tokens_used for r in ledger.usage(
        user_id=user["user_id"]))
    assert json.loads(invoke("usage", "--json", "--since", "2000-01-01", "--until",
                             "2000-01-31").stdout) == []
    invoke("usage", "--since", "2030-01-02", "--until", "2030-01-01", code=EXIT_USAGE)


def test_quota(swarm: BackgroundSwarm) -> None:
    login_as(swarm, "vera", requests=2)
    out = invoke("quota").stdout
    assert "Tier default" in out and "requests" in out and "Resets at" in out
    data = json.loads(invoke("quota", "--json").stdout)
    assert data["usage"]["requests"] == 2 and data["remaining"]["requests"] == 98


def test_peers_public_and_member_views(swarm: BackgroundSwarm) -> None:
    login_as(swarm, "wes")
    public = json.loads(invoke("peers", "--public", "--json").stdout)
    assert [p["peer_id"] for p in public] == [swarm.hub.peer_id]  # entry points only
    member = json.loads(invoke("peers", "--home", str(swarm.home), "--json").stdout)
    assert {p["peer_id"] for p in member} == {n.peer_id for n in swarm.swarm.nodes.values()}
    worker = next(p for p in member if p["roles"] == ["inference"])
    assert [m["name"] for m in worker["models"]] == [FAKE]
    table = invoke("peers", "--home", str(swarm.home)).stdout
    assert "member view" in table and "inference" in table


def test_health(swarm: BackgroundSwarm) -> None:
    out = invoke("health", "--bootstrap", swarm.addr).stdout  # no credentials needed
    assert "Gateway" in out and "ok" in out and f"{FAKE} (1 worker(s))" in out
    assert "Swarm:" in out
    data = json.loads(invoke("health", "--url", swarm.url, "--json").stdout)
    assert data["gateway"]["status"] == "ok" and data["system"] is None  # HTTP: gateway view


def test_health_as_a_member_names_nodes_and_counts_only_nodes(swarm: BackgroundSwarm) -> None:
    """With --home the nodes are listed by peer id; operator commands, whose
    keys connect for a moment and leave, are never counted as nodes (each
    used to become a node that was "down" for an hour)."""
    home = str(swarm.home)
    for _ in range(2):  # operator keys connect and leave
        invoke("metrics", "--home", home, "--bootstrap", swarm.addr, "--scope", "node")
    data = json.loads(invoke("health", "--home", home, "--bootstrap", swarm.addr,
                             "--json").stdout)
    nodes = {n.peer_id for n in swarm.swarm.nodes.values()}
    listed = {n["peer_id"] for n in data["system"]["nodes"]}
    assert listed == nodes, (listed, nodes)
    assert data["system"]["summary"]["nodes"] == len(nodes)
    assert data["system"]["status"] == "ok" and data["system"]["reasons"] == []
    out = invoke("health", "--home", home, "--bootstrap", swarm.addr).stdout
    assert "Swarm:" in out and f"{len(nodes)} of {len(nodes)} node(s) up" in out


def test_metrics_as_an_operator(swarm: BackgroundSwarm) -> None:
    home = str(swarm.home)
    out = invoke("metrics", "--home", home, "--bootstrap", swarm.addr, "--scope", "node").stdout
    assert "ai_platform_requests_total" in out and "counter" in out
    raw = invoke("metrics", "--home", home, "--bootstrap", swarm.addr, "--raw").stdout
    assert "# TYPE ai_platform_requests_total counter" in raw
    only = invoke("metrics", "--home", home, "--bootstrap", swarm.addr, "-g", "tokens").stdout
    assert "tokens" in only and "ai_platform_requests_total" not in only
    invoke("metrics", "--home", home, "-g", "([", code=EXIT_USAGE)
    # the operator key and its certificate were made in the home, 0600
    assert (swarm.home / "operator.key").stat().st_mode & 0o777 == 0o600
    assert (swarm.home / "operator.cert").stat().st_mode & 0o777 == 0o600


def test_audit_as_an_operator(swarm: BackgroundSwarm) -> None:
    user = login_as(swarm, "xena")
    home = str(swarm.home)
    rows = json.loads(invoke("audit", "--home", home, "--bootstrap", swarm.addr,
                             "--action", "user.register", "--since", "1h", "--json").stdout)
    assert f"user:{user['user_id']}" in {r["target"] for r in rows}
    out = invoke("audit", "--home", home, "--bootstrap", swarm.addr, "-n", "3").stdout
    assert "3 audit row(s)" in out
    invoke("audit", "--home", home, "--since", "last tuesday", code=EXIT_USAGE)


def test_users_set_tier_as_an_operator(swarm: BackgroundSwarm) -> None:
    user = login_as(swarm, "yuri")
    out = invoke("users", "set-tier", user["user_id"], "premium", "--home", str(swarm.home),
                 "--bootstrap", swarm.addr).output
    assert "tier premium" in out
    assert json.loads(invoke("quota", "--json").stdout)["tier"] == "premium"
    out = invoke("users", "set-admin", user["user_id"], "true", "--home", str(swarm.home),
                 "--bootstrap", swarm.addr).output
    assert "admin" in out and json.loads(invoke("whoami", "--json").stdout)["is_admin"]
    audit = json.loads(invoke("audit", "--home", str(swarm.home), "--bootstrap", swarm.addr,
                              "--json").stdout)
    assert any(r["target"] == f"user:{user['user_id']}" and r["actor"].startswith("peer:")
               for r in audit)


def test_operator_commands_need_a_member_home(swarm: BackgroundSwarm, tmp_path: Path) -> None:
    from p2pinfer.ledger.membership import load_owner

    # a home that belongs to no network
    out = invoke("metrics", "--home", str(tmp_path / "empty"), "--bootstrap", swarm.addr,
                 code=EXIT_USAGE).output
    assert "network init" in out
    # a member node's home without the owner key or an operator certificate
    other = tmp_path / "member"
    token_out = invoke("network", "info", "--home", str(other), "--json").stdout
    node_id = json.loads(token_out)["node_peer_id"]
    owner = load_owner(swarm.home)
    assert owner is not None
    from p2pinfer.ledger.membership import admit, make_join_token

    invoke("network", "join", make_join_token(owner.network, admit(owner, node_id,
                                                                   ["inference"])),
           "--home", str(other))
    out = invoke("audit", "--home", str(other), "--bootstrap", swarm.addr,
                 code=EXIT_AUTH).output
    assert "network admit" in out and "--operator" in out
    # once the owner admits its operator key, the same home works
    op_id = json.loads(invoke("network", "info", "--home", str(other), "--json").stdout)[
        "operator_peer_id"]
    token = invoke("network", "admit", op_id, "--operator", "--home",
                   str(swarm.home)).stdout.strip()
    invoke("network", "join", token, "--home", str(other))
    assert invoke("audit", "--home", str(other), "--bootstrap", swarm.addr).stdout
