"""Schema migrations of the ledger store, in the style of simonw/llm.

Each migration is a function named ``mNNN_description`` appended to
:data:`MIGRATIONS` by the ``@migration`` decorator; :func:`migrate` runs the
ones not yet recorded in the ``_migrations`` table, each in its own
transaction, in list order. Never edit a migration that has shipped: add a
new one.

Tables (timestamps are REAL seconds since the epoch, ids UUID strings):

- the original schema's ``users``, ``api_keys``, ``usage_stats`` and
  ``request_logs`` (same columns; ``users`` adds ``tier`` and ``updated_at``,
  ``api_keys`` adds ``public_id``, ``revoked_at`` and ``rank``; ``m003``
  adds ``users.is_admin``);
- ``events``: every accepted event, ``applied`` = 0 while it waits for its
  author's earlier events; ``heads``: the highest contiguous seq applied per
  author (the version vector);
- ``membership_docs`` (owner-signed certificates and removals) and
  ``members`` (what follows from them);
- bookkeeping that makes materialisation order-independent:
  ``registrations`` (every registration and whether it won),
  ``user_attrs`` (last-writer-wins fields), ``key_revocations``,
  ``key_last_used``, ``usage_hourly`` (per-gateway counters per hour);
- ``audit`` and ``revoked_sessions``;
- ``erased_users`` and ``redactions`` (what erasures redacted; a redacted
  row of ``events`` holds a stub, ``redacted`` = 1);
- ``local_state``: this node's own, unreplicated state (the restore fence);
- ``peer_addrs``: where this node last saw each member (unreplicated);
- ``log_events`` and ``log_heads``: the log lane (request logs this node
  keeps: its own and those it keeps for others, see :mod:`.logs`);
- ``checkpoints``: signed checkpoints of the main lane this node keeps
  (see :mod:`.checkpoints`); ``personal_events``: which events hold each
  user's personal data (what an erasure lists).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlite_utils import Database

__all__ = ["MIGRATIONS", "migrate", "applied_migrations"]

MIGRATIONS: list[Callable[[Database], None]] = []
migration = MIGRATIONS.append

TEXT, INT, REAL, BLOB = str, int, float, bytes


@migration
def m001_initial(db: Database) -> None:
    db.table("events").create(
        {"author": TEXT, "seq": INT, "hlc": INT, "kind": TEXT, "hash": BLOB, "raw": BLOB,
         "applied": INT, "received_at": REAL},
        pk=("author", "seq"), not_null={"hlc", "kind", "hash", "raw", "applied"},
    )
    db.table("events").create_index(["kind", "hlc"])
    db.table("heads").create({"author": TEXT, "seq": INT, "hlc": INT}, pk="author",
                       not_null={"seq"})
    db.table("membership_docs").create(
        {"hash": BLOB, "peer_id": TEXT, "type": TEXT, "doc": BLOB, "added_at": REAL},
        pk="hash", not_null={"peer_id", "type", "doc"},
    )
    db.table("members").create(
        {"peer_id": TEXT, "roles": TEXT, "admitted_at": INT, "expires_at": INT,
         "removed_after": INT},
        pk="peer_id",
    )
    db.table("registrations").create(
        {"user_id": TEXT, "username": TEXT, "email": TEXT, "username_key": TEXT,
         "email_key": TEXT, "password_hash": TEXT, "created_at": REAL, "tier": TEXT,
         "is_active": INT, "rank": TEXT, "status": TEXT, "lost_to": TEXT},
        pk="user_id", not_null={"username_key", "email_key", "rank", "status"},
    )
    db.table("registrations").create_index(["username_key"])
    db.table("registrations").create_index(["email_key"])
    db.table("user_attrs").create(
        {"user_id": TEXT, "tier": TEXT, "tier_rank": TEXT, "is_active": INT,
         "active_rank": TEXT, "updated_at": REAL},
        pk="user_id",
    )
    db.table("users").create(
        {"id": TEXT, "username": TEXT, "email": TEXT, "password_hash": TEXT,
         "created_at": REAL, "is_active": INT, "tier": TEXT, "updated_at": REAL},
        pk="id", not_null={"username", "email", "password_hash"},
        defaults={"is_active": 1, "tier": "default"},
    )
    db.table("users").create_index(["username"], unique=True)
    db.table("users").create_index(["email"], unique=True)
    db.table("api_keys").create(
        {"id": TEXT, "user_id": TEXT, "key_hash": TEXT, "name": TEXT, "created_at": REAL,
         "last_used_at": REAL, "is_active": INT, "public_id": TEXT, "revoked_at": REAL,
         "rank": TEXT},
        pk="id", not_null={"user_id", "key_hash", "public_id", "rank"},
        defaults={"is_active": 1},
    )
    db.table("api_keys").create_index(["public_id"])
    db.table("api_keys").create_index(["user_id"])
    db.table("key_revocations").create({"key_id": TEXT, "revoked_at": REAL}, pk="key_id")
    db.table("key_last_used").create({"key_id": TEXT, "last_used_at": REAL}, pk="key_id")
    db.table("usage_stats").create(
        {"id": TEXT, "user_id": TEXT, "api_key_id": TEXT, "request_count": INT,
         "tokens_used": INT, "date": TEXT, "created_at": REAL},
        pk="id", not_null={"date"}, defaults={"request_count": 0, "tokens_used": 0},
    )
    db.table("usage_stats").create_index(["user_id", "date"])
    db.table("usage_stats").create_index(["api_key_id", "date"])
    db.table("usage_hourly").create(
        {"author": TEXT, "user_id": TEXT, "api_key_id": TEXT, "hour": INT, "requests": INT,
         "tokens": INT},
        pk=("author", "user_id", "api_key_id", "hour"),
    )
    db.table("usage_hourly").create_index(["user_id", "hour"])
    db.table("usage_hourly").create_index(["api_key_id", "hour"])
    db.table("request_logs").create(
        {"id": TEXT, "user_id": TEXT, "api_key_id": TEXT, "prompt_hash": TEXT,
         "model_used": TEXT, "response_time_ms": REAL, "tokens_used": INT, "status": TEXT,
         "created_at": REAL, "author": TEXT, "rank": TEXT},
        pk="id",
    )
    db.table("request_logs").create_index(["created_at"])
    db.table("request_logs").create_index(["user_id", "created_at"])
    db.table("audit").create(
        {"id": TEXT, "time": REAL, "actor": TEXT, "action": TEXT, "target": TEXT,
         "outcome": TEXT, "source": TEXT, "detail": TEXT, "author": TEXT, "seq": INT},
        pk="id",
    )
    db.table("audit").create_index(["time"])
    db.table("audit").create_index(["actor", "time"])
    db.table("revoked_sessions").create({"jti": TEXT, "exp": REAL}, pk="jti")


@migration
def m002_erasure(db: Database) -> None:
    """Erased users: the user id and when; no personal data."""
    db.table("erased_users").create({"user_id": TEXT, "erased_at": REAL}, pk="user_id")


@migration
def m003_admin_flag(db: Database) -> None:
    """The auth role's admin flag: ``users.is_admin`` and its last-writer-wins
    bookkeeping in ``user_attrs`` (set by ``user.updated``)."""
    db.table("users").add_column("is_admin", INT, not_null_default=0)
    db.table("user_attrs").add_column("is_admin", INT)
    db.table("user_attrs").add_column("admin_rank", TEXT)


@migration
def m003_redaction(db: Database) -> None:
    """Erasure redacts stored registrations: ``events.redacted`` marks a stub,
    ``redactions`` lists what applied erasures redact."""
    db.table("events").add_column("redacted", int, not_null_default=0)
    db.table("redactions").create(
        {"author": TEXT, "seq": INT, "hash": BLOB, "user_id": TEXT, "erasure_author": TEXT,
         "erasure_seq": INT},
        pk=("author", "seq"), not_null={"hash", "user_id"},
    )


@migration
def m004_local_state(db: Database) -> None:
    """This node's own bookkeeping, never replicated: ``local_state`` (key,
    JSON value); ``fence`` is set by a restore from backup (see
    :mod:`.backup`) until the node has learnt its own latest events from
    its peers."""
    db.table("local_state").create({"key": TEXT, "value": TEXT}, pk="key", if_not_exists=True)


@migration
def m005_rotations(db: Database) -> None:
    """Refresh-token rotations (``session.revoked`` with a ``sid``): the first
    event that spent each refresh token. A second, different event spending
    the same token means it was used twice (on two auth nodes at once, before
    either heard of the other), and the whole session is revoked."""
    db.table("rotations").create(
        {"jti": TEXT, "sid": TEXT, "author": TEXT, "seq": INT}, pk="jti", if_not_exists=True)


@migration
def m006_password_change(db: Database) -> None:
    """Password changes (``user.updated`` with ``password_hash``, last writer
    wins like the other fields) and ``sessions_after``: sessions authenticated
    before it are over (set by a password change)."""
    db.table("user_attrs").add_column("password_hash", TEXT)
    db.table("user_attrs").add_column("password_rank", TEXT)
    db.table("user_attrs").add_column("sessions_after", REAL)
    db.table("users").add_column("sessions_after", REAL)


@migration
def m007_peer_addrs(db: Database) -> None:
    """``peer_addrs``: where this node last saw each member (the addresses
    of its signed descriptor), never replicated: a restarted node redials
    its members from here before any peer answers."""
    db.table("peer_addrs").create({"peer_id": TEXT, "addrs": TEXT, "seen_at": REAL},
                                  pk="peer_id", if_not_exists=True)


@migration
def m008_log_lane(db: Database) -> None:
    """The log lane (request logs, see :mod:`.logs`): ``log_events`` holds the
    signed ``log.requests`` events this node keeps, numbered per author in a
    sequence of their own; ``log_heads`` the highest seq held per author
    (it stays when old events expire, so they are not pulled again)."""
    db.table("log_events").create(
        {"author": TEXT, "seq": INT, "hlc": INT, "hash": BLOB, "raw": BLOB},
        pk=("author", "seq"), not_null={"hlc", "hash", "raw"}, if_not_exists=True)
    db.table("log_events").create_index(["hlc"], if_not_exists=True)
    db.table("log_heads").create({"author": TEXT, "seq": INT}, pk="author",
                                 not_null={"seq"}, if_not_exists=True)



@migration
def m009_checkpoints(db: Database) -> None:
    """Signed checkpoints of the main lane (see :mod:`.checkpoints`):
    ``checkpoints`` holds the header (msgpack) and compressed body of the
    few this node keeps; ``local_state`` key ``floor`` (JSON) is the version
    vector up to which events were pruned."""
    db.table("checkpoints").create(
        {"id": BLOB, "made_at": REAL, "events": INT, "header": BLOB, "body": BLOB},
        pk="id", not_null={"made_at", "events", "header", "body"}, if_not_exists=True)


@migration
def m010_personal_events(db: Database) -> None:
    """``personal_events``: the (author, seq, hash) of every registration and
    password change per user (no personal data), so that an erasure lists
    them even after the events were pruned into a checkpoint; filled from
    the events already held."""
    from .events import decode_trusted

    db.table("personal_events").create(
        {"author": TEXT, "seq": INT, "hash": BLOB, "user_id": TEXT, "kind": TEXT, "hlc": INT},
        pk=("author", "seq"), not_null={"hash", "user_id", "kind", "hlc"}, if_not_exists=True)
    db.table("personal_events").create_index(["user_id"], if_not_exists=True)
    for raw, redacted in db.execute(
            "SELECT raw, redacted FROM events WHERE kind IN ('user.registered', "
            "'user.updated')").fetchall():
        if redacted:
            continue
        ev = decode_trusted(raw)
        if "username" in ev.body or "password_hash" in ev.body:
            db.execute("INSERT OR IGNORE INTO personal_events VALUES (?,?,?,?,?,?)",
                       (ev.author, ev.seq, ev.hash, ev.body["user_id"], ev.kind, ev.hlc))

def applied_migrations(db: Database) -> list[str]:
    if not db.table("_migrations").exists():
        return []
    return [row["name"] for row in db.query("select name from _migrations order by rowid")]


def migrate(db: Database) -> list[str]:
    """Apply pending migrations; returns the names applied now."""
    if not db.table("_migrations").exists():
        db.table("_migrations").create({"name": TEXT, "applied_at": REAL}, pk="name")
    done = set(applied_migrations(db))
    ran = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        with db.atomic():
            fn(db)
            db.table("_migrations").insert({"name": fn.__name__, "applied_at": time.time()})
        ran.append(fn.__name__)
    return ran
