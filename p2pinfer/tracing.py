"""Request ids that follow a request across nodes.

The id lives in a context variable: the RPC server sets it from the caller's
call metadata before running a handler, and the RPC client copies it into the
metadata of every call made while it is set. A gateway's call to a worker
therefore carries the client's request id, and both nodes log it (see
:class:`RequestIdFilter`).
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets

__all__ = ["current_request_id", "new_request_id", "valid_request_id", "RequestIdFilter"]

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "p2pinfer_request_id", default=None
)

_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def new_request_id() -> str:
    return secrets.token_hex(8)


def valid_request_id(value: object) -> str | None:
    """``value`` if it is an acceptable request id (short, printable), else None."""
    if isinstance(value, str) and _VALID.match(value):
        return value
    return None


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (or ``-``) to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or "-"
        return True
