"""How a user command reaches the swarm, and with which credential.

**Where.** In this order:

1. ``--bootstrap MULTIADDR`` (repeatable; env ``P2PINFER_BOOTSTRAP``, comma
   or space separated): peer-to-peer, as a non-member client peer with a
   Noise-encrypted libp2p host of its own;
2. ``--url URL`` (env ``P2PINFER_URL``): HTTP to a node with the web role;
3. neither: the swarm that ``p2pinfer login`` or ``p2pinfer up`` saved.

**Who.** ``--api-key`` (env ``P2PINFER_API_KEY``), else the saved API key,
else the saved session token, which is refreshed (and saved again) when it
is about to expire. Saved credentials go only to the swarm they were saved
for: with an explicit address of another swarm, only ``--api-key`` is sent.

Commands take these options through :func:`swarm_access`, which hands them
a :class:`SwarmAccess`; they then ``trio.run`` their body and open an SDK
:class:`~p2pinfer.client.Client` with :meth:`SwarmAccess.client`.
Operator commands (acting as a network member) use :mod:`.operator` instead.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from p2pinfer.errors import AuthenticationRequired, TokenExpired

from .errors import EXIT_USAGE, CliError
from .store import Credentials, CredentialStore

if TYPE_CHECKING:  # pragma: no cover
    from p2pinfer.client import Client

__all__ = ["SwarmAccess", "quiet_logging", "split_addrs", "swarm_access", "timeout_option",
           "with_client"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# Refresh a saved session this many seconds before it expires.
REFRESH_MARGIN = 60.0
DEFAULT_TIMEOUT = 60.0
NO_SWARM = ("no swarm to talk to: pass --bootstrap MULTIADDR (peer-to-peer) or --url URL "
            "(a web node), or run `p2pinfer up` for a local swarm")


def quiet_logging() -> None:
    """Keep library log records off the terminal of a client command.

    py-libp2p's loggers (and ours) have no handler in a CLI process, so
    Python would print their warnings on stderr; the CLI reports failures
    through its own error messages instead. (``daemon`` and ``up`` configure
    logging themselves.)
    """
    import logging

    import libp2p  # noqa: F401  (its import resets the "libp2p" logger: import first)

    for name in ("", "libp2p"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())


def split_addrs(values: Sequence[str]) -> list[str]:
    """Multiaddrs given as repeated options and/or comma/space separated lists."""
    out: list[str] = []
    for value in values:
        for part in re.split(r"[,\s]+", value):
            if part and part not in out:
                out.append(part)
    return out


def _check_addrs(addrs: list[str]) -> None:
    for addr in addrs:
        if not addr.startswith("/") or "/p2p/" not in addr:
            raise CliError(f"--bootstrap: {addr!r} is not a multiaddr ending in /p2p/<peer id> "
                           "(e.g. /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...)", EXIT_USAGE)


def _check_url(url: str) -> str:
    if not re.match(r"^https?://[^/\s]+", url):
        raise CliError(f"--url: {url!r} is not an http:// or https:// URL", EXIT_USAGE)
    return url.rstrip("/")


def _peer_ids(addrs: Sequence[str]) -> set[str]:
    return {a.rsplit("/p2p/", 1)[1] for a in addrs if "/p2p/" in a}


@dataclass
class SwarmAccess:
    """The swarm a command talks to and the credentials it may use."""

    store: CredentialStore
    creds: Credentials
    bootstrap: list[str]
    url: str | None
    timeout: float
    api_key: str | None = None
    saved_target: bool = True
    ca_file: str | None = None

    @classmethod
    def from_options(cls, bootstrap: Sequence[str] = (), url: str | None = None,
                     timeout: float = DEFAULT_TIMEOUT, api_key: str | None = None,
                     store: CredentialStore | None = None) -> SwarmAccess:
        """Resolve ``--bootstrap`` / ``--url`` against the saved credentials."""
        store = store or CredentialStore()
        creds = store.load()
        addrs = split_addrs(bootstrap)
        _check_addrs(addrs)
        url = _check_url(url) if url else None
        saved = not addrs and not url
        if saved:
            addrs, url = list(creds.bootstrap), creds.url
        elif not (_peer_ids(addrs) & _peer_ids(creds.bootstrap)
                  or (url is not None and url == creds.url)):
            # Another swarm than the saved one: its credentials stay home.
            creds = Credentials()
        return cls(store, creds, addrs, url, timeout, api_key or None, saved)

    @property
    def where(self) -> str:
        """A short description of the target, for messages."""
        if self.bootstrap:
            return self.bootstrap[0] + (f" (+{len(self.bootstrap) - 1})"
                                        if len(self.bootstrap) > 1 else "")
        return self.url or "nowhere"

    def require_swarm(self) -> None:
        if not self.bootstrap and not self.url:
            raise CliError(NO_SWARM, EXIT_USAGE)

    def client_kwargs(self, credential: str = "any") -> dict[str, Any]:
        """Keyword arguments for an SDK client of the target.

        Args:
            credential: ``"any"`` (API key, else session token), ``"token"``
                (a session token is required), ``"key"`` (an API key is
                required) or ``"none"``.

        Raises:
            AuthenticationRequired: the credential asked for is not there.
        """
        self.require_swarm()
        api_key = token = None
        if credential in ("any", "key"):
            api_key = self.api_key or self.creds.api_key
        if credential == "token" or (credential == "any" and not api_key):
            token = self.creds.token
            if token is None and credential == "token":
                raise AuthenticationRequired("no saved session")
        if credential == "key" and not api_key:
            raise AuthenticationRequired("no API key")
        if credential == "any" and not (api_key or token):
            raise AuthenticationRequired("no API key and no saved session")
        target: dict[str, Any] = ({"bootstrap": self.bootstrap} if self.bootstrap
                                  else {"base_url": self.url})
        if self.bootstrap and self.creds.network:
            target["network"] = self.creds.network
        if self.ca_file:  # HTTPS certificates are checked against it (always checked)
            target["verify"] = self.ca_file
        return {**target, "api_key": api_key, "token": token}

    def client(self, credential: str = "any") -> Client:
        """An (unopened) SDK client for the target (see :meth:`client_kwargs`)."""
        from p2pinfer.client import Client

        quiet_logging()
        return Client(**self.client_kwargs(credential))

    def uses_saved_session(self, client: Client) -> bool:
        return bool(client.token) and client.token == self.creds.token

    async def fresh_session(self, client: Client, *, force: bool = False) -> None:
        """Refresh the saved session if it expires soon (or ``force``) and save
        the new tokens. A no-op for API keys."""
        if not self.uses_saved_session(client) or not self.creds.refresh_token:
            return
        expires = self.creds.expires_at
        if not force and (expires is None or expires - time.time() > REFRESH_MARGIN):
            return
        session = await client.refresh(self.creds.refresh_token)
        self.save_session(session)

    def save_session(self, session: dict[str, Any]) -> None:
        """Store a session (from login or refresh) with this target."""
        user = session.get("user") or {}
        self.creds.token = str(session["token"])
        self.creds.refresh_token = session.get("refresh_token")
        self.creds.expires_at = session.get("expires_at")
        self.creds.username = user.get("username", self.creds.username)
        self.creds.user_id = user.get("user_id", self.creds.user_id)
        self.remember_target()
        self.store.save(self.creds)

    def remember_target(self) -> None:
        """Make this target the saved swarm (``login`` does this)."""
        if not self.saved_target:
            self.creds.bootstrap, self.creds.url = list(self.bootstrap), self.url
            self.creds.saved_by = self.creds.saved_by or "login"

    async def call(self, client: Client, fn: Callable[[Client], Awaitable[T]]) -> T:
        """Run ``fn(client)`` under the ``--timeout`` ceiling (``fn`` may lift
        it with :meth:`lift_deadline`, e.g. once tokens flow); a saved session
        that expired is refreshed once and the call repeated."""
        import trio

        with trio.fail_after(self.timeout) as scope:
            self._scope = scope
            await self.fresh_session(client)
            try:
                return await fn(client)
            except TokenExpired:
                if not self.uses_saved_session(client) or not self.creds.refresh_token:
                    raise
                await self.fresh_session(client, force=True)
                return await fn(client)

    def lift_deadline(self) -> None:
        """Drop the ``--timeout`` ceiling of the running :meth:`call`."""
        scope = getattr(self, "_scope", None)
        if scope is not None:
            scope.deadline = math.inf


def timeout_option(f: F) -> F:
    """``--timeout SECONDS`` (env P2PINFER_TIMEOUT)."""
    return click.option(
        "--timeout", type=click.FloatRange(min=0.1), default=DEFAULT_TIMEOUT,
        show_default=True, envvar="P2PINFER_TIMEOUT",
        help="Seconds to wait for the swarm (env: P2PINFER_TIMEOUT).")(f)


def swarm_access(*, api_key: bool = True) -> Callable[[F], F]:
    """Add ``--bootstrap``, ``--url``, ``--timeout`` (and ``--api-key``) to a
    command, and pass it ``access=SwarmAccess(...)`` instead."""

    def decorator(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, bootstrap: tuple[str, ...], url: str | None, timeout: float,
                    ca_file: str | None, **kwargs: Any) -> Any:
            key = kwargs.pop("api_key", None)
            access = SwarmAccess.from_options(bootstrap, url, timeout, key)
            access.ca_file = ca_file
            return f(*args, access=access, **kwargs)

        wrapper = timeout_option(wrapper)
        wrapper = click.option(
            "--ca-file", envvar="P2PINFER_CA_FILE", metavar="PEM",
            type=click.Path(exists=True, dir_okay=False),
            help="CA certificate(s) to check an https:// --url against, e.g. a node's "
                 "self-signed tls/ca.pem (env: P2PINFER_CA_FILE). Certificates are "
                 "always checked.")(wrapper)
        if api_key:
            wrapper = click.option(
                "--api-key", envvar="P2PINFER_API_KEY", metavar="KEY",
                help="API key to use instead of the saved one (env: P2PINFER_API_KEY).")(wrapper)
        wrapper = click.option(
            "--url", envvar="P2PINFER_URL", metavar="URL",
            help="A web node's URL, to talk HTTP (env: P2PINFER_URL).")(wrapper)
        wrapper = click.option(
            "-b", "--bootstrap", multiple=True, envvar="P2PINFER_BOOTSTRAP", metavar="MULTIADDR",
            help="A node to dial, /ip4/.../tcp/.../p2p/<peer id> (repeatable; "
                 "env: P2PINFER_BOOTSTRAP). Default: the swarm saved by login or up.")(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorator


async def with_client(access: SwarmAccess, credential: str,
                      fn: Callable[[Client], Awaitable[T]]) -> T:
    """Open a client for ``access`` and run ``fn`` with it (see :meth:`SwarmAccess.call`)."""
    async with access.client(credential) as client:
        result = await access.call(client, fn)
        # pin the saved swarm's network once a node proved it belongs to it
        if (client.network and access.bootstrap and access.creds.has_swarm
                and not access.creds.network):
            access.creds.network = client.network
        return result
