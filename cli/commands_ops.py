"""Operations commands: ``backup``, ``restore``, ``account password|export|erase`` and
``tls self-signed``.

``backup`` and ``restore`` work on a node home's files (no network):
backup while the node runs, restore while it is stopped (see
:mod:`p2pinfer.ledger.backup`). ``account`` acts on the user's own account
through the swarm, with the session ``p2pinfer login`` saved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .connect import SwarmAccess, swarm_access, with_client
from .errors import EXIT_AUTH, EXIT_USAGE, CliError
from .output import note, print_json

if TYPE_CHECKING:  # pragma: no cover
    from p2pinfer.client import Client
    from p2pinfer.config import NodeConfig

__all__ = ["COMMANDS"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _home_options(f: Any) -> Any:
    f = click.option("-c", "--config", "config_path",
                     type=click.Path(dir_okay=False, path_type=Path), envvar="P2PINFER_CONFIG",
                     help="The node's TOML config, for a database_url other than "
                          "<home>/node.db (env: P2PINFER_CONFIG).")(f)
    return click.option("--home", type=click.Path(file_okay=False, path_type=Path),
                        envvar="P2PINFER_HOME",
                        help="The node's home (env: P2PINFER_HOME).")(f)


def _node_config(home: Path | None, config_path: Path | None) -> NodeConfig:
    from p2pinfer.config import NodeConfig

    data: dict[str, Any] = {}
    if config_path is not None:
        import tomllib

        try:
            data = tomllib.loads(config_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CliError(f"{config_path}: {exc}", EXIT_USAGE) from None
    node = dict(data.get("node", {}))
    if home is not None:
        node["home"] = str(home)
    return NodeConfig.from_mapping({**data, "node": node})


def _node_of(config: NodeConfig) -> tuple[str, str]:
    """The peer id and network id of a home (never creating a key)."""
    from p2pinfer.identity import Identity
    from p2pinfer.ledger import load_network

    home = config.home
    if not (home / "node.key").is_file():
        raise CliError(f"{home} has no node key (node.key): is it a node home?", EXIT_USAGE)
    network = load_network(home)
    if network is None:
        raise CliError(f"{home} belongs to no network (no network.json)", EXIT_USAGE)
    return Identity.load_or_create(home).peer_id, network.network_id


def _running_pid(home: Path) -> int | str | None:
    """The pid of the process running the home's node, if one runs: the
    holder of its lock (p2pinfer.homelock), else the pid in daemon.json."""
    from p2pinfer.homelock import holder_of

    holder = holder_of(home)
    if holder is not None:
        return holder
    try:
        pid = int(json.loads((home / "daemon.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


@click.command(context_settings=CONTEXT)
@_home_options
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The backup file to write (mode 0600: it holds password hashes).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def backup(home: Path | None, config_path: Path | None, out: Path, as_json: bool) -> None:
    """Back up a node's ledger store, while the node runs.

    Writes a consistent snapshot (SQLite's online backup API) of the node's
    database to --out. Keys are not in it: keep node.key, member.cert and
    network.json of the home (and owner.key, offline) safe separately.

    \b
    Examples:
      p2pinfer backup --home /var/lib/p2pinfer --out /backups/node-$(date +%F).db
    """
    from p2pinfer.ledger.backup import backup as take

    config = _node_config(home, config_path)
    peer_id, network_id = _node_of(config)
    info = take(config.database_path, out, peer_id=peer_id, network_id=network_id)
    if as_json:
        print_json(info.to_dict())
        return
    note(f"Backed up {config.database_path} to {info.path}: {info.events} events, this node's "
         f"own up to #{info.own_head}.")


@click.command(context_settings=CONTEXT)
@click.argument("backup_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_home_options
@click.option("--force", is_flag=True, help="Accept a backup of another node of the network.")
@click.option("--quorum", type=click.IntRange(min=0), default=None,
              help="Members that must report this node's latest events before it writes "
                   "again (default: [ledger] restore_quorum; 0 trusts the backup: only when "
                   "no other member can hold newer events of this node).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def restore(backup_file: Path, home: Path | None, config_path: Path | None, force: bool,
            quorum: int | None, as_json: bool) -> None:
    """Bring a stopped node back from a backup; it then catches up from its peers.

    The current database is moved aside (node.db.before-restore-TIME), not
    deleted. The restored node writes nothing until its peers have told it
    its own latest events, so it never reuses an event number it had
    already used after the backup was taken.

    \b
    Examples:
      p2pinfer restore /backups/node-2025-01-31.db --home /var/lib/p2pinfer
      p2pinfer daemon --home /var/lib/p2pinfer     # then start it again
    """
    from p2pinfer.ledger.backup import restore as put_back

    config = _node_config(home, config_path)
    pid = _running_pid(config.home)
    if pid is not None:
        raise CliError(f"the node of {config.home} is running (pid {pid}): stop it first",
                       EXIT_USAGE)
    peer_id, network_id = _node_of(config)
    result = put_back(backup_file, config.database_path, peer_id=peer_id,
                      network_id=network_id, force=force, quorum=quorum)
    if as_json:
        print_json(result)
        return
    b = result["backup"]
    note(f"Restored {config.database_path} from {backup_file} ({b['events']} events, this "
         f"node's own up to #{b['own_head']}).")
    for path in result["moved_aside"]:
        note(f"The previous file is kept as {path}.")
    note("Start the node: it catches up from its peers and writes again once they have told "
         "it its own latest events.")


# -- account ---------------------------------------------------------------------------
@click.group(context_settings=CONTEXT)
def account() -> None:
    """Change your password, export your data, or delete your account (needs
    `p2pinfer login`).

    \b
    Examples:
      p2pinfer account password
      p2pinfer account export --out my-data.json
      p2pinfer account erase
    """


@account.command("export", context_settings=CONTEXT)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON here (default: print it).")
@click.option("--user-id", help="Another user's data (admins only).")
@swarm_access(api_key=False)
def account_export(out: Path | None, user_id: str | None, access: SwarmAccess) -> None:
    """Everything the swarm holds about you, as JSON.

    Your account, your API keys (never the keys themselves), usage, request
    logs (prompts only as hashes) and the audit trail of your account.

    \b
    Examples:
      p2pinfer account export --out my-data.json
      p2pinfer account export | jq .usage
    """
    import trio

    async def body(client: Client) -> dict[str, Any]:
        return await client.export_data(user_id=user_id)

    data = trio.run(with_client, access, "token", body)
    if out is None:
        print_json(data)
        return
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
    note(f"Wrote your data to {out} ({len(data.get('request_logs', []))} request logs, "
         f"{len(data.get('audit', []))} audit rows).")


@account.command("password", context_settings=CONTEXT)
@click.option("--current", envvar="P2PINFER_PASSWORD",
              help="Current password (env: P2PINFER_PASSWORD); asked for when not given.")
@click.option("--new", envvar="P2PINFER_NEW_PASSWORD",
              help="New password (env: P2PINFER_NEW_PASSWORD); asked for, twice, when not "
                   "given.")
@swarm_access(api_key=False)
def account_password(current: str | None, new: str | None, access: SwarmAccess) -> None:
    """Change your password.

    Every session of the account ends, on every node (other devices must
    log in again); this one is replaced by a new session, saved here. API
    keys stay valid: revoke them with `p2pinfer keys revoke`.

    \b
    Examples:
      p2pinfer account password
      P2PINFER_PASSWORD=... P2PINFER_NEW_PASSWORD=... p2pinfer account password
    """
    import trio

    creds = access.creds
    if not creds.token and not creds.refresh_token:
        raise CliError("not logged in: run `p2pinfer login` first", EXIT_AUTH)
    current = current or str(click.prompt("Current password", hide_input=True))
    new = new or str(click.prompt("New password", hide_input=True, confirmation_prompt=True))

    async def body(client: Client) -> dict[str, Any]:
        return await client.change_password(current, new)

    session = trio.run(with_client, access, "token", body)
    access.save_session(session)
    note("Password changed. Every other session of the account has ended; this one was "
         "renewed and saved.")


@account.command("erase", context_settings=CONTEXT)
@click.option("--password", envvar="P2PINFER_PASSWORD",
              help="Your password (env: P2PINFER_PASSWORD); asked for when not given.")
@click.option("--user-id", help="Erase another user (admins only; no password needed).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@swarm_access(api_key=False)
def account_erase(password: str | None, user_id: str | None, yes: bool,
                  access: SwarmAccess) -> None:
    """Delete your account on every node, for good.

    Your username and email are erased everywhere, your API keys revoked
    and the saved session forgotten. Usage counts and request logs (prompt
    hashes only) stay, under an id that no longer leads to you.

    \b
    Examples:
      p2pinfer account erase
      p2pinfer account erase --user-id 2b0c4f9e-5d1a-4c3e-9f7a-0d8e6b5a4c21 --yes   # an admin
    """
    import trio

    whom = f"user {user_id}" if user_id else "your account"
    if not yes and not click.confirm(f"Erase {whom} on every node? This cannot be undone"):
        raise CliError("nothing was erased", EXIT_USAGE)
    if user_id is None and password is None:
        password = str(click.prompt("Password", hide_input=True))

    async def body(client: Client) -> dict[str, Any]:
        return await client.erase_account(password, user_id=user_id)

    result = trio.run(with_client, access, "token", body)
    if user_id is None:  # the saved session and key are dead now
        access.creds.forget_session()
        access.creds.forget_key()
        access.store.save(access.creds)
    note(f"Erased {whom} ({result['revoked_keys']} API key(s) revoked)."
         if not result.get("already_erased") else f"{whom.capitalize()} was already erased.")


# -- tls -------------------------------------------------------------------------------
@click.group(context_settings=CONTEXT)
def tls() -> None:
    """HTTPS certificates for the web role.

    \b
    Examples:
      p2pinfer tls self-signed --host 10.0.0.2
    """


@tls.command("self-signed", context_settings=CONTEXT)
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="P2PINFER_HOME",
              help="The node's home; the files go to <home>/tls (env: P2PINFER_HOME).")
@click.option("--host", "hosts", multiple=True,
              help="A name or address clients use to reach the node (repeatable).")
def tls_self_signed(home: Path | None, hosts: tuple[str, ...]) -> None:
    """Make a private CA and a server certificate for a LAN.

    Writes <home>/tls/{ca.pem, ca.key, cert.pem, key.pem}. Serve it with
    `[web] tls_self_signed = true` (or tls_cert/tls_key) and give clients
    ca.pem: `p2pinfer prompt --ca-file ca.pem ...`, P2PINFER_CA_FILE, or the
    browser's trust store. Nobody but you vouches for it: use a certificate
    from a trusted CA beyond a LAN.

    \b
    Examples:
      p2pinfer tls self-signed --home /var/lib/p2pinfer --host 10.0.0.2 --host gpu-box.lan
    """
    from p2pinfer.identity import default_home
    from p2pinfer.web.tls import TLS_DIR, make_self_signed

    files = make_self_signed((home or default_home()) / TLS_DIR, hosts)
    note(f"Certificate: {files.cert}\nKey: {files.key}\nCA for clients: {files.ca}")
    note("WARNING: self-signed. Clients must be given the CA file; never disable verification.")


COMMANDS = [backup, restore, account, tls]
