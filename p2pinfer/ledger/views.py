"""Materialisation: how each event kind changes the queryable tables.

Every function here is *commutative*: applying any set of events in any
order leaves the same rows (the property test checks it). The rules:

- **Registrations** (``user.registered``): all registrations are kept in
  ``registrations``. Registrations that share a username or an email (case
  folded) compete; the winners are chosen greedily in ascending *rank*
  ``(hlc, author, seq)``: a registration wins if neither its username nor its
  email is held by an earlier winner. Only winners appear in ``users``; a
  loser's status is ``lost`` and the auth role turns that into
  :class:`~p2pinfer.errors.RegistrationLost`. A user id registered twice keeps
  its lowest-ranked registration.
- **User fields** (``user.updated``): ``tier``, ``is_active`` and
  ``is_admin`` are each last-writer-wins by rank; the registration counts as
  the first write (``is_admin`` starts false).
- **API keys**: ``apikey.issued`` inserts (lowest rank wins for a repeated
  key id); revocation is a tombstone (earliest ``revoked_at`` kept) and is
  permanent; ``apikey.used`` keeps the latest ``last_used_at`` (max).
- **Usage** (``usage``): counter deltas summed per (user, key, day) into
  ``usage_stats`` and per (gateway, user, key, hour) into ``usage_hourly``.
  Events are deduplicated by ``(author, seq)`` upstream, so sums are exact.
- **Request logs**, **audit rows**: inserted once by id.
- **Revoked sessions**: ``jti`` with the latest ``exp``. A rotation (a
  ``session.revoked`` with ``sid``) spends a refresh token; two different
  rotations of one token revoke the whole session (``rotations``).
- **Erasure** (``user.erased``, effective as soon as the store accepts it,
  even while it waits for earlier events of its author): the user leaves ``users``, its registration
  keeps no username, email or password hash (so the names are free again),
  later registrations and updates of that id are ignored; usage totals,
  keys (now without a user) and request logs stay. Audit rows name users by
  id, never by username or email, so they need no rewrite. The stored
  ``user.registered`` events the erasure lists are replaced by stubs
  (:mod:`.events`, the store does it), so no node keeps or serves the
  personal data after convergence.

Functions take the open sqlite3 connection of a transaction; the store
owns transactions.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import uuid
from collections.abc import Iterable
from typing import Any

from .events import Event

__all__ = ["apply", "clear", "VIEW_TABLES"]

# Tables derived from events (cleared and rebuilt after a removal voids events).
VIEW_TABLES = (
    "registrations", "user_attrs", "users", "api_keys", "key_revocations", "key_last_used",
    "usage_stats", "usage_hourly", "request_logs", "audit", "revoked_sessions", "erased_users",
    "rotations", "personal_events",
)
_USAGE_NS = uuid.UUID("5f0c7a52-1d3e-4c59-9a43-2b8f27c1e0d4")


def clear(conn: sqlite3.Connection) -> None:
    for table in VIEW_TABLES:
        conn.execute(f"DELETE FROM {table}")


def apply(conn: sqlite3.Connection, ev: Event) -> None:
    """Materialise one event (already verified and authorised)."""
    if ev.kind in ("user.registered", "user.updated") and (
            "username" in ev.body or "password_hash" in ev.body):
        # Which events hold a user's personal data: what an erasure lists,
        # even once the events themselves were pruned into a checkpoint.
        conn.execute(
            "INSERT OR IGNORE INTO personal_events (author, seq, hash, user_id, kind, hlc) "
            "VALUES (?,?,?,?,?,?)", (ev.author, ev.seq, ev.hash, ev.body["user_id"], ev.kind,
                                     ev.hlc))
    handler = _HANDLERS.get(ev.kind)
    if handler is not None:
        handler(conn, ev)


# --- users ---------------------------------------------------------------------
def _user_registered(conn: sqlite3.Connection, ev: Event) -> None:
    b = ev.body
    user_id = b["user_id"]
    if conn.execute("SELECT 1 FROM erased_users WHERE user_id=?", (user_id,)).fetchone():
        return
    row = conn.execute("SELECT rank FROM registrations WHERE user_id=?", (user_id,)).fetchone()
    if row is not None and row[0] <= ev.rank:
        return
    old_keys = _keys_of(conn, user_id)
    conn.execute(
        "INSERT OR REPLACE INTO registrations (user_id, username, email, username_key, "
        "email_key, password_hash, created_at, tier, is_active, rank, status, lost_to) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,'pending',NULL)",
        (user_id, b["username"], b["email"], b["username"].casefold(),
         b["email"].casefold(), b["password_hash"], b["created_at"],
         b.get("tier", "default"), int(b.get("is_active", True)), ev.rank),
    )
    _resolve(conn, [b["username"].casefold(), *old_keys[0]],
             [b["email"].casefold(), *old_keys[1]])


def _keys_of(conn: sqlite3.Connection, user_id: str) -> tuple[list[str], list[str]]:
    row = conn.execute("SELECT username_key, email_key FROM registrations WHERE user_id=?",
                       (user_id,)).fetchone()
    return ([row[0]], [row[1]]) if row else ([], [])


def _resolve(conn: sqlite3.Connection, usernames: Iterable[str], emails: Iterable[str]) -> None:
    """Recompute winners of every registration connected (by a shared
    username or email) to the given keys."""
    todo_u, todo_e = set(usernames), set(emails)
    seen_u: set[str] = set()
    seen_e: set[str] = set()
    regs: dict[str, tuple[str, str, str, str]] = {}
    while todo_u or todo_e:
        if todo_u:
            key = todo_u.pop()
            seen_u.add(key)
            rows = conn.execute("SELECT user_id, username_key, email_key, rank, status FROM "
                                "registrations WHERE username_key=?", (key,)).fetchall()
        else:
            key = todo_e.pop()
            seen_e.add(key)
            rows = conn.execute("SELECT user_id, username_key, email_key, rank, status FROM "
                                "registrations WHERE email_key=?", (key,)).fetchall()
        for user_id, ukey, ekey, rank, status in rows:
            if status == "erased" or user_id in regs:
                continue
            regs[user_id] = (ukey, ekey, rank, status)
            if ukey not in seen_u:
                todo_u.add(ukey)
            if ekey not in seen_e:
                todo_e.add(ekey)
    held_u: dict[str, str] = {}
    held_e: dict[str, str] = {}
    outcome: dict[str, str | None] = {}
    for user_id, (ukey, ekey, _rank, _status) in sorted(regs.items(), key=lambda kv: kv[1][2]):
        winner = held_u.get(ukey) or held_e.get(ekey)
        outcome[user_id] = winner
        if winner is None:
            held_u[ukey] = user_id
            held_e[ekey] = user_id
    # Losers leave `users` first so the UNIQUE indexes never see two holders.
    for user_id, winner in outcome.items():
        if winner is not None:
            conn.execute("UPDATE registrations SET status='lost', lost_to=? WHERE user_id=?",
                         (winner, user_id))
            conn.execute("DELETE FROM users WHERE id=?", (user_id,))
    for user_id, winner in outcome.items():
        if winner is None:
            conn.execute("UPDATE registrations SET status='won', lost_to=NULL WHERE user_id=?",
                         (user_id,))
            _write_user(conn, user_id)


def _write_user(conn: sqlite3.Connection, user_id: str) -> None:
    """(Re)write the ``users`` row of a winning registration with its fields."""
    reg = conn.execute(
        "SELECT username, email, password_hash, created_at, tier, is_active, rank, status "
        "FROM registrations WHERE user_id=?", (user_id,)).fetchone()
    if reg is None or reg[7] != "won":
        return
    username, email, password_hash, created_at, tier, is_active, rank, _ = reg
    attrs = conn.execute(
        "SELECT tier, tier_rank, is_active, active_rank, updated_at, is_admin, admin_rank, "
        "password_hash, password_rank, sessions_after FROM user_attrs WHERE user_id=?",
        (user_id,)).fetchone()
    updated_at = None
    sessions_after = None
    is_admin = 0
    if attrs is not None:
        if attrs[1] is not None and attrs[1] > rank:
            tier = attrs[0]
        if attrs[3] is not None and attrs[3] > rank:
            is_active = attrs[2]
        if attrs[6] is not None and attrs[6] > rank:
            is_admin = attrs[5]
        if attrs[8] is not None and attrs[8] > rank:
            password_hash = attrs[7]
        updated_at = attrs[4]
        sessions_after = attrs[9]
    conn.execute(
        "INSERT INTO users (id, username, email, password_hash, created_at, is_active, tier, "
        "updated_at, is_admin, sessions_after) VALUES (?,?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT(id) DO UPDATE SET "
        "username=excluded.username, email=excluded.email, "
        "password_hash=excluded.password_hash, created_at=excluded.created_at, "
        "is_active=excluded.is_active, tier=excluded.tier, updated_at=excluded.updated_at, "
        "is_admin=excluded.is_admin, sessions_after=excluded.sessions_after",
        (user_id, username, email, password_hash, created_at, is_active, tier, updated_at,
         is_admin, sessions_after),
    )


def _user_updated(conn: sqlite3.Connection, ev: Event) -> None:
    b = ev.body
    user_id = b["user_id"]
    if conn.execute("SELECT 1 FROM erased_users WHERE user_id=?", (user_id,)).fetchone():
        return
    row = conn.execute(
        "SELECT tier, tier_rank, is_active, active_rank, updated_at, is_admin, admin_rank, "
        "password_hash, password_rank, sessions_after FROM user_attrs WHERE user_id=?",
        (user_id,)).fetchone()
    (tier, tier_rank, active, active_rank, updated_at, admin, admin_rank,
     password, password_rank, sessions_after) = row or (None,) * 10
    if "tier" in b and (tier_rank is None or ev.rank > tier_rank):
        tier, tier_rank = b["tier"], ev.rank
    if "is_active" in b and (active_rank is None or ev.rank > active_rank):
        active, active_rank = int(b["is_active"]), ev.rank
    if "is_admin" in b and (admin_rank is None or ev.rank > admin_rank):
        admin, admin_rank = int(b["is_admin"]), ev.rank
    if "password_hash" in b and (password_rank is None or ev.rank > password_rank):
        password, password_rank = b["password_hash"], ev.rank
    if "sessions_after" in b:  # only ever later: a sign-out is never undone
        sessions_after = (b["sessions_after"] if sessions_after is None
                          else max(sessions_after, b["sessions_after"]))
    updated_at = b["updated_at"] if updated_at is None else max(updated_at, b["updated_at"])
    conn.execute(
        "INSERT OR REPLACE INTO user_attrs (user_id, tier, tier_rank, is_active, active_rank, "
        "updated_at, is_admin, admin_rank, password_hash, password_rank, sessions_after) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (user_id, tier, tier_rank, active, active_rank, updated_at, admin, admin_rank,
         password, password_rank, sessions_after),
    )
    _write_user(conn, user_id)


def _user_erased(conn: sqlite3.Connection, ev: Event) -> None:
    user_id = ev.body["user_id"]
    for item in ev.body.get("redacts", []):  # listed: no longer to be listed
        conn.execute(
            "DELETE FROM personal_events WHERE author=? AND seq=? AND hash=? AND user_id=?",
            (item["author"], item["seq"], item["hash"], user_id))
    row = conn.execute("SELECT erased_at FROM erased_users WHERE user_id=?",
                       (user_id,)).fetchone()
    if row is not None:
        if ev.body["erased_at"] < row[0]:
            conn.execute("UPDATE erased_users SET erased_at=? WHERE user_id=?",
                         (ev.body["erased_at"], user_id))
        return
    conn.execute("INSERT INTO erased_users (user_id, erased_at) VALUES (?,?)",
                 (user_id, ev.body["erased_at"]))
    keys = _keys_of(conn, user_id)
    conn.execute("DELETE FROM users WHERE id=?", (user_id,))
    conn.execute("DELETE FROM user_attrs WHERE user_id=?", (user_id,))
    # The registration row stays as a marker with no personal data; its
    # (hashed-away) keys no longer hold any name, so others may take them.
    conn.execute(
        "INSERT OR REPLACE INTO registrations (user_id, username, email, username_key, "
        "email_key, password_hash, created_at, tier, is_active, rank, status, lost_to) "
        "VALUES (?,NULL,NULL,?,?,NULL,NULL,NULL,0,'',?,NULL)",
        (user_id, f"erased:{user_id}", f"erased:{user_id}", "erased"),
    )
    # Registrations that lost to it compete again; a checkpoint redacted
    # after this erasure no longer holds its registration's names, so the
    # losers' own names are resolved too (the same components either way).
    for ukey, ekey in conn.execute(
            "SELECT username_key, email_key FROM registrations WHERE lost_to=?", (user_id,)):
        keys[0].append(ukey)
        keys[1].append(ekey)
    if keys[0]:
        _resolve(conn, keys[0], keys[1])


# --- API keys ------------------------------------------------------------------
def _apikey_issued(conn: sqlite3.Connection, ev: Event) -> None:
    b = ev.body
    row = conn.execute("SELECT rank FROM api_keys WHERE id=?", (b["key_id"],)).fetchone()
    if row is not None and row[0] <= ev.rank:
        return
    revoked = conn.execute("SELECT revoked_at FROM key_revocations WHERE key_id=?",
                           (b["key_id"],)).fetchone()
    used = conn.execute("SELECT last_used_at FROM key_last_used WHERE key_id=?",
                        (b["key_id"],)).fetchone()
    conn.execute(
        "INSERT OR REPLACE INTO api_keys (id, user_id, key_hash, name, created_at, "
        "last_used_at, is_active, public_id, revoked_at, rank) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (b["key_id"], b["user_id"], b["key_hash"], b["name"], b["created_at"],
         used[0] if used else None, 0 if revoked else 1, b["public_id"],
         revoked[0] if revoked else None, ev.rank),
    )


def _apikey_revoked(conn: sqlite3.Connection, ev: Event) -> None:
    key_id, at = ev.body["key_id"], ev.body["revoked_at"]
    row = conn.execute("SELECT revoked_at FROM key_revocations WHERE key_id=?",
                       (key_id,)).fetchone()
    if row is not None and row[0] <= at:
        return
    conn.execute("INSERT OR REPLACE INTO key_revocations (key_id, revoked_at) VALUES (?,?)",
                 (key_id, at))
    conn.execute("UPDATE api_keys SET is_active=0, revoked_at=? WHERE id=?", (at, key_id))


def _apikey_used(conn: sqlite3.Connection, ev: Event) -> None:
    for entry in ev.body["entries"]:
        key_id, at = entry["key_id"], entry["at"]
        conn.execute(
            "INSERT INTO key_last_used (key_id, last_used_at) VALUES (?,?) ON CONFLICT(key_id) "
            "DO UPDATE SET last_used_at=max(last_used_at, excluded.last_used_at)", (key_id, at))
        conn.execute("UPDATE api_keys SET last_used_at=? WHERE id=? AND "
                     "(last_used_at IS NULL OR last_used_at < ?)", (at, key_id, at))


def _revoke(conn: sqlite3.Connection, jti: str, exp: float) -> None:
    conn.execute(
        "INSERT INTO revoked_sessions (jti, exp) VALUES (?,?) ON CONFLICT(jti) "
        "DO UPDATE SET exp=max(exp, excluded.exp)", (jti, exp))


def _session_revoked(conn: sqlite3.Connection, ev: Event) -> None:
    b = ev.body
    _revoke(conn, b["jti"], b["exp"])
    if "sid" not in b:
        return
    # A rotation: b["jti"] is the refresh token spent. If another event
    # already spent it, it was used twice: end the session everywhere. The
    # outcome does not depend on which of the two arrives first.
    first = conn.execute("SELECT author, seq FROM rotations WHERE jti=?",
                         (b["jti"],)).fetchone()
    if first is None:
        conn.execute("INSERT INTO rotations (jti, sid, author, seq) VALUES (?,?,?,?)",
                     (b["jti"], b["sid"], ev.author, ev.seq))
    elif tuple(first) != (ev.author, ev.seq):
        _revoke(conn, b["sid"], b["session_exp"])


# --- usage and logs --------------------------------------------------------------
def usage_row_id(user_id: str, key_id: str | None, date: str) -> str:
    """The ``usage_stats`` id of a (user, key, day): the same on every node."""
    return str(uuid.uuid5(_USAGE_NS, f"{user_id}|{key_id or ''}|{date}"))


def day_of(hour: int) -> str:
    return datetime.datetime.fromtimestamp(hour, datetime.UTC).strftime("%Y-%m-%d")


def _usage(conn: sqlite3.Connection, ev: Event) -> None:
    for e in ev.body["entries"]:
        user_id, key_id, hour = e["user_id"], e["key_id"], e["hour"]
        requests, tokens = e["requests"], e["tokens"]
        conn.execute(
            "INSERT INTO usage_hourly (author, user_id, api_key_id, hour, requests, tokens) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT(author, user_id, api_key_id, hour) DO UPDATE SET "
            "requests=requests+excluded.requests, tokens=tokens+excluded.tokens",
            (ev.author, user_id, key_id or "", hour, requests, tokens))
        date = day_of(hour)
        conn.execute(
            "INSERT INTO usage_stats (id, user_id, api_key_id, request_count, tokens_used, "
            "date, created_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
            "request_count=request_count+excluded.request_count, "
            "tokens_used=tokens_used+excluded.tokens_used, "
            "created_at=min(created_at, excluded.created_at)",
            (usage_row_id(user_id, key_id, date), user_id, key_id, requests, tokens, date,
             ev.wall))


# A row whose id is already logged is replaced only by a lower-ranked copy, so
# every node keeps the same one whatever order events arrive in.
_LOG_ROW = (
    "INSERT INTO request_logs (id, user_id, api_key_id, prompt_hash, model_used, "
    "response_time_ms, tokens_used, status, created_at, author, rank) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
    "user_id=excluded.user_id, api_key_id=excluded.api_key_id, "
    "prompt_hash=excluded.prompt_hash, model_used=excluded.model_used, "
    "response_time_ms=excluded.response_time_ms, tokens_used=excluded.tokens_used, "
    "status=excluded.status, created_at=excluded.created_at, author=excluded.author, "
    "rank=excluded.rank WHERE excluded.rank < request_logs.rank")


def _request_logged(conn: sqlite3.Connection, ev: Event) -> None:
    # one statement for the whole batch: this runs for every row of every
    # gateway's usage flush on every node
    rank, author = ev.rank, ev.author
    conn.executemany(_LOG_ROW, [
        (r["id"], r["user_id"], r["api_key_id"], r["prompt_hash"], r["model_used"],
         r["response_time_ms"], r["tokens_used"], r["status"], r["created_at"],
         author, f"{rank}|{i:04d}")
        for i, r in enumerate(ev.body["rows"])])


def _audit(conn: sqlite3.Connection, ev: Event) -> None:
    b = ev.body
    detail = json.dumps(b["detail"], sort_keys=True, default=_jsonable) if "detail" in b else None
    conn.execute(
        "INSERT OR IGNORE INTO audit (id, time, actor, action, target, outcome, source, detail, "
        "author, seq) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (f"{ev.author}:{ev.seq}", b["time"], b["actor"], b["action"], b.get("target"),
         b["outcome"], b.get("source"), detail, ev.author, ev.seq))


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


_HANDLERS = {
    "user.registered": _user_registered,
    "user.updated": _user_updated,
    "user.erased": _user_erased,
    "apikey.issued": _apikey_issued,
    "apikey.revoked": _apikey_revoked,
    "apikey.used": _apikey_used,
    "session.revoked": _session_revoked,
    "usage": _usage,
    "request.logged": _request_logged,
    "log.requests": _request_logged,
    "audit": _audit,
}
