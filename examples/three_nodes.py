"""A three-node swarm on one machine, set up the way separate machines would be.

Node ``a`` creates the network and runs auth, gateway, web and metrics;
nodes ``b`` and ``c`` are inference workers with the embedded model. Each
runs as its own ``p2pinfer daemon`` process with its own home; ``b`` and
``c`` are admitted with join tokens (``network admit`` on ``a``, ``network
join`` on the worker), which also tell them where ``a`` listens. Then a user
registers, gets an API key, and sends four prompts at once: the gateway
spreads them over both workers. Everything stops at the end (or on Ctrl-C)::

    python examples/three_nodes.py                 # in a temporary directory
    python examples/three_nodes.py --dir ./lab     # keep the homes (reused next time)

The same steps by hand, one terminal per node::

    p2pinfer network init --home a --roles auth,gateway,web,metrics
    p2pinfer daemon --home a --config a.toml
    p2pinfer network info --home b                         # b's peer id
    p2pinfer network admit <b's peer id> --roles inference --home a   # prints a token
    p2pinfer network join <token> --home b
    p2pinfer daemon --home b --config worker.toml --bootstrap <a's address>
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import trio

from p2pinfer import Client, P2PInferError

CONFIGS = {
    "a": """
[node]
roles = ["auth", "gateway", "web", "metrics"]
listen = ["/ip4/127.0.0.1/tcp/0"]
announce_interval = 2.0
descriptor_ttl = 2.0
[auth]
registration_wait = 0   # one auth node: no rival registration to wait for
[web]
port = 0                # any free port (the dashboard)
[metrics]
prometheus_port = 0
""",
    "worker": """
[node]
roles = ["inference"]
listen = ["/ip4/127.0.0.1/tcp/0"]
announce_interval = 2.0
[inference]
slots = 1               # one model instance per worker
""",
}


def p2pinfer(*args: str) -> str:
    """Run a ``p2pinfer`` CLI command; returns its stdout."""
    done = subprocess.run([sys.executable, "-m", "p2pinfer.cli.main", *args],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"p2pinfer {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


class Daemon:
    """A ``p2pinfer daemon`` process for one home."""

    def __init__(self, home: Path, config: str, bootstrap: str | None = None) -> None:
        self.home = home
        (home / "node.toml").write_text(config)
        self.log = open(home / "daemon.log", "wb")  # noqa: SIM115 - closed in stop()
        extra = ["--bootstrap", bootstrap] if bootstrap else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2pinfer.daemon", "--home", str(home), "--config",
             str(home / "node.toml"), "--log-level", "WARNING", *extra],
            stdout=subprocess.DEVNULL, stderr=self.log,
            env={**os.environ, "P2PINFER_HOME": str(home)})

    def wait_ready(self, limit: float) -> dict[str, object]:
        """The node's daemon.json, once it serves."""
        deadline = time.monotonic() + limit
        path = self.home / "daemon.json"
        while not path.exists():
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.home.name} exited:\n"
                                 f"{(self.home / 'daemon.log').read_text()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.home.name} did not start in {limit} s")
            time.sleep(0.1)
        return dict(json.loads(path.read_text()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()


async def use(entry: str, workers: dict[str, str], limit: float) -> None:
    """Register, get a key, wait for both workers, ask four prompts at once."""
    with trio.fail_after(limit):
        async with Client(bootstrap=[entry]) as setup:
            try:
                await setup.register("ada", "ada@example.com", "correct horse 42")
            except P2PInferError as exc:  # a kept --dir: she registered last time
                print(f"register: {exc.message}")
            await setup.login("ada", password="correct horse 42")
            key = (await setup.create_api_key("three-nodes"))["api_key"]
        async with Client(bootstrap=[entry], api_key=key) as client:
            while True:
                served = (await client.health())["models"].get("smollm2", [])
                if set(workers.values()) <= set(served):
                    break
                await trio.sleep(0.2)  # the workers are still loading the model
            print(f"gateway sees {len(served)} workers serving smollm2")
            answers = []

            async def ask(question: str) -> None:
                answers.append(await client.inference(question, max_tokens=24,
                                                      temperature=0))

            async with trio.open_nursery() as nursery:
                for question in ("Name a color.", "Name a fruit.", "Name a planet.",
                                 "Name an animal."):
                    nursery.start_soon(ask, question)
        names = {peer: name for name, peer in workers.items()}
        for answer in answers:
            print(f"  {names[answer.worker or '']}: {answer.text.strip()[:60]!r}")
        spread = Counter(names[a.worker or ""] for a in answers)
        print("answers per worker: " + ", ".join(f"{k}={v}" for k, v in sorted(spread.items())))


def run(base: Path, limit: float) -> None:
    homes = {name: base / name for name in ("a", "b", "c")}
    if not (homes["a"] / "network.json").exists():
        network_id = p2pinfer("network", "init", "--home", str(homes["a"]), "--name",
                              "three nodes", "--roles", "auth,gateway,web,metrics")
        print(f"created network {network_id} in {homes['a']}")
    daemons = []
    try:
        a = Daemon(homes["a"], CONFIGS["a"])
        daemons.append(a)
        entry = str(a.wait_ready(limit)["addrs"][0])  # type: ignore[index]
        print(f"a: auth, gateway, web, metrics on {entry}")
        workers = {}
        for name in ("b", "c"):
            home = homes[name]
            info = json.loads(p2pinfer("network", "info", "--home", str(home), "--json"))
            if not info["roles"]:  # not admitted yet: the owner admits, the node joins
                token = p2pinfer("network", "admit", info["node_peer_id"], "--roles",
                                 "inference", "--home", str(homes["a"]))
                p2pinfer("network", "join", token, "--home", str(home))
            # The token named a's address, but a listens on a new port each run.
            worker = Daemon(home, CONFIGS["worker"], bootstrap=entry)
            daemons.append(worker)
            workers[name] = str(worker.wait_ready(limit)["peer_id"])
            print(f"{name}: inference worker {workers[name]}")
        trio.run(use, entry, workers, limit)
        # (the CLI finds the running node of a home through its daemon.json)
        print(p2pinfer("network", "members", "--home", str(homes["a"])))
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


def main() -> int:
    import libp2p  # noqa: F401  (import first: its import resets its logger)

    logging.getLogger("libp2p").addHandler(logging.NullHandler())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where the node homes live (kept)")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this")
    args = parser.parse_args()
    failed = False
    try:
        if args.dir:
            run(args.dir.resolve(), args.timeout)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                run(Path(tmp), args.timeout)
    except* P2PInferError as group:
        for exc in group.exceptions:
            print(f"error: {exc}", file=sys.stderr)
        failed = True
    except* trio.TooSlowError:
        print(f"error: not done within {args.timeout} s", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
