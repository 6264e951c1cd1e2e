"""The operations commands as a user runs them (separate processes against a
real node): ``account export`` / ``account erase`` with a saved session,
``restore`` refusing a running node, ``tls self-signed``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

from .test_web_support import PASSWORD, web_swarm

P2PINFER = str(Path(sys.executable).parent / "p2pinfer")


async def run(*args: str, env: dict[str, str]) -> tuple[int, str]:
    done = await trio.run_process([P2PINFER, *args], capture_stdout=True, capture_stderr=True,
                                  check=False, env={**os.environ, **env})
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


async def test_account_export_and_erase_from_the_cli(tmp_path: Path,
                                                     nursery: trio.Nursery) -> None:
    env = {"P2PINFER_CONFIG_DIR": str(tmp_path / "cli"), "P2PINFER_PASSWORD": PASSWORD}
    with trio.fail_after(90):
        async with web_swarm(nursery, tmp_path) as swarm:
            code, out = await run("register", "-u", "carol_cli", "-e", "carol@example.com",
                                  "--url", swarm.url, env=env)
            assert code == 0, out
            target = tmp_path / "carol.json"
            code, out = await run("account", "export", "--out", str(target), env=env)
            assert code == 0, out
            assert target.stat().st_mode & 0o077 == 0
            data = json.loads(target.read_text())
            assert data["account"]["username"] == "carol_cli" and data["version"] == 1
            user_id = data["account"]["user_id"]
            code, out = await run("account", "erase", "--yes", "--password", "wrong one 123",
                                  env=env)
            assert code == 3 and swarm.node.ledger.user(user_id) is not None, out
            code, out = await run("account", "erase", "--yes", env=env)
            assert code == 0 and "Erased your account" in out, out
            assert swarm.node.ledger.user(user_id) is None
            # the saved session is gone with the account
            code, out = await run("account", "export", env=env)
            assert code == 3, out

            # restore refuses a running node (its daemon.json names a live pid)
            home = swarm.node.config.home
            (home / "daemon.json").write_text(json.dumps({"pid": os.getpid()}))
            backup = tmp_path / "n0.db"
            code, out = await run("backup", "--home", str(home), "--out", str(backup), env=env)
            assert code == 0 and backup.exists(), out
            code, out = await run("restore", str(backup), "--home", str(home), env=env)
            assert code == 2 and "running" in out, out
            (home / "daemon.json").unlink()

    code, out = await run("tls", "self-signed", "--home", str(tmp_path / "h"), "--host",
                          "10.9.8.7", env=env)
    assert code == 0 and "WARNING" in out, out
    assert (tmp_path / "h" / "tls" / "ca.pem").exists()
    assert (tmp_path / "h" / "tls" / "key.pem").stat().st_mode & 0o077 == 0
