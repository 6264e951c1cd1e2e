"""Backups of a node's ledger store, and restoring a node from one.

**Backup** (:func:`backup`, ``p2pinfer backup``) copies the store with
SQLite's online backup API in one step, i.e. inside one read transaction:
in WAL mode the node keeps writing meanwhile and the copy is one
consistent moment of it (never half a transaction). The copy is checked
(``PRAGMA integrity_check``), gets a ``backup_info`` row (the node's peer
id, network, version vector, time) and is written with mode 0600 (it holds
password hashes) under a temporary name, then renamed into place.

**Restore** (:func:`restore`, ``p2pinfer restore``, with the node stopped)
checks that the backup belongs to this node's network (and, unless
forced, to this node), moves the current database aside
(``node.db.before-restore-<time>``, never deleted), installs the backup
and sets the **restore fence**. When the node starts it catches up from
its peers by ordinary anti-entropy.

**Why a fence.** A node numbers its own events 1, 2, 3, ... and peers
refuse a second, different event with a number they have seen (a replay).
A backup is older than the node's last writes: events it wrote after the
backup may live on its peers. Writing again from the backup's numbers would
reuse those numbers, and every peer would refuse the new events for good.
So a restored node writes nothing (``Ledger.append`` raises StorageError,
``data.reason = "restored"``; callers such as the gateway's usage recorder
retry) until ``[ledger] restore_quorum`` other members (default: half of
the members with roles, rounded up, at least one) have told it, in
``ledgerSync``, the highest of its own events they hold (applied or waiting
for a gap, ``own_max``), and it has pulled and applied its events up to the
highest of those. Then it continues after its real last event. Its request
logs (the log lane, :mod:`.logs`) are numbered apart: a peer that keeps them
reports the highest it holds (``own_log_max``) and the node numbers new
ones after it. In a network
with no other member there is nobody to ask, and nobody who could have seen
a lost event: the fence lifts at once. ``restore --quorum 0`` (trust the
backup) is for a network whose other members are gone for good.

The node's keys are not in the backup: back up ``node.key``,
``member.cert`` and ``network.json`` (and, offline, ``owner.key``) from its
home separately.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StorageError

__all__ = ["BackupInfo", "backup", "read_info", "restore"]

FORMAT = 1


@dataclass(frozen=True)
class BackupInfo:
    """What a backup file says about itself."""

    format: int
    peer_id: str
    network_id: str
    taken_at: float
    heads: dict[str, int]
    events: int
    path: Path

    @property
    def own_head(self) -> int:
        """The node's own last event in the backup."""
        return self.heads.get(self.peer_id, 0)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "peer_id": self.peer_id,
                "network_id": self.network_id, "taken_at": self.taken_at,
                "own_head": self.own_head, "authors": len(self.heads),
                "events": self.events, "path": str(self.path)}


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _private_file(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)


