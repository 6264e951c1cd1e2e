"""Chaos harness: real p2pinfer daemons as OS processes, each in its own
network namespace, and the faults to throw at them.

Used by ``tests/test_reliability_*.py`` (short runs in CI) and
``benchmarks/chaos.py`` (longer runs). Pieces:

- :class:`Topology`: one network namespace per node, each with its own
  address on a private /24 (``10.231.<n>.0/24``, a free ``<n>`` picked at
  run time) behind a bridge in the root namespace, so this process (the
  test, acting as client peers) reaches every node and the nodes reach each
  other. Faults: :meth:`Topology.partition` takes a node's link down (its
  packets are silently dropped, as on a cut cable), :meth:`Topology.block`
  cuts only the path between two nodes. Everything is removed on exit, also
  after a failure, and namespaces left by a killed run are swept at start.
  :class:`Loopback` is the fallback when ``ip netns`` is not permitted: same
  API on 127.0.0.1, without the network faults.
- :class:`Daemon`: one ``python -m p2pinfer.daemon --config ... --ready-file
  ...`` process: start, wait until ready, SIGKILL, SIGTERM, restart, RSS.
- :class:`Cluster`: a network made by :func:`p2pinfer.swarm.prepare_local_network`
  and one daemon per node; the first node bootstraps from the second and
  every other node from the first, so any of them can be restarted.
- :class:`ClientPeer` plus :func:`register_user` and :func:`ask`: a
  non-member client peer in this process, as any SDK user's program is,
  and one inference request with its outcome (text, trailer or error).
- :func:`read_ledger`: what a node's SQLite file holds (events, usage
  totals, request logs), read after the node stopped; :func:`swarm_logs`:
  the request logs of all of them (each is on its gateway and keepers).

Nothing leaves the machine: nodes listen on loopback or on addresses of
namespaces made here, and only this process talks to them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pinfer import errors

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "chaos harness password 7"
NS_PREFIX = "p2pchaos"
READY_TIMEOUT = 60.0


# -- network namespaces -----------------------------------------------------------------
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20,
                          check=check)


def netns_unavailable_reason() -> str | None:
    """None when this process may create network namespaces, else why not."""
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{NS_PREFIX}-probe-{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"'ip netns add' is not permitted here: {made.stderr.strip()[:200]}"
        link = _ip("link", "add", f"p2cprobe{os.getpid() % 10000}", "type", "bridge",
                   check=False)
        if link.returncode != 0:
            return f"creating a bridge is not permitted here: {link.stderr.strip()[:200]}"
        _ip("link", "del", f"p2cprobe{os.getpid() % 10000}", check=False)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"'ip netns' failed: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> None:
    """Remove namespaces and bridges left by harness runs whose process died."""
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == NS_PREFIX and parts[1].isdigit() \
                and not _pid_alive(int(parts[1])):
            _ip("netns", "del", name, check=False)
    links = _ip("-o", "link", "show", "type", "bridge", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith("p2cb"):
            try:
                pid = int(name[4:], 16)
            except ValueError:
                continue
            if not _pid_alive(pid):
                _ip("link", "del", name, check=False)


class Loopback:
    """Every node on 127.0.0.1 with its own port (no network faults)."""

    namespaced = False

    def __init__(self, n: int) -> None:
        self.n = n
        self._ports = [_free_port() for _ in range(n)]

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def addr(self, i: int) -> str:
        return "127.0.0.1"

    def port(self, i: int) -> int:
        return self._ports[i]

    def wrap(self, i: int, argv: list[str]) -> list[str]:
        return argv


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Topology:
    """``n`` network namespaces on a bridge (see the module docstring)."""

    namespaced = True

    def __init__(self, n: int) -> None:
        self.n = n
        self.pid = os.getpid()
        self.tag = f"{self.pid:x}"[-6:]
        self.bridge = f"p2cb{self.tag}"
        self.namespaces = [f"{NS_PREFIX}-{self.pid}-{i}" for i in range(n)]
        self.subnet = 0
        self.moved: dict[int, str] = {}  # node -> its address after readdress()
        self._made: list[tuple[str, str]] = []

    def host_veth(self, i: int) -> str:
        return f"p2c{self.tag}h{i}"

    def addr(self, i: int) -> str:
        return self.moved.get(i, f"10.231.{self.subnet}.{10 + i}")

    def port(self, i: int) -> int:
        return 4001

    def wrap(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[i], *argv]

    def _pick_subnet(self) -> int:
        routes = _ip("-4", "route", "show", check=False).stdout
        used = {int(part.split(".")[2]) for part in routes.split()
                if part.startswith("10.231.") and part.count(".") == 3}
        for candidate in [self.pid % 200 + 20, *range(20, 250)]:
            if candidate not in used:
                return candidate
        raise RuntimeError("no free 10.231.x.0/24 subnet for the chaos topology")

    def __enter__(self) -> Topology:
        sweep_stale()
        self.subnet = self._pick_subnet()
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _setup(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"10.231.{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.namespaces):
            _ip("netns", "add", ns)
            self._made.append(("netns", ns))
            host, inner = self.host_veth(i), f"p2c{self.tag}n{i}"
            _ip("link", "add", host, "type", "veth", "peer", "name", inner)
            self._made.append(("link", host))
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", host, "master", self.bridge)
            _ip("link", "set", host, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")

    def teardown(self) -> None:
        for kind, name in reversed(self._made):
            _ip(kind, "del", name, check=False)
        self._made.clear()

    # -- faults -----------------------------------------------------------------------
    def partition(self, i: int) -> None:
        """Cut node ``i`` off from everyone: its packets vanish silently."""
        _ip("link", "set", self.host_veth(i), "down")

    def heal(self, i: int) -> None:
        _ip("link", "set", self.host_veth(i), "up")

    def readdress(self, i: int, host: int) -> str:
        """Give node ``i`` the address ``10.231.<subnet>.<host>`` in place of
        its own (as a DHCP lease change or a move to another network does);
        returns the new address. Its sockets are left as they are."""
        ns, inner = self.namespaces[i], f"p2c{self.tag}n{i}"
        old, new = self.addr(i), f"10.231.{self.subnet}.{host}"
        # the old one first: deleting a primary address also deletes the
        # secondaries of its subnet (unless promote_secondaries is set)
        _ip("-n", ns, "addr", "del", f"{old}/24", "dev", inner)
        _ip("-n", ns, "addr", "add", f"{new}/24", "dev", inner)
        self.moved[i] = new
        return new

    def block(self, i: int, j: int) -> None:
        """Cut the path between nodes ``i`` and ``j`` only (both directions)."""
        _ip("-n", self.namespaces[i], "route", "add", "blackhole", f"{self.addr(j)}/32")
        _ip("-n", self.namespaces[j], "route", "add", "blackhole", f"{self.addr(i)}/32")

    def unblock(self, i: int, j: int) -> None:
        _ip("-n", self.namespaces[i], "route", "del", "blackhole", f"{self.addr(j)}/32",
            check=False)
        _ip("-n", self.namespaces[j], "route", "del", "blackhole", f"{self.addr(i)}/32",
            check=False)


# -- config files -------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(tables: Mapping[str, Any]) -> str:
    """TOML for ``{table: {key: value}}`` and ``{name: [{...}, ...]}`` (arrays
    of tables): all a node config needs."""
    out: list[str] = []
    for name, body in tables.items():
        if isinstance(body, list):
            for item in body:
                out.append(f"[[{name}]]")
                out.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
                out.append("")
        else:
            out.append(f"[{name}]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in body.items())
            out.append("")
    return "\n".join(out)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def synthetic(name: str = "fake", *, tokens: int = 8, token_delay: float = 0.0,
              slots: int = 4096) -> dict[str, Any]:
    """A ``[[models]]`` entry for the synthetic (instant, exact) backend."""
    return {"name": name, "backend": "synthetic", "tokens": tokens,
            "token_delay": token_delay, "slots": slots}


# -- daemons ------------------------------------------------------------------------------
class Daemon:
    """One node as a ``p2pinfer daemon`` process."""

    def __init__(self, cluster: Cluster, index: int, name: str, home: Path) -> None:
        self.cluster = cluster
        self.index = index
        self.name = name
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_file = home / "ready.json"
        self.config_file = home / "chaos-node.toml"
        self.log_file = home / "daemon.log"
        self.info: dict[str, Any] = {}
        self.starts = 0
        self._terminated = False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.alive, f"{self.name} is already running"
        self.ready_file.unlink(missing_ok=True)
        self.config_file.write_text(to_toml(self.cluster.config_of(self.name)))
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "WEB_SERVICE_PORT", "PROMETHEUS_PORT")}
        env.update({"P2PINFER_HOME": str(self.home), "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(REPO)})
        env.update(self.cluster.env.get(self.name, {}))
        level = os.environ.get("CHAOS_LOG_LEVEL", "INFO")
        argv = [sys.executable, "-m", "p2pinfer.daemon", "--config", str(self.config_file),
                "--ready-file", str(self.ready_file), "--log-level", level]
        with open(self.log_file, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            self.proc = subprocess.Popen(self.cluster.topology.wrap(self.index, argv),
                                         env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        self.starts += 1
        self._terminated = False

    def wait_ready(self, limit: float = READY_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.info = dict(json.loads(self.ready_file.read_text()))
                return self.info
            if not self.alive:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {limit} s: {self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=20)

    def terminate(self) -> None:
        """Send SIGTERM once (a second one would cut the graceful shutdown short)."""
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL if it does not exit in time)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        return self.proc.returncode

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)

    def memory(self) -> dict[str, int]:
        """Resident memory split (bytes): ``anon`` (heap, what a leak grows)
        and ``file`` (mapped files), from /proc (Linux)."""
        out = {"rss": self.rss()}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    name, value = line.split(":", 1)
                    out[name[3:].lower()] = int(value.split()[0]) * 1024
        except OSError:
            pass
        return out

    @property
    def peer_id(self) -> str:
        return self.cluster.peer_ids[self.name]

    @property
    def addr(self) -> str:
        return self.cluster.addr_of(self.name)

    @property
    def db(self) -> Path:
        return Path(self.cluster.config_of(self.name)["node"]["database_url"]
                    .removeprefix("sqlite:///"))


class Cluster:
    """Daemons of one network (see the module docstring).

    Args:
        base: a directory for the homes, configs and logs.
        layout: node name → roles; the order is the start order.
        tables: config tables for every node; per-node tables under the
            node's name (``{"w1": {"models": [...]}}``) are merged over them.
        netns: namespaces (True), loopback (False) or namespaces if
            permitted and ``CHAOS_NETNS`` is not ``0`` (None).
        env: extra environment per node name (e.g. ``DATABASE_URL``).
        hub: the first node is the only bootstrap node, as in the documented
            deployment (it joins through nobody, every other node through
            it); by default it bootstraps from the second node.
        listen_any: every node listens on ``0.0.0.0`` (all its interfaces,
            loopback included) instead of its namespace's address only.
    """

    def __init__(self, base: Path, layout: Mapping[str, Sequence[str]],
                 tables: Mapping[str, Any] | None = None, *, netns: bool | None = None,
                 env: Mapping[str, Mapping[str, str]] | None = None, hub: bool = False,
                 listen_any: bool = False) -> None:
        from p2pinfer.identity import Identity
        from p2pinfer.swarm import prepare_local_network

        self.base = base
        self.layout = {k: list(v) for k, v in layout.items()}
        self.names = list(self.layout)
        self.tables = dict(tables or {})
        self.env = {k: dict(v) for k, v in (env or {}).items()}
        self.hub = hub
        self.listen_any = listen_any
        homes = prepare_local_network(base, self.layout, name="chaos network")
        self.peer_ids = {n: Identity.load_or_create(homes[n]).peer_id for n in self.names}
        if netns is None:  # CHAOS_NETNS=0 forces loopback
            netns = os.environ.get("CHAOS_NETNS", "1") != "0" \
                and netns_unavailable_reason() is None
        self.topology: Topology | Loopback = (Topology(len(self.names)) if netns
                                              else Loopback(len(self.names)))
        self.nodes = {n: Daemon(self, i, n, homes[n]) for i, n in enumerate(self.names)}
        self._entered = False

    # -- addresses and configs -----------------------------------------------------------
    def index(self, name: str) -> int:
        return self.names.index(name)

    def addr_of(self, name: str) -> str:
        i = self.index(name)
        return (f"/ip4/{self.topology.addr(i)}/tcp/{self.topology.port(i)}"
                f"/p2p/{self.peer_ids[name]}")

    def config_of(self, name: str) -> dict[str, Any]:
        i = self.index(name)
        shared = {k: v for k, v in self.tables.items() if k not in self.layout}
        tables = _merge(shared, self.tables.get(name, {}))
        boot = self.names[1] if i == 0 and len(self.names) > 1 and not self.hub \
            else self.names[0]
        host = "0.0.0.0" if self.listen_any else self.topology.addr(i)
        node = {
            "home": str(self.base / name),
            "roles": self.layout[name],
            "listen": [f"/ip4/{host}/tcp/{self.topology.port(i)}"],
            "bootstrap": [self.addr_of(boot)] if boot != name else [],
            "database_url": f"sqlite:///{self.base / name / 'node.db'}",
            "descriptor_ttl": 1.0,
            "announce_interval": 1.0,
        }
        tables["node"] = {**node, **tables.get("node", {})}
        tables.setdefault("ledger", {}).setdefault("sync_interval", 0.5)
        return tables

    # -- life cycle ------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        self.topology.__enter__()
        self._entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, names: Sequence[str] | None = None) -> None:
        """Start daemons (all by default) and wait until each serves."""
        assert self._entered, "use the cluster as a context manager"
        chosen = list(names or self.names)
        for name in chosen:
            self.nodes[name].start()
        for name in chosen:
            self.nodes[name].wait_ready()

    def restart(self, name: str) -> None:
        node = self.nodes[name]
        if node.alive:
            node.stop()
        node.start()
        node.wait_ready()

    def stop_all(self) -> dict[str, int | None]:
        """SIGTERM every daemon (graceful: final usage flush) and wait."""
        for node in self.nodes.values():
            node.terminate()
        return {name: node.stop() for name, node in self.nodes.items()}

    def close(self) -> None:
        try:
            for node in self.nodes.values():
                if node.alive:
                    node.kill()
        finally:
            if self._entered:
                self.topology.__exit__(None, None, None)
                self._entered = False

    def logs(self) -> str:
        return "\n".join(f"===== {n} =====\n{d.log_tail(3000)}" for n, d in self.nodes.items())


# -- a client peer ------------------------------------------------------------------------
class ClientPeer:
    """A non-member peer in this process (its own libp2p host and key)."""

    def __init__(self, rpc: Any, host: Any) -> None:
        self.rpc = rpc
        self.host = host

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id().to_base58())


@contextlib.asynccontextmanager
async def client_peer(identity: Any = None) -> AsyncIterator[ClientPeer]:
    import multiaddr

    from p2pinfer.identity import Identity
    from p2pinfer.rpc import RpcClient, make_host

    host = make_host(identity or Identity.generate())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        async with RpcClient.open(host) as rpc:
            yield ClientPeer(rpc, host)


async def connect_all(peer: ClientPeer, addrs: Sequence[str], limit: float = 30.0) -> list[str]:
    """Dial every address (retrying while a node finishes starting)."""
    out = []
    with trio.fail_after(limit):
        for addr in addrs:
            while True:
                try:
                    out.append(await peer.rpc.connect(addr))
                    break
                except errors.PeerUnavailable:
                    await trio.sleep(0.1)
    return out


async def register_user(rpc: Any, auth_peer: str, name: str) -> dict[str, str]:
    """Register, log in and issue an API key through the auth role's RPC."""
    with trio.fail_after(30):
        await rpc.call(auth_peer, "registerUser", {"username": name, "password": PASSWORD,
                                                   "email": f"{name}@example.com"})
        session = await rpc.call(auth_peer, "loginUser", {"username": name,
                                                          "password": PASSWORD})
        key = await rpc.call(auth_peer, "generateApiKey", {"token": session["token"],
                                                           "name": "chaos"})
    return {"user_id": session["user"]["user_id"], "token": session["token"],
            "api_key": key["api_key"], "key_id": key["key_id"]}


