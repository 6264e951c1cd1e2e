"""Read-only queries over the materialised tables, returning typed records.

Every lookup the auth and gateway roles need on a hot path is one indexed
query: :func:`api_key_by_public_id` (``validateApiKey``),
:func:`is_session_revoked`, :func:`usage_in_hour` (cross-gateway limits).
Usernames and emails are matched case-insensitively (``str.casefold``), the
same way registration conflicts are decided.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

__all__ = [
    "User",
    "Registration",
    "ApiKey",
    "UsageRow",
    "RequestLog",
    "AuditRow",
    "user_by_id",
    "user_by_username",
    "user_by_email",
    "registration",
    "api_key_by_public_id",
    "api_key_by_id",
    "api_keys_of_user",
    "usage",
    "usage_in_hour",
    "request_logs",
    "request_log_exists",
    "audit_rows",
    "is_session_revoked",
]


@dataclass(frozen=True, slots=True)
class User:
    """A row of ``users`` (only winning, non-erased registrations)."""

    id: str
    username: str
    email: str
    password_hash: str
    created_at: float
    is_active: bool
    tier: str
    updated_at: float | None
    is_admin: bool = False
    #: sessions authenticated before this time are over (a password change)
    sessions_after: float | None = None


@dataclass(frozen=True, slots=True)
class Registration:
    """The fate of a registration: ``won``, ``lost`` (to ``lost_to``) or ``erased``."""

    user_id: str
    status: str
    lost_to: str | None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A row of ``api_keys`` plus its user's standing.

    ``user_active`` and ``tier`` are None when the key's user is not in
    ``users`` (unknown yet, lost its registration, or erased): such a key
    must not validate.
    """

    id: str
    user_id: str
    key_hash: str
    name: str | None
    created_at: float
    last_used_at: float | None
    is_active: bool
    public_id: str
    revoked_at: float | None
    user_active: bool | None
    tier: str | None


@dataclass(frozen=True, slots=True)
class UsageRow:
    """A row of ``usage_stats``: merged counts of one (user, key, day)."""

    id: str
    user_id: str
    api_key_id: str | None
    date: str
    request_count: int
    tokens_used: int
    created_at: float


@dataclass(frozen=True, slots=True)
class RequestLog:
    """A row of ``request_logs`` (the prompt is only ever a hash)."""

    id: str
    user_id: str | None
    api_key_id: str | None
    prompt_hash: str
    model_used: str
    response_time_ms: float
    tokens_used: int
    status: str
    created_at: float
    gateway: str


@dataclass(frozen=True, slots=True)
class AuditRow:
    """A row of ``audit``; ``id`` is ``<author>:<seq>``."""

    id: str
    time: float
    actor: str
    action: str
    target: str | None
    outcome: str
    source: str | None
    detail: dict[str, Any] | None
    author: str


_USER_COLS = "u.id, u.username, u.email, u.password_hash, u.created_at, u.is_active, " \
             "u.tier, u.updated_at, u.is_admin, u.sessions_after"


def _user(row: Any) -> User | None:
    if row is None:
        return None
    return User(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7],
                bool(row[8]), row[9])


def user_by_id(conn: sqlite3.Connection, user_id: str) -> User | None:
    return _user(conn.execute(f"SELECT {_USER_COLS} FROM users u WHERE u.id=?",
                              (user_id,)).fetchone())


def user_by_username(conn: sqlite3.Connection, username: str) -> User | None:
    return _user(conn.execute(
        f"SELECT {_USER_COLS} FROM registrations r JOIN users u ON u.id=r.user_id "
        "WHERE r.username_key=? AND r.status='won'", (username.casefold(),)).fetchone())


def user_by_email(conn: sqlite3.Connection, email: str) -> User | None:
    return _user(conn.execute(
        f"SELECT {_USER_COLS} FROM registrations r JOIN users u ON u.id=r.user_id "
        "WHERE r.email_key=? AND r.status='won'", (email.casefold(),)).fetchone())


def registration(conn: sqlite3.Connection, user_id: str) -> Registration | None:
    row = conn.execute("SELECT user_id, status, lost_to FROM registrations WHERE user_id=?",
                       (user_id,)).fetchone()
    return Registration(*row) if row else None


_KEY_SQL = (
    "SELECT k.id, k.user_id, k.key_hash, k.name, k.created_at, k.last_used_at, k.is_active, "
    "k.public_id, k.revoked_at, u.is_active, u.tier FROM api_keys k "
    "LEFT JOIN users u ON u.id=k.user_id "
)


