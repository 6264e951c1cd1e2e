"""Status commands for users: ``usage``, ``quota``, ``peers`` and ``health``."""

from __future__ import annotations

import datetime
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from p2pinfer.errors import P2PInferError

from .connect import SwarmAccess, swarm_access, with_client
from .errors import EXIT_USAGE, CliError
from .operator import OperatorAccess, home_option, resolve_home
from .output import bar_chart, console, fmt_time, print_json, short_id, table

if TYPE_CHECKING:  # pragma: no cover
    from p2pinfer.client import Client

    from .operator import OperatorSession

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command(context_settings=CONTEXT)
@click.option("--days", type=click.IntRange(1, 366), default=14, show_default=True,
              help="How many days back, today included (ignored with --since).")
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), help="First day, YYYY-MM-DD.")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), help="Last day, YYYY-MM-DD.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@swarm_access()
def usage(days: int, since: datetime.datetime | None, until: datetime.datetime | None,
          as_json: bool, access: SwarmAccess) -> None:
    """Your requests and tokens per day and API key, with a chart.

    Figures come from the replicated ledger (UTC days).

    \b
    Examples:
      p2pinfer usage
      p2pinfer usage --days 30
      p2pinfer usage --since 2025-01-01 --until 2025-01-31 --json
    """
    import trio

    today = datetime.datetime.now(datetime.UTC).date()
    first = since.date() if since else today - datetime.timedelta(days=days - 1)
    last = until.date() if until else today
    if first > last:
        raise CliError("--since is after --until", EXIT_USAGE)

    async def body(client: Client) -> tuple[list[dict[str, Any]], dict[str, str]]:
        rows = await client.usage(since=first.isoformat(), until=last.isoformat())
        names: dict[str, str] = {}
        try:  # label keys by name: nice to have, never worth failing for
            names = {k["key_id"]: k.get("name") or k.get("public_id") or ""
                     for k in await client.api_keys()}
        except P2PInferError:
            pass
        return rows, names

    rows, names = trio.run(with_client, access, "any", body)
    if as_json:
        print_json(rows)
        return
    out = console()
    if not rows:
        out.print(f"No usage from {first} to {last}.")
        return
    per_day: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    table_rows = []
    for r in sorted(rows, key=lambda r: (r["date"], str(r.get("api_key_id")))):
        key_id = r.get("api_key_id")
        key = names.get(key_id or "", "") or (short_id(key_id, 8) if key_id else "(session)")
        table_rows.append((r["date"], key, f"{r['requests']:,}", f"{r['tokens']:,}"))
        per_day[r["date"]][0] += int(r["requests"])
        per_day[r["date"]][1] += int(r["tokens"])
    total_req = sum(v[0] for v in per_day.values())
    total_tok = sum(v[1] for v in per_day.values())
    table_rows.append(("total", "", f"{total_req:,}", f"{total_tok:,}"))
    out.print(table(f"Usage {first} to {last}", ["date", "key", "requests", "tokens"],
                    table_rows, justify={"requests": "right", "tokens": "right"}))
    points = []
    # The chart starts at the first day with usage (showing at least a week).
    used_days = sorted(per_day)
    day = max(first, min(datetime.date.fromisoformat(used_days[0]),
                         last - datetime.timedelta(days=6)), last - datetime.timedelta(days=59))
    while day <= last:
        points.append((day.strftime("%m-%d"), float(per_day.get(day.isoformat(), [0, 0])[1])))
        day += datetime.timedelta(days=1)
    out.print("\nTokens per day")
    for line in bar_chart(points, width=40):
        out.print(line)


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@swarm_access()
def quota(as_json: bool, access: SwarmAccess) -> None:
    """Your rate limits and what is left in the current window.

    \b
    Examples:
      p2pinfer quota
      p2pinfer quota --json
    """
    import trio

    q = trio.run(with_client, access, "any", lambda c: c.quota())
    if as_json:
        print_json(q)
        return
    limits, used, left = q.get("limits") or {}, q.get("usage") or {}, q.get("remaining") or {}

    def show(value: Any) -> str:
        return "unlimited" if value is None else f"{value:,}"

    rows = [("requests", show(used.get("requests", 0)), show(limits.get("requests")),
             show(left.get("requests"))),
            ("tokens", show(used.get("tokens", 0)), show(limits.get("tokens")),
             show(left.get("tokens")))]
    title = f"Tier {q.get('tier', '?')}, per {q.get('window', 'hour')}"
    out = console()
    out.print(table(title, ["", "used", "limit", "left"], rows,
                    justify={"used": "right", "limit": "right", "left": "right"}))
    if q.get("reset"):
        out.print(f"Resets at {fmt_time(q['reset'])}.")


