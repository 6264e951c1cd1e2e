"""Account commands: ``register``, ``login``, ``logout``, ``whoami`` and ``keys``."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import click

from p2pinfer.errors import InvalidCredentials, PeerUnavailable

from .connect import SwarmAccess, swarm_access, with_client
from .errors import EXIT_AUTH, EXIT_USAGE, CliError
from .output import console, fmt_time, note, print_json, table

if TYPE_CHECKING:  # pragma: no cover
    from p2pinfer.client import Client

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# A fresh registration may take a moment to reach every auth node.
LOGIN_AFTER_REGISTER_WAIT = 10.0


def _password(value: str | None, *, confirm: bool) -> str:
    if value:
        return value
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=confirm))


def _save_login(access: SwarmAccess, session: dict[str, Any]) -> None:
    user = session.get("user") or {}
    if access.creds.username and user.get("username") != access.creds.username:
        access.creds.forget_key()  # a key of the previous user
    access.save_session(session)


@click.command(context_settings=CONTEXT)
@click.option("-u", "--username", help="3-32 characters: letters, digits, . _ -")
@click.option("-e", "--email", help="Your email address.")
@click.option("--password", envvar="P2PINFER_PASSWORD",
              help="Password (env: P2PINFER_PASSWORD); asked for when not given.")
@click.option("--login/--no-login", default=True, show_default=True,
              help="Log in right after registering, and save the session.")
@swarm_access(api_key=False)
def register(username: str | None, email: str | None, password: str | None, login: bool,
             access: SwarmAccess) -> None:
    """Create an account on the swarm (then log in).

    Passwords need 10+ characters of two kinds (letters and digits, or
    words and spaces) and must not contain the username.

    \b
    Examples:
      p2pinfer register --username alice --email alice@example.com
      p2pinfer register -u alice -e alice@example.com \
          --bootstrap /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...
      P2PINFER_PASSWORD='correct horse 42' p2pinfer register -u ci -e ci@example.com \
          --url http://gw:3000
    """
    import trio

    access.require_swarm()
    username = username or str(click.prompt("Username"))
    email = email or str(click.prompt("Email"))
    password = _password(password, confirm=True)

    async def body(client: Client) -> tuple[dict[str, Any], dict[str, Any] | None]:
        user = await client.register(username, email, password)
        if not login:
            return user, None
        with trio.move_on_after(LOGIN_AFTER_REGISTER_WAIT):
            while True:
                try:
                    return user, await client.login(username, password=password)
                except InvalidCredentials:
                    # the password was just set: the registration has not
                    # reached that auth node yet (logins do not say which)
                    await trio.sleep(0.2)
        return user, await client.login(username, password=password)

    user, session = trio.run(with_client, access, "none", body)
    note(f"Registered [bold]{user['username']}[/] (user id {user['user_id']}).")
    if session is not None:
        _save_login(access, session)
        note(f"Logged in; session saved in {access.store.path}.")
        note("Next: create an API key with `p2pinfer keys create`, "
             "or ask right away: p2pinfer prompt \"Hello!\"")


@click.command(context_settings=CONTEXT)
@click.argument("user", required=False)
@click.option("--password", envvar="P2PINFER_PASSWORD",
              help="Password (env: P2PINFER_PASSWORD); asked for when not given.")
@click.option("--create-key", is_flag=True,
              help="Also create an API key and save it for the CLI.")
@swarm_access(api_key=False)
def login(user: str | None, password: str | None, create_key: bool,
          access: SwarmAccess) -> None:
    """Log in with a username (or email) and save the session and swarm.

    Later commands use the saved swarm and session; the session is
    refreshed automatically (for up to 14 days of inactivity).

    \b
    Examples:
      p2pinfer login alice --bootstrap /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...
      p2pinfer login alice@example.com --url http://gateway.lan:3000
      p2pinfer login alice --create-key
    """
    import trio

    access.require_swarm()
    user = user or access.creds.username or str(click.prompt("Username or email"))
    password = _password(password, confirm=False)
    by_email = "@" in user

    async def body(client: Client) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if by_email:
            session = await client.login(email=user, password=password)
        else:
            session = await client.login(user, password=password)
        key = await client.create_api_key("cli") if create_key else None
        return session, key

    session, key = trio.run(with_client, access, "none", body)
    _save_login(access, session)
    if key is not None:
        access.creds.api_key, access.creds.api_key_id = key["api_key"], key["key_id"]
        access.store.save(access.creds)
    name = (session.get("user") or {}).get("username", user)
    note(f"Logged in as [bold]{name}[/] on {access.where}; session saved in "
         f"{access.store.path}.")
    if key is not None:
        note(f"API key {key['public_id']} created and saved for the CLI.")


@click.command(context_settings=CONTEXT)
@click.option("--forget-key", is_flag=True,
              help="Also forget the saved API key (it stays valid until revoked).")
@click.option("--everywhere", is_flag=True,
              help="End every session of the account, on every device (a lost laptop).")
@swarm_access(api_key=False)
def logout(forget_key: bool, everywhere: bool, access: SwarmAccess) -> None:
    """End the saved session on every node and forget it here.

    With --everywhere, every session of the account ends (other browsers
    and devices must log in again). API keys stay valid either way.

    \b
    Examples:
      p2pinfer logout
      p2pinfer logout --forget-key
      p2pinfer logout --everywhere
    """
    import trio

    creds = access.creds
    if not creds.token and not creds.refresh_token:
        raise CliError("not logged in", EXIT_AUTH)

    async def body(client: Client) -> Any:
        if everywhere:
            return await client.logout_everywhere()
        if creds.refresh_token:
            return await client.logout(refresh_token=creds.refresh_token)
        return await client.logout()

    try:
        trio.run(with_client, access, "token", body)
    except PeerUnavailable as exc:
        if everywhere:  # the other sessions are not over: say so, keep this one
            raise
        note(f"[yellow]Could not reach the swarm ({exc.message}); the session is forgotten "
             "here but stays valid until it expires.[/]")
    creds.forget_session()
    if forget_key:
        creds.forget_key()
    access.store.save(creds)
    note(("Every session of the account has ended." if everywhere else "Logged out.")
         + ("" if forget_key or not creds.api_key
            else " The saved API key is kept (--forget-key drops it)."))


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@swarm_access()
def whoami(as_json: bool, access: SwarmAccess) -> None:
    """Show the account the CLI acts as.

    \b
    Examples:
      p2pinfer whoami
      p2pinfer whoami --json
    """
    import trio

    user = trio.run(with_client, access, "any", lambda c: c.me())
    if as_json:
        print_json(user)
        return
    rows = [("username", user.get("username")), ("email", user.get("email")),
            ("user id", user.get("user_id")), ("tier", user.get("tier")),
            ("admin", "yes" if user.get("is_admin") else "no"),
            ("active", "yes" if user.get("is_active", True) else "no"),
            ("swarm", access.where)]
    console().print(table(None, ["", ""], rows))


# -- API keys ----------------------------------------------------------------------------
@click.group(context_settings=CONTEXT)
def keys() -> None:
    """Create, list and revoke API keys.

    \b
    Examples:
      p2pinfer keys create --name laptop
      p2pinfer keys list
      p2pinfer keys revoke 2b0c4f9e-...
    """


@keys.command("create", context_settings=CONTEXT)
@click.option("-n", "--name", help="A label to recognise the key by.")
@click.option("--save/--no-save", default=True, show_default=True,
              help="Save the key as the one the CLI uses.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@swarm_access(api_key=False)
def keys_create(name: str | None, save: bool, as_json: bool, access: SwarmAccess) -> None:
    """Create an API key (needs `p2pinfer login`). The key is printed on
    stdout and shown only once.

    \b
    Examples:
      p2pinfer keys create --name laptop
      export P2PINFER_API_KEY=$(p2pinfer keys create --name ci --no-save)
    """
    import trio

    key = trio.run(with_client, access, "token", lambda c: c.create_api_key(name))
    if save:
        access.creds.api_key, access.creds.api_key_id = key["api_key"], key["key_id"]
        access.store.save(access.creds)
    if as_json:
        print_json(key)
        return
    click.echo(key["api_key"])
    note(f"Key {key['public_id']} ({key.get('name') or 'no name'}, id {key['key_id']}): "
         "shown this once." + (f" Saved for the CLI in {access.store.path}." if save else ""))


@keys.command("list", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@swarm_access()
def keys_list(as_json: bool, access: SwarmAccess) -> None:
    """List your API keys, revoked ones too (never the secrets).

    \b
    Examples:
      p2pinfer keys list
      p2pinfer keys list --json
    """
    import trio

    found = trio.run(with_client, access, "any", lambda c: c.api_keys())
    if as_json:
        print_json(found)
        return
    rows = []
    for k in found:
        status = "revoked" if k.get("revoked_at") or not k.get("is_active", True) else "active"
        mark = " (cli)" if k.get("key_id") == access.creds.api_key_id else ""
        rows.append((k["key_id"], k.get("public_id"), (k.get("name") or "") + mark,
                     fmt_time(k.get("created_at")), fmt_time(k.get("last_used_at")), status))
    console().print(table(f"{len(found)} API key(s)",
                          ["key id", "public id", "name", "created", "last used", "status"],
                          rows))


def _pick_key(found: list[dict[str, Any]], wanted: str) -> dict[str, Any]:
    matches = [k for k in found if wanted in (k.get("key_id"), k.get("public_id"), k.get("name"))]
    if not matches:
        raise CliError(f"no API key {wanted!r} (see `p2pinfer keys list`)", EXIT_USAGE)
    if len(matches) > 1:
        raise CliError(f"{len(matches)} keys are named {wanted!r}: give the key id", EXIT_USAGE)
    return matches[0]


@keys.command("revoke", context_settings=CONTEXT)
@click.argument("key")
@swarm_access(api_key=False)
def keys_revoke(key: str, access: SwarmAccess) -> None:
    """Revoke an API key, by key id, public id or name (needs `p2pinfer login`).
    Every node refuses it once the revocation has replicated.

    \b
    Examples:
      p2pinfer keys revoke 2b0c4f9e-5d1a-4c3e-9f7a-0d8e6b5a4c21
      p2pinfer keys revoke laptop
    """
    import trio

    async def body(client: Client) -> dict[str, Any]:
        key_id = key
        if not UUID.match(key):
            key_id = _pick_key(await client.api_keys(), key)["key_id"]
        return await client.revoke_api_key(key_id)

    result = trio.run(with_client, access, "token", body)
    if result.get("key_id") == access.creds.api_key_id:
        access.creds.forget_key()
        access.store.save(access.creds)
        note("It was the CLI's saved key: forgotten here too.")
    state = "was already revoked" if result.get("already_revoked") else "revoked"
    note(f"Key {result['key_id']} {state}.")


COMMANDS = [register, login, logout, whoami, keys]
