"""The p2pinfer wire format, sans-IO: bytes in, messages out, no awaits.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack.
The msgpack value is an array whose first three items are always
``[version, kind, call_id]``:

    REQUEST  [v, 1, id, method: str, params, timeout: float | None, meta: map]
    RESPONSE [v, 2, id, result]
    CHUNK    [v, 3, id, data]                  one item of a server stream
    END      [v, 4, id, trailer]               a server stream finished
    ERROR    [v, 5, id, code: int, message: str, data: map | None]
    CANCEL   [v, 6, id]                        the client gave up on a call
    CREDIT   [v, 7, id, n: int]                the client can take n more chunks

``timeout`` is the caller's remaining time in seconds (clocks of two machines
are never compared). ``meta`` carries call metadata such as the request id
that follows a request across nodes.

The length is checked against the maximum frame size *before* anything is
buffered or decoded; an oversized frame is skipped byte by byte, so one bad
frame costs its sender an error reply and nothing else: the stream stays in
sync and the next frame decodes normally. The error names the frame's call
id when its first bytes carry one, so the caller is answered, not left
waiting.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import (
    FrameTooLarge,
    MalformedFrame,
    P2PInferError,
    UnsupportedVersion,
)

__all__ = [
    "VERSION",
    "DEFAULT_MAX_FRAME",
    "Kind",
    "Request",
    "Response",
    "Chunk",
    "End",
    "Error",
    "Cancel",
    "Credit",
    "Message",
    "DecodeError",
    "FrameDecoder",
    "encode",
    "encode_many",
    "pack",
    "unpack",
    "canonical_pack",
]

VERSION = 1
DEFAULT_MAX_FRAME = 4 * 1024 * 1024
MAX_METHOD_LEN = 128
MAX_CALL_ID = 2**63 - 1
_HEADER = struct.Struct(">I")


class Kind(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    CHUNK = 3
    END = 4
    ERROR = 5
    CANCEL = 6
    CREDIT = 7


@dataclass(slots=True)
class Request:
    id: int
    method: str
    params: Any = None
    timeout: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Response:
    id: int
    result: Any = None


@dataclass(slots=True)
class Chunk:
    id: int
    data: Any = None


@dataclass(slots=True)
class End:
    id: int
    trailer: Any = None


@dataclass(slots=True)
class Error:
    id: int
    code: int
    message: str
    data: dict[str, Any] | None = None

    @classmethod
    def from_exception(cls, call_id: int, exc: P2PInferError) -> Error:
        return cls(call_id, exc.code, exc.message, exc.data or None)


@dataclass(slots=True)
class Cancel:
    id: int


@dataclass(slots=True)
class Credit:
    id: int
    n: int


Message = Request | Response | Chunk | End | Error | Cancel | Credit


@dataclass(slots=True)
class DecodeError:
    """A frame that could not be decoded. ``call_id`` is known when the frame
    was well-formed enough to carry one, so the error can be addressed."""

    error: P2PInferError
    call_id: int = 0


def pack(obj: Any) -> bytes:
    """msgpack with the options used everywhere in p2pinfer."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _fields(msg: Message) -> list[Any]:
    if isinstance(msg, Request):
        return [VERSION, Kind.REQUEST, msg.id, msg.method, msg.params, msg.timeout, msg.meta]
    if isinstance(msg, Response):
        return [VERSION, Kind.RESPONSE, msg.id, msg.result]
    if isinstance(msg, Chunk):
        return [VERSION, Kind.CHUNK, msg.id, msg.data]
    if isinstance(msg, End):
        return [VERSION, Kind.END, msg.id, msg.trailer]
    if isinstance(msg, Error):
        return [VERSION, Kind.ERROR, msg.id, msg.code, msg.message, msg.data]
    if isinstance(msg, Cancel):
        return [VERSION, Kind.CANCEL, msg.id]
    if isinstance(msg, Credit):
        return [VERSION, Kind.CREDIT, msg.id, msg.n]
    raise TypeError(f"not a wire message: {msg!r}")


