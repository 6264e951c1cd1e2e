"""The :class:`Ledger`: the store, membership and replication of one node.

Other packages use the ledger only through this class (see the package
docstring for the API). A ledger is built by :meth:`Ledger.for_node` inside
``Node.__init__`` (or :meth:`Ledger.open` without a node, e.g. in
benchmarks), and started with ``await nursery.start(ledger.run)`` before the
node dials anyone.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry

from ..config import ROLES, NodeConfig, Section
from ..errors import ConfigError, EmailTaken, RegistrationLost, StorageError, UsernameTaken
from ..identity import Identity
from . import queries
from .checkpoints import Checkpoints, CheckpointService
from .events import LOG_KINDS, MAX_REDACTS, Event, decode_trusted
from .gossip import Gossip, topic_for
from .logs import LogLane, LogService
from .membership import (
    Certificate,
    MemberInfo,
    NetworkInfo,
    Owner,
    SignedDoc,
    admit,
    create_network,
    import_join_token,
    load_member_cert,
    load_network,
    make_join_token,
    make_removal,
    parse_doc,
    save_member_cert,
    short,
)
from .metrics import LedgerMetrics
from .replication import AntiEntropy, LedgerService
from .store import IngestReport, Store


class LedgerHost(Protocol):
    """What the ledger needs of the node that runs it (:class:`p2pinfer.node.Node`
    provides it; the ledger never imports the node)."""

    config: NodeConfig
    identity: Identity
    registry: CollectorRegistry
    host: Any
    rpc: Any
    rpc_server: Any
    peer_id: str

    def connected_peers(self) -> list[str]: ...

__all__ = ["Ledger", "LedgerSettings"]

log = logging.getLogger(__name__)

WAL_CHECKPOINT_INTERVAL = 1.0  # seconds between WAL checkpoints (when written to)
BACKSTOP_PAGES = 20_000    # SQLite's own checkpoint while ours runs (~80 MB of log)
EXPIRY_FIRST = 60.0        # seconds after start before the first retention pass
EXPIRY_INTERVAL = 3600.0   # seconds between retention passes


@dataclass(frozen=True)
class LedgerSettings:
    """The ``[ledger]`` config table.

    Attributes:
        sync_interval: seconds between periodic anti-entropy rounds.
        sync_fanout: peers per periodic round.
        batch_size: events per pulled batch.
        pull_limit: events per ``ledgerPull`` call (the round repeats if more).
        synchronous: SQLite durability, ``"normal"`` or ``"full"``.
        gossip: publish and receive events on GossipSub (anti-entropy always runs).
        join_token: a join token to import on first start.
        self_network_days: certificate lifetime of an automatically created
            single-node network.
        restore_quorum: after a restore from backup, how many other member
            nodes must have told this node its own latest events before it
            writes again (-1: half of the other members with roles, rounded
            up, at least one; see :mod:`.backup`).
        log_replicas: how many members keep each gateway's request logs
            besides the gateway itself, chosen among the members granted
            auth or metrics (see :mod:`.logs`; 0: only the gateway).
        log_retention_days: request logs older than this are deleted
            (0: kept for ever).
        audit_retention_days: audit rows older than this are deleted
            (0: kept for ever).
        checkpoint_events: a member granted auth makes a signed checkpoint
            of the main lane's state after this many events (0: never; see
            :mod:`.checkpoints`).
        checkpoint_catchup: a node at least this many events behind a
            peer's checkpoint loads it instead of replaying the events.
        prune_after_days: events within a checkpoint this old are deleted
            (-1: never).
    """

    sync_interval: float = 5.0
    sync_fanout: int = 3
    batch_size: int = 500
    pull_limit: int = 50_000
    synchronous: str = "normal"
    gossip: bool = True
    join_token: str | None = None
    self_network_days: float = 3650.0
    restore_quorum: int = -1
    log_replicas: int = 2
    log_retention_days: float = 30.0
    audit_retention_days: float = 365.0
    checkpoint_events: int = 100_000
    checkpoint_catchup: int = 10_000
    prune_after_days: float = 1.0

    @classmethod
    def from_section(cls, section: Section) -> LedgerSettings:
        """Read and check the ``[ledger]`` table (an unknown key is an error)."""
        section.reject_unknown({f.name for f in fields(cls)})
        return cls(
            sync_interval=section.get_float("sync_interval", 5.0, minimum=0.05, maximum=3600),
            sync_fanout=section.get_int("sync_fanout", 3, minimum=1, maximum=64),
            batch_size=section.get_int("batch_size", 500, minimum=1, maximum=10_000),
            pull_limit=section.get_int("pull_limit", 50_000, minimum=100, maximum=1_000_000),
            synchronous=section.get_str("synchronous", "normal", choices=("normal", "full")),
            gossip=section.get_bool("gossip", True),
            join_token=section.get_optional_str("join_token"),
            self_network_days=section.get_float("self_network_days", 3650.0, minimum=1.0),
            restore_quorum=section.get_int("restore_quorum", -1, minimum=-1, maximum=10_000),
            log_replicas=section.get_int("log_replicas", 2, minimum=0, maximum=16),
            log_retention_days=section.get_float("log_retention_days", 30.0, minimum=0,
                                                 maximum=36_500),
            audit_retention_days=section.get_float("audit_retention_days", 365.0, minimum=0,
                                                   maximum=36_500),
            checkpoint_events=section.get_int("checkpoint_events", 100_000, minimum=0,
                                              maximum=1_000_000_000),
            checkpoint_catchup=section.get_int("checkpoint_catchup", 10_000, minimum=0,
                                               maximum=1_000_000_000),
            prune_after_days=section.get_float("prune_after_days", 1.0, minimum=-1,
                                               maximum=36_500),
        )


class Ledger:
    """A node's replicated ledger.

    Args:
        identity: the node key (authors and signs this node's events).
        store: the opened store.
        own_cert: this node's certificate (owner-signed).
        settings: the ``[ledger]`` settings.
        host, rpc, peers: the libp2p host, the RPC client and a callable
            listing connected peer ids; without them the ledger is local only
            (:meth:`run` then only waits).
    """

    def __init__(
        self,
        identity: Identity,
        store: Store,
        own_cert: SignedDoc,
        *,
        settings: LedgerSettings | None = None,
        host: Any = None,
        rpc: Any = None,
        peers: Callable[[], list[str]] | None = None,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.store = store
        self.network: NetworkInfo = store.network
        self.settings = settings or LedgerSettings()
        self.metrics = store.metrics
        self.own_cert = own_cert
        self.host = host
        self.rpc = rpc
        self._changed = trio.Event()
        self._subscribers: list[Callable[[list[Event]], None]] = []
        self.gossip: Gossip | None = None
        if host is not None and self.settings.gossip:
            self.gossip = Gossip(host, topic_for(self.network_id), deliver=self._on_gossip,
                                 accept_from=self.is_member,
                                 on_drop=self.metrics.gossip_dropped.inc)
        self.anti_entropy: AntiEntropy | None = None
        if rpc is not None:
            self.anti_entropy = AntiEntropy(self, rpc, peers or (lambda: []))
        self.service = LedgerService(self)
        self.logs = LogLane(self, rpc, peers or (lambda: []))
        self.log_service = LogService(self)
        self.checkpoints = Checkpoints(self, rpc)
        self.checkpoint_service = CheckpointService(self)
        store.listeners.append(self._on_applied)
        # After a restore from backup: what peers said our own head is (see .backup).
        self._heard: dict[str, int] = {}
        if store.fence is None:
            self._ensure_admitted()
        else:
            log.warning("this node's ledger was restored from a backup: it writes nothing "
                        "until %d member node(s) have told it its own latest events",
                        self.restore_quorum())
            self._check_fence()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def for_node(cls, node: LedgerHost) -> Ledger:
        """The ledger of ``node``: finds or creates its network under the node
        home, opens the store at ``config.database_path`` and registers the
        ledger RPC methods on ``node.rpc_server``."""
        config = node.config
        settings = LedgerSettings.from_section(config.section("ledger"))
        network, cert = _network_of(config.home, node.identity, settings)
        store = Store(config.database_path, network, metrics=LedgerMetrics(node.registry),
                      synchronous=settings.synchronous)
        ledger = cls(node.identity, store, cert, settings=settings, host=node.host,
                     rpc=node.rpc, peers=node.connected_peers)
        node.rpc_server.register(ledger.service)
        node.rpc_server.register(ledger.log_service)
        node.rpc_server.register(ledger.checkpoint_service)
        roles = ledger.store.membership.roles(node.peer_id)
        missing = [r for r in config.roles if r not in roles]
        if missing:
            log.warning("this node runs roles %s that its certificate does not grant; "
                        "their ledger writes will be refused", ", ".join(missing))
        return ledger

    @classmethod
    def open(
        cls,
        path: Path | str,
        identity: Identity,
        network: NetworkInfo,
        own_cert: SignedDoc,
        *,
        registry: CollectorRegistry | None = None,
        settings: LedgerSettings | None = None,
    ) -> Ledger:
        """A local-only ledger (no networking) on the store at ``path``."""
        settings = settings or LedgerSettings()
        store = Store(path, network, metrics=LedgerMetrics(registry),
                      synchronous=settings.synchronous)
        return cls(identity, store, own_cert, settings=settings)

    def _ensure_admitted(self) -> None:
        """Carry our own certificate in one of our events, so it replicates."""
        cert = parse_doc(self.own_cert.to_wire(), self.network)
        if not isinstance(cert, Certificate) or cert.peer != self.peer_id:
            raise ConfigError(f"member.cert is not a certificate for {self.peer_id}")
        if self.store.membership.cutoff(self.peer_id) is not None:
            return  # removed: it may write nothing (the node says so as it starts)
        rows = self.store.conn.execute(
            "SELECT raw FROM events WHERE author=? AND kind='member.admitted'",
            (self.peer_id,)).fetchall()
        for (raw,) in rows:
            if SignedDoc(**decode_trusted(raw).body["cert"]).hash == self.own_cert.hash:
                return
        self.append("member.admitted", {"cert": self.own_cert.to_wire()})

    # -- identity and membership ----------------------------------------------------------
    @property
    def network_id(self) -> str:
        return self.network.network_id

    def is_member(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is an admitted, unexpired, unremoved member
        (an in-memory lookup)."""
        return self.store.membership.is_member(peer_id)

    def grants_of(self, peer_id: str) -> frozenset[str]:
        """What a member may do (its certificates' grants); empty for a
        non-member or a removed node."""
        return self.store.membership.grants(peer_id)

    def roles_of(self, peer_id: str) -> frozenset[str]:
        return self.store.membership.roles(peer_id)

    def members(self) -> list[MemberInfo]:
        return self.store.membership.members()

    def own_docs(self) -> list[SignedDoc]:
        docs = self.store.membership.docs_of(self.peer_id)
        return docs or [self.own_cert]

    def admit_member(self, owner: Owner, peer_id: str, roles: Sequence[str], *,
                     days: float = 365.0, bootstrap: Sequence[str] = ()) -> str:
        """Admit ``peer_id`` (this node must hold the owner key) and return
        its join token; the certificate is also published in the ledger."""
        cert = admit(owner, peer_id, roles, days=days)
        self.append("member.admitted", {"cert": cert.to_wire()})
        return make_join_token(self.network, cert, bootstrap)

    def remove_member(self, owner: Owner, peer_id: str) -> Event:
        """Remove ``peer_id``: its events after the last one this node has
        seen become void on every node."""
        removal = make_removal(owner, peer_id, self.store.heads.get(peer_id, 0))
        return self.append("member.removed", {"removal": removal.to_wire()})

    # -- writing ------------------------------------------------------------------------
    def append(self, kind: str, body: dict[str, Any]) -> Event:
        """Sign, apply locally (one transaction) and publish one event.

        Raises:
            InvalidEvent: malformed body. UnauthorizedAuthor / KindNotAllowed:
            this node may not write ``kind``. StorageError: nothing was written.
        """
        return self.store.append(self.identity, [(kind, body)])[0]

    def append_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> list[Event]:
        """Like :meth:`append` for several events, all in one transaction."""
        return self.store.append(self.identity, items)

    def erase_user(self, user_id: str) -> list[Event]:
        """Erase a user everywhere: append ``user.erased`` listing
        every registration and password change of ``user_id`` this node
        knows of and no erasure listed yet, held or folded into a checkpoint
        (several ``user.erased`` events in one transaction when there
        are more than :data:`~.events.MAX_REDACTS`), so that every node drops
        the user from ``users`` and replaces those events by stubs with no
        personal data (nor password hash). Usage totals are unchanged.

        A registration of the same id that this node has not seen yet (written
        concurrently elsewhere) is not listed; its username and email never
        reach ``users`` (the id is erased), but its stored event keeps them
        until a later erasure lists it.
        """
        redacts = [{"author": author, "seq": seq, "hash": digest}
                   for author, seq, digest in self.store.conn.execute(
                       "SELECT author, seq, hash FROM personal_events WHERE user_id=? "
                       "ORDER BY kind='user.updated', hlc", (user_id,)).fetchall()]
        erased_at = time.time()
        items: list[tuple[str, dict[str, Any]]] = []
        for i in range(0, max(1, len(redacts)), MAX_REDACTS):
            body: dict[str, Any] = {"user_id": user_id, "erased_at": erased_at}
            if redacts[i:i + MAX_REDACTS]:
                body["redacts"] = redacts[i:i + MAX_REDACTS]
            items.append(("user.erased", body))
        return self.append_many(items)

    # -- restore fence (see .backup) -----------------------------------------------------
    @property
    def fenced(self) -> bool:
        """True while a node restored from a backup may not write yet."""
        return self.store.fence is not None

    def restore_quorum(self) -> int:
        """How many other members must report this node's own head before the
        restore fence lifts (0: none to ask)."""
        fence = self.store.fence or {}
        wanted = fence.get("quorum")
        if not isinstance(wanted, int) or wanted < 0:
            wanted = self.settings.restore_quorum
        now = time.time()
        others = sum(1 for m in self.members()
                     if m.peer_id != self.peer_id and m.roles and m.active(now))
        if wanted < 0:
            wanted = (others + 1) // 2
        return min(wanted, others)

    def heard_version(self, peer: str, vv: Mapping[str, int], own_max: int | None,
                      own_log_max: int | None = None) -> None:
        """A member told us its version vector (and the highest of our own
        events it holds, held ones included, and of our log-lane events):
        while fenced, remember what it knows of our sequence; a log-lane
        event of ours that we no longer hold (a restore from a backup)
        moves our log sequence past it at once."""
        if not self.is_member(peer):
            return
        if own_log_max is not None and own_log_max > self.store.log_heads.get(self.peer_id, 0):
            log.warning("%s holds this node's request logs up to #%d, past this store's #%d "
                        "(restored from a backup?): numbering new ones after it",
                        short(peer), own_log_max, self.store.log_heads.get(self.peer_id, 0))
            self.store.raise_log_head(self.peer_id, own_log_max)
        if self.store.fence is None:
            return
        self._heard[peer] = max(vv.get(self.peer_id, 0), own_max or 0)
        self._check_fence()

    def _check_fence(self) -> None:
        """Lift the restore fence once enough members have reported our own
        head and we have applied everything up to the highest of them."""
        if self.store.fence is None:
            return
        quorum = self.restore_quorum()
        known = max(self._heard.values(), default=0)
        if len(self._heard) < quorum or self.store.heads.get(self.peer_id, 0) < known:
            return
        self.store.lift_fence()
        log.warning("restore fence lifted: %d member(s) reported this node's events up to "
                    "#%d; writing again from #%d", len(self._heard), known,
                    self.store.heads.get(self.peer_id, 0) + 1)
        self._heard.clear()
        self._ensure_admitted()

    def fence_status(self) -> dict[str, Any] | None:
        """None when not fenced; else the fence, who reported and what is needed."""
        fence = self.store.fence
        if fence is None:
            return None
        return {**fence, "heard": dict(self._heard), "quorum_needed": self.restore_quorum(),
                "own_head": self.store.heads.get(self.peer_id, 0)}

    def ingest(self, raws: Sequence[bytes], *, source: str = "sync",
               origin: str | None = None) -> IngestReport:
        """Apply events received from a peer (checked; refusals are counted)."""
        report = self.store.ingest(raws, source=source)
        if report.gaps and self.anti_entropy is not None and origin is not None:
            self.anti_entropy.hint(origin, report.gaps)
        return report

    def _on_gossip(self, raws: list[bytes], origin: str) -> None:
        try:
            self.ingest(raws, source="gossip", origin=origin)
        except StorageError:
            log.exception("could not store gossiped events from %s", short(origin))

    def _on_applied(self, events: list[Event], source: str) -> None:
        if source == "local":
            if self.gossip is not None:
                for ev in events:
                    if ev.kind not in LOG_KINDS:  # the log lane is pulled by its keepers
                        self.gossip.publish_nowait(ev.raw)
        else:
            now = time.time()
            for ev in events:
                self.metrics.lag.observe(max(0.0, now - ev.wall))
        if self.store.compact_due:  # an erasure was applied: leave no copy in the WAL
            self.store.compact()
        if self.store.fence is not None:
            self._check_fence()
        self._changed.set()
        self._changed = trio.Event()
        for subscriber in list(self._subscribers):
            try:
                subscriber(events)
            except Exception:
                log.exception("ledger subscriber failed")

    def subscribe(self, callback: Callable[[list[Event]], None]) -> None:
        """Call ``callback(events)`` after every committed batch (local or
        remote). It runs on the trio thread and must not block."""
        self._subscribers.append(callback)

    # -- queries ------------------------------------------------------------------------
    def user(self, user_id: str) -> queries.User | None:
        return queries.user_by_id(self.store.conn, user_id)

    def user_by_username(self, username: str) -> queries.User | None:
        return queries.user_by_username(self.store.conn, username)

    def user_by_email(self, email: str) -> queries.User | None:
        return queries.user_by_email(self.store.conn, email)

    def registration(self, user_id: str) -> queries.Registration | None:
        return queries.registration(self.store.conn, user_id)

    def check_available(self, username: str, email: str) -> None:
        """Raise UsernameTaken / EmailTaken if a user already holds either
        (as far as this node knows)."""
        if self.user_by_username(username) is not None:
            raise UsernameTaken(f"username {username!r} is taken")
        if self.user_by_email(email) is not None:
            raise EmailTaken("email is already registered")

    def check_registration(self, user_id: str) -> None:
        """Raise :class:`~p2pinfer.errors.RegistrationLost` if a concurrent
        registration of the same username or email won over ``user_id``."""
        reg = self.registration(user_id)
        if reg is not None and reg.status == "lost":
            raise RegistrationLost(
                "a concurrent registration of the same username or email won",
                data={"user_id": user_id, "winner": reg.lost_to})

    def api_key(self, public_id: str) -> queries.ApiKey | None:
        """The API key with this public id (one indexed query)."""
        return queries.api_key_by_public_id(self.store.conn, public_id)

    def api_key_by_id(self, key_id: str) -> queries.ApiKey | None:
        return queries.api_key_by_id(self.store.conn, key_id)

    def api_keys_of(self, user_id: str) -> list[queries.ApiKey]:
        return queries.api_keys_of_user(self.store.conn, user_id)

    def usage(self, *, user_id: str | None = None, api_key_id: str | None = None,
              since: str | None = None, until: str | None = None) -> list[queries.UsageRow]:
        return queries.usage(self.store.conn, user_id=user_id, api_key_id=api_key_id,
                             since=since, until=until)

    def usage_in_hour(self, hour: int, *, user_id: str | None = None,
                      api_key_id: str | None = None,
                      exclude_gateway: str | None = None) -> tuple[int, int]:
        return queries.usage_in_hour(self.store.conn, hour, user_id=user_id,
                                     api_key_id=api_key_id, exclude_gateway=exclude_gateway)

    def request_logs(self, *, user_id: str | None = None,
                     limit: int = 100) -> list[queries.RequestLog]:
        return queries.request_logs(self.store.conn, user_id=user_id, limit=limit)

    async def gather_request_logs(self, user_id: str, *,
                                  limit: int = 100) -> list[queries.RequestLog]:
        """``user_id``'s newest request log rows from this node and every
        connected member that may hold some (see :mod:`.logs`)."""
        return await self.logs.gather(user_id, limit)

    def has_request_log(self, row_id: str) -> bool:
        """Whether the request log row ``row_id`` is in this node's ledger."""
        return queries.request_log_exists(self.store.conn, row_id)

    def audit(self, *, actor: str | None = None, action: str | None = None,
              since: float | None = None, limit: int = 100) -> list[queries.AuditRow]:
        return queries.audit_rows(self.store.conn, actor=actor, action=action, since=since,
                                  limit=limit)

    def is_session_revoked(self, jti: str) -> bool:
        return queries.is_session_revoked(self.store.conn, jti)

    # -- convergence --------------------------------------------------------------------
    def version_vector(self) -> dict[str, int]:
        return self.store.version_vector()

    def covers(self, vv: Mapping[str, int]) -> bool:
        heads = self.store.heads
        return all(heads.get(a, 0) >= s for a, s in vv.items())

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is re-checked after every
        committed batch. Bound it with ``trio.fail_after``."""
        while True:
            changed = self._changed
            if predicate():
                return
            await changed.wait()

    async def wait_for_version(self, vv: Mapping[str, int]) -> None:
        """Wait until this node has applied everything in ``vv``."""
        await self.wait_until(lambda: self.covers(vv))

    async def wait_for_event(self, author: str, seq: int) -> None:
        await self.wait_for_version({author: seq})

    def statistics(self) -> dict[str, Any]:
        newest = self.store.newest_checkpoint()
        return {
            "network_id": self.network_id,
            "events": self.store.count_events(),
            "held": self.store.held_count,
            "authors": len(self.store.heads),
            "members": sum(1 for m in self.members() if m.active(time.time())),
            "gossip_published": self.gossip.published if self.gossip else 0,
            "gossip_received": self.gossip.received if self.gossip else 0,
            "sync_rounds": self.anti_entropy.rounds if self.anti_entropy else 0,
            # events the newest checkpoint held here covers; events pruned
            "checkpoint_events": newest.events if newest is not None else 0,
            "pruned_to": sum(self.store.floor.values()),
            "fenced": self.fenced,
        }

    # -- running ------------------------------------------------------------------------
    def on_peer_connected(self, peer_id: str) -> None:
        """A connection opened: greet the peer and sync soon (non-blocking).

        Only peers that are known members or that this node dialled are
        greeted: clients (non-members that dial a gateway) serve no RPC, and
        opening a stream they cannot answer would disturb their connection.
        A member that dials us greets us itself."""
        if self.anti_entropy is None or peer_id == self.peer_id:
            return
        if self.is_member(peer_id) or self._dialled(peer_id):
            self.anti_entropy.connected(peer_id)

    def _dialled(self, peer_id: str) -> bool:
        """Whether this node opened (one of) its connections to ``peer_id``."""
        if self.host is None:
            return False
        from libp2p.peer.id import ID

        try:
            conns = self.host.get_network().connections.get(ID.from_base58(peer_id), [])
        except Exception:  # not a peer id libp2p can parse
            return False
        for conn in conns:
            direction = getattr(conn, "direction", None)  # an IntEnum in py-libp2p 0.8.1
            if str(getattr(direction, "name", direction)).lower() == "outbound":
                return True
        return False

    def request_sync(self, peer_id: str) -> None:
        """Run an anti-entropy round with ``peer_id`` now (non-blocking)."""
        if self.anti_entropy is not None and peer_id != self.peer_id:
            self.anti_entropy.request(peer_id)

    def hint_sync(self, peer_id: str, want: Mapping[str, int]) -> None:
        """``peer_id`` has events up to ``want`` that we lack: sync soon unless
        gossip brings them first (rate-limited per peer)."""
        if self.anti_entropy is not None and peer_id != self.peer_id:
            self.anti_entropy.hint(peer_id, want)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start GossipSub, then anti-entropy, and checkpoint the store's
        write-ahead log from a thread; run until cancelled."""
        async with trio.open_nursery() as nursery:
            if self.gossip is not None:
                await nursery.start(self.gossip.run)
            if self.anti_entropy is not None:
                await nursery.start(self.anti_entropy.run)
                await nursery.start(self.logs.run)
            nursery.start_soon(self._wal_checkpoints)
            nursery.start_soon(self._expiry)
            nursery.start_soon(self.checkpoints.run)
            task_status.started()
            await trio.sleep_forever()

    async def _wal_checkpoints(self) -> None:
        """Checkpoint in a worker thread, every :data:`WAL_CHECKPOINT_INTERVAL`
        seconds in which something was committed, so that commits on the
        event loop never do it (SQLite's automatic checkpoint stays as a
        backstop at :data:`BACKSTOP_PAGES`)."""
        store = self.store
        store.set_autocheckpoint(BACKSTOP_PAGES)
        seen = store.commits
        try:
            while True:
                await trio.sleep(WAL_CHECKPOINT_INTERVAL)
                if store.commits == seen:
                    continue
                seen = store.commits
                try:
                    await trio.to_thread.run_sync(store.wal_checkpoint)
                except StorageError as exc:
                    log.warning("%s", exc)
        finally:
            with contextlib.suppress(sqlite3.Error):
                store.set_autocheckpoint(1000)

    def expire(self, now: float | None = None) -> dict[str, int]:
        """Delete request logs and audit rows past their retention (see
        :class:`LedgerSettings`); returns how many rows of each went."""
        now = time.time() if now is None else now
        logs, audit = self.settings.log_retention_days, self.settings.audit_retention_days
        gone = self.store.expire(logs_before=now - logs * 86400 if logs else None,
                                 audit_before=now - audit * 86400 if audit else None)
        if any(gone.values()):
            log.info("retention: deleted %d request log events, %d request log rows and "
                     "%d audit rows", gone["log_events"], gone["request_logs"], gone["audit"])
        return gone

    async def _expiry(self) -> None:
        """:meth:`expire` shortly after start, then every :data:`EXPIRY_INTERVAL`."""
        await trio.sleep(EXPIRY_FIRST)
        while True:
            try:
                self.expire()
            except StorageError as exc:
                log.warning("retention: %s", exc)
            await trio.sleep(EXPIRY_INTERVAL)

    def close(self) -> None:
        self.store.close()


def _network_of(home: Path, identity: Identity,
                settings: LedgerSettings) -> tuple[NetworkInfo, SignedDoc]:
    """This home's network and certificate, joining or creating one if needed."""
    network = load_network(home)
    cert = load_member_cert(home)
    if settings.join_token and (network is None or cert is None):
        network = import_join_token(home, settings.join_token, peer_id=identity.peer_id)
        cert = load_member_cert(home)
        log.info("joined network %s with the configured join token", network.network_id)
    if network is None:
        owner = create_network(home, name=f"network of {short(identity.peer_id)}")
        network = owner.network
        cert = admit(owner, identity.peer_id, ROLES, days=settings.self_network_days)
        save_member_cert(home, cert)
        log.warning(
            "no network configured: created network %s with this node as its only member "
            "(all roles). The owner key is %s: keep it safe, it admits and removes nodes. "
            "To join another network instead, import a join token.",
            network.network_id, home / "owner.key")
    if cert is None:
        raise ConfigError(
            f"{home}/member.cert is missing: this node has no certificate for network "
            f"{network.network_id}; import a join token from the network owner")
    return network, cert
