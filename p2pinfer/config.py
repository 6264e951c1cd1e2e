"""Node configuration: a frozen dataclass read from TOML and the environment.

Precedence, lowest first: built-in defaults, the TOML file, environment
variables (the platform's documented names: ``DATABASE_URL``, ``WEB_SERVICE_PORT``,
``DEFAULT_RATE_LIMIT``, …). Every value is validated when the config is
built, and a bad one raises :class:`~p2pinfer.errors.ConfigError` naming the
key and the problem, e.g. ``gateway.default_rate_limit: must be an integer
>= 1, got 'lots'``.

The core fields live on :class:`NodeConfig`. Each role reads its own TOML
section through the typed getters below (``config.section("inference")``),
so a role's settings stay next to the role.

    [node]
    roles = ["auth", "gateway", "inference", "metrics", "web"]
    listen = ["/ip4/0.0.0.0/tcp/4001"]
    bootstrap = ["/ip4/10.0.0.2/tcp/4001/p2p/12D3KooW..."]
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .grants import ROLES as _ROLES
from .identity import default_home

__all__ = ["NodeConfig", "ROLES", "Section"]

ROLES = _ROLES  # the node roles (p2pinfer.grants lists them once)
T = TypeVar("T")

# The config tables a node reads (each role's own, and [models]).
TABLES = frozenset({"node", "inference", "gateway", "auth", "metrics", "web", "models",
                    "ledger", "scaling"})
# Tables that were never read, and where their settings are (a file that has
# one would otherwise look configured and be silently ignored).
MOVED_TABLES = {
    "tls": "HTTPS is set in [web]: tls_cert, tls_key, tls_self_signed, tls_hosts",
    "privacy": "export and erasure need no settings; retention is not configurable yet",
    "discovery": "discovery is set in [node]: announce_interval, descriptor_ttl, dht_server, "
                 "mdns",
}
# The [node] keys. The *_service_port keys take the AUTH_/GATEWAY_/
# INFERENCE_/METRICS_SERVICE_PORT variables of the original deployment: roles
# are reached over libp2p, so they are accepted and have no effect.
NODE_KEYS = frozenset({
    "home", "roles", "listen", "announce", "bootstrap", "database_url", "mdns", "dht_server",
    "announce_interval", "descriptor_ttl", "max_frame", "max_streams_per_peer",
    "max_inbound_per_ip", "dead_link_timeout", "stall_timeout", "keep_links", "log_format",
    "network", "auth_service_port", "gateway_service_port", "inference_service_port",
    "metrics_service_port",
})

# The documented environment variables (docs/deployment.md), and where they land.
ENV_KEYS: dict[str, tuple[str, str]] = {
    "DATABASE_URL": ("node", "database_url"),
    "AUTH_SERVICE_PORT": ("node", "auth_service_port"),
    "GATEWAY_SERVICE_PORT": ("node", "gateway_service_port"),
    "INFERENCE_SERVICE_PORT": ("node", "inference_service_port"),
    "METRICS_SERVICE_PORT": ("node", "metrics_service_port"),
    "WEB_SERVICE_PORT": ("web", "port"),
    "OLLAMA_URL": ("inference", "ollama_url"),
    "OPENAI_API_KEY": ("inference", "openai_api_key"),
    "OPENAI_BASE_URL": ("inference", "openai_base_url"),
    "DEFAULT_RATE_LIMIT": ("gateway", "default_rate_limit"),
    "PREMIUM_RATE_LIMIT": ("gateway", "premium_rate_limit"),
    "PROMETHEUS_PORT": ("metrics", "prometheus_port"),
    "METRICS_ENABLED": ("metrics", "enabled"),
    "P2PINFER_ROLES": ("node", "roles"),
    "P2PINFER_LISTEN": ("node", "listen"),
    "P2PINFER_BOOTSTRAP": ("node", "bootstrap"),
    "P2PINFER_ANNOUNCE": ("node", "announce"),
    "P2PINFER_LOG_FORMAT": ("node", "log_format"),
    "P2PINFER_TLS_CERT": ("web", "tls_cert"),
    "P2PINFER_TLS_KEY": ("web", "tls_key"),
    "P2PINFER_TLS_SELF_SIGNED": ("web", "tls_self_signed"),
    "P2PINFER_HTTP_REDIRECT_PORT": ("web", "redirect_port"),
    "P2PINFER_WEB_WORKERS": ("web", "workers"),
    # llama.cpp weight repacking (auto | on | off): off forces the portable path.
    "P2PINFER_REPACK": ("inference", "repack"),
}
_LIST_KEYS = {("node", "roles"), ("node", "listen"), ("node", "bootstrap"), ("node", "announce")}


class Section:
    """Typed, validated access to one TOML table; errors name ``table.key``."""

    def __init__(self, name: str, data: Mapping[str, Any]) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{name}: must be a table")
        self.name = name
        self.data = data

    def _path(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def reject_unknown(self, known: set[str] | frozenset[str], what: str | None = None) -> None:
        """Raise ConfigError naming the first key not in ``known`` (so a
        typo is an error rather than a silently ignored setting); ``what``
        says whose keys these are when the table name alone does not
        (``backend ollama``). Every table is checked this way."""
        unknown = sorted(str(k) for k in set(self.data) - set(known))
        if unknown:
            whose = f" for {what}" if what else ""
            raise ConfigError(f"{self._path(unknown[0])}: unknown key{whose} "
                              f"(known: {', '.join(sorted(known))})")

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def get_str(self, key: str, default: str, *, choices: tuple[str, ...] | None = None) -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._path(key)}: must be a string, got {value!r}")
        if choices is not None and value not in choices:
            raise ConfigError(
                f"{self._path(key)}: must be one of {', '.join(choices)}; got {value!r}"
            )
        return value

    def get_optional_str(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{self._path(key)}: must be a string, got {value!r}")
        return value

    def get_int(self, key: str, default: int, *, minimum: int | None = None,
                maximum: int | None = None) -> int:
        value = self.data.get(key, default)
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ConfigError(f"{self._path(key)}: must be an integer, got {value!r}") from None
        if type(value) is not int:
            raise ConfigError(f"{self._path(key)}: must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self._path(key)}: must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self._path(key)}: must be <= {maximum}, got {value}")
        return value

    def get_float(self, key: str, default: float, *, minimum: float | None = None,
                  maximum: float | None = None) -> float:
        value = self.data.get(key, default)
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{self._path(key)}: must be a number, got {value!r}") from None
        if type(value) not in (int, float):
            raise ConfigError(f"{self._path(key)}: must be a number, got {value!r}")
        value = float(value)
        if value != value:  # NaN
            raise ConfigError(f"{self._path(key)}: must be a number, got NaN")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self._path(key)}: must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self._path(key)}: must be <= {maximum}, got {value}")
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{self._path(key)}: must be true or false, got {value!r}")
        if not isinstance(value, bool):
            raise ConfigError(f"{self._path(key)}: must be true or false, got {value!r}")
        return value

    def get_str_list(self, key: str, default: list[str] | tuple[str, ...] = ()) -> list[str]:
        value = self.data.get(key, list(default))
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self._path(key)}: must be a list of strings, got {value!r}")
        return list(value)

    def get_table_list(self, key: str) -> list[Section]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ConfigError(f"{self._path(key)}: must be an array of tables")
        return [Section(f"{self._path(key)}[{i}]", v) for i, v in enumerate(value)]

    def get_table(self, key: str) -> Section:
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self._path(key)}: must be a table")
        return Section(self._path(key), value)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _sqlite_path(url: str, home: Path) -> Path:
    """``sqlite:///relative/to/home.db`` or ``sqlite:////absolute/path.db``."""
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///"):]
        if not rest or rest.endswith("/"):
            raise ConfigError("node.database_url: sqlite:/// needs a file path")
        path = Path(rest).expanduser()
        return path if path.is_absolute() else home / path
    if url.startswith("sqlite://"):
        raise ConfigError(f"node.database_url: use sqlite:///path/to/node.db, got {url!r}")
    raise ConfigError(
        f"node.database_url: only sqlite:/// URLs are supported (each node keeps its own "
        f"SQLite file); got {url.split(':', 1)[0]!r}"
    )


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to start. Build with :meth:`from_toml`,
    :meth:`from_mapping` or :meth:`from_env`; all values are validated."""

    home: Path
    roles: tuple[str, ...] = ROLES
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    announce: tuple[str, ...] = ()
    bootstrap: tuple[str, ...] = ()
    database_path: Path = field(default=Path("node.db"))
    enable_mdns: bool = False
    dht_server: bool = True
    announce_interval: float = 30.0
    descriptor_ttl: float = 15.0
    max_frame: int = 4 * 1024 * 1024
    max_streams_per_peer: int = 16
    max_inbound_per_ip: int = 64
    dead_link_timeout: float = 15.0
    stall_timeout: float = 3.0
    keep_links: int = 16
    log_format: str = "text"
    network: str = "default"
    tree: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def section(self, name: str) -> Section:
        """The raw TOML table ``[name]`` (with env overrides applied)."""
        return Section(name, self.tree.get(name, {}))

    @classmethod
    def from_toml(cls, path: str | Path, *, env: Mapping[str, str] | None = None) -> NodeConfig:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        return cls.from_mapping(data, env=env)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NodeConfig:
        return cls.from_mapping({}, env=env)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, env: Mapping[str, str] | None = None
    ) -> NodeConfig:
        """Build from a TOML-shaped mapping, then apply ``env`` (default
        ``os.environ``; pass ``{}`` to ignore the environment)."""
        env = os.environ if env is None else env
        tree = _merge({}, data)
        for key in tree:
            if key in MOVED_TABLES:
                raise ConfigError(f"[{key}]: not a config table; {MOVED_TABLES[key]}")
            if key not in TABLES:
                known = ", ".join(sorted(TABLES))
                raise ConfigError(f"{key}: unknown config table (known: {known})")
        for var, (table, key) in ENV_KEYS.items():
            if var in env and env[var] != "":
                value: Any = env[var]
                if (table, key) in _LIST_KEYS:
                    value = [v.strip() for v in value.split(",") if v.strip()]
                tree.setdefault(table, {})
                tree[table] = {**tree[table], key: value}
        node = Section("node", tree.get("node", {}))
        node.reject_unknown(NODE_KEYS)
        home_raw = node.get_optional_str("home") or env.get("P2PINFER_HOME")
        home = Path(home_raw).expanduser() if home_raw else default_home()

        roles = tuple(node.get_str_list("roles", list(ROLES)))
        for role in roles:
            if role not in ROLES:
                raise ConfigError(f"node.roles: unknown role {role!r} (known: {', '.join(ROLES)})")
        if len(set(roles)) != len(roles):
            raise ConfigError("node.roles: a role is listed twice")

        listen = tuple(node.get_str_list("listen", ["/ip4/127.0.0.1/tcp/0"]))
        if not listen:
            raise ConfigError("node.listen: at least one address is needed")
        announce = tuple(node.get_str_list("announce"))
        bootstrap = tuple(node.get_str_list("bootstrap"))
        from .rpc.host import parse_multiaddr

        for key, values in (("listen", listen), ("announce", announce), ("bootstrap", bootstrap)):
            for value in values:
                try:
                    parse_multiaddr(value)
                except Exception:
                    raise ConfigError(f"node.{key}: not a multiaddr: {value!r}") from None
        for value in bootstrap:
            if "/p2p/" not in value:
                raise ConfigError(f"node.bootstrap: {value!r} must end in /p2p/<peer id>")

        db_url = node.get_optional_str("database_url")
        database_path = _sqlite_path(db_url, home) if db_url else home / "node.db"
        log_format = node.get_str("log_format", "text", choices=("text", "json"))
        return cls(
            home=home,
            roles=roles,
            listen=listen,
            announce=announce,
            bootstrap=bootstrap,
            database_path=database_path,
            enable_mdns=node.get_bool("mdns", False),
            dht_server=node.get_bool("dht_server", True),
            announce_interval=node.get_float("announce_interval", 30.0, minimum=0.5, maximum=86400),
            descriptor_ttl=node.get_float("descriptor_ttl", 15.0, minimum=0.5, maximum=86400),
            max_frame=node.get_int("max_frame", 4 * 1024 * 1024, minimum=4096, maximum=64 * 2**20),
            max_streams_per_peer=node.get_int("max_streams_per_peer", 16, minimum=1, maximum=1024),
            max_inbound_per_ip=node.get_int("max_inbound_per_ip", 64, minimum=1, maximum=10_000),
            dead_link_timeout=node.get_float("dead_link_timeout", 15.0, minimum=3.0,
                                             maximum=3600.0),
            stall_timeout=node.get_float("stall_timeout", 3.0, minimum=0.1, maximum=3600.0),
            keep_links=node.get_int("keep_links", 16, minimum=0, maximum=1024),
            log_format=log_format,
            network=node.get_str("network", "default"),
            tree=tree,
        )
