"""The node's RPC served on a unix-domain socket, for processes of the same user.

HTTP front-door workers run in their own processes (uvicorn on asyncio), and
reach their node over a unix socket with the ordinary RPC wire protocol
(:mod:`p2pinfer.wire`): the same frames, deadlines, cancellation and stream
credits as between peers, with neither Noise nor yamux, since nothing leaves
the machine.

A call on this socket is served as a call **from the node itself** (its own
peer id), with every grant the node holds. The socket file's mode (0600) is
therefore the access control: only processes of the same OS user can
connect. To keep that true:

- the parent directory must belong to us and be writable by nobody else, or
  another user could swap the socket file for one of theirs (or unlink ours
  and listen in its place);
- the socket is bound, chmod-ed to 0600, and only then listens: until
  ``listen`` a connect is refused, so there is no window in which the file
  is reachable with a looser mode (no process-wide ``umask`` change, which
  would race other threads creating files);
- on Linux the peer's credentials (``SO_PEERCRED``) are checked as well: a
  connection from another uid is closed at once.

All connections count as streams of the node's own peer id in
:class:`~p2pinfer.rpc.server.RpcServer` (``max_streams_per_peer``): a node
with many workers needs that limit above its worker count.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import trio

from ..errors import ConfigError
from .server import RpcServer

__all__ = ["serve_local", "SocketStreamAdapter", "MAX_SOCKET_PATH"]

log = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux (104 on the BSDs), including the final NUL.
MAX_SOCKET_PATH = 104 - 1
BACKLOG = 128


READ_MAX = 64 * 1024


class SocketStreamAdapter:
    """A :class:`trio.SocketStream` with the stream methods
    :class:`~p2pinfer.rpc.channel.FramedChannel` uses (those of a libp2p
    stream): ``read`` returns ``b""`` at end of stream, which the channel
    treats as the peer closing its side."""

    __slots__ = ("_stream",)

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream

    async def read(self, n: int | None = None) -> bytes:
        # At most 64 KiB a read: a larger buffer is allocated (mmap) and
        # freed on every read, whatever arrives (measured: 29 us a read of
        # 200 bytes with 256 KiB asked, 2.8 us with 64 KiB).
        return await self._stream.receive_some(min(n or READ_MAX, READ_MAX))

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close_write(self) -> None:
        """Half-close: the client sees the end of our frames, still sending."""
        await self._stream.send_eof()

    async def close(self) -> None:
        await self._stream.aclose()

    async def reset(self) -> None:
        # A unix socket has no reset; closing is all the peer can observe.
        await self._stream.aclose()


def _check_parent(path: Path) -> None:
    """Refuse a directory where another user could replace our socket."""
    parent = path.parent
    try:
        st = os.stat(parent)
    except OSError as exc:
        raise ConfigError(f"cannot use {parent} for the local RPC socket: {exc}",
                          data={"path": str(path)}) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{parent} is not a directory", data={"path": str(path)})
    if st.st_uid != os.getuid():
        raise ConfigError(
            f"the directory of the local RPC socket, {parent}, belongs to another user "
            f"(uid {st.st_uid})", data={"path": str(path)})
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"the directory of the local RPC socket, {parent}, is writable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):o}): they could replace the socket",
            data={"path": str(path), "mode": f"{stat.S_IMODE(st.st_mode):o}"})


async def _remove_stale(path: Path) -> None:
    """Remove a socket file left by a node that died; refuse to remove
    anything else, or a socket someone is still listening on."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; not removing it",
                          data={"path": str(path)})
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(str(path))
    except OSError:
        pass  # nobody listening: stale
    else:
        raise ConfigError(f"another process is already serving on {path}",
                          data={"path": str(path)})
    finally:
        probe.close()
    os.unlink(path)


def _same_user(sock: Any) -> bool:
    """Whether the connected peer runs as our uid (True where the OS cannot tell)."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is None:
        return True
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("3i"))
    except OSError:
        return True
    _pid, uid, _gid = struct.unpack("3i", raw)
    return bool(uid == os.getuid())


async def serve_local(
    server: RpcServer,
    path: Path,
    peer_id: str,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``server``'s methods on a unix socket at ``path`` until cancelled.

    Every connection is served as calls from ``peer_id`` (the node's own
    id). The socket file is mode 0600 and is removed when serving stops.

    Raises:
        ConfigError: the path is too long for a unix socket, its directory is
            writable by others or not ours, something other than a stale
            socket is in the way, or another process serves on it.
    """
    path = Path(path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"the local RPC socket path is too long ({len(os.fsencode(path))} bytes, "
            f"at most {MAX_SOCKET_PATH}): {path}", data={"path": str(path)})
    _check_parent(path)
    await _remove_stale(path)

    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    identity: tuple[int, int] | None = None
    try:
        try:
            await sock.bind(str(path))
            st = os.lstat(path)
            identity = (st.st_dev, st.st_ino)
            os.chmod(path, 0o600)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {path}: {exc}",
                              data={"path": str(path)}) from exc
        listener = trio.SocketListener(sock)

        async def handle(stream: trio.SocketStream) -> None:
            if not _same_user(stream.socket):
                log.warning("local RPC socket %s: refused a connection from another user", path)
                await stream.aclose()
                return
            try:
                await server.serve_stream(SocketStreamAdapter(stream), peer_id, limited=False)
            except Exception:  # one bad connection must not stop the listener
                log.exception("local RPC connection on %s failed", path)
            # (serve_listeners closes the stream after this returns)

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, [listener])
            log.info("serving RPC on unix socket %s", path)
            task_status.started()
    finally:
        sock.close()
        if identity is not None:
            _unlink_if_ours(path, identity)


def _unlink_if_ours(path: Path, identity: tuple[int, int]) -> None:
    """Remove the socket file unless another server has since bound the path."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.debug("removing %s failed", path, exc_info=True)
