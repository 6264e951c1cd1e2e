"""Acting as a network member: how operator commands reach the swarm.

Some commands need a caller that is a *network member* (a peer id holding an
owner-signed certificate): ``network members`` and ``network remove``,
``metrics``, ``audit``, ``users set-*`` (``as_operator``) and the full
``peers`` listing. They act with the node home given by ``--home`` (env
``P2PINFER_HOME``; after ``p2pinfer up``, the up swarm's hub).

The CLI does not borrow the home's node key: a second libp2p host with a
running node's peer id would make the node seem to come and go to its
peers. It uses an **operator key** of its own, kept in the home:

- ``<home>/operator.key`` (mode 0600, created on first use);
- ``<home>/operator.cert``: its certificate, granting ``operator`` and no
  node role (an operator writes nothing to the ledger; it calls the methods
  that need the operator grant and acts ``as_operator``). A certificate
  without that grant (made before grants existed) is re-signed on the
  owner's machine and refused elsewhere.

On the network owner's machine (the home holds ``owner.key``) the CLI signs
that certificate itself. Elsewhere the owner admits the operator key like a
node: ``p2pinfer network info`` prints its peer id, ``p2pinfer network admit
PEER_ID --operator`` on the owner's machine prints a join token, and
``p2pinfer network join TOKEN`` saves it.

Each session opens with ``ledgerHello`` carrying the certificate (nodes
accept owner-signed documents from anyone), so the node knows the operator
at once, and anti-entropy spreads the certificate to every member.

Which node: ``--bootstrap`` (env ``P2PINFER_BOOTSTRAP``), else, in this
order until one answers: the home's running daemon (``<home>/daemon.json``,
written by ``p2pinfer daemon``), the swarm ``up`` saved for this home, the
bootstrap addresses of the home's ``network.json``, the swarm the CLI saved.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from p2pinfer.errors import ConfigError, NotMember, P2PInferError, PeerUnavailable
from p2pinfer.grants import OPERATOR

from .connect import quiet_logging, split_addrs, timeout_option
from .store import Credentials, CredentialStore, write_private

if TYPE_CHECKING:  # pragma: no cover
    from p2pinfer.discovery import Descriptor
    from p2pinfer.identity import Identity
    from p2pinfer.ledger.membership import NetworkInfo, SignedDoc

__all__ = [
    "DAEMON_FILE",
    "OPERATOR_CERT",
    "OPERATOR_KEY",
    "Operator",
    "OperatorAccess",
    "OperatorSession",
    "daemon_addrs",
    "home_option",
    "load_operator",
    "operator_access",
    "operator_targets",
    "resolve_home",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

OPERATOR_KEY = "operator.key"
OPERATOR_CERT = "operator.cert"
DAEMON_FILE = "daemon.json"
OPERATOR_CERT_DAYS = 365.0
CONNECT_TIMEOUT = 10.0


def resolve_home(home: Path | None, creds: Credentials | None = None) -> Path:
    """``--home`` / ``P2PINFER_HOME``, else the home saved by ``up``, else the
    default node home."""
    if home is not None:
        return home.expanduser()
    creds = creds if creds is not None else CredentialStore().load()
    if creds.home:
        return Path(creds.home)
    from p2pinfer.identity import default_home

    return default_home()


def no_network(home: Path) -> ConfigError:
    return ConfigError(f"{home} belongs to no network: create one with `p2pinfer network init` "
                       "or join one with `p2pinfer network join TOKEN` (or pass --home)")


@dataclass
class Operator:
    """The operator key of a home and its certificate."""

    home: Path
    network: NetworkInfo
    identity: Identity
    cert: SignedDoc

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


def _valid_cert(path: Path, network: NetworkInfo, peer_id: str) -> SignedDoc | None:
    from p2pinfer.ledger.membership import Certificate, decode_cert, parse_doc

    try:
        cert = decode_cert(path.read_text().strip())
        parsed = parse_doc(cert.to_wire(), network)
    except FileNotFoundError:
        return None
    except P2PInferError:
        return None
    if not isinstance(parsed, Certificate) or parsed.peer != peer_id:
        return None
    if OPERATOR not in parsed.roles or parsed.exp < time.time() + 3600:
        return None
    return cert


def load_operator(home: Path) -> Operator:
    """The home's operator key and a valid certificate for it (signed here
    when the home holds the owner key).

    Raises:
        ConfigError: the home belongs to no network.
        NotMember: no certificate, and no owner key to sign one.
    """
    from p2pinfer.identity import Identity
    from p2pinfer.ledger.membership import admit, encode_cert, load_network, load_owner

    network = load_network(home)
    if network is None:
        raise no_network(home)
    identity = Identity.load_or_create(home, name=OPERATOR_KEY)
    cert = _valid_cert(home / OPERATOR_CERT, network, identity.peer_id)
    if cert is None:
        owner = load_owner(home)
        if owner is None:
            raise NotMember(
                f"{home} holds no operator certificate granting operator, and no owner key; "
                "on the owner's "
                f"machine run `p2pinfer network admit {identity.peer_id} --operator`, then "
                "here `p2pinfer network join TOKEN`")
        cert = admit(owner, identity.peer_id, [OPERATOR], days=OPERATOR_CERT_DAYS)
        write_private(home / OPERATOR_CERT, encode_cert(cert) + "\n")
    return Operator(home, network, identity, cert)


def daemon_addrs(home: Path) -> list[str]:
    """Addresses of the daemon running from ``home``, if it runs."""
    try:
        data = json.loads((home / DAEMON_FILE).read_text())
    except (OSError, ValueError):
        return []
    pid = data.get("pid") if isinstance(data, dict) else None
    if not isinstance(pid, int):
        return []
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass  # it runs, as another user
    addrs = data.get("addrs")
    return [str(a) for a in addrs] if isinstance(addrs, list) else []


def operator_targets(home: Path, bootstrap: Sequence[str], creds: Credentials,
                     network: NetworkInfo) -> list[str]:
    """The nodes an operator session tries, in order (see the module docstring)."""
    if bootstrap:
        return split_addrs(bootstrap)
    out = daemon_addrs(home)
    if creds.home and Path(creds.home) == home:
        out += [a for a in creds.bootstrap if a not in out]
    out += [a for a in network.bootstrap if a not in out]
    # Last, the swarm the CLI saved (a node of another network refuses the hello).
    out += [a for a in creds.bootstrap if a not in out]
    return out


async def _close_host(host: Any) -> None:
    import trio

    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await host.close()
        except Exception:  # best effort: the connections die with the process anyway
            return


class OperatorSession:
    """A libp2p host with the operator key, connected to one member node.

    ``async with OperatorSession(op, targets) as s: await s.call("getMetrics")``
    """

    def __init__(self, operator: Operator, targets: Sequence[str]) -> None:
        self.operator = operator
        self.targets = list(targets)
        self.peer: str = ""
        self.descriptor: Descriptor | None = None
        self._rpc: Any = None
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> OperatorSession:
        import multiaddr
        import trio

        from p2pinfer.rpc import RPC_PROTOCOL, RpcClient, RpcServer, make_host
        from p2pinfer.rpc.host import guard_handler

        quiet_logging()
        if not self.targets:
            raise ConfigError(
                "no node to talk to: pass --bootstrap MULTIADDR, or run the home's node "
                f"(`p2pinfer daemon --home {self.operator.home}`) so its address is known")
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            host = make_host(self.operator.identity)
            await stack.enter_async_context(host.run(
                listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            # Leave cleanly: the node must see this peer id go at once, or the
            # next session with the same key finds a stale connection there.
            stack.push_async_callback(_close_host, host)
            # Nodes greet a member that connects (ledgerHello, ledgerSync): answer
            # them (with UnknownMethod, an empty server) so they leave us be
            # instead of finding a peer that refuses the protocol.
            server = RpcServer(is_member=lambda peer: False)
            host.set_stream_handler(RPC_PROTOCOL, guard_handler("rpc", server.handle_stream))
            self._rpc = await stack.enter_async_context(RpcClient.open(host))
            errors: list[str] = []
            for addr in self.targets:
                try:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        await self._hello(addr)
                    break
                except trio.TooSlowError:
                    errors.append(f"{addr}: no answer within {CONNECT_TIMEOUT:.0f} s")
                except P2PInferError as exc:
                    errors.append(exc.message if addr in exc.message else f"{addr}: {exc.message}")
            else:
                raise PeerUnavailable("no node of the network answered: " + "; ".join(errors))
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def _hello(self, addr: str) -> None:
        from p2pinfer.discovery import Descriptor

        peer = await self._rpc.connect(addr)
        reply = await self._rpc.call(peer, "ledgerHello", {
            "net": self.operator.network.network_id, "docs": [self.operator.cert.to_wire()]})
        if not reply.get("member"):
            raise NotMember(f"{peer} does not accept this operator certificate")
        self.peer = peer
        self.descriptor = Descriptor.from_wire(await self._rpc.call(peer, "getDescriptor"))

    async def __aexit__(self, *exc: Any) -> bool | None:
        stack, self._stack = self._stack, None
        return None if stack is None else await stack.__aexit__(*exc)

    async def call(self, method: str, params: Any = None, *, peer: str | None = None) -> Any:
        """Call ``method`` on the connected node (or on ``peer``)."""
        return await self._rpc.call(peer or self.peer, method, params)

    async def find(self, role: str) -> list[Descriptor]:
        """Member nodes with ``role``, as the connected node finds them."""
        from p2pinfer.discovery import Descriptor

        found: dict[str, Descriptor] = {}
        if self.descriptor is not None and role in self.descriptor.roles:
            found[self.peer] = self.descriptor
        for raw in await self.call("findPeers", {"role": role}):
            try:
                desc = Descriptor.from_wire(raw)
            except P2PInferError:
                continue
            found.setdefault(desc.peer_id, desc)
            self._remember(desc)
        return sorted(found.values(), key=lambda d: d.peer_id)

    def _remember(self, desc: Descriptor) -> None:
        from libp2p.peer.id import ID

        from p2pinfer.rpc.host import parse_multiaddr

        try:
            addrs = [parse_multiaddr(a).decapsulate(parse_multiaddr(f"/p2p/{desc.peer_id}"))
                     for a in desc.addrs]
            self._rpc.host.get_peerstore().add_addrs(ID.from_base58(desc.peer_id), addrs, 600)
        except Exception:  # an address we cannot parse is simply not dialled
            return

    async def call_role(self, role: str, method: str, params: Any = None) -> Any:
        """Call ``method`` on a node with ``role`` (the connected one if it has it)."""
        nodes = await self.find(role)
        if not nodes:
            raise PeerUnavailable(f"no node with the {role} role is up in the network")
        last: P2PInferError | None = None
        for desc in nodes:
            try:
                return await self.call(method, params, peer=desc.peer_id)
            except PeerUnavailable as exc:
                last = exc
        assert last is not None
        raise last

    async def membership_docs(self) -> list[Any]:
        """Every owner-signed document (certificates, removals) the node holds."""
        reply = await self.call("ledgerSync", {"vv": {}, "digest": b""})
        return list(reply.get("docs") or [])

    async def heads(self) -> dict[str, int]:
        """The connected node's version vector: author -> highest contiguous seq."""
        reply = await self.call("ledgerSync", {"vv": {}, "digest": b""})
        return dict(reply.get("vv") or {})


