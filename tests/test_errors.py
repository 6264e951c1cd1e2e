from __future__ import annotations

import p2pinfer
from p2pinfer import errors


def test_codes_are_unique_and_roundtrip() -> None:
    seen: dict[int, str] = {}
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.P2PInferError):
            assert cls.code not in seen, (cls, seen.get(cls.code))
            seen[cls.code] = name
            err = errors.error_from_code(cls.code, "msg", {"retry_after": 2})
            assert type(err) is cls
            assert err.retry_after == 2.0
    assert len(seen) > 50


def test_unknown_code_keeps_number() -> None:
    err = errors.error_from_code(9999, "from the future")
    assert type(err) is errors.P2PInferError
    assert err.data["remote_code"] == 9999


def test_public_api() -> None:
    assert set(p2pinfer.__all__) >= {"Node", "NodeConfig", "Identity", "P2PInferError"}
    for name in p2pinfer.__all__:
        assert getattr(p2pinfer, name) is not None
