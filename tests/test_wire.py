"""The sans-IO frame codec, without sockets."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer import wire
from p2pinfer.errors import FrameTooLarge, MalformedFrame, UnsupportedVersion

MESSAGES = [
    wire.Request(1, "echo", {"a": [1, 2, b"x"]}, 2.5, {"rid": "abc"}),
    wire.Request(2**40, "m", None, None, {}),
    wire.Response(3, {"ok": True}),
    wire.Chunk(4, "tok"),
    wire.End(4, {"usage": 3}),
    wire.Error(5, 1601, "slow down", {"retry_after": 1.5}),
    wire.Error(6, 1004, "nope", None),
    wire.Cancel(7),
    wire.Credit(8, 16),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_roundtrip(msg: wire.Message) -> None:
    assert wire.FrameDecoder().feed(wire.encode(msg)) == [msg]


def test_split_anywhere() -> None:
    data = wire.encode_many(MESSAGES)
    for step in (1, 2, 3, 7, 64):
        dec = wire.FrameDecoder()
        out = []
        for i in range(0, len(data), step):
            out.extend(dec.feed(data[i : i + step]))
        assert out == MESSAGES
        assert dec.buffered == 0


def test_oversized_frame_is_skipped_without_buffering() -> None:
    dec = wire.FrameDecoder(max_frame=1024)
    big = struct.pack(">I", 10_000) + b"\0" * 10_000
    good = wire.encode(wire.Cancel(9))
    out = dec.feed(big[:500])
    assert len(out) == 1 and isinstance(out[0], wire.DecodeError)
    assert isinstance(out[0].error, FrameTooLarge)
    assert dec.buffered == 0  # the body is discarded, not kept
    out = dec.feed(big[500:] + good)
    assert out == [wire.Cancel(9)]


def test_encode_refuses_oversized() -> None:
    with pytest.raises(FrameTooLarge):
        wire.encode(wire.Response(1, b"x" * 2000), max_frame=1024)


def frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "raw, error, call_id",
    [
        (struct.pack(">I", 3) + b"\xc1\xc1\xc1", MalformedFrame, 0),
        (frame({"not": "a list"}), MalformedFrame, 0),
        (frame([1, 1]), MalformedFrame, 0),
        (frame([1, 1, -5, "m", None, None, {}]), MalformedFrame, 0),
        (frame([2, 1, 7, "m", None, None, {}]), UnsupportedVersion, 7),
        (frame([1, 99, 7]), MalformedFrame, 7),
        (frame([1, 1, 7, "", None, None, {}]), MalformedFrame, 7),
        (frame([1, 1, 7, "m" * 200, None, None, {}]), MalformedFrame, 7),
        (frame([1, 1, 7, "m", None, -1, {}]), MalformedFrame, 7),
        (frame([1, 1, 7, "m", None, "soon", {}]), MalformedFrame, 7),
        (frame([1, 1, 7, "m", None, None, [1]]), MalformedFrame, 7),
        (frame([1, 5, 7, "code", "msg", None]), MalformedFrame, 7),
        (frame([1, 7, 7, 0]), MalformedFrame, 7),
    ],
)
def test_bad_frames_are_errors_not_exceptions(raw: bytes, error: type, call_id: int) -> None:
    dec = wire.FrameDecoder()
    out = dec.feed(raw + wire.encode(wire.Cancel(1)))
    assert len(out) == 2
    assert isinstance(out[0], wire.DecodeError) and isinstance(out[0].error, error)
    assert out[0].call_id == call_id
    assert out[1] == wire.Cancel(1)  # and the stream stays in sync


def test_canonical_pack_is_order_independent() -> None:
    a = {"b": 1, "a": {"y": [1, {"d": 1, "c": 2}], "x": 2}}
    b = {"a": {"x": 2, "y": [1, {"c": 2, "d": 1}]}, "b": 1}
    assert wire.canonical_pack(a) == wire.canonical_pack(b)


@pytest.mark.parametrize(("obj", "expected"), [
    # bytes from the first implementation, which every stored signature covers
    ({"b": 1, "a": [{"z": 2, "y": (1, 2)}], "c": {"x": None}},
     "83a1619182a179920102a17a02a16201a16381a178c0"),
    ({1: "a", "1": "b", b"k": "c"}, "83c4016ba16301a161a131a162"),  # keys of mixed types
])
def test_canonical_pack_bytes_are_stable(obj: Any, expected: str) -> None:
    assert wire.canonical_pack(obj).hex() == expected


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=64))
def test_fuzz_decoder_never_raises(data: bytes, step: int) -> None:
    dec = wire.FrameDecoder(max_frame=512)
    for i in range(0, len(data), step):
        for item in dec.feed(data[i : i + step]):
            assert isinstance(item, wire.Message | wire.DecodeError)
    assert dec.buffered <= 512 + 4 + step


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)
    | st.binary(max_size=20) | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**63 - 1), st.text(min_size=1, max_size=128), values)
def test_fuzz_roundtrip(call_id: int, method: str, params: object) -> None:
    msg = wire.Request(call_id, method, params, None, {})
    assert wire.FrameDecoder().feed(wire.encode(msg)) == [msg]
