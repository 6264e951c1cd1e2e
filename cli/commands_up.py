"""``p2pinfer up``: the quick start, a whole swarm on this machine.

One process runs a hub node (auth, gateway, metrics and, when the web role
is installed, web) and ``--workers`` inference nodes serving the embedded
model, all members of one network whose homes live under ``<config
dir>/up``. The first run creates the network and a demo user with an API
key (``up/demo.json``, mode 0600); later runs reuse the same keys, network,
users and data. The CLI's saved credentials point at this swarm (unless
they belong to another swarm), so ``p2pinfer prompt "..."`` works next.
"""

from __future__ import annotations

import errno
import json
import logging
import secrets
import signal
import socket
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from p2pinfer.errors import ConfigError, P2PInferError

from .errors import EXIT_INTERRUPTED, EXIT_USAGE, CliError, sole_error
from .output import note, short_id, spinner, write
from .store import Credentials, CredentialStore, write_private

if TYPE_CHECKING:  # pragma: no cover
    from p2pinfer.swarm import LocalSwarm

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
HUB = "hub"
DEMO_USER = "demo"
DEMO_EMAIL = "demo@p2pinfer.local"
DEMO_PROMPT = "Explain peer-to-peer networks in one sentence."
HUB_ROLES = ["auth", "gateway", "metrics"]
log = logging.getLogger("p2pinfer.cli.up")


def _layout(workers: int) -> dict[str, list[str]]:
    import importlib.util

    hub = list(HUB_ROLES)
    if importlib.util.find_spec("p2pinfer.web.role") is not None:
        hub.append("web")
    layout = {HUB: hub}
    for i in range(1, workers + 1):
        layout[f"worker-{i}"] = ["inference"]
    return layout