class Observer:
    """A network member with no role, in this process: it may call the
    member-only ``ledgerSync`` to read each node's version vector."""

    def __init__(self, cluster: Cluster) -> None:
        from p2pinfer.identity import Identity
        from p2pinfer.ledger.membership import admit, load_owner

        owner = load_owner(cluster.nodes[cluster.names[0]].home)
        assert owner is not None
        self.identity = Identity.generate()
        self.network_id = owner.network.network_id
        self.cert = admit(owner, self.identity.peer_id, [])

    async def version_vector(self, rpc: Any, peer: str) -> dict[str, int]:
        with trio.fail_after(10):
            await rpc.call(peer, "ledgerHello", {"net": self.network_id,
                                                 "docs": [self.cert.to_wire()]})
            reply = await rpc.call(peer, "ledgerSync", {"vv": {}, "digest": b""})
        return {str(a): int(s) for a, s in reply["vv"].items()}

    async def wait_converged(self, rpc: Any, peers: Sequence[str],
                             limit: float = 30.0) -> dict[str, int]:
        """Until every peer holds the same events; returns their version vector."""
        with trio.fail_after(limit):
            while True:
                vvs = []
                for peer in peers:
                    try:
                        vvs.append(await self.version_vector(rpc, peer))
                    except errors.CallError:
                        vvs.append({})
                if vvs and all(vv == vvs[0] for vv in vvs) and vvs[0]:
                    return vvs[0]
                await trio.sleep(0.1)


