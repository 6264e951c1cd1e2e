"""An in-process stream pair, so a node can call its own RPC methods.

A gateway that also runs the inference role routes some requests to itself;
libp2p cannot dial its own peer id, so :class:`~p2pinfer.rpc.RpcClient` serves
calls addressed to the local peer through :func:`memory_stream_pair` and the
local :class:`~p2pinfer.rpc.RpcServer`, with the same framing, deadlines,
cancellation and credits as a remote call (and no encryption, since nothing
leaves the process).
"""

from __future__ import annotations

import math

import trio

__all__ = ["MemoryStream", "memory_stream_pair"]


class MemoryStream:
    """One end of an in-memory duplex byte pipe with libp2p's stream methods."""

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
    ) -> None:
        self._send = send
        self._receive = receive

    async def write(self, data: bytes) -> None:
        try:
            self._send.send_nowait(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise trio.BrokenResourceError("the other end is closed") from exc

    async def read(self, n: int | None = None) -> bytes:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise EOFError("stream closed") from exc

    async def close(self) -> None:
        self._send.close()

    async def reset(self) -> None:
        self._send.close()
        self._receive.close()


def memory_stream_pair() -> tuple[MemoryStream, MemoryStream]:
    a_send, b_receive = trio.open_memory_channel[bytes](math.inf)
    b_send, a_receive = trio.open_memory_channel[bytes](math.inf)
    return MemoryStream(a_send, a_receive), MemoryStream(b_send, b_receive)
