"""The query side of the audit trail (``getAuditLog``).

The auth role writes an ``audit`` ledger event for every sensitive operation
(register, login success and failure, key issue and revoke, tier change,
node admit and remove) with actor, action, target, outcome, source and time;
the ledger replicates it to every member. This module checks the filters of
a query and shapes the rows the node's ledger returns, so any member can ask
a metrics node what happened anywhere in the swarm.

    params: {"actor": str, "action": str, "since": epoch seconds, "limit": 1-1000}
            (all optional; limit defaults to 100)
    result: {"rows": [{"id", "time", "actor", "action", "target", "outcome",
                       "source", "detail", "author"}, ...]}   newest first
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import InvalidParams

__all__ = ["AUDIT_MAX_LIMIT", "audit_row", "parse_audit_query"]

AUDIT_MAX_LIMIT = 1000
_MAX_FILTER = 200


def parse_audit_query(params: Any) -> dict[str, Any]:
    """Keyword arguments for ``Ledger.audit`` from ``getAuditLog`` params.

    Raises:
        InvalidParams: an unknown key or a bad value; ``data.field`` names it.
    """
    if params in (None, [], {}):
        return {"limit": 100}
    if not isinstance(params, dict):
        raise InvalidParams("params: getAuditLog takes {actor, action, since, limit}",
                            data={"field": "params"})
    extra = set(params) - {"actor", "action", "since", "limit"}
    if extra:
        key = sorted(map(str, extra))[0]
        raise InvalidParams(f"{key}: unknown key", data={"field": key})
    out: dict[str, Any] = {"limit": 100}
    for key in ("actor", "action"):
        value = params.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not 0 < len(value) <= _MAX_FILTER:
            raise InvalidParams(f"{key}: must be a string of 1-{_MAX_FILTER} characters",
                                data={"field": key})
        out[key] = value
    since = params.get("since")
    if since is not None:
        if isinstance(since, bool) or not isinstance(since, int | float) \
                or not math.isfinite(since):
            raise InvalidParams("since: must be a time in seconds since the epoch",
                                data={"field": "since"})
        out["since"] = float(since)
    limit = params.get("limit", 100)
    if type(limit) is not int or not 0 < limit <= AUDIT_MAX_LIMIT:
        raise InvalidParams(f"limit: must be an integer from 1 to {AUDIT_MAX_LIMIT}",
                            data={"field": "limit"})
    out["limit"] = limit
    return out


def audit_row(row: Any) -> dict[str, Any]:
    """A ledger ``AuditRow`` as a wire map."""
    return {
        "id": row.id,
        "time": row.time,
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "outcome": row.outcome,
        "source": row.source,
        "detail": row.detail,
        "author": row.author,
    }
