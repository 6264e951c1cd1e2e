"""The p2pinfer error tree.

Every error that crosses a boundary (the wire, HTTP, the CLI) is a
:class:`P2PInferError` with a numeric ``code``. Remote errors keep their code:
a client that receives an error frame rebuilds the same class from the code,
so callers match on types, never on message strings.

    P2PInferError                      (code 1)
    ├── ProtocolError                  1000-1099: the wire itself
    │   ├── MalformedFrame             1001
    │   ├── FrameTooLarge              1002
    │   ├── UnsupportedVersion         1003
    │   └── UnknownMethod              1004
    ├── InvalidParams                  1100 (bad arguments to a method or route)
    ├── ConfigError                    1101 (a config value; names the key)
    ├── CallError                      1200-1299: the call as a whole
    │   ├── DeadlineExceeded           1201
    │   ├── Cancelled                  1202
    │   ├── HandlerError               1203 (the remote handler raised)
    │   ├── PeerUnavailable            1204 (cannot dial / connection lost)
    │   ├── StreamBroken               1205 (the stream died mid-call)
    │   ├── TooManyStreams             1206 (per-peer limits)
    │   └── StreamStalled              1207 (the caller stopped reading a stream)
    ├── AccessError                    1300-1399: who you are
    │   ├── NotMember                  1301 (member-only method, caller not admitted)
    │   ├── PermissionDenied           1302 (member, but not for this)
    │   ├── AuthenticationRequired     1303
    │   ├── UntrustedPeer              1304 (a peer shows no valid member certificate)
    │   ├── InvalidCredentials         1310 (wrong password)
    │   ├── UnknownUser                1311
    │   ├── InactiveUser               1312
    │   ├── LoginThrottled             1313 (retry_after)
    │   ├── InvalidToken               1320 (malformed or tampered token)
    │   ├── TokenExpired               1321
    │   ├── TokenRevoked               1322
    │   ├── UntrustedIssuer            1323 (token signed by a non-member)
    │   ├── InvalidApiKey              1330 (malformed, tampered or unknown)
    │   └── RevokedApiKey              1331
    ├── ConflictError                  1400-1499: the request clashes with state
    │   ├── UsernameTaken              1401
    │   ├── EmailTaken                 1402
    │   ├── RegistrationLost           1403 (a concurrent registration won)
    │   └── NotFound                   1404
    ├── ValidationError                1500-1599: well-formed but unacceptable
    │   ├── WeakPassword               1501
    │   ├── InvalidEmail               1502
    │   └── InvalidUsername            1503
    ├── LimitError                     1600-1699: come back later (retry_after)
    │   ├── RateLimited                1601
    │   ├── QuotaExceeded              1602
    │   ├── ConcurrencyLimited         1603
    │   └── Overloaded                 1604
    ├── InferenceError                 1700-1799
    │   ├── UnknownModel               1701
    │   ├── BackendUnavailable         1702 (connection refused / down)
    │   │   └── ModelUnavailable       1708 (its runner is restarting; retry_after)
    │   ├── BackendError               1703 (the backend answered an error)
    │   ├── BackendTimeout             1704
    │   ├── MalformedBackendResponse   1705
    │   ├── NoWorkerAvailable          1706
    │   ├── StreamInterrupted          1707 (a worker died after the first token)
    │   └── MissingCapability          1709 (the model cannot do what was asked:
    │                                        data names the capability)
    └── LedgerError                    1800-1899
        ├── InvalidEvent               1801 (malformed body / fields)
        ├── BadSignature               1802
        ├── WrongNetwork               1803
        ├── UnauthorizedAuthor         1804 (not a member, or removed)
        │   └── KindNotAllowed         1807 (a member whose certificate lacks the kind)
        ├── ReplayedEvent              1805
        ├── StorageError               1806
        └── CheckpointRequired         1808 (the events asked for were pruned: take
                                             the peer's checkpoint)

An error may carry ``data`` (a small msgpack-able dict), for example
``{"retry_after": 3.5}`` for :class:`LimitError`.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "P2PInferError",
    "error_from_code",
    "error_class_for_code",
]


class P2PInferError(Exception):
    """Base class of every p2pinfer error. ``code`` survives the wire."""

    code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500

    def __init__(self, message: str = "", *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__
        self.data: dict[str, Any] = dict(data or {})

    @property
    def retry_after(self) -> float | None:
        value = self.data.get("retry_after")
        return float(value) if isinstance(value, int | float) else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form used by HTTP error bodies and ``--json`` output."""
        out: dict[str, Any] = {
            "code": self.code,
            "type": self.__class__.__name__,
            "message": self.message,
        }
        if self.data:
            out["data"] = self.data
        return out


# --- the wire ---------------------------------------------------------------
class ProtocolError(P2PInferError):
    code = 1000
    http_status = 400


class MalformedFrame(ProtocolError):
    code = 1001


class FrameTooLarge(ProtocolError):
    code = 1002
    http_status = 413


class UnsupportedVersion(ProtocolError):
    code = 1003


class UnknownMethod(ProtocolError):
    code = 1004
    http_status = 404


class InvalidParams(P2PInferError):
    code = 1100
    http_status = 422


class ConfigError(P2PInferError):
    code = 1101
    http_status = 500


# --- calls ------------------------------------------------------------------
class CallError(P2PInferError):
    code = 1200
    http_status = 502


class DeadlineExceeded(CallError):
    code = 1201
    http_status = 504


class Cancelled(CallError):
    code = 1202
    http_status = 499


class HandlerError(CallError):
    code = 1203
    http_status = 500


