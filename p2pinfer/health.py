"""Why a node or the swarm is not "ok": the shape every layer shares.

A node reports its own ``problems`` (``{"kind", "text"}``: a model in
error, the restore fence, a bootstrap peer it is not linked to); the
metrics role gathers every node's into ``getSystemHealth``, the gateway
into ``getServiceHealth``, the web role onto ``/system``. Members are told
the text (which names models and peers), others only the kind.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROBLEM_KINDS", "health_reasons"]


# What non-members are told of a node's problem (members get the text).
PROBLEM_KINDS = {"model_error": "a model is in error", "fenced": "restore fence",
                 "unlinked": "not linked to a bootstrap peer"}


def health_reasons(nodes: list[dict[str, Any]], models: dict[str, int],
                   alerts: list[dict[str, Any]], *, member: bool) -> list[str]:
    """Why the swarm is not "ok", one line each, from ``getSystemHealth``'s
    member view (its ``nodes``, ``models`` and ``alerts``). Members are told
    which node; others (``member=False``) the same lines without peer ids."""
    out: list[str] = []

    def who(n: dict[str, Any]) -> str:
        roles = ", ".join(n.get("roles") or []) or "no roles"
        return f"node {n.get('peer_id')} ({roles})" if member else f"a node ({roles})"

    for n in nodes:
        if not n.get("up"):
            error = n.get("error")
            out.append(f"{who(n)} is down" + (f": {error}" if member and error else ""))
            continue
        for problem in n.get("problems") or []:
            if not isinstance(problem, dict):
                continue
            kind = str(problem.get("kind", "problem"))
            text = str(problem.get("text", kind)) if member else PROBLEM_KINDS.get(kind, kind)
            out.append(f"{who(n)}: {text}")
    for name, workers in sorted(models.items()):
        if workers == 0:
            out.append(f"no worker serves model {name}")
    for alert in alerts:
        if alert.get("name") in ("NodeDown", "NoWorkerForModel"):
            continue  # said above, with the node or the model
        out.append(f"alert {alert.get('name')}: {alert.get('summary')}" if member
                   else f"alert {alert.get('name')} ({alert.get('severity')})")
    return out