@dataclass
class Outcome:
    """How one request ended, as its client saw it."""

    prompt: str
    gateway: str
    chunks: int = 0
    text: str = ""
    trailer: dict[str, Any] | None = None
    error: errors.P2PInferError | None = None
    started: float = 0.0
    ended: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.trailer is not None

    @property
    def kind(self) -> str:
        return "ok" if self.ok else type(self.error).__name__

    @property
    def tokens(self) -> int:
        assert self.trailer is not None
        return int(self.trailer["usage"]["total_tokens"])


async def ask(rpc: Any, gateway: str, api_key: str, prompt: str, *, model: str = "fake",
              max_tokens: int | None = None, limit: float = 60.0) -> Outcome:
    """One streamed inference request; never raises for a P2PInferError (it
    is the outcome) and fails the test if no outcome arrives within ``limit``."""
    out = Outcome(prompt, gateway, started=trio.current_time())
    request: dict[str, Any] = {"prompt": prompt, "model": model}
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    with trio.fail_after(limit):
        try:
            async with rpc.stream(gateway, "processInferenceRequest",
                                  {"request": request, "auth": {"api_key": api_key}}) as s:
                async for chunk in s:
                    out.chunks += 1
                    out.text += chunk["delta"]
            out.trailer = s.trailer
        except errors.P2PInferError as exc:
            out.error = exc
    out.ended = trio.current_time()
    return out


