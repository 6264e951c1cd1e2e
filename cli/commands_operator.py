"""Operator commands, run as a network member (see :mod:`.operator`):
``metrics``, ``audit`` and ``users``."""

from __future__ import annotations

import datetime
import re
import time
from typing import TYPE_CHECKING, Any

import click

from .errors import EXIT_USAGE, CliError
from .operator import OperatorAccess, operator_access
from .output import console, fmt_time, note, print_json, table

if TYPE_CHECKING:  # pragma: no cover
    from .operator import OperatorSession

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def _summarise(text: str, pattern: str) -> list[tuple[str, str, int, str]]:
    """One row per metric family: name, type, series, value (sum, or count
    and mean for histograms)."""
    from prometheus_client.parser import text_string_to_metric_families

    regex = re.compile(pattern)
    rows = []
    for family in text_string_to_metric_families(text):
        if not regex.search(family.name + ("_total" if family.type == "counter" else "")):
            continue
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        if family.type in ("histogram", "summary"):
            count = sum(s.value for s in samples if s.name.endswith("_count"))
            total = sum(s.value for s in samples if s.name.endswith("_sum"))
            series = sum(1 for s in samples if s.name.endswith("_count"))
            value = f"{count:,.0f} obs, mean {total / count:.3g}" if count else "0 obs"
        else:
            series = len(samples)
            value = f"{sum(s.value for s in samples):,.6g}"
        name = family.name + ("_total" if family.type == "counter" else "")
        rows.append((name, family.type, series, value))
    return rows


@click.command(context_settings=CONTEXT)
@click.option("--scope", type=click.Choice(["swarm", "node"]), default="swarm",
              show_default=True, help="Every node's metrics, or the metrics node's own.")
@click.option("--raw", is_flag=True, help="Print the Prometheus text exposition as is.")
@click.option("-g", "--grep", "pattern", default="^ai_platform_", show_default=True,
              help="Only metric families whose name matches this regex.")
@operator_access
def metrics(scope: str, raw: bool, pattern: str, op: OperatorAccess) -> None:
    """Prometheus metrics of the swarm, summed per metric (operators only).

    Runs as a network member with the node home's keys (--home).

    \b
    Examples:
      p2pinfer metrics
      p2pinfer metrics --grep tokens
      p2pinfer metrics --raw --scope node > node.prom
    """
    import trio

    try:
        re.compile(pattern)
    except re.error as exc:
        raise CliError(f"--grep: not a regular expression ({exc})", EXIT_USAGE) from None

    async def body(session: OperatorSession) -> str:
        return str(await session.call_role("metrics", "getMetrics", {"scope": scope}))

    text = trio.run(op.run, body)
    if raw:
        click.echo(text, nl=not text.endswith("\n"))
        return
    rows = _summarise(text, pattern)
    console().print(table(f"{len(rows)} metric(s), {scope} view",
                          ["metric", "type", "series", "value"], rows,
                          justify={"series": "right", "value": "right"}))


def _since(value: str | None) -> float | None:
    """``1h`` / ``30m`` / ``2d`` ago, or a date ``YYYY-MM-DD[THH:MM]``, as epoch seconds."""
    if value is None:
        return None
    m = DURATION.match(value)
    if m:
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return time.time() - seconds
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise CliError(f"--since: {value!r} is neither a duration (30m, 2h, 7d) nor a date "
                       "(2025-01-31)", EXIT_USAGE) from None