def encode(msg: Message, *, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One frame. Raises :class:`FrameTooLarge` rather than send what the
    peer would refuse."""
    try:
        body = pack(_fields(msg))
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedFrame(f"cannot encode {type(msg).__name__}: {exc}") from exc
    if len(body) > max_frame:
        raise FrameTooLarge(
            f"frame of {len(body)} bytes exceeds the limit of {max_frame}",
            data={"size": len(body), "limit": max_frame},
        )
    return _HEADER.pack(len(body)) + body


def encode_many(msgs: list[Message], *, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    return b"".join(encode(m, max_frame=max_frame) for m in msgs)


def _is_id(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_CALL_ID


def _decode_body(body: bytes) -> Message | DecodeError:
    try:
        obj = unpack(body)
    except Exception as exc:  # msgpack raises a zoo of types on bad input
        return DecodeError(MalformedFrame(f"frame is not valid msgpack: {type(exc).__name__}"))
    if not isinstance(obj, list) or len(obj) < 3:
        return DecodeError(MalformedFrame("frame is not a [version, kind, id, ...] array"))
    version, kind, call_id = obj[0], obj[1], obj[2]
    if not _is_id(call_id):
        return DecodeError(MalformedFrame("call id must be a non-negative integer"))
    if version != VERSION:
        return DecodeError(
            UnsupportedVersion(
                f"wire version {version!r} is not supported (this node speaks {VERSION})",
                data={"supported": [VERSION]},
            ),
            call_id,
        )
    n = len(obj)
    try:
        if kind == Kind.REQUEST and n == 7:
            method, params, timeout, meta = obj[3], obj[4], obj[5], obj[6]
            if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD_LEN:
                raise ValueError("method must be a non-empty string of at most 128 characters")
            if timeout is not None and (
                type(timeout) not in (int, float) or not 0 <= timeout < 10**9
            ):
                raise ValueError("timeout must be null or a non-negative number of seconds")
            if meta is None:
                meta = {}
            if not isinstance(meta, dict):
                raise ValueError("meta must be a map")
            timeout = None if timeout is None else float(timeout)
            return Request(call_id, method, params, timeout, meta)
        if kind == Kind.RESPONSE and n == 4:
            return Response(call_id, obj[3])
        if kind == Kind.CHUNK and n == 4:
            return Chunk(call_id, obj[3])
        if kind == Kind.END and n == 4:
            return End(call_id, obj[3])
        if kind == Kind.ERROR and n == 6:
            code, message, data = obj[3], obj[4], obj[5]
            if type(code) is not int or not isinstance(message, str):
                raise ValueError("error frames carry an integer code and a string message")
            if data is not None and not isinstance(data, dict):
                raise ValueError("error data must be a map")
            return Error(call_id, code, message, data)
        if kind == Kind.CANCEL and n == 3:
            return Cancel(call_id)
        if kind == Kind.CREDIT and n == 4:
            if type(obj[3]) is not int or not 0 < obj[3] <= 1_000_000:
                raise ValueError("credit must be an integer between 1 and 1000000")
            return Credit(call_id, obj[3])
    except ValueError as exc:
        return DecodeError(MalformedFrame(str(exc)), call_id)
    return DecodeError(MalformedFrame(f"unknown message kind {kind!r} with {n} fields"), call_id)


def _peek_call_id(head: bytes) -> int:
    """The call id of a frame from its first bytes (``[version, kind, id,
    ...``), or 0. An oversized frame is never decoded, but its error must
    still reach the call that sent it, or that call would wait for ever."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(head)
    try:
        if unpacker.read_array_header() < 3:
            return 0
        unpacker.skip()  # version
        unpacker.skip()  # kind
        call_id = unpacker.unpack()
    except Exception:  # too few bytes, or not a frame at all
        return 0
    return call_id if _is_id(call_id) else 0


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)`` returns the messages (or decode
    errors) completed by those bytes, in order.

    Memory is bounded by ``max_frame`` + one read: the length header is
    checked before the body is buffered, and an oversized body is discarded
    as it arrives.
    """

    __slots__ = ("_buf", "_max_frame", "_skip", "frames", "errors")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame
        self._skip = 0
        self.frames = 0
        self.errors = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message | DecodeError]:
        out: list[Message | DecodeError] = []
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return out
            data = data[self._skip :]
            self._skip = 0
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = _HEADER.unpack_from(buf, pos)
            if size > self._max_frame:
                self.errors += 1
                available = end - pos - 4
                out.append(
                    DecodeError(
                        FrameTooLarge(
                            f"frame of {size} bytes exceeds the limit of {self._max_frame}",
                            data={"size": size, "limit": self._max_frame},
                        ),
                        _peek_call_id(bytes(buf[pos + 4 : pos + 4 + min(available, 64)])),
                    )
                )
                if available >= size:
                    pos += 4 + size
                    continue
                self._skip = size - available
                pos = end
                break
            if end - pos - 4 < size:
                break
            msg = _decode_body(bytes(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
            if isinstance(msg, DecodeError):
                self.errors += 1
            else:
                self.frames += 1
            out.append(msg)
        if pos:
            del buf[:pos]
        return out


_NESTED = (dict, list, tuple)


def _type_then_value(k: Any) -> tuple[str, Any]:
    return (str(type(k)), k)


def canonical(obj: Any) -> Any:
    """``obj`` with every map's keys sorted (by type name, then value) and
    tuples as lists: packing it gives :func:`canonical_pack`'s bytes."""
    if isinstance(obj, dict):
        try:  # the usual case, all keys strings: the same order, 5x faster
            keys = sorted(obj) if all(type(k) is str for k in obj) else None
        except TypeError:
            keys = None
        if keys is None:
            keys = sorted(obj, key=_type_then_value)
        return {k: canonical(v) if isinstance(v := obj[k], _NESTED) else v for k in keys}
    if isinstance(obj, list | tuple):
        return [canonical(v) if isinstance(v, _NESTED) else v for v in obj]
    return obj


def canonical_pack(obj: Any) -> bytes:
    """A deterministic msgpack encoding (map keys sorted, tuples as arrays):
    the bytes that signatures cover, identical on every node."""
    return pack(canonical(obj))
