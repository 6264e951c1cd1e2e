"""Credentials every node checks, below the roles.

Any node that takes a user's request (the gateway, the web role, the auth
role itself) checks API keys and session tokens offline, from its own
ledger copy: :class:`~.authenticator.Authenticator`, with the key format
(:mod:`.apikeys`), session tokens (:mod:`.tokens`, EdDSA JWTs), the
throttles on guessing (:mod:`.throttle`) and the ``[auth]`` settings they
read (:mod:`.settings`). The auth role, which issues keys and tokens, builds
on this package; no role imports another for it.
"""

from __future__ import annotations

from .apikeys import IssuedKey as IssuedKey
from .authenticator import Authenticator as Authenticator
from .authenticator import Principal as Principal
from .settings import AuthSettings as AuthSettings
from .tokens import Claims as Claims

__all__ = ["AuthSettings", "Authenticator", "Claims", "IssuedKey", "Principal"]