def backup(db_path: Path, out: Path, *, peer_id: str, network_id: str) -> BackupInfo:
    """Copy the live store at ``db_path`` to ``out`` (see the module docstring).

    Raises:
        StorageError: the store cannot be read, or the copy is not sound.
        ConfigError: ``db_path`` does not exist.
    """
    if not db_path.is_file():
        raise ConfigError(f"no ledger store at {db_path}")
    out = out.resolve()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        _private_file(tmp)
        src = _connect(db_path)
        try:
            dst = _connect(tmp)
            try:
                src.backup(dst)  # all pages in one step: one consistent snapshot
                check = dst.execute("PRAGMA integrity_check").fetchone()[0]
                if check != "ok":
                    raise StorageError(f"the backup of {db_path} is not sound: {check}")
                heads = {a: int(s) for a, s in dst.execute("SELECT author, seq FROM heads")}
                events = int(dst.execute("SELECT count(*) FROM events WHERE applied=1")
                             .fetchone()[0])
                info = {"format": FORMAT, "peer_id": peer_id, "network_id": network_id,
                        "taken_at": time.time(), "heads": heads, "events": events}
                dst.execute("CREATE TABLE backup_info (key TEXT PRIMARY KEY, value TEXT)")
                dst.execute("INSERT INTO backup_info VALUES ('info', ?)", (json.dumps(info),))
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                dst.close()
        finally:
            src.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(out)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot back up {db_path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return read_info(out)


def read_info(path: Path) -> BackupInfo:
    """The ``backup_info`` of a backup file.

    Raises:
        ConfigError: not a p2pinfer backup (or unreadable).
    """
    if not path.is_file():
        raise ConfigError(f"no backup file at {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM backup_info WHERE key='info'").fetchone()
        finally:
            conn.close()
        data = json.loads(row[0])
        return BackupInfo(int(data["format"]), str(data["peer_id"]), str(data["network_id"]),
                          float(data["taken_at"]), dict(data["heads"]), int(data["events"]),
                          path)
    except (sqlite3.Error, TypeError, KeyError, ValueError) as exc:
        raise ConfigError(f"{path} is not a p2pinfer ledger backup ({exc})") from exc


def restore(backup_file: Path, db_path: Path, *, peer_id: str, network_id: str,
            force: bool = False, quorum: int | None = None) -> dict[str, Any]:
    """Install ``backup_file`` as the store at ``db_path`` (node stopped),
    with the restore fence set (see the module docstring).

    Args:
        backup_file: a file written by :func:`backup`.
        db_path: the node's database path.
        peer_id, network_id: the node the store is for.
        force: accept a backup of another node of the same network.
        quorum: members to hear from before writing (None: ``[ledger]
            restore_quorum``; 0: trust the backup).

    Returns:
        ``{backup, moved_aside, fence}``.

    Raises:
        ConfigError: another network's backup, another node's (without
            ``force``), or not a backup.
        StorageError: the backup is not sound or cannot be installed.
    """
    info = read_info(backup_file)
    if info.network_id != network_id:
        raise ConfigError(f"{backup_file} is a backup of network {info.network_id}, this node "
                          f"belongs to {network_id}")
    if info.peer_id != peer_id and not force:
        raise ConfigError(f"{backup_file} is a backup of node {info.peer_id}, not of this node "
                          f"({peer_id}); pass --force to use it anyway")
    moved: list[str] = []
    stamp = time.strftime("%Y%m%dT%H%M%S")
    owner = _owner_of(db_path)
    for suffix in ("", "-wal", "-shm"):
        current = db_path.with_name(db_path.name + suffix)
        if current.exists():
            aside = current.with_name(f"{db_path.name}.before-restore-{stamp}{suffix}")
            current.replace(aside)
            moved.append(str(aside))
    db_path.parent.mkdir(parents=True, exist_ok=True)
    fence = {"restored_at": time.time(), "backup_taken_at": info.taken_at,
             "backup_own_head": info.own_head, "from": str(backup_file)}
    if quorum is not None:
        fence["quorum"] = quorum
    tmp = db_path.with_name(f".{db_path.name}.restoring")
    tmp.unlink(missing_ok=True)
    try:
        _private_file(tmp)
        src = sqlite3.connect(f"file:{backup_file}?mode=ro", uri=True)
        try:
            dst = _connect(tmp)
            try:
                src.backup(dst)
                check = dst.execute("PRAGMA integrity_check").fetchone()[0]
                if check != "ok":
                    raise StorageError(f"{backup_file} is not sound: {check}")
                dst.execute("DROP TABLE backup_info")
                if dst.execute("SELECT 1 FROM sqlite_master WHERE name='local_state'"
                               ).fetchone() is None:  # a backup from before the fence existed
                    dst.execute("CREATE TABLE local_state (key TEXT PRIMARY KEY, value TEXT)")
                dst.execute("INSERT OR REPLACE INTO local_state VALUES ('fence', ?)",
                            (json.dumps(fence),))
                dst.execute("PRAGMA journal_mode=WAL")
            finally:
                dst.close()
        finally:
            src.close()
        if owner is not None:
            os.chown(tmp, *owner)
        tmp.replace(db_path)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot restore {backup_file}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return {"backup": info.to_dict(), "moved_aside": moved, "fence": fence}


def _owner_of(db_path: Path) -> tuple[int, int] | None:
    """Who the restored database must belong to, when root restores it: the
    owner of the database it replaces, else of its directory (the node's
    home). Run as root (``sudo p2pinfer restore``), the restored file would
    otherwise belong to root, and the node, running as its own user, could
    not open it."""
    if os.geteuid() != 0:
        return None
    for path in (db_path, db_path.parent):
        try:
            st = path.stat()
        except OSError:
            continue
        return (st.st_uid, st.st_gid)
    return None