def request_hash(prompt: str, model: str = "fake") -> str:
    """The prompt hash the gateway logs for ``ask(..., prompt, model=model)``."""
    from p2pinfer.gateway.usage import prompt_hash

    return prompt_hash({"prompt": prompt, "model": model})


# -- reading a stopped node's ledger ------------------------------------------------------
@dataclass
class LedgerFile:
    """What one node's SQLite file holds."""

    events: set[tuple[str, int, bytes]] = field(default_factory=set)
    usage: dict[str, tuple[int, int]] = field(default_factory=dict)  # user -> (req, tok)
    # request log rows held here: id -> (prompt hash, status, tokens, user id)
    rows: dict[str, tuple[str, str, int, str | None]] = field(default_factory=dict)
    held: int = 0
    integrity: str = ""

    def usage_of(self, user_id: str) -> tuple[int, int]:
        return self.usage.get(user_id, (0, 0))


@dataclass
class SwarmLogs:
    """The request log rows of a whole swarm (they stay with their gateway
    and its keepers, so no one node need hold them all), one per id."""

    logs: dict[str, list[tuple[str, int]]]  # prompt hash -> [(status, tokens)]
    # user -> (requests, tokens) of its counted rows (all but rate_limited)
    logged: dict[str, tuple[int, int]]


