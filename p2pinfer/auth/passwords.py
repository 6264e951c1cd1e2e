"""Passwords, usernames and emails: hashing, policy and normalisation (sans-IO).

**Hashing.** Passwords are hashed with argon2id (argon2-cffi), each with its
own 16-byte random salt, into the PHC string (``$argon2id$v=19$m=...``) that
the ledger stores as ``password_hash``; the parameters travel inside the
string, so raising them later only affects new registrations. The defaults
are OWASP's first argon2id choice, m = 19 MiB, t = 2, p = 1: ~40 ms per hash
on one core of the reference machine (the benchmark's ``login_ms``), so a
login stays far under a second on 2 cores while an offline guess costs the
same 40 ms and 19 MiB. Hashing runs in a worker thread (argon2-cffi releases
the GIL), at most ``[auth] max_concurrent_hashes`` at once.

Passwords are NFKC-normalised before hashing and checking, so the same
password typed on two keyboards (composed or decomposed accents, full-width
digits) is the same password.

**Password policy** (:func:`check_password`, :class:`~p2pinfer.errors.WeakPassword`
with ``data.reason``):

- ``too_short`` / ``too_long``: at least ``[auth] password_min_length``
  (default 10) and at most 256 characters;
- ``one_class``: not all from one class of lower case, upper case, digits,
  other (letters and a digit, or words and a space, are fine);
- ``too_few_distinct``: at least 5 different characters;
- ``contains_username`` / ``contains_email``: must not contain the username
  or the email's local part (case-insensitive, parts of 3+ characters);
- ``common``: not in a small deny list of the most common passwords, also
  when a trailing run of digits or punctuation is removed.

**Usernames** (:func:`normalise_username`, InvalidUsername): NFKC, surrounding
whitespace removed, lower-cased; then 3-32 characters of ``a-z 0-9 . _ -``,
starting and ending with a letter or digit, no two separators in a row, and
not one of :data:`RESERVED_USERNAMES`. Stored lower-case, so ``Alice`` and
``alice`` are the same user.

**Emails** (:func:`normalise_email`, InvalidEmail): NFKC, surrounding
whitespace removed, lower-cased (the ledger treats emails as
case-insensitive); at most 100 characters; one ``@``; a local part of 1-64
characters of RFC 5322 dot-atom text (no leading, trailing or double dots,
no quoted strings); a domain of at least two dot-separated labels of
``a-z 0-9 -`` (1-63 characters, no leading or trailing hyphen), the last
one alphabetic or an ``xn--`` label. Internationalised domains must be given
in their ``xn--`` form; there is no DNS lookup.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from argon2 import PasswordHasher as _Argon2
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from ..errors import InvalidEmail, InvalidUsername, WeakPassword

__all__ = [
    "PasswordHasher",
    "check_password",
    "normalise_password",
    "normalise_username",
    "normalise_email",
    "RESERVED_USERNAMES",
    "MAX_PASSWORD_LENGTH",
]

MAX_PASSWORD_LENGTH = 256
MIN_DISTINCT = 5

RESERVED_USERNAMES = frozenset({
    "admin", "administrator", "root", "system", "operator", "support", "security",
    "p2pinfer", "anonymous", "null", "none", "undefined", "api", "auth", "gateway",
})

# The most common passwords of public breach corpora (and their obvious
# variants), compared after case folding and removing a trailing run of
# digits or punctuation.
_COMMON = frozenset({
    "password", "passw0rd", "p@ssword", "p@ssw0rd", "qwerty", "qwertyuiop", "asdfgh",
    "asdfghjkl", "zxcvbnm", "letmein", "welcome", "iloveyou", "admin", "administrator",
    "monkey", "dragon", "football", "baseball", "master", "sunshine", "princess",
    "trustno1", "shadow", "superman", "batman", "starwars", "whatever", "secret",
    "changeme", "default", "login", "abc", "abcdef", "abcdefg", "abcdefgh", "qazwsx",
    "1q2w3e4r", "1q2w3e4r5t", "zaq12wsx", "football1", "hello", "freedom", "computer",
    "internet", "michael", "jennifer", "jordan", "hunter", "killer", "pokemon",
    "correcthorsebatterystaple", "", "p2pinfer",
})

_USERNAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{1,30})[a-z0-9]")
_DOUBLE_SEP = re.compile(r"[._-]{2}")
_ATOM = re.compile(r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TLD = re.compile(r"[a-z]{2,63}|xn--[a-z0-9-]{1,59}")
_TRAILING = re.compile(r"[\d\W_]+$")


def _nfkc(value: str) -> str:
    return unicodedata.normalize("NFKC", value)


def normalise_username(value: Any) -> str:
    """The canonical form of a username.

    Raises:
        InvalidUsername: with ``data.reason`` (``type``, ``length``,
            ``characters``, ``reserved``).
    """
    if not isinstance(value, str):
        raise InvalidUsername("username must be a string", data={"reason": "type"})
    name = _nfkc(value).strip().lower()
    if not 3 <= len(name) <= 32:
        raise InvalidUsername("username must be 3-32 characters", data={"reason": "length"})
    if not _USERNAME.fullmatch(name) or _DOUBLE_SEP.search(name):
        raise InvalidUsername(
            "username may use a-z, 0-9 and . _ - (not two in a row), and must start and end "
            "with a letter or digit", data={"reason": "characters"})
    if name in RESERVED_USERNAMES:
        raise InvalidUsername(f"username {name!r} is reserved", data={"reason": "reserved"})
    return name


def normalise_email(value: Any) -> str:
    """The canonical form of an email address.

    Raises:
        InvalidEmail: with ``data.reason`` (``type``, ``length``, ``format``,
            ``local``, ``domain``).
    """
    if not isinstance(value, str):
        raise InvalidEmail("email must be a string", data={"reason": "type"})
    email = _nfkc(value).strip().lower()
    if not 3 <= len(email) <= 100:
        raise InvalidEmail("email must be 3-100 characters", data={"reason": "length"})
    if email.count("@") != 1:
        raise InvalidEmail("email must be local@domain", data={"reason": "format"})
    local, domain = email.split("@")
    if not 1 <= len(local) <= 64 or not all(_ATOM.fullmatch(a) for a in local.split(".")):
        raise InvalidEmail("the part before @ is not a valid address", data={"reason": "local"})
    labels = domain.split(".")
    if (len(labels) < 2 or not all(_LABEL.fullmatch(lb) for lb in labels)
            or not _TLD.fullmatch(labels[-1])):
        raise InvalidEmail("the part after @ is not a valid domain", data={"reason": "domain"})
    return email


def normalise_password(value: Any, *, max_len: int = MAX_PASSWORD_LENGTH) -> str:
    """The NFKC form hashed and checked (type and length only are enforced
    here, so that login accepts any password the policy once accepted).

    Raises:
        WeakPassword: not a string, or longer than ``max_len`` characters.
    """
    if not isinstance(value, str):
        raise WeakPassword("password must be a string", data={"reason": "type"})
    if len(value) > max_len:
        raise WeakPassword(f"password must be at most {max_len} characters",
                           data={"reason": "too_long"})
    return _nfkc(value)


def _classes(password: str) -> int:
    lower = upper = digit = other = False
    for ch in password:
        if ch.isdigit():
            digit = True
        elif ch.isalpha():
            if ch.islower():
                lower = True
            elif ch.isupper():
                upper = True
            else:  # letters without case (CJK, ...) count as their own class
                other = True
        else:
            other = True
    return lower + upper + digit + other


def check_password(password: str, *, username: str, email: str, min_length: int = 10) -> None:
    """Apply the password policy (see the module docstring) to a normalised
    password.

    Raises:
        WeakPassword: with ``data.reason`` naming the rule it breaks.
    """
    if len(password) < min_length:
        raise WeakPassword(f"password must be at least {min_length} characters",
                           data={"reason": "too_short", "min_length": min_length})
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPassword(f"password must be at most {MAX_PASSWORD_LENGTH} characters",
                           data={"reason": "too_long"})
    if _classes(password) < 2:
        raise WeakPassword("password must mix at least two of: lower case, upper case, "
                           "digits, other characters", data={"reason": "one_class"})
    if len(set(password)) < MIN_DISTINCT:
        raise WeakPassword(f"password must use at least {MIN_DISTINCT} different characters",
                           data={"reason": "too_few_distinct"})
    folded = password.casefold()
    if len(username) >= 3 and username.casefold() in folded:
        raise WeakPassword("password must not contain the username",
                           data={"reason": "contains_username"})
    local = email.split("@", 1)[0].casefold()
    if len(local) >= 3 and local in folded:
        raise WeakPassword("password must not contain the email address",
                           data={"reason": "contains_email"})
    stripped = _TRAILING.sub("", folded)
    if folded in _COMMON or stripped in _COMMON:
        raise WeakPassword("password is too common", data={"reason": "common"})


@dataclass(frozen=True)
class PasswordHasher:
    """argon2id with fixed parameters (see the module docstring).

    Both methods are CPU-bound (tens of milliseconds): call them in a worker
    thread (``trio.to_thread.run_sync``), never on the trio thread.
    """

    time_cost: int = 2
    memory_kib: int = 19456
    parallelism: int = 1
    _argon2: _Argon2 = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_argon2", _Argon2(
            time_cost=self.time_cost, memory_cost=self.memory_kib, parallelism=self.parallelism,
            hash_len=32, salt_len=16, type=Type.ID))

    def hash(self, password: str) -> str:
        """The PHC string of a normalised password, with a fresh salt."""
        return self._argon2.hash(password)

    def verify(self, password_hash: str, password: str) -> bool:
        """Whether ``password`` matches ``password_hash`` (any argon2 variant
        and parameters; a malformed stored hash never matches)."""
        try:
            return self._argon2.verify(password_hash, password)
        except VerifyMismatchError:
            return False
        except (VerificationError, InvalidHashError):
            return False
