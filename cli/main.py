"""The ``p2pinfer`` command.

Each command's docstring is its ``--help`` text. Commands import the network
stack lazily, so ``p2pinfer --help`` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from p2pinfer import __version__
from p2pinfer.errors import P2PInferError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(exc: P2PInferError) -> click.ClickException:
    """The one place where library errors become CLI errors."""
    err = click.ClickException(exc.message)
    err.exit_code = 2 if exc.code in (1100, 1101) else 1
    return err


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="p2pinfer")
def cli() -> None:
    """p2pinfer: peer-to-peer AI inference on machines you own.

    \b
    Examples:
      p2pinfer daemon --config node.toml     run a node
    """


@cli.command(context_settings=CONTEXT)
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="P2PINFER_CONFIG", help="TOML config file (env: P2PINFER_CONFIG).")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="P2PINFER_HOME",
              help="Node home dir for keys and data (env: P2PINFER_HOME).")
@click.option("--roles", help="Comma-separated roles, overriding the config "
              "(auth,gateway,inference,metrics,web).")
@click.option("--listen", multiple=True, help="Multiaddr to listen on (repeatable).")
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
    options.

    \b
    Examples:
      p2pinfer daemon --config /etc/p2pinfer/node.toml
      p2pinfer daemon --roles inference --bootstrap /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...
    """
    from p2pinfer.config import NodeConfig
    from p2pinfer.daemon.logs import configure_logging
    from p2pinfer.daemon.main import run_daemon

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
        if bootstrap:
            node["bootstrap"] = list(bootstrap)
        if log_format:
            node["log_format"] = log_format
        config = NodeConfig.from_mapping({**data, "node": node})
    except P2PInferError as exc:
        raise _fail(exc) from None
    configure_logging(level=log_level.upper(), fmt=config.log_format)
    try:
        run_daemon(config, ready_file=ready_file)
    except P2PInferError as exc:
        raise _fail(exc) from None


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="p2pinfer")


if __name__ == "__main__":  # pragma: no cover
    main()
