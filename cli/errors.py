"""The one place where errors become CLI messages and exit codes.

Every expected failure ends the command with one line on stderr
(``Error: ...``) and one of these exit codes, never a traceback:

====  ==========================================================
code  meaning
====  ==========================================================
0     success
1     the swarm refused or failed the request (a P2PInferError)
2     bad usage or configuration (a flag, a config file, a home)
3     not logged in, wrong credentials, a revoked key, not a member
4     a limit: rate limited, quota exceeded, overloaded
5     the swarm cannot be reached, no worker, or a timeout
130   interrupted (Ctrl-C)
====  ==========================================================

:class:`ErrorMappingGroup` (the ``p2pinfer`` group) applies
:func:`to_click` around every command, so commands simply let errors rise.
"""

from __future__ import annotations

import errno
from typing import Any

import click

from p2pinfer import errors as e

__all__ = [
    "EXIT_AUTH",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_LIMIT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "CliError",
    "ErrorMappingGroup",
    "explain",
    "sole_error",
    "to_click",
]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_LIMIT = 4
EXIT_UNREACHABLE = 5
EXIT_INTERRUPTED = 130

_LOGIN_AGAIN = "run `p2pinfer login` again"
_NEW_KEY = "create one with `p2pinfer keys create` (after `p2pinfer login`)"
_OPERATOR = ("operator commands act as a network member: pass --home (or set P2PINFER_HOME) "
             "to a node home holding the owner key or an operator certificate")


class CliError(click.ClickException):
    """A CLI-level failure with its exit code (see the module docstring)."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        # click declares exit_code on the class; each error carries its own
        self.exit_code = exit_code  # type: ignore[misc]


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 90:
        return f"{max(value, 0.1):.1f} s" if value < 10 else f"{value:.0f} s"
    if value < 5400:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def explain(exc: e.P2PInferError) -> str:
    """One line telling a person what went wrong and, where it helps, what to do."""
    msg = exc.message
    if isinstance(exc, e.InvalidCredentials):
        return "wrong username or password (no account yet? `p2pinfer register`)"
    if isinstance(exc, e.UnknownUser):
        return f"{msg} (register with `p2pinfer register`)"
    if isinstance(exc, e.LoginThrottled):
        return f"too many failed logins: try again in {_seconds(exc.retry_after) or 'a while'}"
    if isinstance(exc, e.AuthenticationRequired):
        return (f"not logged in ({msg}): run `p2pinfer login`, or pass --api-key "
                "(or set P2PINFER_API_KEY)")
    if isinstance(exc, e.RevokedApiKey):
        return f"this API key was revoked; {_NEW_KEY}"
    if isinstance(exc, e.InvalidApiKey):
        return f"the API key is not valid ({msg}); {_NEW_KEY}"
    if isinstance(exc, e.TokenExpired | e.TokenRevoked | e.InvalidToken | e.UntrustedIssuer):
        return f"your session has ended ({msg}): {_LOGIN_AGAIN}"
    if isinstance(exc, e.NotMember):
        return f"{msg} ({_OPERATOR})"
    if isinstance(exc, e.LimitError):
        wait = _seconds(exc.retry_after)
        label = {e.RateLimited: "rate limited", e.QuotaExceeded: "quota exceeded",
                 e.Overloaded: "the swarm is overloaded",
                 e.ConcurrencyLimited: "too many requests at once"}.get(type(exc), "limited")
        return f"{label}: {msg}" + (f"; try again in {wait}" if wait else "")
    if isinstance(exc, e.UnknownModel) or (isinstance(exc, e.NoWorkerAvailable)
                                           and "model" in msg):
        return f"{msg} (list the models with `p2pinfer models`)"
    if isinstance(exc, e.MissingCapability):
        return f"{msg} (what each model can do: `p2pinfer models`, column 'can')"
    if isinstance(exc, e.PeerUnavailable):
        return f"cannot reach the swarm: {msg}"
    if isinstance(exc, e.InvalidParams) and exc.data.get("field"):
        return msg if str(exc.data["field"]) in msg else f"{exc.data['field']}: {msg}"
    return msg


def exit_code_for(exc: e.P2PInferError) -> int:
    """The exit code of an error (see the module docstring)."""
    if isinstance(exc, e.InvalidParams | e.ConfigError | e.ValidationError
                  | e.MissingCapability):
        return EXIT_USAGE
    if isinstance(exc, e.AccessError):
        return EXIT_AUTH
    if isinstance(exc, e.LimitError):
        return EXIT_LIMIT
    if isinstance(exc, e.PeerUnavailable | e.NoWorkerAvailable | e.DeadlineExceeded
                  | e.StreamBroken):
        return EXIT_UNREACHABLE
    return EXIT_ERROR


def to_click(exc: e.P2PInferError) -> CliError:
    """The CLI error for a library error."""
    return CliError(explain(exc), exit_code_for(exc))


def sole_error(exc: BaseException) -> BaseException:
    """Unwrap trio's single-member exception groups (nested ones too)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        # Several failures at once: a Ctrl-C among them wins, else the first error.
        leaves = list(_leaves(exc))
        for leaf in leaves:
            if isinstance(leaf, KeyboardInterrupt):
                return leaf
        for leaf in leaves:
            if isinstance(leaf, e.P2PInferError):
                return leaf
    return exc


def _leaves(exc: BaseException) -> Any:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def map_exception(exc: BaseException) -> BaseException | None:
    """The click exception to raise instead of ``exc``, or None to let it be."""
    import trio

    leaf = sole_error(exc)
    if isinstance(leaf, click.exceptions.Exit | click.ClickException | click.Abort):
        return leaf
    if isinstance(leaf, KeyboardInterrupt):
        click.echo("Interrupted.", err=True)
        return click.exceptions.Exit(EXIT_INTERRUPTED)
    if isinstance(leaf, e.P2PInferError):
        return to_click(leaf)
    if isinstance(leaf, trio.TooSlowError):
        return CliError("timed out: the swarm did not answer in time (raise --timeout)",
                        EXIT_UNREACHABLE)
    if isinstance(leaf, BrokenPipeError):
        return click.exceptions.Exit(EXIT_ERROR)
    if isinstance(leaf, PermissionError | FileNotFoundError | IsADirectoryError):
        return CliError(f"{leaf.strerror}: {leaf.filename}", EXIT_USAGE)
    if isinstance(leaf, OSError) and leaf.errno == errno.EADDRINUSE:
        return CliError("a port this command listens on is already in use "
                        f"({leaf.strerror}); choose another one", EXIT_USAGE)
    if isinstance(leaf, OSError) and leaf.strerror:
        return CliError(f"{leaf.strerror}" + (f": {leaf.filename}" if leaf.filename else ""))
    return None


class ErrorMappingGroup(click.Group):
    """A click group that maps every expected error of its commands (and
    subcommands) through :func:`map_exception`: no tracebacks, fixed exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BaseException as exc:
            mapped = map_exception(exc)
            if mapped is None or mapped is exc:
                raise
            raise mapped from None