def _port_free(port: int) -> bool:
    if port == 0:
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _tables(port: int, extra: dict[str, Any], workers: int = 2) -> dict[str, Any]:
    import os

    tables: dict[str, Any] = {
        # One auth node: nothing to wait for before a registration is final.
        "auth": {"registration_wait": 0},
        # Workers of a laptop swarm: each runs one llama.cpp runner with two
        # parallel sequences; the machine's cores are shared out between the
        # runners (llama.cpp's threads spin while they compute, so more
        # threads than cores would slow every runner down).
        "inference": {"slots": 2, "n_threads": max(1, (os.cpu_count() or 1) // workers)},
        "web": {"host": "127.0.0.1", "port": port},
        "metrics": {"prometheus_port": 0, "interval": 5.0},
        # Nodes on one machine: notice each other quickly.
        "node": {"announce_interval": 5.0, "descriptor_ttl": 5.0},
    }
    return _merge(tables, extra)


def _lock(base: Path) -> Any:
    """Hold ``<base>/up.lock`` for the life of the process: two swarms must
    not share the same node homes and databases."""
    import fcntl
    import os

    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(base / "up.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise CliError(f"`p2pinfer up` already runs on {base} (pid {holder}); stop it first, "
                       "or give another --dir", EXIT_USAGE) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _configure_logging(path: Path, level: str) -> None:
    import os

    from p2pinfer.daemon.logs import configure_logging

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
    stream = os.fdopen(fd, "a", encoding="utf-8")  # lives as long as the process
    configure_logging(level=level, stream=stream)


class DemoUser:
    """The demo account of the up swarm, kept in ``<base>/demo.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if path.exists():
            self.data = json.loads(path.read_text())

    def save(self) -> None:
        write_private(self.path, json.dumps(self.data, indent=2) + "\n")

    async def ensure(self, hub: Any) -> dict[str, Any]:
        """Register the demo user and issue its key on first use; check the
        key on later runs (and issue a new one if it was revoked)."""
        call = _local_call(hub)
        if not self.data:
            self.data = {"username": DEMO_USER, "email": DEMO_EMAIL,
                         "password": "P2p-" + secrets.token_urlsafe(18)}
            self.save()
        # asked of the hub's own ledger: a login does not say whether a user
        # exists (an unknown user and a wrong password are one error)
        if hub.ledger.user_by_username(self.data["username"]) is None:
            await call("registerUser", {"username": self.data["username"],
                                        "email": self.data["email"],
                                        "password": self.data["password"]})
        session = await call("loginUser", {"username": self.data["username"],
                                           "password": self.data["password"]})
        self.data["user_id"] = session["user"]["user_id"]
        if session["user"].get("tier") != "premium":
            # the default tier's 100 requests an hour throttle a local tool
            # (an agent, an editor plugin) within minutes; the hub is the
            # network's owner, so it may act as the operator
            await call("setUserTier", {"as_operator": True, "user_id": self.data["user_id"],
                                       "tier": "premium"})
        valid = False
        if self.data.get("api_key"):
            try:
                await call("validateApiKey", {"api_key": self.data["api_key"]})
                valid = True
            except P2PInferError:
                valid = False
        if not valid:
            key = await call("generateApiKey", {"token": session["token"], "name": "demo"})
            self.data["api_key"], self.data["api_key_id"] = key["api_key"], key["key_id"]
        self.save()
        return dict(session)


def _local_call(node: Any) -> Any:
    async def call(method: str, params: Any) -> Any:
        return await node.rpc.call(node.peer_id, method, params)

    return call


def _save_cli_credentials(store: CredentialStore, hub: Any, web_url: str | None,
                          demo: DemoUser, session: dict[str, Any]) -> bool:
    """Point the CLI at this swarm, unless its saved credentials are another
    swarm's. Returns whether they were saved."""
    creds = store.load()
    hub_home = str(hub.config.home)
    ours = (not creds.has_swarm or creds.saved_by == "up" or creds.home == hub_home
            or any(a.endswith("/p2p/" + hub.peer_id) for a in creds.bootstrap))
    if not ours:
        return False
    store.save(Credentials(
        bootstrap=[hub.addrs[0]], url=web_url, username=demo.data["username"],
        user_id=demo.data.get("user_id"), token=session["token"],
        refresh_token=session.get("refresh_token"), expires_at=session.get("expires_at"),
        api_key=demo.data["api_key"], api_key_id=demo.data.get("api_key_id"),
        home=hub_home, saved_by="up", network=hub.network_id))
    return True


async def _wait_ready(swarm: LocalSwarm, limit: float) -> list[str]:
    """Wait until every worker's models loaded and the gateway sees them all;
    returns the model names."""
    import trio

    workers = {name: node for name, node in swarm.nodes.items() if "inference" in node.roles}
    models: set[str] = set()
    with trio.move_on_after(limit):
        for name, node in workers.items():
            states = await node.roles["inference"].engine.wait_settled()
            bad = {m: node.roles["inference"].engine.models[m].backend.error
                   for m, state in states.items() if state != "loaded"}
            if bad:
                model, error = next(iter(bad.items()))
                raise CliError(f"{name} could not load {model}: {error}")
            models |= set(states)
        gateway = swarm.first.roles["gateway"]
        while True:
            seen = {m["name"]: m["workers"] for m in await gateway.swarm_models()}
            if models and all(seen.get(m, 0) >= len(workers) for m in models):
                return sorted(models)
            await trio.sleep(0.2)
    raise CliError(f"the workers were not ready within {limit:.0f} s (see the nodes' log; "
                   "raise --ready-timeout on a slow machine)")


async def _answer(hub_addr: str, api_key: str, text: str, max_tokens: int) -> None:
    from p2pinfer.client import Client

    async with Client(bootstrap=[hub_addr], api_key=api_key) as client:
        note(f"\n[bold]>>> {text}[/]")
        with spinner("Waiting for the first token…") as spin:
            async with client.stream(text, max_tokens=max_tokens) as stream:
                async for delta in stream:
                    spin.stop()
                    write(delta)
        write("\n")
        response = stream.response
        if response is not None and response.usage:
            note(f"[dim]({response.model}, worker {short_id(response.worker or '')}, "
                 f"{response.usage.get('completion_tokens', 0)} tokens, "
                 f"{response.latency_ms or 0:.0f} ms)[/]")


def _banner(swarm: LocalSwarm, models: list[str], web_url: str | None, metrics_url: str | None,
            demo: DemoUser, saved: bool, store: CredentialStore, log_path: Path) -> None:
    hub = swarm.first
    workers = len(swarm.nodes) - 1
    note(f"\n[bold green]p2pinfer is up[/]: a hub and {workers} worker(s) serving "
         f"{', '.join(models)} in network {hub.network_id}")
    rows = [("hub", hub.addrs[0])]
    if web_url:
        rows.append(("dashboard", web_url + "/"))
    if metrics_url:
        rows.append(("metrics", metrics_url))
    gateway = hub.roles.get("gateway")
    per_hour = gateway.settings.premium_rate_limit if gateway is not None else None
    rows += [("demo user", f"{demo.data['username']} (password and API key in {demo.path})"),
             ("its limit", f"premium tier, {per_hour} requests an hour ([gateway] "
                           "premium_rate_limit; `p2pinfer users set-tier "
                           f"{demo.data.get('user_id')} default --home {hub.config.home}` "
                           "for the default tier)"),
             ("node data", str(swarm.base)), ("logs", str(log_path))]
    for label, value in rows:
        note(f"  {label:<10} {value}")
    if saved:
        note(f"The CLI is logged in as {demo.data['username']} ({store.path}). Try:")
        note(f"  p2pinfer prompt \"{DEMO_PROMPT}\"")
        note("  p2pinfer chat        p2pinfer models        p2pinfer usage        p2pinfer peers")
    else:
        note(f"The CLI's saved login is another swarm's ({store.path}); to use this one:")
        note(f"  P2PINFER_API_KEY={demo.data['api_key']} p2pinfer prompt "
             f"--bootstrap {hub.addrs[0]} \"{DEMO_PROMPT}\"")


@click.command(context_settings=CONTEXT)
@click.option("-w", "--workers", type=click.IntRange(1, 8), default=2, show_default=True,
              help="Inference nodes to run (one model instance each).")
@click.option("--port", type=click.IntRange(0, 65535), default=3000, show_default=True,
              envvar="P2PINFER_UP_PORT",
              help="Port of the dashboard and REST API (env: P2PINFER_UP_PORT; 0: any free "
                   "port). A busy port falls back to a free one.")
@click.option("--p2p-port", type=click.IntRange(0, 65535), default=0,
              help="TCP port of the hub's libp2p listener (default: any free port).")
@click.option("--prompt", "prompt_text", metavar="TEXT",
              help="Answer this prompt as soon as the swarm is ready.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=200, show_default=True,
              help="Longest answer to --prompt, in tokens.")
@click.option("--once", is_flag=True, envvar="P2PINFER_UP_ONCE",
              help="Stop after answering --prompt (or once ready) instead of running until "
                   "Ctrl-C (env: P2PINFER_UP_ONCE=1).")
@click.option("-c", "--config", "config_path",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML tables for every node, e.g. [[models]] to serve other models; a "
                   "table named after a node (hub, worker-1) applies to that node only.")
@click.option("--dir", "base", type=click.Path(file_okay=False, path_type=Path),
              help="Where the nodes keep their keys and data (default: <config dir>/up).")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Seconds to wait for the models to load.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Level of the nodes' log file.")
def up(workers: int, port: int, p2p_port: int, prompt_text: str | None, max_tokens: int,
       once: bool, config_path: Path | None, base: Path | None, ready_timeout: float,
       log_level: str) -> None:
    """Start a local swarm with the embedded model and a demo user (the quick start).

    One process runs a hub (auth, gateway, metrics, web dashboard) and
    --workers inference nodes. The first run creates the network and a demo
    user with an API key; later runs reuse them. The CLI is pointed at the
    swarm, so `p2pinfer prompt` works in another terminal. Ctrl-C stops it.

    \b
    Examples:
      p2pinfer up
      p2pinfer up --prompt "Explain peer-to-peer networks in one sentence."
      p2pinfer up --workers 1 --port 8080
      p2pinfer up --prompt "Hello" --once          # CI: answer, then stop
    """
    import trio

    from p2pinfer.runtime import tune_gc
    from p2pinfer.swarm import LocalSwarm

    store = CredentialStore()
    store.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    base = base or store.up_dir
    extra: dict[str, Any] = {}
    if config_path is not None:
        try:
            extra = tomllib.loads(config_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise CliError(f"{config_path}: not valid TOML: {exc}", EXIT_USAGE) from None
    if not _port_free(port):
        note(f"[yellow]Port {port} is busy: the dashboard takes a free port instead.[/]")
        port = 0
    layout = _layout(workers)
    lock = _lock(base)  # noqa: F841 - held until the process exits
    log_path = base / "up.log"
    _configure_logging(log_path, log_level.upper())
    demo = DemoUser(base / "demo.json")

    async def run_swarm() -> None:
        note(f"Starting a hub and {workers} worker(s) in {base} …")
        swarm = LocalSwarm(base, layout, tables=_tables(port, extra, workers),
                           listen=f"/ip4/127.0.0.1/tcp/{p2p_port}")
        async with swarm:
            hub = swarm.first
            with spinner("Loading the model on the workers…"):
                models = await _wait_ready(swarm, ready_timeout)
            session = await demo.ensure(hub)
            web = hub.roles.get("web")
            web_url = getattr(web, "url", None) if web is not None else None
            metrics_url = getattr(hub.roles.get("metrics"), "url", None)
            saved = _save_cli_credentials(store, hub, web_url, demo, session)
            tune_gc()
            _banner(swarm, models, web_url, metrics_url, demo, saved, store, log_path)
            if prompt_text:
                await _answer(hub.addrs[0], demo.data["api_key"], prompt_text, max_tokens)
            if once:
                return
            note("\nThe swarm runs until Ctrl-C.")
            await trio.sleep_forever()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_sigterm, nursery.cancel_scope)
            await run_swarm()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as exc:
        leaf = sole_error(exc)
        if isinstance(leaf, KeyboardInterrupt):
            note("\nStopped the swarm.")
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        if (isinstance(leaf, OSError) and leaf.errno == errno.EADDRINUSE
                or isinstance(leaf, ConfigError) and leaf.data.get("reason") == "in_use"):
            raise CliError(f"port {port} is already in use: pass --port with another one "
                           "(0 for any free port)", EXIT_USAGE) from None
        raise


async def _stop_on_sigterm(scope: Any) -> None:
    """SIGTERM (systemd, docker, a test) stops the swarm cleanly, exit code 0."""
    import trio

    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            note("Stopping the swarm.")
            scope.cancel()
            return


COMMANDS = [up]
