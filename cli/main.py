"""The ``p2pinfer`` command.

Each command's docstring is its ``--help`` text. Command modules import the
network stack inside their command bodies, so ``p2pinfer --help`` answers
at once. Commands are grouped by concept, one module each:

- ``commands_account.py``: register, login, logout, whoami, keys;
- ``commands_inference.py``: prompt, chat, models, embed;
- ``commands_status.py``: usage, quota, peers, health;
- ``commands_operator.py``: metrics, audit, users (as a network member);
- ``commands_network.py``: network init|info|admit|join|remove|members;
- ``commands_up.py``: up, the quick start;
- ``commands_shell.py``: completion;
- this module: the group and ``daemon``.

To add commands (e.g. ``backup`` / ``restore`` / ``export``), write a
``commands_<concept>.py`` module ending in ``COMMANDS = [...]`` and list it
in :data:`COMMAND_MODULES`. Errors need no handling in commands: the group
maps every ``P2PInferError`` to a one-line message and an exit code
(:mod:`.errors`); user commands reach the swarm through :mod:`.connect`,
operator commands through :mod:`.operator`.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import click

from p2pinfer import __version__

from .errors import ErrorMappingGroup, to_click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

COMMAND_MODULES = (
    "commands_up",
    "commands_inference",
    "commands_account",
    "commands_status",
    "commands_operator",
    "commands_network",
    "commands_shell",
    "commands_ops",
)


@click.group(cls=ErrorMappingGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="p2pinfer")
def cli() -> None:
    """p2pinfer: peer-to-peer AI inference on machines you own.

    \b
    Examples:
      p2pinfer up                              # a local swarm with the embedded model
      p2pinfer prompt "Explain peer-to-peer networks in one sentence."
      p2pinfer chat
      p2pinfer register -u alice -e alice@example.com --bootstrap /ip4/.../p2p/12D3KooW...
      p2pinfer keys create --name laptop
      p2pinfer network init --name lab && p2pinfer daemon     # run a node

    Commands reach the swarm through --bootstrap (env P2PINFER_BOOTSTRAP),
    --url (env P2PINFER_URL) or what `login`/`up` saved under
    $P2PINFER_CONFIG_DIR (default ~/.config/p2pinfer/cli). Exit codes: 0 ok,
    1 refused or failed, 2 usage or config, 3 credentials, 4 rate or quota
    limit, 5 unreachable or timed out, 130 interrupted. Shell completion:
    `p2pinfer completion bash|zsh|fish`.
    """


# Where a daemon listens unless told: the node is a machine's member of a
# network, reached by other machines (an embedded Node defaults to loopback).
DAEMON_LISTEN = "/ip4/0.0.0.0/tcp/4001"


@cli.command(context_settings=CONTEXT)
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="P2PINFER_CONFIG", help="TOML config file (env: P2PINFER_CONFIG).")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="P2PINFER_HOME",
              help="Node home dir for keys and data (env: P2PINFER_HOME).")
@click.option("--roles", help="Comma-separated roles, overriding the config "
              "(auth,gateway,inference,metrics,web).")
@click.option("--listen", multiple=True, help="Multiaddr to listen on (repeatable; default "
              f"{DAEMON_LISTEN}: every interface, so other machines reach the node).")
@click.option("--bootstrap", multiple=True, help="Bootstrap peer multiaddr ending in /p2p/<id> "
              "(repeatable).")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write {peer_id, addrs} as JSON here once the node serves.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Log format (default from config, else text).")
def daemon(config_path: Path | None, home: Path | None, roles: str | None,
           listen: tuple[str, ...], bootstrap: tuple[str, ...], ready_file: Path | None,
           log_level: str, log_format: str | None) -> None:
    """Run a node until Ctrl-C or SIGTERM.

    Settings come from the TOML file, then the environment (DATABASE_URL,
    WEB_SERVICE_PORT, OLLAMA_URL, OPENAI_API_KEY, DEFAULT_RATE_LIMIT,
    PREMIUM_RATE_LIMIT, PROMETHEUS_PORT, METRICS_ENABLED, ...), then these
    options. While it runs, the node's addresses are in <home>/daemon.json,
    where operator commands (metrics, audit, network members) find it.

    \b
    Examples:
      p2pinfer daemon --config /etc/p2pinfer/node.toml
      p2pinfer daemon --roles inference --bootstrap /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...
    """
    from p2pinfer.config import NodeConfig
    from p2pinfer.daemon.logs import configure_logging
    from p2pinfer.daemon.main import run_daemon
    from p2pinfer.errors import P2PInferError

    try:
        data: dict[str, Any] = {}
        if config_path is not None:
            import tomllib

            try:
                data = tomllib.loads(config_path.read_text())
            except FileNotFoundError:
                raise click.ClickException(f"config file not found: {config_path}") from None
            except tomllib.TOMLDecodeError as exc:
                raise click.ClickException(f"{config_path}: not valid TOML: {exc}") from None
        node = dict(data.get("node", {}))
        if home is not None:
            node["home"] = str(home)
        if roles is not None:
            node["roles"] = [r.strip() for r in roles.split(",") if r.strip()]
        if listen:
            node["listen"] = list(listen)
        elif "listen" not in node and not os.environ.get("P2PINFER_LISTEN"):
            node["listen"] = [DAEMON_LISTEN]
        if bootstrap:
            node["bootstrap"] = list(bootstrap)
        if log_format:
            node["log_format"] = log_format
        config = NodeConfig.from_mapping({**data, "node": node})
    except P2PInferError as exc:
        raise to_click(exc) from None
    configure_logging(level=log_level.upper(), fmt=config.log_format)
    run_daemon(config, ready_file=ready_file)


def _add_commands(group: click.Group) -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        for command in module.COMMANDS:
            group.add_command(command)


_add_commands(cli)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="p2pinfer")


if __name__ == "__main__":  # pragma: no cover
    main()
