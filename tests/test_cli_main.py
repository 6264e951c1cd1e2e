"""The ``p2pinfer`` command group: help with examples everywhere, a fast
``--help``, shell completion, the one error mapping (messages and exit
codes, Ctrl-C), usage errors, and the credential store.

:func:`invoke` and the autouse :func:`cli_env` fixture are shared by every
``test_cli_*`` module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from p2pinfer import errors
from p2pinfer.cli.errors import (
    EXIT_AUTH,
    EXIT_INTERRUPTED,
    EXIT_LIMIT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ErrorMappingGroup,
    to_click,
)
from p2pinfer.cli.main import cli
from p2pinfer.cli.store import Credentials, CredentialStore

ROOT = Path(__file__).resolve().parent.parent
# A well-formed peer id nobody listens for, on a port nobody listens on.
DEAD_PEER = "12D3KooWRHrW7MTBm6CRYPNCx4wSfX1ZY6QikJ73DdNviHTRdfDM"
DEAD_ADDR = f"/ip4/127.0.0.1/tcp/1/p2p/{DEAD_PEER}"
CLI_ENV = ("P2PINFER_URL", "P2PINFER_API_KEY", "P2PINFER_TIMEOUT", "P2PINFER_PASSWORD",
           "P2PINFER_UP_PORT", "P2PINFER_UP_ONCE", "P2PINFER_CONFIG")


@pytest.fixture(autouse=True)
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own CLI config dir (and no CLI variables from the shell)."""
    config = tmp_path / "cli-config"
    monkeypatch.setenv("P2PINFER_CONFIG_DIR", str(config))
    for var in CLI_ENV:
        monkeypatch.delenv(var, raising=False)
    return config


def invoke(*args: str, input: str | None = None, code: int = 0,
           env: dict[str, str] | None = None) -> Result:
    """Run ``p2pinfer ARGS`` in-process; the exit code must be ``code`` and
    no exception other than click's exit may escape (no traceback)."""
    result = CliRunner().invoke(cli, list(args), input=input, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"p2pinfer {' '.join(args)} raised "
                             f"{result.exception!r}\n{result.output}") from result.exception
    assert result.exit_code == code, (
        f"p2pinfer {' '.join(args)}: exit {result.exit_code}, wanted {code}\n{result.output}")
    if code:
        assert "Traceback" not in result.output
    return result


def all_commands(group: click.Group = cli, prefix: tuple[str, ...] = ()
                 ) -> list[tuple[tuple[str, ...], click.Command]]:
    out: list[tuple[tuple[str, ...], click.Command]] = []
    for name, command in sorted(group.commands.items()):
        out.append(((*prefix, name), command))
        if isinstance(command, click.Group):
            out += all_commands(command, (*prefix, name))
    return out


def test_every_command_has_help_with_an_example() -> None:
    commands = all_commands()
    names = {" ".join(path) for path, _ in commands}
    assert {"up", "prompt", "chat", "models", "usage", "quota", "peers", "health", "metrics",
            "audit", "register", "login", "logout", "keys create", "keys list", "keys revoke",
            "network init", "network admit", "network join", "network remove",
            "network members", "completion", "daemon"} <= names
    for path, _ in [((), cli), *commands]:
        for flag in ("--help", "-h"):
            out = invoke(*path, flag).output
            assert "Examples:" in out, f"p2pinfer {' '.join(path)} --help has no example"
            example = out.split("Examples:", 1)[1]
            assert "p2pinfer " in example


