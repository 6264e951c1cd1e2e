"""The signed, replicated ledger: users, API keys, usage, logs and audit,
kept by every member node in its own SQLite file.

Files:

- ``ledger.py``: :class:`Ledger`, the only entry point other packages use;
- ``events.py``: the event format, signing, body shapes, kind → role rules;
- ``clock.py``: the hybrid logical clock that stamps events;
- ``membership.py``: owner key, certificates, removals, join tokens, files;
- ``store.py``: the SQLite store: checks, holds and applies events;
- ``views.py``: how each kind changes the tables (order-independent);
- ``queries.py``: typed read queries;
- ``migrations.py``: the schema, as ``m001_...`` migrations;
- ``replication.py``: the ledger RPC methods and anti-entropy;
- ``logs.py``: the log lane: request logs kept by their gateway and a few
  keepers, pulled by them, read across nodes;
- ``gossip.py``: GossipSub publishing, a fast hint only;
- ``privacy.py``: what the ledger holds about a user (exports), compaction
  after an erasure;
- ``backup.py``: online backups of the store, restores and the restore
  fence (a restored node learns its own sequence from peers before writing);
- ``metrics.py``: Prometheus metrics on the node's registry.

Using the ledger from a role (``ledger = node.ledger``)::

    ev = ledger.append("user.registered", {"user_id": ..., "username": ...,
                       "email": ..., "password_hash": ..., "created_at": time.time()})
    ledger.append_many([("usage", {...}), ("log.requests", {...})])  # one transaction
    ledger.user(user_id) / user_by_username(name) / user_by_email(email)
    ledger.check_available(username, email)     # UsernameTaken / EmailTaken
    ledger.check_registration(user_id)          # RegistrationLost if a rival won
    ledger.api_key(public_id)                   # one indexed query -> ApiKey | None
    ledger.api_key_by_id(key_id) / api_keys_of(user_id)
    ledger.usage(user_id=..., api_key_id=..., since="2025-01-01", until=...)
    ledger.usage_in_hour(hour, user_id=... | api_key_id=..., exclude_gateway=peer_id)
    ledger.request_logs(user_id=..., limit=100) / audit(actor=..., action=..., since=...)
    await ledger.gather_request_logs(user_id, limit=100)  # this node's and its peers'
    ledger.has_request_log(row_id)              # is this request log row applied here?
    ledger.is_session_revoked(jti)
    ledger.erase_user(user_id)                  # user.erased + redaction of its registrations
    ledger.subscribe(callback)                  # callback(events) after each commit
    await ledger.wait_for_version(vv) / wait_for_event(author, seq) / wait_until(pred)

Writes are synchronous (one SQLite transaction) and return the signed
:class:`~.events.Event`; it is then published on gossip and served to peers
by anti-entropy. Which node may write what is decided by its certificate
(``events.KIND_ROLES``): auth members write users, keys, sessions and audit
rows; gateway members write usage, request logs and ``apikey.used``.
Request logs (``log.requests``) are the exception to "every member keeps
everything": they stay with their gateway and its keepers (:mod:`.logs`);
request logs and audit rows expire (``[ledger] log_retention_days``,
``audit_retention_days``).

Event kinds and bodies are listed in :mod:`.events`; the order-independent
merge rules (registration conflicts: lowest ``(hlc, author, seq)`` wins;
counters summed; last-writer-wins fields; tombstones) in :mod:`.views`;
network files and the join token format in :mod:`.membership`.
"""

from __future__ import annotations

from .events import KIND_ROLES as KIND_ROLES
from .events import KINDS as KINDS
from .events import Event as Event
from .ledger import Ledger as Ledger
from .ledger import LedgerSettings as LedgerSettings
from .membership import MemberInfo as MemberInfo
from .membership import NetworkInfo as NetworkInfo
from .membership import Owner as Owner
from .membership import admit as admit
from .membership import create_network as create_network
from .membership import import_join_token as import_join_token
from .membership import load_network as load_network
from .membership import load_owner as load_owner
from .membership import make_join_token as make_join_token
from .membership import make_removal as make_removal
from .membership import parse_join_token as parse_join_token
from .queries import ApiKey as ApiKey
from .queries import AuditRow as AuditRow
from .queries import Registration as Registration
from .queries import RequestLog as RequestLog
from .queries import UsageRow as UsageRow
from .queries import User as User
from .store import IngestReport as IngestReport
from .store import Store as Store

__all__ = [
    "ApiKey",
    "AuditRow",
    "Event",
    "IngestReport",
    "KINDS",
    "KIND_ROLES",
    "Ledger",
    "LedgerSettings",
    "MemberInfo",
    "NetworkInfo",
    "Owner",
    "Registration",
    "RequestLog",
    "Store",
    "UsageRow",
    "User",
    "admit",
    "create_network",
    "import_join_token",
    "load_network",
    "load_owner",
    "make_join_token",
    "make_removal",
    "parse_join_token",
]