@click.command(context_settings=CONTEXT)
@click.option("--actor", help="Only rows by this actor (e.g. user:<id>, peer:<id>).")
@click.option("--action", help="Only this action (e.g. user.login, apikey.revoke).")
@click.option("--since", help="Only newer rows: a duration (30m, 2h, 7d) or a date.")
@click.option("-n", "--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_access
def audit(actor: str | None, action: str | None, since: str | None, limit: int, as_json: bool,
          op: OperatorAccess) -> None:
    """The audit trail of sensitive operations, newest first (operators only).

    Logins, registrations, key changes and admin actions, from the
    replicated ledger. Runs as a network member with --home's keys.

    \b
    Examples:
      p2pinfer audit
      p2pinfer audit --action user.login --since 2h
      p2pinfer audit --actor user:2b0c4f9e-5d1a-4c3e-9f7a-0d8e6b5a4c21 --json
    """
    import trio

    params: dict[str, Any] = {"limit": limit}
    for key, value in (("actor", actor), ("action", action), ("since", _since(since))):
        if value is not None:
            params[key] = value

    async def body(session: OperatorSession) -> list[dict[str, Any]]:
        return list((await session.call_role("metrics", "getAuditLog", params))["rows"])

    rows = trio.run(op.run, body)
    if as_json:
        print_json(rows)
        return
    console().print(table(f"{len(rows)} audit row(s)",
                          ["time", "actor", "action", "target", "outcome", "source"],
                          [(fmt_time(r.get("time")), r.get("actor"), r.get("action"),
                            r.get("target"), r.get("outcome"), r.get("source")) for r in rows]))


# -- users ------------------------------------------------------------------------------
@click.group(context_settings=CONTEXT)
def users() -> None:
    """Change a user's tier, active flag or admin flag (operators only).

    A user's id is shown by `p2pinfer whoami` (as that user) and in the
    audit trail. Runs as a network member with --home's keys; every change
    is audited.

    \b
    Examples:
      p2pinfer users set-tier 2b0c4f9e-5d1a-4c3e-9f7a-0d8e6b5a4c21 premium
      p2pinfer users set-active 2b0c4f9e-5d1a-4c3e-9f7a-0d8e6b5a4c21 false
      p2pinfer users set-admin 2b0c4f9e-5d1a-4c3e-9f7a-0d8e6b5a4c21 true
    """


def _user_id(value: str) -> str:
    if not UUID.match(value):
        raise CliError(f"{value!r} is not a user id (a lower-case UUID; `p2pinfer whoami` "
                       "shows yours)", EXIT_USAGE)
    return value


def _set_user(op: OperatorAccess, method: str, user_id: str, field: str, value: Any) -> None:
    import trio

    params = {"as_operator": True, "user_id": _user_id(user_id), field: value}

    async def body(session: OperatorSession) -> dict[str, Any]:
        return dict(await session.call_role("auth", method, params))

    user = trio.run(op.run, body)
    note(f"{user.get('username')} ({user.get('user_id')}): tier {user.get('tier')}, "
         f"{'active' if user.get('is_active') else 'inactive'}, "
         f"{'admin' if user.get('is_admin') else 'not admin'}.")


@users.command("set-tier", context_settings=CONTEXT)
@click.argument("user_id")
@click.argument("tier", type=click.Choice(["default", "premium"]))
@operator_access
def users_set_tier(user_id: str, tier: str, op: OperatorAccess) -> None:
    """Put a user on the default or the premium rate limits.

    \b
    Examples:
      p2pinfer users set-tier 2b0c4f9e-5d1a-4c3e-9f7a-0d8e6b5a4c21 premium
    """
    _set_user(op, "setUserTier", user_id, "tier", tier)


@users.command("set-active", context_settings=CONTEXT)
@click.argument("user_id")
@click.argument("active", type=click.BOOL)
@operator_access
def users_set_active(user_id: str, active: bool, op: OperatorAccess) -> None:
    """Deactivate a user (false: every key and session is refused) or
    reactivate one (true).

    \b
    Examples:
      p2pinfer users set-active 2b0c4f9e-5d1a-4c3e-9f7a-0d8e6b5a4c21 false
    """
    _set_user(op, "setUserActive", user_id, "is_active", active)


@users.command("set-admin", context_settings=CONTEXT)
@click.argument("user_id")
@click.argument("admin", type=click.BOOL)
@operator_access
def users_set_admin(user_id: str, admin: bool, op: OperatorAccess) -> None:
    """Make a user an admin (true) or take it back (false).

    \b
    Examples:
      p2pinfer users set-admin 2b0c4f9e-5d1a-4c3e-9f7a-0d8e6b5a4c21 true
    """
    _set_user(op, "setUserAdmin", user_id, "is_admin", admin)


COMMANDS = [metrics, audit, users]
