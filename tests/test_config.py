"""NodeConfig: TOML + environment, validated, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pinfer.config import NodeConfig
from p2pinfer.errors import ConfigError


def test_environment_overrides_toml(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nroles = ["gateway"]\n[gateway]\ndefault_rate_limit = 50\n')
    cfg = NodeConfig.from_toml(path, env={"DEFAULT_RATE_LIMIT": "70", "WEB_SERVICE_PORT": "3100",
                                          "DATABASE_URL": "sqlite:////tmp/x/node.db",
                                          "P2PINFER_HOME": str(tmp_path)})
    assert cfg.roles == ("gateway",)
    assert cfg.section("gateway").get_int("default_rate_limit", 0) == 70
    assert cfg.section("web").get_int("port", 0) == 3100
    assert cfg.database_path == Path("/tmp/x/node.db")
    assert cfg.home == tmp_path


def test_relative_database_url_lives_in_home(tmp_path: Path) -> None:
    cfg = NodeConfig.from_mapping({"node": {"home": str(tmp_path),
                                            "database_url": "sqlite:///data/n.db"}}, env={})
    assert cfg.database_path == tmp_path / "data" / "n.db"


@pytest.mark.parametrize("data, env, message", [
    ({"node": {"roles": ["wizard"]}}, {}, "node.roles: unknown role 'wizard'"),
    ({"node": {"roles": ["auth", "auth"]}}, {}, "node.roles: a role is listed twice"),
    ({"node": {"listen": ["not-an-address"]}}, {}, "node.listen: not a multiaddr"),
    ({"node": {"bootstrap": ["/ip4/1.2.3.4/tcp/1"]}}, {}, "must end in /p2p/"),
    ({"node": {"max_frame": 10}}, {}, "node.max_frame: must be >= 4096"),
    ({"node": {"announce_interval": "soon"}}, {}, "node.announce_interval: must be a number"),
    ({"node": {"log_format": "xml"}}, {}, "node.log_format: must be one of text, json"),
    ({"node": {"max_inbound_per_ip": 0}}, {}, "node.max_inbound_per_ip: must be >= 1"),
    ({"node": {"dead_link_timeout": 1}}, {}, "node.dead_link_timeout: must be >= 3"),
    ({"nodes": {}}, {}, "nodes: unknown config table"),
    ({}, {"DATABASE_URL": "postgresql://u@h/db"}, "only sqlite:/// URLs are supported"),
    ({}, {"DEFAULT_RATE_LIMIT": "lots"}, None),  # checked by the gateway's own settings
    ({"gateway": {"default_rate_limt": 5}}, {}, None),
])
def test_bad_values_name_their_key(tmp_path: Path, data: dict, env: dict,
                                   message: str | None) -> None:
    data.setdefault("node", {})["home"] = str(tmp_path)
    if message is None:
        from p2pinfer.gateway.settings import GatewaySettings

        cfg = NodeConfig.from_mapping(data, env=env)
        with pytest.raises(ConfigError, match=r"gateway\.default_rate_li"):
            GatewaySettings.from_config(cfg)
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        NodeConfig.from_mapping(data, env=env)


def test_toml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        NodeConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nroles = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        NodeConfig.from_toml(bad)


def test_connection_limits_reach_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``[node] max_inbound_per_ip`` and ``dead_link_timeout`` are passed to
    the libp2p host, and the timeout sets the sockets' liveness options."""
    import socket

    import p2pinfer.node as node_module
    from p2pinfer.rpc.host import liveness_options

    cfg = NodeConfig.from_mapping({"node": {"home": str(tmp_path), "roles": [],
                                            "max_inbound_per_ip": 8,
                                            "dead_link_timeout": 6}}, env={})
    assert (cfg.max_inbound_per_ip, cfg.dead_link_timeout) == (8, 6.0)
    seen: dict = {}
    real = node_module.make_host

    def spy(*args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(node_module, "make_host", spy)
    node_module.Node(cfg)
    assert seen["max_inbound_per_ip"] == 8 and seen["dead_link_timeout"] == 6.0
    options = {opt: value for _, opt, value in liveness_options(6.0)}
    assert options[socket.SO_KEEPALIVE] == 1
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        assert options[socket.TCP_USER_TIMEOUT] == 6000
        # probes start at a third of the timeout and give up within it
        idle, interval, count = (options[socket.TCP_KEEPIDLE], options[socket.TCP_KEEPINTVL],
                                 options[socket.TCP_KEEPCNT])
        assert idle + interval * count <= 6
    defaults = NodeConfig.from_mapping({"node": {"home": str(tmp_path)}}, env={})
    assert (defaults.max_inbound_per_ip, defaults.dead_link_timeout) == (64, 15.0)


@pytest.mark.parametrize("table, hint", [("tls", "[web]: tls_cert"),
                                         ("discovery", "[node]: announce_interval"),
                                         ("privacy", "need no settings")])
def test_tables_that_are_not_read_are_refused_with_a_pointer(tmp_path: Path, table: str,
                                                             hint: str) -> None:
    """``[tls] cert = ...`` used to be accepted and silently ignored."""
    with pytest.raises(ConfigError) as ei:
        NodeConfig.from_mapping({"node": {"home": str(tmp_path)}, table: {"cert": "x.pem"}},
                                env={})
    assert f"[{table}]: not a config table" in ei.value.message and hint in ei.value.message


def test_unknown_node_keys_are_refused_like_in_every_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        NodeConfig.from_mapping({"node": {"home": str(tmp_path), "lisen": ["/ip4/0.0.0.0"]}},
                                env={})
    assert ei.value.message.startswith("node.lisen: unknown key (known: ")
    # the original deployment's per-service ports are accepted (and unused)
    NodeConfig.from_mapping({"node": {"home": str(tmp_path)}},
                            env={"AUTH_SERVICE_PORT": "8001", "GATEWAY_SERVICE_PORT": "8002"})


@pytest.mark.parametrize("table,key", [("auth", "token_tll"), ("ledger", "sync_intervall"),
                                       ("inference", "slotz"), ("gateway", "rate"),
                                       ("web", "prot"), ("metrics", "intervall"),
                                       ("scaling", "cpu_hgh")])
def test_every_table_refuses_an_unknown_key_the_same_way(tmp_path: Path, table: str,
                                                         key: str) -> None:
    """One rule: ``<table>.<key>: unknown key (known: ...)``, whichever role
    reads the table (a typo is never a silently ignored setting)."""
    from p2pinfer.credentials.settings import AuthSettings
    from p2pinfer.gateway.settings import GatewaySettings
    from p2pinfer.inference.settings import InferenceSettings
    from p2pinfer.ledger.ledger import LedgerSettings
    from p2pinfer.metrics.settings import MetricsSettings
    from p2pinfer.scaling.settings import ScalingSettings
    from p2pinfer.web.settings import WebSettings

    readers = {"auth": AuthSettings.from_config, "gateway": GatewaySettings.from_config,
               "inference": InferenceSettings.from_config,
               "ledger": lambda c: LedgerSettings.from_section(c.section("ledger")),
               "metrics": MetricsSettings.from_config, "scaling": ScalingSettings.from_config,
               "web": WebSettings.from_config}
    config = NodeConfig.from_mapping({"node": {"home": str(tmp_path)}, table: {key: 1}},
                                     env={})
    with pytest.raises(ConfigError) as ei:
        readers[table](config)
    assert ei.value.message.startswith(f"{table}.{key}: unknown key (known: "), ei.value.message
