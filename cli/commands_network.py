"""Network membership commands, run on a node home: ``network init``,
``info``, ``admit``, ``join``, ``remove`` and ``members``.

A network is defined by its owner key (``owner.key`` in the home that
created it). The owner admits nodes by signing certificates; a certificate
travels to the new node inside a join token (see
:mod:`p2pinfer.ledger.membership`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from p2pinfer.errors import ConfigError
from p2pinfer.grants import OPERATOR

from .connect import split_addrs
from .errors import EXIT_USAGE, CliError
from .operator import (
    OPERATOR_CERT,
    OPERATOR_KEY,
    OperatorAccess,
    daemon_addrs,
    home_option,
    load_operator,
    no_network,
    operator_access,
    resolve_home,
)
from .output import console, fmt_time, note, print_json, table

if TYPE_CHECKING:  # pragma: no cover
    from .operator import OperatorSession

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
ALL_ROLES = ("auth", "gateway", "inference", "metrics", "web")


def _roles(value: str) -> list[str]:
    roles = [r.strip() for r in value.split(",") if r.strip()]
    for role in roles:
        if role not in ALL_ROLES:
            raise CliError(f"--roles: unknown role {role!r} (known: {', '.join(ALL_ROLES)})",
                           EXIT_USAGE)
    return roles


def _home(home: Path | None) -> Path:
    return resolve_home(home)


def _owner(home: Path) -> Any:
    from p2pinfer.ledger.membership import load_network, load_owner

    owner = load_owner(home)
    if owner is None:
        if load_network(home) is None:
            raise no_network(home)
        raise CliError(f"{home} holds no owner key: only the network owner's home can do this",
                       EXIT_USAGE)
    return owner


@click.group(context_settings=CONTEXT)
def network() -> None:
    """Create a network, admit and remove nodes (run on a node home).

    \b
    Examples:
      p2pinfer network init --name lab                  # on the first machine
      p2pinfer network info                             # on a new machine: its peer id
      p2pinfer network admit 12D3KooW... --roles inference   # owner: prints a join token
      p2pinfer network join p2pj1....                   # on the new machine
      p2pinfer network members
    """


@network.command("init", context_settings=CONTEXT)
@home_option
@click.option("--name", default="", help="A name for the network, shown to operators.")
@click.option("--roles", default=",".join(ALL_ROLES), show_default=True,
              help="Roles this home's own node may run (comma-separated).")
@click.option("-b", "--bootstrap", multiple=True, metavar="MULTIADDR",
              help="Addresses new nodes should dial, put into every join token (repeatable).")
def network_init(home: Path | None, name: str, roles: str, bootstrap: tuple[str, ...]) -> None:
    """Create a new network owned by this home (its owner key stays here).

    \b
    Examples:
      p2pinfer network init --name lab
      p2pinfer network init --home /var/lib/p2pinfer --roles auth,gateway,web,metrics \\
          --bootstrap /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...
    """
    from p2pinfer.identity import Identity
    from p2pinfer.ledger.membership import admit, create_network, save_member_cert

    path = _home(home)
    role_list = _roles(roles)
    addrs = split_addrs(bootstrap)
    owner = create_network(path, name=name, bootstrap=addrs)
    node = Identity.load_or_create(path)
    save_member_cert(path, admit(owner, node.peer_id, role_list))
    click.echo(owner.network.network_id)
    note(f"Created network {owner.network.network_id}{f' ({name})' if name else ''} in {path}.")
    note(f"  owner key  {path / 'owner.key'} (keep it safe: it admits and removes nodes)")
    note(f"  this node  {node.peer_id} ({', '.join(role_list) or 'no roles'})")
    note(f"Next: start the node with `p2pinfer daemon --home {path}`, and admit others with "
         "`p2pinfer network admit PEER_ID --roles inference`.")


@network.command("info", context_settings=CONTEXT)
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def network_info(home: Path | None, as_json: bool) -> None:
    """Show this home's node and operator peer ids, its network and roles.

    Creates the node key (and the operator key) on first use: give the
    peer id to the network owner to be admitted.

    \b
    Examples:
      p2pinfer network info
      p2pinfer network info --home /var/lib/p2pinfer --json
    """
    from p2pinfer.identity import Identity
    from p2pinfer.ledger.membership import decode_cert, load_member_cert, load_network

    path = _home(home)
    node = Identity.load_or_create(path)
    operator = Identity.load_or_create(path, name=OPERATOR_KEY)
    network = load_network(path)
    cert = load_member_cert(path)
    op_cert = None
    if (path / OPERATOR_CERT).exists():
        op_cert = decode_cert((path / OPERATOR_CERT).read_text().strip())
    info: dict[str, Any] = {
        "home": str(path),
        "node_peer_id": node.peer_id,
        "operator_peer_id": operator.peer_id,
        "network_id": network.network_id if network else None,
        "network_name": network.name if network else None,
        "owner": (path / "owner.key").exists(),
        "roles": sorted(cert.doc.get("roles", [])) if cert else None,
        "cert_expires": cert.doc.get("exp") if cert else None,
        "operator_cert_expires": op_cert.doc.get("exp") if op_cert else None,
        "bootstrap": list(network.bootstrap) if network else [],
        "daemon": daemon_addrs(path),
    }
    if as_json:
        print_json(info)
        return
    rows = [("home", str(path)), ("node peer id", node.peer_id),
            ("operator peer id", operator.peer_id)]
    if network is None:
        rows.append(("network", "none yet (network init, or network join TOKEN)"))
    else:
        rows += [("network", network.network_id + (f" ({network.name})" if network.name
                                                   else "")),
                 ("owner key", "here" if info["owner"] else "elsewhere"),
                 ("node roles", ", ".join(info["roles"] or []) or "none (not admitted)"),
                 ("certificate until", fmt_time(info["cert_expires"])),
                 ("operator cert", "until " + fmt_time(info["operator_cert_expires"])
                  if op_cert else ("signed on first use" if info["owner"] else "none"))]
    if info["daemon"]:
        rows.append(("daemon", info["daemon"][0]))
    console().print(table(None, ["", ""], rows))


@network.command("admit", context_settings=CONTEXT)
@click.argument("peer_id")
@home_option
@click.option("--roles", default="", help="Roles the node may run, comma-separated "
              "(auth,gateway,inference,metrics,web).")
@click.option("--operator", is_flag=True,
              help="Admit an operator key (the operator grant, no node role): for "
                   "running operator commands from another machine.")
@click.option("--days", type=click.FloatRange(min=1), default=365, show_default=True,
              help="How long the certificate is valid.")
@click.option("-b", "--bootstrap", multiple=True, metavar="MULTIADDR",
              help="Addresses the new node should dial (repeatable). Default: the "
                   "network's bootstrap list (network init --bootstrap), else this "
                   "home's running daemon.")
def network_admit(peer_id: str, home: Path | None, roles: str, operator: bool, days: float,
                  bootstrap: tuple[str, ...]) -> None:
    """Admit a node (owner only) and print its join token on stdout.

    The token holds the network id, the owner's public key, the node's
    certificate and where to connect; the node imports it with
    `p2pinfer network join TOKEN`.

    \b
    Examples:
      p2pinfer network admit 12D3KooWAbc... --roles inference
      p2pinfer network admit 12D3KooWAbc... --roles gateway,auth,web --days 90
      p2pinfer network admit 12D3KooWXyz... --operator
    """
    from p2pinfer.ledger.membership import admit, make_join_token

    path = _home(home)
    role_list = _roles(roles)
    if operator and role_list:
        raise CliError("--operator admits a key with no roles: drop --roles", EXIT_USAGE)
    if not operator and not role_list:
        raise CliError("give --roles (e.g. --roles inference), or --operator", EXIT_USAGE)
    owner = _owner(path)
    cert = admit(owner, peer_id, [OPERATOR] if operator else role_list, days=days)
    addrs = split_addrs(bootstrap) or list(owner.network.bootstrap) or daemon_addrs(path)
    token = make_join_token(owner.network, cert, addrs)
    click.echo(token)
    what = "operator key" if operator else f"node with roles {', '.join(role_list)}"
    note(f"Admitted {peer_id} as a {what} for {days:g} days. On that machine run:\n"
         f"  p2pinfer network join {token[:24]}…")
    if not addrs:
        note("[yellow]The token names no address to connect to: the node needs "
             "--bootstrap when it starts.[/]")


@network.command("join", context_settings=CONTEXT)
@click.argument("token")
@home_option
def network_join(token: str, home: Path | None) -> None:
    """Import a join token from the network owner into this home.

    The token admits either this home's node key or its operator key
    (`p2pinfer network info` shows both peer ids).

    \b
    Examples:
      p2pinfer network join p2pj1.gqNuZXTZ...
      p2pinfer network join "$(cat token.txt)" --home /var/lib/p2pinfer
    """
    from p2pinfer.identity import Identity
    from p2pinfer.ledger.membership import (
        encode_cert,
        import_join_token,
        load_network,
        parse_join_token,
    )

    from .store import write_private

    path = _home(home)
    network, cert = parse_join_token(token)
    node = Identity.load_or_create(path)
    operator = Identity.load_or_create(path, name=OPERATOR_KEY)
    if cert.peer == node.peer_id:
        import_join_token(path, token, peer_id=node.peer_id)
        what = f"node {node.peer_id} with roles {', '.join(sorted(cert.roles)) or 'none'}"
    elif cert.peer == operator.peer_id:
        existing = load_network(path)
        if existing is not None and existing.network_id != network.network_id:
            raise ConfigError(f"{path} already belongs to network {existing.network_id}; "
                              f"the token is for {network.network_id}")
        if existing is None:
            network.save(path)
        write_private(path / OPERATOR_CERT, encode_cert(cert.signed) + "\n")
        what = f"operator key {operator.peer_id}"
    else:
        raise CliError(f"the token admits {cert.peer}, which is neither this home's node "
                       f"({node.peer_id}) nor its operator key ({operator.peer_id})", EXIT_USAGE)
    click.echo(network.network_id)
    note(f"Joined network {network.network_id} as {what} "
         f"(until {fmt_time(cert.exp)}).")
    if network.bootstrap and cert.peer == node.peer_id:
        note(f"Start the node: p2pinfer daemon --home {path} --bootstrap {network.bootstrap[0]}")


@network.command("remove", context_settings=CONTEXT)
@click.argument("peer_id")
@click.option("--after", type=click.IntRange(min=0),
              help="Keep the node's events up to this sequence number (default: all that "
                   "the connected node has seen).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@operator_access
def network_remove(peer_id: str, after: int | None, yes: bool, op: OperatorAccess) -> None:
    """Remove a node from the network for good (owner only).

    Its later ledger events become void on every node, and its peer id can
    never rejoin (admit a new key instead). Needs the owner's home and a
    running member node to hand the removal to.

    \b
    Examples:
      p2pinfer network remove 12D3KooWAbc...
      p2pinfer network remove 12D3KooWAbc... --yes \
          --bootstrap /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...
    """
    import trio

    from p2pinfer.identity import public_key_from_peer_id
    from p2pinfer.ledger.membership import make_removal

    public_key_from_peer_id(peer_id)  # InvalidParams for a typo
    owner = _owner(op.home)
    operator = load_operator(op.home)
    if not yes:
        click.confirm(f"Remove {peer_id} from {owner.network.network_id} for good?",
                      abort=True, err=True)

    async def body(session: OperatorSession) -> tuple[int, bool]:
        cut = after if after is not None else (await session.heads()).get(peer_id, 0)
        removal = make_removal(owner, peer_id, cut)
        await session.call("ledgerHello", {"net": owner.network.network_id,
                                           "docs": [operator.cert.to_wire(), removal.to_wire()]})
        docs = await session.membership_docs()
        return cut, any(d.get("doc") == removal.doc for d in docs if isinstance(d, dict))

    cut, accepted = trio.run(op.run, body)
    if not accepted:
        raise CliError("the node did not keep the removal (see its log)")
    note(f"Removed {peer_id}: its events after #{cut} are void; every member applies the "
         "removal as the ledger spreads it.")


@network.command("members", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_access
def network_members(as_json: bool, op: OperatorAccess) -> None:
    """List the network's members: roles, certificate dates, removals, and
    whether each node is up.

    \b
    Examples:
      p2pinfer network members
      p2pinfer network members --home /var/lib/p2pinfer --json
    """
    import trio

    from p2pinfer.identity import Identity
    from p2pinfer.ledger.membership import Membership

    operator = load_operator(op.home)

    async def body(session: OperatorSession) -> tuple[list[Any], set[str]]:
        docs = await session.membership_docs()
        up: set[str] = {session.peer}
        for role in ALL_ROLES:
            up |= {d.peer_id for d in await session.find(role)}
        return docs, up

    docs, up = trio.run(op.run, body)
    membership = Membership(operator.network)
    for doc in docs:
        membership.add(doc)
    node_id = Identity.load_or_create(op.home).peer_id
    now = time.time()
    rows: list[dict[str, Any]] = []
    for m in membership.members():
        state = ("removed" if m.removed_after is not None
                 else "expired" if m.expires_at < now else "active")
        label = ("this home's node" if m.peer_id == node_id
                 else "this home's operator key" if m.peer_id == operator.peer_id else "")
        rows.append({"peer_id": m.peer_id, "roles": sorted(m.roles), "state": state,
                     "admitted_at": m.admitted_at, "expires_at": m.expires_at,
                     "removed_after": m.removed_after, "up": m.peer_id in up, "note": label})
    if as_json:
        print_json(rows)
        return
    console().print(table(
        f"{len(rows)} member(s) of {operator.network.network_id}",
        ["peer id", "roles", "state", "up", "admitted", "expires", "note"],
        [(r["peer_id"], ", ".join(r["roles"]) or "(operator)",
          r["state"] + (f" after #{r['removed_after']}" if r["removed_after"] is not None
                        else ""),
          "yes" if r["up"] else "-", fmt_time(r["admitted_at"]), fmt_time(r["expires_at"]),
          r["note"]) for r in rows]))


COMMANDS = [network]
