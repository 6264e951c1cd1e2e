"""The daemon entry point, as real OS processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import multiaddr
import trio

from p2pinfer.identity import Identity
from p2pinfer.rpc import RpcClient, make_host


def start_daemon(home: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    ready = home / "ready.json"
    env = {**os.environ, "P2PINFER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pinfer.daemon", "--ready-file", str(ready),
         "--listen", "/ip4/127.0.0.1/tcp/0", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=open(home / "stderr.log", "wb"),
    )
    return proc, ready


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, limit: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if ready.exists():
            return dict(json.loads(ready.read_text()))
        assert proc.poll() is None, (ready.parent / "stderr.log").read_text()
        time.sleep(0.05)
    raise AssertionError(f"daemon not ready: {(ready.parent / 'stderr.log').read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    return time.monotonic() - t0


async def test_three_daemons_bootstrap_and_answer(tmp_path: Path) -> None:
    homes = [tmp_path / f"n{i}" for i in range(3)]
    for h in homes:
        h.mkdir()
    procs = []
    try:
        first, ready = start_daemon(homes[0], "--roles", "")
        procs.append(first)
        boot = await trio.to_thread.run_sync(wait_ready, first, ready)
        infos = [boot]
        for home in homes[1:]:
            proc, ready = start_daemon(home, "--roles", "", "--bootstrap", boot["addrs"][0])
            procs.append(proc)
            infos.append(await trio.to_thread.run_sync(wait_ready, proc, ready))
        assert len({i["peer_id"] for i in infos}) == 3

        client_host = make_host(Identity.generate())
        async with client_host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            async with RpcClient.open(client_host) as client:
                with trio.fail_after(30):
                    for info in infos:
                        peer = await client.connect(info["addrs"][0])
                        pong = await client.call(peer, "ping")
                        assert pong["peer_id"] == info["peer_id"]
        # clean shutdown on SIGTERM, in well under a second of work
        for proc in procs:
            # SIGTERM to exit, interpreter teardown included; the node itself
            # stops in milliseconds (bounded 1.5 s for a noisy CI machine).
            assert await trio.to_thread.run_sync(stop, proc) < 1.5
            assert proc.returncode == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


async def test_restart_keeps_peer_id(tmp_path: Path) -> None:
    ids = []
    for _ in range(2):
        proc, ready = start_daemon(tmp_path, "--roles", "")
        try:
            info = await trio.to_thread.run_sync(wait_ready, proc, ready)
            ids.append(info["peer_id"])
        finally:
            await trio.to_thread.run_sync(stop, proc)
            ready.unlink()
    assert ids[0] == ids[1]
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600


def test_tune_gc_freezes_startup_objects_and_raises_thresholds() -> None:
    import gc

    from p2pinfer.runtime import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 10_000  # the imported modules, at least
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def spawn(env: dict[str, str], home: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(home / "stderr.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "p2pinfer.daemon", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_second_daemon_on_a_home_or_a_busy_port_is_refused(tmp_path: Path) -> None:
    """A second daemon on the same home, and a daemon on another home whose
    libp2p port is taken (py-libp2p listens with SO_REUSEPORT, so it used to
    start and split connections with the first): exit 2, saying why."""
    port = free_port()
    home, other = tmp_path / "a", tmp_path / "b"
    home.mkdir()
    other.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    listen = f"/ip4/127.0.0.1/tcp/{port}"
    first = spawn(env, home, "--home", str(home), "--roles", "", "--listen", listen,
                  "--ready-file", str(home / "ready.json"))
    try:
        await trio.to_thread.run_sync(wait_ready, first, home / "ready.json")

        def second(h: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "p2pinfer.daemon", "--home", str(h), "--roles", "",
                 "--listen", listen], env=env, capture_output=True, text=True, timeout=60)

        same_home = await trio.to_thread.run_sync(second, home)
        busy_port = await trio.to_thread.run_sync(second, other)
    finally:
        stop(first)
    assert same_home.returncode == 2, same_home.stderr
    assert f"pid {first.pid}" in same_home.stderr
    assert busy_port.returncode == 2, busy_port.stderr
    assert f"port {port} is already in use" in busy_port.stderr
    assert first.returncode == 0


async def test_the_daemon_listens_on_every_interface_unless_told(tmp_path: Path) -> None:
    """With no listen address anywhere, a daemon listens on port 4001 of
    every interface and announces the machine's addresses, not loopback
    (where the documented worker command used to leave it unreachable)."""
    from p2pinfer.addresses import interface_ips, is_local

    env = {k: v for k, v in os.environ.items() if k != "P2PINFER_LISTEN"}
    env["PYTHONUNBUFFERED"] = "1"
    ready = tmp_path / "ready.json"
    proc = spawn(env, tmp_path, "--home", str(tmp_path), "--roles", "",
                 "--ready-file", str(ready))
    try:
        info = await trio.to_thread.run_sync(wait_ready, proc, ready)
    finally:
        stop(proc)
    remote = [ip for ip in interface_ips(4) if not is_local(ip)]
    expected = remote or ["127.0.0.1"]
    assert sorted(info["addrs"]) == sorted(
        f"/ip4/{ip}/tcp/4001/p2p/{info['peer_id']}" for ip in expected)


async def test_a_missing_bootstrap_peer_is_logged_once_not_per_dial(tmp_path: Path) -> None:
    """Bootstrap peer down for the node's first 4 s: one line says so (its
    redials, and py-libp2p's own error per failed dial, only at DEBUG)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ready = tmp_path / "ready.json"
    gone = Identity.generate().peer_id
    proc = spawn(env, tmp_path, "--home", str(tmp_path), "--roles", "", "--listen",
                 "/ip4/127.0.0.1/tcp/0", "--bootstrap",
                 f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{gone}", "--ready-file", str(ready))
    try:
        await trio.to_thread.run_sync(wait_ready, proc, ready)
        await trio.sleep(4)
    finally:
        stop(proc)
    log = (tmp_path / "stderr.log").read_text()
    assert log.count(f"bootstrap {gone} not reachable") == 1, log
    assert "libp2p" not in log, log