@dataclass
class OperatorAccess:
    """What an operator command was given: the home, the nodes to try and
    the timeout (see :func:`operator_access`)."""

    home: Path
    bootstrap: list[str]
    timeout: float
    creds: Credentials

    def operator(self) -> Operator:
        return load_operator(self.home)

    def session(self, operator: Operator | None = None) -> OperatorSession:
        """An (unopened) session as this home's operator."""
        op = operator or self.operator()
        return OperatorSession(op, operator_targets(self.home, self.bootstrap, self.creds,
                                                    op.network))

    async def run(self, fn: Callable[[OperatorSession], Awaitable[T]]) -> T:
        """Open a session and run ``fn(session)`` under the ``--timeout`` ceiling."""
        import trio

        with trio.fail_after(self.timeout):
            async with self.session() as session:
                return await fn(session)


def home_option(f: F) -> F:
    """``--home DIR`` (env P2PINFER_HOME)."""
    return click.option(
        "--home", type=click.Path(file_okay=False, path_type=Path), envvar="P2PINFER_HOME",
        help="Node home with the network's keys (env: P2PINFER_HOME; after `p2pinfer up`, "
             "the up swarm's hub).")(f)


def operator_access(f: F) -> F:
    """Add ``--home``, ``--bootstrap`` and ``--timeout`` to an operator
    command and pass it ``op=OperatorAccess(...)`` instead."""

    @functools.wraps(f)
    def wrapper(*args: Any, home: Path | None, bootstrap: tuple[str, ...], timeout: float,
                **kwargs: Any) -> Any:
        creds = CredentialStore().load()
        access = OperatorAccess(resolve_home(home, creds), split_addrs(bootstrap), timeout,
                                creds)
        return f(*args, op=access, **kwargs)

    wrapper = timeout_option(wrapper)
    wrapper = click.option(
        "-b", "--bootstrap", multiple=True, envvar="P2PINFER_BOOTSTRAP", metavar="MULTIADDR",
        help="A member node to talk to (repeatable; env: P2PINFER_BOOTSTRAP). Default: the "
             "home's running daemon, or the swarm saved by `p2pinfer up`.")(wrapper)
    wrapper = home_option(wrapper)
    return wrapper  # type: ignore[return-value]
