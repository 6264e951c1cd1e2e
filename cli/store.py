"""What the CLI keeps between runs, under the user's config dir.

The config dir is ``$P2PINFER_CONFIG_DIR``, else ``click.get_app_dir("p2pinfer")/cli``
(``~/.config/p2pinfer/cli`` on Linux). It is not a node home: it holds no
node key, only what a user of the swarm needs:

- ``credentials.json`` (mode 0600): the swarm address (bootstrap multiaddrs
  and/or a web URL), the session (access and refresh token), the API key
  the CLI uses, the username, and the operator home saved by ``up``;
- ``chat_history`` (0600): lines typed in ``p2pinfer chat``;
- ``up/``: the local swarm of ``p2pinfer up`` (one node home per node, the
  demo user's credentials in ``up/demo.json``).

Every file is written atomically (a 0600 temporary file, then rename), and
the directory is created with mode 0700.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from p2pinfer.errors import ConfigError

__all__ = ["CONFIG_DIR_ENV", "Credentials", "CredentialStore", "config_dir", "write_private"]

CONFIG_DIR_ENV = "P2PINFER_CONFIG_DIR"


def config_dir() -> Path:
    """``$P2PINFER_CONFIG_DIR`` or ``click.get_app_dir("p2pinfer")/cli``."""
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env).expanduser()
    import click

    return Path(click.get_app_dir("p2pinfer")) / "cli"


def write_private(path: Path, text: str) -> None:
    """Write ``path`` atomically with mode 0600 (its directory 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class Credentials:
    """What ``login`` and ``up`` save (every field optional)."""

    bootstrap: list[str] = field(default_factory=list)
    url: str | None = None
    username: str | None = None
    user_id: str | None = None
    token: str | None = None
    refresh_token: str | None = None
    expires_at: float | None = None
    api_key: str | None = None
    api_key_id: str | None = None
    home: str | None = None
    saved_by: str | None = None
    # The network the saved swarm belongs to, learnt at the first login: the
    # SDK then sends credentials only to nodes holding its certificates.
    network: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> Credentials:
        if not isinstance(data, dict):
            raise ConfigError("credentials.json: not a JSON object")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if not isinstance(values.get("bootstrap", []), list):
            raise ConfigError("credentials.json: bootstrap must be a list")
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, [])}

    @property
    def has_swarm(self) -> bool:
        return bool(self.bootstrap or self.url)

    def forget_session(self) -> None:
        self.token = self.refresh_token = self.expires_at = None

    def forget_key(self) -> None:
        self.api_key = self.api_key_id = None


class CredentialStore:
    """``credentials.json`` in a config dir (see the module docstring)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else config_dir()
        self.path = self.root / "credentials.json"

    def load(self) -> Credentials:
        """The saved credentials (empty if none).

        Raises:
            ConfigError: the file is unreadable, not JSON, or readable by others.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Credentials()
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read ({exc.strerror})") from exc
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"{self.path}: readable by other users (mode {mode:o}); "
                              f"run: chmod 600 {self.path}")
        try:
            return Credentials.from_json(json.loads(text))
        except ValueError as exc:
            raise ConfigError(f"{self.path}: not valid JSON ({exc})") from exc

    def save(self, creds: Credentials) -> Path:
        write_private(self.path, json.dumps(creds.to_json(), indent=2) + "\n")
        return self.path

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    @property
    def history_path(self) -> Path:
        return self.root / "chat_history"

    @property
    def up_dir(self) -> Path:
        return self.root / "up"
