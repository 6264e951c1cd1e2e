"""Authentication: users, passwords, session tokens, API keys, admins.

Files:

- ``service.py``: :class:`AuthService`: register, login and throttling,
  refresh, logout, issue / list / revoke keys, tier / active / admin
  changes, usage, and the audit events they write;
- ``role.py``: :class:`AuthRole`: those operations as RPC methods
  (``registerUser``, ``loginUser``, ``generateApiKey``, ``validateApiKey``,
  ``getUserUsage``, ...), their params and the admin model;
- ``passwords.py``: argon2id hashing, the password policy, username and
  email rules;
- ``privacy.py``: data export and account erasure (``exportUserData``,
  ``eraseUser``).

What every node checks, whatever its roles, lives below the roles in
:mod:`p2pinfer.credentials`: the :class:`Authenticator` and its
:class:`Principal` (API keys and session tokens, offline, from the node's
ledger copy), the key format, the EdDSA session tokens, the throttles and
the ``[auth]`` settings; they are re-exported here.

Use from a role (no network round trip)::

    from p2pinfer.credentials import Authenticator
    auth = Authenticator(node)
    p = auth.authenticate({"api_key": key})      # or {"token": jwt}
    p.user_id, p.username, p.tier, p.is_admin, p.api_key_id, p.via

Configuration (``[auth]``; defaults shown)::

    [auth]
    token_ttl = 3600.0              # access token lifetime, seconds
    refresh_ttl = 1209600.0         # refresh token lifetime (14 d), renewed on refresh
    session_max = 2592000.0         # absolute session lifetime (30 d) from the login
    clock_skew = 30.0               # leeway on exp / iat, seconds
    argon2_time_cost = 2            # argon2id t   (OWASP: m = 19 MiB, t = 2, p = 1)
    argon2_memory_kib = 19456       # argon2id m, KiB
    argon2_parallelism = 1          # argon2id p
    max_concurrent_hashes = 2       # argon2 computations at once on this node
    password_min_length = 10
    max_failures_per_account = 5    # failed logins per account (swarm-wide) ...
    max_failures_per_source = 20    # ... per source (this node) ...
    throttle_window = 900.0         # ... within this window, then LoginThrottled
    registrations_per_source = 10   # registrations per source ...
    registration_window = 3600.0    # ... per window, then RateLimited
    registration_wait = 1.0         # seconds registerUser watches for a rival registration
    max_keys_per_user = 50          # active API keys per user

A node that holds the role must have a certificate granting ``auth``
(ledger ``KIND_ROLES``): auth members alone may write users, keys, session
revocations and audit rows, and tokens are trusted only when their issuer
holds the auth role.
"""

from __future__ import annotations

from ..credentials.apikeys import IssuedKey as IssuedKey
from ..credentials.authenticator import Authenticator as Authenticator
from ..credentials.authenticator import Principal as Principal
from ..credentials.settings import AuthSettings as AuthSettings
from ..credentials.tokens import Claims as Claims
from .role import AuthRole as AuthRole
from .service import Actor as Actor
from .service import AuthService as AuthService

__all__ = [
    "Actor",
    "AuthRole",
    "AuthService",
    "AuthSettings",
    "Authenticator",
    "Claims",
    "IssuedKey",
    "Principal",
]
