"""Data export and account erasure, on a node with the auth role.

**Export** (:meth:`Privacy.export`): everything this node's replica of the
ledger holds about a user, as one JSON document (see
:func:`p2pinfer.ledger.privacy.user_record`): the account, API key metadata
(never a key or its hash), usage per day and per gateway hour, request logs
(prompt hashes only: prompts are never stored) and the audit rows about the
user. A user exports their own data with a session token (an API key is
not enough: a leaked inference key must not leak the account); an admin or
a network operator may export anyone's. Every export is audited.

**Erasure** (:meth:`Privacy.erase`): the user's active API keys are revoked,
then a signed ``user.erased`` tombstone is appended (``Ledger.erase_user``)
and an audit row records who erased whom. Every node that applies the
tombstone drops the user from ``users``, strips username, email and password
hash from the registration and replaces the stored registration events by
stubs that peers pull instead (:mod:`p2pinfer.ledger.events`), then
compacts its write-ahead log; from then on no API of any node can show the
username or email (the names are free for new accounts), while usage
totals, request logs (hashes) and audit rows stay, keyed by the user's id.
Self-service erasure needs a session token *and* the password (a wrong
password counts as a failed login, so it is throttled the same way); an
admin (session token) or a network operator (``as_operator``) may erase
another user without it.

Backups taken before an erasure still hold the data: a node restored from
one redacts it again as soon as it catches up (the tombstone replicates),
but the backup files themselves must be rotated by the operator.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..errors import NotFound, PermissionDenied
from ..ledger.logs import MAX_GATHER_ROWS as MAX_EXPORT_LOGS
from ..ledger.privacy import EXPORT_VERSION, is_erased, log_rows, user_record

if TYPE_CHECKING:  # pragma: no cover
    from .service import Actor, AuthService

__all__ = ["Privacy"]

log = logging.getLogger(__name__)

EXPORT = "user.export"
ERASE = "user.erase"


class Privacy:
    """Export and erasure (see the module docstring) on top of an :class:`AuthService`."""

    def __init__(self, service: AuthService) -> None:
        self.service = service
        self.ledger = service.ledger

    def _allowed(self, actor: Actor, target: str, *, self_id: str | None, what: str) -> None:
        if target != self_id and not (actor.is_admin or actor.operator):
            raise PermissionDenied(f"only admins and network operators may {what} "
                                   "another user's account")

    async def export(self, actor: Actor, user_id: str, *, self_id: str | None,
                     source: str) -> dict[str, Any]:
        """The JSON export of ``user_id`` (the actor's own, or anyone's for an
        admin or operator). Request logs come from every connected member
        that holds some (they are not replicated everywhere: see
        :mod:`p2pinfer.ledger.logs`).

        Raises:
            PermissionDenied: another user's data, by a non-admin.
            NotFound: no such user (or it was erased).
        """
        self._allowed(actor, user_id, self_id=self_id, what="export")
        record = user_record(self.ledger.store.conn, user_id)
        if record is None:
            raise NotFound("no such user", data={"user_id": user_id})
        logs = await self.ledger.gather_request_logs(user_id, limit=MAX_EXPORT_LOGS)
        record["request_logs"] = log_rows(logs)
        svc = self.service
        svc._write(svc._audit(EXPORT, "success", actor=actor.name, target=f"user:{user_id}",
                              source=source))
        return {"version": EXPORT_VERSION, "exported_at": time.time(),
                "exported_by": svc.peer_id, "network": self.ledger.network_id,
                **record}

    async def check_password(self, user_id: str, password: Any, *, source: str) -> None:
        """Confirm an erasure with the account's password, as a login would
        (throttled; a wrong password is a failed login).

        Raises:
            LoginThrottled, InvalidCredentials, NotFound.
        """
        user = self.ledger.user(user_id)
        if user is None:
            raise NotFound("no such user", data={"user_id": user_id})
        await self.service.confirm_password(user, password, source=source, purpose="erase",
                                            refused="the account was not erased")

    def erase(self, actor: Actor, user_id: str, *, self_id: str | None,
              source: str) -> dict[str, Any]:
        """Erase ``user_id`` everywhere (the caller checked the password of a
        self-service erasure). Erasing an erased user changes nothing.

        Returns:
            ``{user_id, erased_at, revoked_keys, redacted, already_erased}``.

        Raises:
            PermissionDenied: another user, by a non-admin. NotFound: no such user.
        """
        self._allowed(actor, user_id, self_id=self_id, what="erase")
        svc = self.service
        when = is_erased(self.ledger.store.conn, user_id)
        if when is not None:
            return {"user_id": user_id, "erased_at": when, "revoked_keys": 0, "redacted": 0,
                    "already_erased": True}
        if self.ledger.user(user_id) is None:
            raise NotFound("no such user", data={"user_id": user_id})
        now = svc.clock()
        revoke = [("apikey.revoked", {"key_id": k.id, "revoked_at": now})
                  for k in self.ledger.api_keys_of(user_id)
                  if k.is_active and k.revoked_at is None]
        if revoke:
            self.ledger.append_many(revoke)
        erasures = self.ledger.erase_user(user_id)
        redacted = sum(len(e.body.get("redacts", [])) for e in erasures)
        target = f"user:{user_id}"
        svc._write(svc._audit(ERASE, "success", actor=actor.name, target=target, source=source,
                              detail={"revoked_keys": len(revoke), "redacted": redacted}))
        log.info("erased user %s (%d key(s) revoked, %d event(s) redacted)", user_id,
                 len(revoke), redacted)
        return {"user_id": user_id, "erased_at": erasures[0].body["erased_at"],
                "revoked_keys": len(revoke), "redacted": redacted, "already_erased": False}
