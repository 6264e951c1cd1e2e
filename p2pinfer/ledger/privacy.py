"""What the ledger holds about one user, and what erasing them leaves.

:func:`user_record` reads everything this node's replica holds about a
user, for an export (the auth role's ``exportUserData``): the account (no
password hash), its registration's fate, its API keys (metadata: never the
key or its hash), usage per day and key and per gateway and hour, request
logs (prompt *hashes* only: prompts are never stored), and the audit rows
about the user: rows the user is the actor or the target of, rows about
their keys or sessions, and rows whose detail names them.

Erasure (``Ledger.erase_user``, see :mod:`.views` and :mod:`.events`) is a
signed ``user.erased`` tombstone that every node honours: the user leaves
``users``, its registration keeps no username, email or password hash, and
the stored ``user.registered`` events become stubs. Usage totals, keys
(revoked, without a user) and request logs stay, keyed by the user id, which
identifies nobody once the registration is gone. :func:`compact` then
checkpoints the write-ahead log into the database file and truncates it, so
with ``secure_delete`` (set by the store) no page of the node's files still
holds the erased values.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from . import queries

__all__ = ["audit_about", "compact", "log_rows", "user_record", "EXPORT_VERSION"]

EXPORT_VERSION = 1
MAX_ROWS = 1_000_000


def _user_refs(user_id: str, key_ids: list[str]) -> list[str]:
    return [f"user:{user_id}", *(f"apikey:{k}" for k in key_ids)]


def audit_about(conn: sqlite3.Connection, user_id: str, key_ids: list[str], *,
                limit: int = MAX_ROWS) -> list[queries.AuditRow]:
    """Audit rows about ``user_id``, oldest first: as actor or target, about
    one of their keys (``key_ids``) or one of their sessions (logged with the
    user as actor), or naming them in ``detail``."""
    refs = _user_refs(user_id, key_ids)
    marks = ",".join("?" * len(refs))
    needle = f'%"user:{user_id}"%'
    rows = conn.execute(
        "SELECT id, time, actor, action, target, outcome, source, detail, author FROM audit "
        f"WHERE actor=? OR target IN ({marks}) OR detail LIKE ? ORDER BY time, id LIMIT ?",
        (f"user:{user_id}", *refs, needle, limit)).fetchall()
    out = []
    for r in rows:
        detail = json.loads(r[7]) if r[7] is not None else None
        out.append(queries.AuditRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], detail, r[8]))
    return out


def user_record(conn: sqlite3.Connection, user_id: str) -> dict[str, Any] | None:
    """Everything this replica holds about ``user_id`` (see the module
    docstring), JSON-able; None if no such user is in ``users``."""
    user = queries.user_by_id(conn, user_id)
    if user is None:
        return None
    reg = queries.registration(conn, user_id)
    keys = queries.api_keys_of_user(conn, user_id)
    key_ids = [k.id for k in keys]
    usage = queries.usage(conn, user_id=user_id)
    hourly = conn.execute(
        "SELECT author, api_key_id, hour, requests, tokens FROM usage_hourly WHERE user_id=? "
        "ORDER BY hour, author, api_key_id", (user_id,)).fetchall()
    logs = queries.request_logs(conn, user_id=user_id, limit=MAX_ROWS)
    audit = audit_about(conn, user_id, key_ids)
    return {
        "account": {
            "user_id": user.id, "username": user.username, "email": user.email,
            "tier": user.tier, "is_active": user.is_active, "is_admin": user.is_admin,
            "created_at": user.created_at, "updated_at": user.updated_at,
            "registration": None if reg is None else reg.status,
        },
        "api_keys": [{
            "key_id": k.id, "public_id": k.public_id, "name": k.name,
            "created_at": k.created_at, "last_used_at": k.last_used_at,
            "is_active": k.is_active and k.revoked_at is None, "revoked_at": k.revoked_at,
        } for k in keys],
        "usage": {
            "daily": [{"date": u.date, "api_key_id": u.api_key_id,
                       "requests": u.request_count, "tokens": u.tokens_used} for u in usage],
            "hourly": [{"gateway": a, "api_key_id": k or None, "hour": h, "requests": r,
                        "tokens": t} for a, k, h, r, t in hourly],
            "total": {"requests": sum(u.request_count for u in usage),
                      "tokens": sum(u.tokens_used for u in usage)},
        },
        "request_logs": log_rows(logs),
        "audit": [{
            "id": a.id, "time": a.time, "actor": a.actor, "action": a.action,
            "target": a.target, "outcome": a.outcome, "source": a.source,
            "detail": a.detail, "node": a.author,
        } for a in audit],
    }


def log_rows(logs: list[queries.RequestLog]) -> list[dict[str, Any]]:
    """Request log rows (newest first) as an export lists them, oldest first."""
    return [{
        "id": r.id, "api_key_id": r.api_key_id, "prompt_hash": r.prompt_hash,
        "model": r.model_used, "response_time_ms": r.response_time_ms,
        "tokens_used": r.tokens_used, "status": r.status, "created_at": r.created_at,
        "gateway": r.gateway,
    } for r in reversed(logs)]


def is_erased(conn: sqlite3.Connection, user_id: str) -> float | None:
    """When ``user_id`` was erased (None: it was not)."""
    row = conn.execute("SELECT erased_at FROM erased_users WHERE user_id=?",
                       (user_id,)).fetchone()
    return None if row is None else float(row[0])


def compact(conn: sqlite3.Connection) -> bool:
    """Checkpoint the write-ahead log into the database and truncate it (so
    erased values leave the WAL); False if a reader held it up (the next
    checkpoint then does it)."""
    busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return not busy
