"""One process per node home: an exclusive lock on ``<home>/node.lock``.

Two processes on one home share one identity and one database: peers see
one peer id come and go, both write the same SQLite file, and when one
exits it removes the other's ``daemon.json``, after which ``p2pinfer
restore`` took the live database for a stopped one. A node holds this lock
(``flock``, released by the kernel if the process dies) for as long as it
runs; a second node on the same home, and commands that need the node
stopped, refuse and name the process that holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import trio

from .errors import ConfigError

__all__ = ["HomeLock", "LOCK_FILE", "holder_of"]

LOCK_FILE = "node.lock"
# Seconds a node waits for the lock before it refuses: a node stopped in the
# same process a moment ago may still be closing its connections.
LOCK_WAIT = 5.0


def _pid_in(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"


class HomeLock:
    """The exclusive lock of one node home (see the module docstring)."""

    def __init__(self, home: Path) -> None:
        self.path = home / LOCK_FILE
        self._fd: int | None = None

    def try_acquire(self) -> str | None:
        """Take the lock; None if taken, else the pid of the process holding it."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_in(fd)
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return None

    async def acquire(self, wait: float = LOCK_WAIT) -> None:
        """Take the lock, waiting up to ``wait`` seconds.

        Raises:
            ConfigError: another process (or node) runs on this home.
        """
        deadline = trio.current_time() + wait
        while True:
            holder = self.try_acquire()
            if holder is None:
                return
            if trio.current_time() >= deadline:
                raise ConfigError(
                    f"another p2pinfer node runs on {self.path.parent} (pid {holder}): one "
                    "process per node home; stop it first, or give this one another --home",
                    data={"pid": holder})
            await trio.sleep(0.1)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)
                self._fd = None


def holder_of(home: Path) -> str | None:
    """The pid of the process running a node on ``home``, or None if none
    does (the lock is free)."""
    path = home / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
