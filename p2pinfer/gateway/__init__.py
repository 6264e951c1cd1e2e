"""The gateway role: authenticated, rate-limited, load-balanced inference.

- ``quota.py``: swarm-wide rate limits (one coordinator per user, tickets).
- ``router.py``: worker choice (power of two choices) and failover.
"""