def _peer_rows(peers: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    rows = []
    for p in peers:
        models = ", ".join(str(m.get("name")) for m in p.get("models") or [])
        addrs = [a for a in p.get("addrs") or [] if "/127.0.0.1/" not in a] or p.get("addrs") \
            or []
        rows.append((p["peer_id"], ", ".join(p.get("roles") or []) or "-", models or "-",
                     addrs[0].rsplit("/p2p/", 1)[0] if addrs else "-", p.get("version", "")))
    return rows


def _member_home(home: Path | None, access: SwarmAccess) -> Path | None:
    """The home to list peers from as a member, if it can act as one."""
    path = resolve_home(home, access.creds)
    if not (path / "network.json").exists():
        return None
    if not ((path / "owner.key").exists() or (path / "operator.cert").exists()):
        return None
    return path


@click.command(context_settings=CONTEXT)
@home_option
@click.option("--public", is_flag=True,
              help="List only what any client sees (gateways and web nodes), even with a home.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@swarm_access(api_key=False)
def peers(home: Path | None, public: bool, as_json: bool, access: SwarmAccess) -> None:
    """List the swarm's nodes: peer id, roles, models, address.

    A client sees the entry points (gateways and web nodes). With a node
    home that can act as a network member (--home, or the up swarm's hub)
    every node is listed.

    \b
    Examples:
      p2pinfer peers
      p2pinfer peers --bootstrap /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW... --public
      p2pinfer peers --home /var/lib/p2pinfer --json
    """
    import trio

    member_home = None if public else _member_home(home, access)
    if member_home is not None:
        op = OperatorAccess(member_home, access.bootstrap if not access.saved_target else [],
                            access.timeout, access.creds)
        found = trio.run(op.run, _member_peers)
        view = "member view"
    else:
        access.require_swarm()
        found = trio.run(with_client, access, "none", lambda c: c.peers())
        view = "public view: gateways, web nodes and the bootstrap nodes"
    if as_json:
        print_json(found)
        return
    console().print(table(f"{len(found)} node(s) ({view})",
                          ["peer id", "roles", "models", "address", "version"],
                          _peer_rows(found)))


async def _member_peers(session: OperatorSession) -> list[dict[str, Any]]:
    seen: dict[str, Any] = {}
    if session.descriptor is not None:
        seen[session.peer] = session.descriptor
    for role in ("auth", "gateway", "inference", "metrics", "web"):
        for desc in await session.find(role):
            seen.setdefault(desc.peer_id, desc)
    return [{"peer_id": d.peer_id, "roles": list(d.roles), "addrs": list(d.addrs),
             "version": d.version, "models": d.models(), "info": d.info}
            for d in sorted(seen.values(), key=lambda d: d.peer_id)]


def _uptime(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


async def _member_health(session: OperatorSession) -> dict[str, Any]:
    """A gateway's and a metrics node's health, asked as a member (every
    node named)."""
    out: dict[str, Any] = {"gateway": None, "system": None}
    for role, method, key in (("gateway", "getServiceHealth", "gateway"),
                              ("metrics", "getSystemHealth", "system")):
        found = await session.find(role)
        if not found:
            out[f"{key}_error"] = f"no {role} node found"
            continue
        try:
            out[key] = await session.call(method, {}, peer=found[0].peer_id)
        except P2PInferError as exc:
            out[f"{key}_error"] = exc.message
    return out


@click.command(context_settings=CONTEXT)
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@swarm_access(api_key=False)
def health(home: Path | None, as_json: bool, access: SwarmAccess) -> None:
    """The swarm's health: a gateway's view (workers, models, load) and, when
    a metrics node is reachable, every node's status, firing alerts, and why
    it is not ok (a node down or fenced, a model no worker serves, a link
    down). With a home that can act as a network member (--home, or the up
    swarm's hub) nodes are named.

    \b
    Examples:
      p2pinfer health
      p2pinfer health --home /var/lib/p2pinfer
      p2pinfer health --url http://gateway.lan:3000 --json
    """
    import trio

    async def body(client: Client) -> dict[str, Any]:
        out: dict[str, Any] = {"gateway": await client.health(), "system": None}
        try:
            out["system"] = await client.system_health()
        except P2PInferError as exc:
            out["system_error"] = exc.message
        return out

    member_home = _member_home(home, access) if home is not None else None
    if member_home is not None:
        op = OperatorAccess(member_home, access.bootstrap if not access.saved_target else [],
                            access.timeout, access.creds)
        result = trio.run(op.run, _member_health)
        if result["gateway"] is None:
            raise CliError(result.get("gateway_error") or "no gateway found")
    else:
        result = trio.run(with_client, access, "none", body)
    if as_json:
        print_json(result)
        return
    out = console()
    gw = result["gateway"]
    colour = {"ok": "green", "degraded": "yellow", "critical": "red"}
    status = gw.get("status", "?")
    out.print(f"Gateway {short_id(str(gw.get('peer_id', '')))}: "
              f"[{colour.get(status, 'white')}]{status}[/] · v{gw.get('version', '?')} · "
              f"up {_uptime(gw.get('uptime'))} · {gw.get('workers', 0)} worker(s) · "
              f"{gw.get('in_flight', 0)} in flight · {gw.get('served', 0)} served")
    for reason in gw.get("reasons") or []:
        out.print(f"  [yellow]why[/] {reason}")
    models = gw.get("models") or {}
    if models:
        out.print("Models: " + ", ".join(f"{name} ({len(workers)} worker(s))"
                                          for name, workers in sorted(models.items())))
    else:
        out.print("Models: none loaded yet")
    system = result.get("system")
    if not system:
        return
    summary = system.get("summary") or {}
    sys_status = system.get("status", "?")
    out.print(f"Swarm: [{colour.get(sys_status, 'white')}]{sys_status}[/] · "
              f"{summary.get('up', '?')} of {summary.get('nodes', '?')} node(s) up")
    for reason in system.get("reasons") or []:
        out.print(f"  [yellow]why[/] {reason}")
    alerts = system.get("alerts") or []
    for alert in alerts:
        out.print(f"  [red]alert[/] {alert.get('name', '?')} ({alert.get('severity', '?')}, "
                  f"{alert.get('state', 'firing')}): {alert.get('summary') or ''}")
    nodes = system.get("nodes")
    if nodes:
        out.print(table(None, ["node", "status", "roles", "uptime", "lag (p95)"],
                        [(short_id(n["peer_id"]), n.get("status"),
                          ", ".join(n.get("roles") or []), _uptime(n.get("uptime")),
                          "-" if n.get("replication_lag") is None
                          else f"{n['replication_lag']:.2f} s") for n in nodes]))


COMMANDS = [usage, quota, peers, health]