class PeerUnavailable(CallError):
    code = 1204
    http_status = 503


class StreamBroken(CallError):
    code = 1205
    http_status = 502


class TooManyStreams(CallError):
    code = 1206
    http_status = 429


class StreamStalled(CallError):
    """The caller granted no credit (read nothing) for the server's
    ``stall_timeout``: the stream was ended to free what it held."""

    code = 1207
    http_status = 408


# --- access -----------------------------------------------------------------
class AccessError(P2PInferError):
    code = 1300
    http_status = 403


class NotMember(AccessError):
    code = 1301


class PermissionDenied(AccessError):
    code = 1302


class AuthenticationRequired(AccessError):
    code = 1303
    http_status = 401


class UntrustedPeer(AccessError):
    """A node offered as a gateway (or other entry point) shows no valid
    certificate of the network: the client sends it no credential."""

    code = 1304
    http_status = 502


class InvalidCredentials(AccessError):
    code = 1310
    http_status = 401


class UnknownUser(AccessError):
    code = 1311
    http_status = 401


class InactiveUser(AccessError):
    code = 1312


class LoginThrottled(AccessError):
    code = 1313
    http_status = 429


class InvalidToken(AccessError):
    code = 1320
    http_status = 401


class TokenExpired(AccessError):
    code = 1321
    http_status = 401


class TokenRevoked(AccessError):
    code = 1322
    http_status = 401


class UntrustedIssuer(AccessError):
    code = 1323
    http_status = 401


class InvalidApiKey(AccessError):
    code = 1330
    http_status = 401


class RevokedApiKey(AccessError):
    code = 1331
    http_status = 401


# --- conflicts --------------------------------------------------------------
class ConflictError(P2PInferError):
    code = 1400
    http_status = 409


class UsernameTaken(ConflictError):
    code = 1401


class EmailTaken(ConflictError):
    code = 1402


class RegistrationLost(ConflictError):
    code = 1403


class NotFound(ConflictError):
    code = 1404
    http_status = 404


# --- validation -------------------------------------------------------------
class ValidationError(P2PInferError):
    code = 1500
    http_status = 422


class WeakPassword(ValidationError):
    code = 1501


class InvalidEmail(ValidationError):
    code = 1502


class InvalidUsername(ValidationError):
    code = 1503


# --- limits -----------------------------------------------------------------
class LimitError(P2PInferError):
    code = 1600
    http_status = 429


class RateLimited(LimitError):
    code = 1601


class QuotaExceeded(LimitError):
    code = 1602


class ConcurrencyLimited(LimitError):
    code = 1603


class Overloaded(LimitError):
    code = 1604
    http_status = 503


# --- inference --------------------------------------------------------------
class InferenceError(P2PInferError):
    code = 1700
    http_status = 502


class UnknownModel(InferenceError):
    code = 1701
    http_status = 404


class BackendUnavailable(InferenceError):
    code = 1702
    http_status = 503


class BackendError(InferenceError):
    code = 1703


class BackendTimeout(InferenceError):
    code = 1704
    http_status = 504


class MalformedBackendResponse(InferenceError):
    code = 1705


class NoWorkerAvailable(InferenceError):
    code = 1706
    http_status = 503


class StreamInterrupted(InferenceError):
    code = 1707


class ModelUnavailable(BackendUnavailable):
    """The model's runner process stopped and is being restarted; another
    worker, or this one after ``retry_after`` seconds, can answer."""

    code = 1708


class MissingCapability(InferenceError):
    """The model cannot serve this kind of request (JSON output, tools,
    embeddings): ``data`` has ``capability`` and ``model``."""

    code = 1709
    http_status = 400


# --- ledger -----------------------------------------------------------------
class LedgerError(P2PInferError):
    code = 1800
    http_status = 400


class InvalidEvent(LedgerError):
    code = 1801


class BadSignature(LedgerError):
    code = 1802


class WrongNetwork(LedgerError):
    code = 1803


class UnauthorizedAuthor(LedgerError):
    code = 1804
    http_status = 403


class ReplayedEvent(LedgerError):
    code = 1805
    http_status = 409


class StorageError(LedgerError):
    code = 1806
    http_status = 500


class KindNotAllowed(UnauthorizedAuthor):
    code = 1807


class CheckpointRequired(LedgerError):
    """The events asked for were pruned here: take a checkpoint first."""

    code = 1808
    http_status = 409


def _all_subclasses(cls: type[P2PInferError]) -> list[type[P2PInferError]]:
    out: list[type[P2PInferError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[int, type[P2PInferError]] = {P2PInferError.code: P2PInferError}
for _cls in _all_subclasses(P2PInferError):
    if _cls.code in _BY_CODE:  # pragma: no cover - guarded by tests/test_errors.py
        raise RuntimeError(f"duplicate error code {_cls.code}: {_cls} and {_BY_CODE[_cls.code]}")
    _BY_CODE[_cls.code] = _cls
    __all__.append(_cls.__name__)
del _cls


def error_class_for_code(code: int) -> type[P2PInferError]:
    """The error class registered for ``code`` (the base class if unknown)."""
    return _BY_CODE.get(code, P2PInferError)


def error_from_code(code: int, message: str, data: dict[str, Any] | None = None) -> P2PInferError:
    """Rebuild the error a peer sent us, keeping its code and data."""
    cls = error_class_for_code(code)
    err = cls(message, data=data)
    if cls is P2PInferError and code != P2PInferError.code:
        # An error code this version does not know: keep the number visible.
        err.data.setdefault("remote_code", code)
    return err
