"""The ledger field the auth role added: ``users.is_admin`` (``user.updated``
carries it; last writer wins by rank, whatever order events arrive in)."""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.identity import Identity
from p2pinfer.ledger import Store, membership, queries
from p2pinfer.ledger.clock import hlc_from_wall
from p2pinfer.ledger.events import Event, sign_event

T0 = float(int(time.time()) - 3600)
USER = str(uuid.UUID(int=7, version=4))


def build() -> tuple[membership.NetworkInfo, list[object], list[Event]]:
    owner_id = Identity.generate()
    network = membership.NetworkInfo(membership.network_id_for(owner_id.public_key),
                                     owner_id.public_key)
    owner = membership.Owner(owner_id, network)
    a1, a2 = Identity.generate(), Identity.generate()
    certs = [membership.admit(owner, i.peer_id, ["auth"], now=T0 - 10).to_wire()
             for i in (a1, a2)]
    seqs = {a1.peer_id: 0, a2.peer_id: 0}
    events = []

    def add(author: Identity, at: float, kind: str, body: dict[str, object]) -> None:
        seqs[author.peer_id] += 1
        events.append(sign_event(author, network.network_id, seqs[author.peer_id],
                                 hlc_from_wall(at), kind, body))

    add(a1, T0, "user.registered", {"user_id": USER, "username": "root2", "email": "r@x.org",
                                    "password_hash": "h", "created_at": T0})
    add(a1, T0 + 1, "user.updated", {"user_id": USER, "is_admin": True, "updated_at": T0 + 1})
    add(a2, T0 + 2, "user.updated", {"user_id": USER, "tier": "premium", "updated_at": T0 + 2})
    add(a2, T0 + 3, "user.updated", {"user_id": USER, "is_admin": False, "updated_at": T0 + 3})
    add(a1, T0 + 4, "user.updated", {"user_id": USER, "is_active": False, "updated_at": T0 + 4})
    add(a1, T0 + 5, "user.updated", {"user_id": USER, "is_admin": True,
                                     "is_active": True, "updated_at": T0 + 5})
    return network, certs, events


NETWORK, CERTS, EVENTS = build()


def apply(path: Path, order: list[int], upto: int | None = None) -> Store:
    store = Store(path, NETWORK)
    store.absorb_docs(CERTS)
    chosen = [EVENTS[i] for i in order if upto is None or i < upto]
    store.ingest([e.raw for e in chosen])
    return store


def test_is_admin_is_last_writer_wins(tmp_path: Path) -> None:
    for upto, admin, tier, active in ((1, False, "default", True), (2, True, "default", True),
                                      (4, False, "premium", True), (5, False, "premium", False),
                                      (6, True, "premium", True)):
        store = apply(tmp_path / f"s{upto}.db", list(range(6)), upto)
        user = queries.user_by_id(store.conn, USER)
        assert user is not None
        assert (user.is_admin, user.tier, user.is_active) == (admin, tier, active), upto
        store.close()


@settings(max_examples=25, deadline=None)
@given(st.permutations(list(range(6))))
def test_is_admin_does_not_depend_on_arrival_order(order: list[int]) -> None:
    with tempfile.TemporaryDirectory() as d:
        ref = apply(Path(d) / "ref.db", list(range(6)))
        other = apply(Path(d) / "other.db", order)
        assert other.snapshot() == ref.snapshot()
        ref.close()
        other.close()
