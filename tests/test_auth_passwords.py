"""Password hashing and policy, username and email rules (no network)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pinfer import errors
from p2pinfer.auth.passwords import (
    PasswordHasher,
    check_password,
    normalise_email,
    normalise_password,
    normalise_username,
)

GOOD = "Tr0ub4dor&3x"


def reason_of(exc: pytest.ExceptionInfo[errors.P2PInferError]) -> str:
    return str(exc.value.data["reason"])


def test_argon2id_hash_has_the_documented_parameters_and_verifies() -> None:
    hasher = PasswordHasher()
    started = time.perf_counter()
    digest = hasher.hash(GOOD)
    assert time.perf_counter() - started < 1.0
    assert digest.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert GOOD not in digest
    assert hasher.verify(digest, GOOD)
    assert not hasher.verify(digest, GOOD + "!")
    assert not hasher.verify("not a hash", GOOD)
    assert hasher.hash(GOOD) != digest  # a fresh salt each time


def test_a_hash_made_with_other_parameters_still_verifies() -> None:
    old = PasswordHasher(time_cost=1, memory_kib=1024).hash(GOOD)
    assert PasswordHasher().verify(old, GOOD)


@pytest.mark.parametrize(("password", "reason"), [
    ("Sh0rt!", "too_short"),
    ("x" * 300, "too_long"),
    ("alllowercaseletters", "one_class"),
    ("12345678901234", "one_class"),
    ("aaaaaaaaaaA1", "too_few_distinct"),
    ("my-alice-Password1", "contains_username"),
    ("Xx-alice.w-99", "contains_username"),
    ("Password123", "common"),
    ("Qwerty12345!", "common"),
    ("1q2w3e4r5t", "common"),
])
def test_password_policy(password: str, reason: str) -> None:
    with pytest.raises(errors.WeakPassword) as exc:
        check_password(normalise_password(password) if len(password) <= 256 else password,
                       username="alice", email="al.ice@example.org")
    assert reason_of(exc) == reason


def test_password_policy_email_local_part() -> None:
    with pytest.raises(errors.WeakPassword) as exc:
        check_password("Secret-jdoe-2024", username="john", email="jdoe@example.org")
    assert reason_of(exc) == "contains_email"


@pytest.mark.parametrize("password", [GOOD, "correct horse battery", "Zürich-Sommer-7",
                                      "パスワードは長いです1"])
def test_good_passwords_pass(password: str) -> None:
    check_password(normalise_password(password), username="alice", email="alice@example.org")


def test_passwords_are_nfkc_normalised() -> None:
    assert normalise_password("Ｐａｓｓ１２３４５６") == "Pass123456"
    assert normalise_password("Cafe\u0301-latte-9") == normalise_password("Caf\u00e9-latte-9")
    with pytest.raises(errors.WeakPassword):
        normalise_password(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "norm"), [
    ("  Alice ", "alice"), ("bob.smith", "bob.smith"), ("J_Doe-99", "j_doe-99"),
    ("ＡＬＩＣＥ２", "alice2"),
])
def test_usernames_are_normalised(raw: str, norm: str) -> None:
    assert normalise_username(raw) == norm


@pytest.mark.parametrize(("raw", "reason"), [
    ("ab", "length"), ("a" * 33, "length"), ("has space", "characters"), ("-lead", "characters"),
    ("trail_", "characters"), ("dou..ble", "characters"), ("ümlaut", "characters"),
    ("admin", "reserved"), ("Root", "reserved"), (None, "type"),
])
def test_bad_usernames(raw: object, reason: str) -> None:
    with pytest.raises(errors.InvalidUsername) as exc:
        normalise_username(raw)
    assert reason_of(exc) == reason


@pytest.mark.parametrize(("raw", "norm"), [
    (" John.Doe+tag@Example.ORG ", "john.doe+tag@example.org"),
    ("a@b.co", "a@b.co"),
    ("x@xn--bcher-kva.example", "x@xn--bcher-kva.example"),
])
def test_emails_are_normalised(raw: str, norm: str) -> None:
    assert normalise_email(raw) == norm


@pytest.mark.parametrize(("raw", "reason"), [
    ("no-at-sign", "format"), ("two@@example.org", "format"), ("a@b@example.org", "format"),
    (".lead@example.org", "local"), ("dou..ble@example.org", "local"),
    ('"quoted"@example.org', "local"), ("a b@example.org", "local"),
    ("user@localhost", "domain"), ("user@-bad.org", "domain"), ("user@example.c0m", "domain"),
    ("user@exa_mple.org", "domain"), ("user@example..org", "domain"),
    ("u@" + "a" * 100 + ".org", "length"), (42, "type"),
])
def test_bad_emails(raw: object, reason: str) -> None:
    with pytest.raises(errors.InvalidEmail) as exc:
        normalise_email(raw)
    assert reason_of(exc) == reason


@given(st.text(max_size=40))
def test_username_normalisation_is_idempotent(raw: str) -> None:
    try:
        name = normalise_username(raw)
    except errors.InvalidUsername:
        return
    assert normalise_username(name) == name
    assert name == name.strip().lower()


@given(st.emails())
def test_email_normalisation_is_idempotent(raw: str) -> None:
    try:
        email = normalise_email(raw)
    except errors.InvalidEmail:
        return
    assert normalise_email(email) == email
    assert email.count("@") == 1