def test_help_is_fast_and_imports_no_network_stack() -> None:
    probe = ("import sys, time\n"
             "t = time.perf_counter()\n"
             "from p2pinfer.cli.main import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "heavy = [m for m in ('libp2p', 'trio', 'rich', 'httpx', 'nacl', 'llama_cpp')\n"
             "         if m in sys.modules]\n"
             "print('HEAVY', heavy, time.perf_counter() - t, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)
    assert "HEAVY [] " in out.stderr, out.stderr
    started = time.monotonic()
    subprocess.run([str(ROOT / ".venv" / "bin" / "p2pinfer"), "--help"], check=True,
                   capture_output=True, timeout=60)
    # ~0.15 s on an idle machine; the bound leaves room for a busy CI box.
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str) -> None:
    script = invoke("completion", shell).output
    assert "_P2PINFER_COMPLETE" in script and "p2pinfer" in script
    invoke("completion", "tcsh", code=EXIT_USAGE)


def test_completion_completes_commands_and_options() -> None:
    result = CliRunner().invoke(cli, [], prog_name="p2pinfer", env={
        "_P2PINFER_COMPLETE": "bash_complete", "COMP_WORDS": "p2pinfer ke", "COMP_CWORD": "1"})
    assert "keys" in result.output
    result = CliRunner().invoke(cli, [], prog_name="p2pinfer", env={
        "_P2PINFER_COMPLETE": "bash_complete", "COMP_WORDS": "p2pinfer prompt --max",
        "COMP_CWORD": "2"})
    assert "--max-tokens" in result.output


@pytest.mark.parametrize("args", [
    ("prompt", "--max-tokens", "0", "hi"),
    ("prompt", "--temperature", "5", "hi"),
    ("prompt", "--bogus", "hi"),
    ("usage", "--days", "0"),
    ("usage", "--since", "yesterday"),
    ("audit", "--limit", "0"),
    ("up", "--workers", "0"),
    ("keys", "frobnicate"),
    ("models", "--bootstrap", "not-a-multiaddr"),
    ("models", "--bootstrap", "/ip4/127.0.0.1/tcp/4001"),
    ("models", "--url", "ftp://example.com"),
    ("network", "admit", DEAD_PEER),
    ("network", "admit", DEAD_PEER, "--roles", "bogus"),
    ("users", "set-tier", "alice", "premium"),
    ("users", "set-tier", "2b0c4f9e-5d1a-4c3e-9f7a-0d8e6b5a4c21", "gold"),
])
def test_bad_usage_exits_2_with_a_message(args: tuple[str, ...]) -> None:
    result = invoke(*args, code=EXIT_USAGE)
    assert "Error" in result.output


def test_without_a_swarm_or_credentials_the_message_says_what_to_do() -> None:
    out = invoke("prompt", "hello", code=EXIT_USAGE).output
    assert "--bootstrap" in out and "p2pinfer up" in out
    out = invoke("models", "--bootstrap", DEAD_ADDR, code=EXIT_AUTH).output
    assert "not logged in" in out and "p2pinfer login" in out
    out = invoke("logout", code=EXIT_AUTH).output
    assert "not logged in" in out


def test_an_unreachable_swarm_exits_5() -> None:
    out = invoke("models", "--bootstrap", DEAD_ADDR, "--api-key", "p2p_x",
                 code=EXIT_UNREACHABLE).output
    assert "cannot reach the swarm" in out
    out = invoke("health", "--url", "http://127.0.0.1:1", code=EXIT_UNREACHABLE).output
    assert "cannot reach" in out


def _probe_group(raise_: BaseException) -> click.Group:
    group = ErrorMappingGroup()

    @group.command()
    def boom() -> None:
        """Raise."""
        raise raise_

    return group


@pytest.mark.parametrize(("exc", "code", "text"), [
    (errors.InvalidCredentials("bad"), EXIT_AUTH, "wrong username or password"),
    (errors.RevokedApiKey("gone"), EXIT_AUTH, "revoked"),
    (errors.TokenExpired("old"), EXIT_AUTH, "p2pinfer login"),
    (errors.RateLimited("slow", data={"retry_after": 12.0}), EXIT_LIMIT, "try again in 12 s"),
    (errors.PeerUnavailable("down"), EXIT_UNREACHABLE, "cannot reach the swarm"),
    (errors.NoWorkerAvailable("no worker serves model 'x'"), EXIT_UNREACHABLE,
     "p2pinfer models"),
    (errors.WeakPassword("too short"), EXIT_USAGE, "too short"),
    (errors.UsernameTaken("taken"), 1, "taken"),
    (errors.NotMember("members only"), EXIT_AUTH, "--home"),
    (ExceptionGroup("nursery", [ExceptionGroup("inner", [errors.QuotaExceeded("q")])]),
     EXIT_LIMIT, "quota exceeded"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "Interrupted"),
    (BaseExceptionGroup("nursery", [KeyboardInterrupt()]), EXIT_INTERRUPTED, "Interrupted"),
])
def test_one_mapping_from_errors_to_messages_and_exit_codes(exc: BaseException, code: int,
                                                            text: str) -> None:
    result = CliRunner().invoke(_probe_group(exc), ["boom"])
    assert result.exit_code == code, result.output
    assert text in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_unexpected_errors_are_not_hidden() -> None:
    result = CliRunner().invoke(_probe_group(ZeroDivisionError("bug")), ["boom"])
    assert isinstance(result.exception, ZeroDivisionError)


def test_to_click_keeps_the_server_message() -> None:
    err = to_click(errors.InvalidParams("max_tokens: must be <= 4096",
                                        data={"field": "max_tokens"}))
    assert err.message == "max_tokens: must be <= 4096" and err.exit_code == EXIT_USAGE


def test_credentials_are_private_files(cli_env: Path) -> None:
    store = CredentialStore()
    assert store.root == cli_env
    store.save(Credentials(bootstrap=["/ip4/1.2.3.4/tcp/1/p2p/x"], token="t", api_key="k"))
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert os.stat(cli_env).st_mode & 0o777 == 0o700
    assert store.load().api_key == "k"
    os.chmod(store.path, 0o644)
    with pytest.raises(errors.ConfigError, match="chmod 600"):
        store.load()
    os.chmod(store.path, 0o600)
    store.path.write_text("{not json")
    out = invoke("models", code=EXIT_USAGE).output
    assert "not valid JSON" in out


def test_default_config_dir_is_the_app_dir(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    from p2pinfer.cli.store import config_dir

    monkeypatch.delenv("P2PINFER_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_dir() == Path(click.get_app_dir("p2pinfer")) / "cli"


def helper_env(**extra: Any) -> dict[str, str]:
    """The environment for a ``p2pinfer`` subprocess in a test."""
    env = {k: v for k, v in os.environ.items() if k not in CLI_ENV}
    env.update({k: str(v) for k, v in extra.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_the_shipped_daemon_files() -> None:
    """daemon/node.example.toml is a valid config for every role (its
    commented [[models]] examples too); the systemd unit runs the daemon."""
    from p2pinfer.config import NodeConfig
    from p2pinfer.gateway.settings import GatewaySettings
    from p2pinfer.inference.settings import InferenceSettings, build_models
    from p2pinfer.metrics.settings import MetricsSettings
    from p2pinfer.scaling.settings import ScalingSettings
    from p2pinfer.web.settings import WebSettings

    text = (ROOT / "daemon" / "node.example.toml").read_text()
    config = NodeConfig.from_mapping(__import__("tomllib").loads(text), env={})
    assert config.roles == ("auth", "gateway", "inference", "metrics", "web")
    for settings in (GatewaySettings, InferenceSettings, MetricsSettings, WebSettings,
                     ScalingSettings):
        settings.from_config(config)
    uncommented = "\n".join(line[2:] if line.startswith(("# [[models", "# name", "# backend",
                                                         "# url")) else line
                            for line in text.splitlines())
    full = NodeConfig.from_mapping(__import__("tomllib").loads(uncommented), env={})
    entries = build_models(full.tree, InferenceSettings.from_config(full))
    assert [e.backend.name for e in entries] == ["llama3", "gpt-4o-mini"]
    unit = (ROOT / "daemon" / "p2pinfer.service").read_text()
    assert "ExecStart=" in unit and " daemon --config " in unit and "KillSignal=SIGTERM" in unit


def test_systemd_units_verify_and_do_not_restart_on_a_config_error(tmp_path: Path) -> None:
    """systemd's own checker accepts the unit and the backup service and
    timer (its one complaint: the unit's /opt/p2pinfer/venv is not installed
    here), and exit code 2 (bad config, busy port, another node on the
    home) is not restarted in a loop."""
    import shutil
    import subprocess

    unit = (ROOT / "daemon" / "p2pinfer.service").read_text()
    assert "RestartPreventExitStatus=2" in unit and "StateDirectory=p2pinfer" in unit
    backup = (ROOT / "daemon" / "p2pinfer-backup.service").read_text()
    assert "/var/backups/p2pinfer" in backup and " backup --out " in backup
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    names = ["p2pinfer.service", "p2pinfer-backup.service", "p2pinfer-backup.timer"]
    for name in names:
        shutil.copy(ROOT / "daemon" / name, tmp_path / name)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           *[str(tmp_path / n) for n in names]],
                          capture_output=True, text=True, timeout=60)
    missing = "/opt/p2pinfer/venv/bin/p2pinfer is not executable"
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if line.strip() and missing not in line]
    assert complaints == [], complaints
