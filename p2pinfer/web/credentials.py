"""Credentials from HTTP headers (pure functions, no I/O).

Every API route authenticates with an API key or a session token, taken
from the first of these that holds a kind of credential the route accepts:

- ``X-API-Key: p2p_...``;
- ``Authorization: Bearer <value>``: an API key when the value looks like
  one (``p2p_`` prefix), else a session token (the OpenAI and Ollama
  clients send their key this way);
- ``Authorization: Basic ...`` with the API key as the password (or as the
  user name when the password is empty), so a URL such as
  ``http://any:p2p_...@host:3000`` works for clients that only take a URL.

Cookies are never read here: the JSON routes cannot be driven by a
cross-site form (see :mod:`p2pinfer.web.security` for the pages).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from ..errors import AuthenticationRequired, InvalidParams

__all__ = ["API_KEY_PREFIX", "MAX_CREDENTIAL", "credentials_from_headers"]

API_KEY_PREFIX = "p2p_"
MAX_CREDENTIAL = 4096


def _classify(value: str) -> dict[str, str]:
    return {"api_key": value} if value.startswith(API_KEY_PREFIX) else {"token": value}


def _basic(encoded: str) -> str:
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidParams("Authorization: malformed Basic credentials",
                            data={"field": "Authorization"}) from None
    user, _, password = decoded.partition(":")
    return password or user


def credentials_from_headers(headers: Mapping[str, str], *,
                             allow: tuple[str, ...] = ("api_key", "token")) -> dict[str, str]:
    """``{"api_key": ...}`` or ``{"token": ...}`` from request headers.

    Args:
        headers: the request headers (case-insensitive mapping).
        allow: the kinds acceptable on this route.

    Raises:
        AuthenticationRequired: no credential, or not a kind allowed here.
        InvalidParams: a header too long or malformed.
    """
    found: list[dict[str, str]] = []
    key = headers.get("x-api-key")
    auth = headers.get("authorization")
    if key:
        if len(key) > MAX_CREDENTIAL:
            raise InvalidParams("X-API-Key: too long", data={"field": "X-API-Key"})
        found.append({"api_key": key.strip()})
    if auth:
        if len(auth) > MAX_CREDENTIAL:
            raise InvalidParams("Authorization: too long", data={"field": "Authorization"})
        scheme, _, value = auth.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            found.append(_classify(value))
        elif scheme.lower() == "basic" and value:
            secret = _basic(value)
            if secret:
                found.append({"api_key": secret})
        elif not found:
            raise AuthenticationRequired(
                "Authorization: expected 'Bearer <API key or session token>'",
                data={"field": "Authorization"})
    for candidate in found:
        if next(iter(candidate)) in allow:
            return candidate
    wanted = " or ".join("an API key (X-API-Key or Authorization: Bearer)" if a == "api_key"
                         else "a session token (Authorization: Bearer)" for a in allow)
    if found:
        raise AuthenticationRequired(f"this route needs {wanted}",
                                     data={"field": "Authorization"})
    raise AuthenticationRequired(f"{wanted} is required", data={"field": "Authorization"})
