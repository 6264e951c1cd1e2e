"""Logging for the daemon and the CLI (the library itself never configures logging).

Two formats: ``text`` for people and ``json`` (one object per line) for log
collectors. Both carry the request id (see :mod:`p2pinfer.tracing`), so one
request can be followed through the gateway and the worker that served it.
In JSON, fields passed with ``extra=`` (``log.info("served", extra={"model":
m, "latency_ms": 12.5})``) become keys of the object, so collectors can
filter on them without parsing messages.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from p2pinfer.tracing import RequestIdFilter

__all__ = ["configure_logging", "JsonFormatter"]

# Attributes every LogRecord has: anything else on a record came from extra=.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "request_id", "node", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, request_id, node,
    the record's ``extra=`` fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        node = getattr(record, "node", None)
        if node:
            out["node"] = node
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _NodeFilter(logging.Filter):
    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        return True


class _Libp2pRoutine(logging.Filter):
    """py-libp2p logs each failed dial, refused protocol and failed
    handshake of a single peer at ERROR, often over several lines (dozens a
    minute while a node is down). p2pinfer handles each failure where it
    happens and logs what matters once (a link lost and restored, a peer
    refused), so py-libp2p's records below CRITICAL are shown only at DEBUG."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("libp2p") and record.levelno < logging.CRITICAL:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.debug
        return True


def configure_logging(
    *, level: str | int = "INFO", fmt: str = "text", node: str = "", stream: Any = None
) -> None:
    """Configure the root logger once for a daemon or CLI process.

    py-libp2p logs multi-line warnings about ordinary events (a peer closing a
    DHT stream), so its loggers are held at ERROR unless ``level`` is DEBUG,
    and its errors about single peers are shown as DEBUG (:class:`_Libp2pRoutine`).
    """
    import libp2p as _libp2p  # noqa: F401  (its import resets its logger: import first)

    debug = logging.getLevelName(level) == "DEBUG" or level == logging.DEBUG
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_Libp2pRoutine(debug))
    handler.addFilter(RequestIdFilter())
    if node:
        handler.addFilter(_NodeFilter(node))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    quiet = logging.DEBUG if logging.getLevelName(level) == "DEBUG" or level == logging.DEBUG \
        else logging.ERROR
    for name in ("libp2p", "multiaddr", "hypercorn.access", "httpx", "httpcore", "zeroconf"):
        logging.getLogger(name).setLevel(quiet if name != "hypercorn.access" else logging.WARNING)
    # py-libp2p's loggers do not propagate; give them our handler.
    libp2p_logger = logging.getLogger("libp2p")
    libp2p_logger.handlers = [handler]
    libp2p_logger.propagate = False
