"""``network init|info|admit|join|remove|members``: membership files on node
homes, join tokens, and removal and listing against running nodes (a
background swarm, and a real ``p2pinfer daemon`` process found through its
``daemon.json``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pinfer.cli.errors import EXIT_USAGE
from p2pinfer.ledger.membership import parse_join_token

from .test_cli_main import cli_env, helper_env, invoke  # noqa: F401 - cli_env is autouse
from .test_sdk import FAKE, BackgroundSwarm


def info(home: Path) -> dict[str, object]:
    return dict(json.loads(invoke("network", "info", "--home", str(home), "--json").stdout))


def test_init_admit_join(tmp_path: Path) -> None:
    owner, node = tmp_path / "owner", tmp_path / "node"
    network_id = invoke("network", "init", "--home", str(owner), "--name", "lab",
                        "--roles", "auth,gateway").stdout.strip()
    assert network_id.startswith("p2p-")
    for name in ("owner.key", "node.key"):
        assert (owner / name).stat().st_mode & 0o777 == 0o600
    mine = info(owner)
    assert mine["network_id"] == network_id and mine["owner"] is True
    assert mine["roles"] == ["auth", "gateway"] and mine["network_name"] == "lab"
    out = invoke("network", "init", "--home", str(owner), code=EXIT_USAGE).output
    assert "already has a network" in out

    new = info(node)  # creates the new machine's keys; not a member yet
    assert new["network_id"] is None and new["roles"] is None
    boot = "/ip4/10.0.0.2/tcp/4001/p2p/" + str(mine["node_peer_id"])
    admitted = invoke("network", "admit", str(new["node_peer_id"]), "--roles", "inference",
                      "--days", "30", "--bootstrap", boot, "--home", str(owner))
    token = admitted.stdout.strip()
    assert token.startswith("p2pj1.") and "network join" in admitted.stderr
    network, cert = parse_join_token(token)
    assert network.bootstrap == (boot,) and cert.roles == {"inference"}
    assert 29 * 86400 < cert.exp - cert.iat <= 30 * 86400
    joined = invoke("network", "join", token, "--home", str(node))
    assert joined.stdout.strip() == network_id and f"--bootstrap {boot}" in joined.stderr
    assert info(node)["roles"] == ["inference"] and info(node)["owner"] is False


def test_join_and_admit_refusals(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    invoke("network", "init", "--home", str(a))
    invoke("network", "init", "--home", str(b))
    invoke("network", "join", "p2pj1.garbage", "--home", str(c), code=EXIT_USAGE)
    invoke("network", "join", "nonsense", "--home", str(c), code=EXIT_USAGE)
    # a token for another peer
    stranger = str(info(tmp_path / "d")["node_peer_id"])
    token = invoke("network", "admit", stranger, "--roles", "inference", "--home",
                   str(a)).stdout.strip()
    out = invoke("network", "join", token, "--home", str(c), code=EXIT_USAGE).output
    assert "neither this home's node" in out
    # a home that already belongs to another network
    b_node = str(info(b)["node_peer_id"])
    token = invoke("network", "admit", b_node, "--roles", "inference", "--home",
                   str(a)).stdout.strip()
    out = invoke("network", "join", token, "--home", str(b), code=EXIT_USAGE).output
    assert "already belongs to network" in out
    # only the owner admits; flags must make sense; peer ids must be peer ids
    out = invoke("network", "admit", stranger, "--roles", "inference", "--home", str(c),
                 code=EXIT_USAGE).output
    assert "belongs to no network" in out
    invoke("network", "join", invoke("network", "admit", str(info(c)["node_peer_id"]),
                                      "--roles", "web", "--home", str(a)).stdout.strip(),
           "--home", str(c))
    out = invoke("network", "admit", stranger, "--roles", "inference", "--home", str(c),
                 code=EXIT_USAGE).output
    assert "holds no owner key" in out
    invoke("network", "admit", stranger, "--operator", "--roles", "web", "--home", str(a),
           code=EXIT_USAGE)
    invoke("network", "admit", "12D3KooWnotapeerid", "--roles", "web", "--home", str(a),
           code=EXIT_USAGE)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSwarm]:
    bg = BackgroundSwarm(tmp_path_factory.mktemp("cli-network"), workers=2).start()
    try:
        yield bg
    finally:
        bg.stop()


def test_members_and_remove(swarm: BackgroundSwarm) -> None:
    home, boot = str(swarm.home), swarm.addr
    rows = json.loads(invoke("network", "members", "--home", home, "--bootstrap", boot,
                             "--json").stdout)
    nodes = {n.peer_id: name for name, n in swarm.swarm.nodes.items()}
    by_peer = {r["peer_id"]: r for r in rows}
    assert set(nodes) <= set(by_peer)
    assert all(by_peer[p]["state"] == "active" and by_peer[p]["up"] for p in nodes)
    assert by_peer[swarm.hub.peer_id]["note"] == "this home's node"
    operator = [r for r in rows if r["note"] == "this home's operator key"]
    assert len(operator) == 1 and operator[0]["roles"] == ["operator"]

    doomed = swarm.swarm.nodes["worker-2"].peer_id
    invoke("network", "remove", doomed, "--home", home, "--bootstrap", boot, input="n\n",
           code=1)  # declined: nothing happens
    assert swarm.hub.ledger.is_member(doomed)
    out = invoke("network", "remove", doomed, "--yes", "--home", home, "--bootstrap",
                 boot).output
    assert f"Removed {doomed}" in out
    assert not swarm.hub.ledger.is_member(doomed)
    rows = json.loads(invoke("network", "members", "--home", home, "--bootstrap", boot,
                             "--json").stdout)
    assert {r["peer_id"]: r["state"] for r in rows}[doomed] == "removed"
    # the gateway stops routing to it
    gateway = swarm.hub.roles["gateway"]

    async def one_worker() -> None:
        from .helpers import wait_for

        async def check() -> bool:
            return {m["name"]: m["workers"] for m in await gateway.swarm_models()}[FAKE] == 1

        await wait_for(check, limit=15)

    swarm.run(one_worker)


def test_the_daemon_is_found_through_its_home(tmp_path: Path) -> None:
    home = tmp_path / "node"
    network_id = invoke("network", "init", "--home", str(home), "--roles",
                        "auth,gateway").stdout.strip()
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pinfer.daemon", "--home", str(home), "--roles",
         "auth,gateway", "--listen", "/ip4/127.0.0.1/tcp/0"],
        env=helper_env(), stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not (home / "daemon.json").exists():
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        daemon = json.loads((home / "daemon.json").read_text())
        assert daemon["pid"] == proc.pid
        # no --bootstrap: the operator commands find the daemon of the home
        rows = json.loads(invoke("network", "members", "--home", str(home), "--json").stdout)
        me = next(r for r in rows if r["note"] == "this home's node")
        assert me["peer_id"] == daemon["peer_id"] and me["up"] is True
        assert info(home)["daemon"] == daemon["addrs"]
        # and the join tokens it prints tell new nodes where to connect
        new = str(info(tmp_path / "new")["node_peer_id"])
        token = invoke("network", "admit", new, "--roles", "inference", "--home",
                       str(home)).stdout.strip()
        network, _ = parse_join_token(token)
        assert network.network_id == network_id and list(network.bootstrap) == daemon["addrs"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log.close()
    assert not (home / "daemon.json").exists()
    # a stale daemon.json (a crashed daemon) is ignored
    (home / "daemon.json").write_text(json.dumps({"pid": 2**22 + 12345, "addrs": ["/x"]}))
    assert info(home)["daemon"] == []
    os.remove(home / "daemon.json")