def _key(row: Any) -> ApiKey | None:
    if row is None:
        return None
    return ApiKey(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), row[7], row[8],
                  None if row[9] is None else bool(row[9]), row[10])


def api_key_by_public_id(conn: sqlite3.Connection, public_id: str) -> ApiKey | None:
    """The key with this public id (the earliest issued, if two collide)."""
    return _key(conn.execute(_KEY_SQL + "WHERE k.public_id=? ORDER BY k.rank LIMIT 1",
                             (public_id,)).fetchone())


def api_key_by_id(conn: sqlite3.Connection, key_id: str) -> ApiKey | None:
    return _key(conn.execute(_KEY_SQL + "WHERE k.id=?", (key_id,)).fetchone())


def api_keys_of_user(conn: sqlite3.Connection, user_id: str) -> list[ApiKey]:
    rows = conn.execute(_KEY_SQL + "WHERE k.user_id=? ORDER BY k.created_at, k.id",
                        (user_id,)).fetchall()
    return [k for k in map(_key, rows) if k is not None]


def usage(
    conn: sqlite3.Connection,
    *,
    user_id: str | None = None,
    api_key_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> list[UsageRow]:
    """Merged ``usage_stats`` rows, filtered; dates are ``YYYY-MM-DD``, inclusive."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("user_id", user_id), ("api_key_id", api_key_id)):
        if value is not None:
            where.append(f"{column}=?")
            args.append(value)
    if since is not None:
        where.append("date>=?")
        args.append(since)
    if until is not None:
        where.append("date<=?")
        args.append(until)
    sql = ("SELECT id, user_id, api_key_id, date, request_count, tokens_used, created_at "
           "FROM usage_stats")
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY date, user_id, api_key_id"
    return [UsageRow(*r) for r in conn.execute(sql, args).fetchall()]


def usage_in_hour(
    conn: sqlite3.Connection,
    hour: int,
    *,
    user_id: str | None = None,
    api_key_id: str | None = None,
    exclude_gateway: str | None = None,
) -> tuple[int, int]:
    """``(requests, tokens)`` counted by all gateways in one UTC hour for a
    user or a key, optionally leaving out one gateway (its own live count is
    fresher than what it has flushed to the ledger)."""
    if (user_id is None) == (api_key_id is None):
        raise ValueError("give exactly one of user_id or api_key_id")
    column, value = ("user_id", user_id) if user_id is not None else ("api_key_id", api_key_id)
    sql = f"SELECT sum(requests), sum(tokens) FROM usage_hourly WHERE {column}=? AND hour=?"
    args: list[Any] = [value, hour - hour % 3600]
    if exclude_gateway is not None:
        sql += " AND author!=?"
        args.append(exclude_gateway)
    row = conn.execute(sql, args).fetchone()
    return int(row[0] or 0), int(row[1] or 0)


def request_logs(
    conn: sqlite3.Connection, *, user_id: str | None = None, limit: int = 100,
) -> list[RequestLog]:
    """The most recent request log rows, newest first."""
    sql = ("SELECT id, user_id, api_key_id, prompt_hash, model_used, response_time_ms, "
           "tokens_used, status, created_at, author FROM request_logs")
    args: list[Any] = []
    if user_id is not None:
        sql += " WHERE user_id=?"
        args.append(user_id)
    sql += " ORDER BY created_at DESC, id LIMIT ?"
    args.append(limit)
    return [RequestLog(*r) for r in conn.execute(sql, args).fetchall()]


def request_log_exists(conn: sqlite3.Connection, row_id: str) -> bool:
    """Whether a request log row with this id has been applied."""
    return conn.execute("SELECT 1 FROM request_logs WHERE id=?", (row_id,)).fetchone() \
        is not None


def audit_rows(
    conn: sqlite3.Connection,
    *,
    actor: str | None = None,
    action: str | None = None,
    since: float | None = None,
    limit: int = 100,
) -> list[AuditRow]:
    """Audit rows, newest first."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("actor", actor), ("action", action)):
        if value is not None:
            where.append(f"{column}=?")
            args.append(value)
    if since is not None:
        where.append("time>=?")
        args.append(since)
    sql = ("SELECT id, time, actor, action, target, outcome, source, detail, author FROM audit")
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY time DESC, id LIMIT ?"
    args.append(limit)
    out = []
    for r in conn.execute(sql, args).fetchall():
        detail = json.loads(r[7]) if r[7] is not None else None
        out.append(AuditRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], detail, r[8]))
    return out


def is_session_revoked(conn: sqlite3.Connection, jti: str) -> bool:
    return conn.execute("SELECT 1 FROM revoked_sessions WHERE jti=?", (jti,)).fetchone() \
        is not None
