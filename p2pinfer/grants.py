"""What a member's certificate may grant, and which grant each action needs.

A certificate lists *grants*: the node roles (``auth``, ``gateway``,
``inference``, ``metrics``, ``web``), each letting a node run that role and do
what the role does for other members, and :data:`OPERATOR`, which lets a key
act for the network's operator (administer users, read the metrics and the
audit trail). Membership alone grants nothing beyond replicating the ledger:
a worker's key cannot administer users or spend another user's quota.

The capability table (which RPC method or action needs which grant) is in
docs/security.md; each row is enforced where the method is declared
(``rpc_method(..., grants=...)``) and tested in tests/test_capabilities.py.
"""

from __future__ import annotations

__all__ = ["ALL_GRANTS", "GRANTS", "LOG_KEEPERS", "LOG_READERS", "OBSERVERS", "OPERATOR",
           "RELAYS", "ROLES"]

# The node roles (config.ROLES is this tuple). This module imports nothing,
# so the CLI can use it without loading the node's dependencies.
ROLES: tuple[str, ...] = ("auth", "gateway", "inference", "metrics", "web")
OPERATOR = "operator"
GRANTS: tuple[str, ...] = (*ROLES, OPERATOR)
ALL_GRANTS: frozenset[str] = frozenset(GRANTS)
# Members whose calls may name the client they relay (the web role passes its
# HTTP client's address), so that throttles apply to that client.
RELAYS: frozenset[str] = frozenset({"web", "gateway"})
# Who may read a worker's models and their status, and the swarm's metrics.
OBSERVERS: frozenset[str] = frozenset({"gateway", "web", "metrics", OPERATOR})
# Who may keep (pull) other gateways' request logs: the nodes that read them
# (see p2pinfer.ledger.logs); and who may read a user's logs from a holder.
LOG_KEEPERS: frozenset[str] = frozenset({"auth", "metrics"})
LOG_READERS: frozenset[str] = frozenset({"auth", "metrics", "web", "gateway", OPERATOR})