def swarm_logs(files: Iterable[LedgerFile]) -> SwarmLogs:
    rows: dict[str, tuple[str, str, int, str | None]] = {}
    for f in files:
        rows.update(f.rows)
    out = SwarmLogs({}, {})
    for digest, status, tokens, user in rows.values():
        out.logs.setdefault(digest, []).append((status, tokens))
        if status != "rate_limited" and user is not None:
            req, tok = out.logged.get(user, (0, 0))
            out.logged[user] = (req + 1, tok + tokens)
    return out


def read_ledger(path: Path) -> LedgerFile:
    """Read a node's database (the node must not be running)."""
    conn = sqlite3.connect(str(path))
    try:
        out = LedgerFile()
        out.integrity = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        out.events = {(a, s, bytes(h)) for a, s, h in
                      conn.execute("SELECT author, seq, hash FROM events WHERE applied=1")}
        out.held = int(conn.execute("SELECT count(*) FROM events WHERE applied=0")
                       .fetchone()[0])
        for user, req, tok in conn.execute(
                "SELECT user_id, sum(request_count), sum(tokens_used) FROM usage_stats "
                "GROUP BY user_id"):
            out.usage[user] = (int(req), int(tok))
        for row_id, digest, status, tokens, user in conn.execute(
                "SELECT id, prompt_hash, status, tokens_used, user_id FROM request_logs"):
            out.rows[row_id] = (digest, status, int(tokens), user)
        return out
    finally:
        conn.close()


def record(name: str, data: Mapping[str, Any]) -> None:
    """Keep a run's figures in ``test-artifacts/reliability/<name>.json``
    (benchmarks/RELIABILITY.md is filled from them)."""
    folder = REPO / "test-artifacts" / "reliability"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def running(cluster: Cluster) -> Iterator[Cluster]:
    """Enter ``cluster`` and start every daemon; on failure, show their logs."""
    with cluster:
        try:
            cluster.start()
            yield cluster
        except BaseException:
            sys.stderr.write(cluster.logs())
            raise
