"""A framed duplex pipe over one libp2p stream, shared by client and server.

Outgoing frames go through an in-memory queue drained by a single writer
task that coalesces whatever is queued into one ``stream.write``: under load
many small frames cost one Noise encryption and one yamux frame instead of
one each. Nothing waits on the queue, so cancelling a caller never leaves a
half-written frame; its size is bounded by the callers themselves (in-flight
limits and stream credits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import trio

from .. import wire
from ..errors import FrameTooLarge, StreamBroken

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
WRITE_BATCH = 256 * 1024
# Frames handed on per scheduling step. A burst read at once (64 requests
# coalesced into one write by the peer) is released in groups, with a
# checkpoint between groups: the tasks the first group wakes start, and
# their answers leave, while later frames are still being handed on. Without
# it, a burst moves through client, gateway and worker as one convoy, each
# process handling all of it before the next can start: at 64 requests in
# flight the three processes then used ~1.1 of 2 cores and p50 was ~48 ms;
# groups of 16 gave ~1.9-2.3k requests/s and p50 27-33 ms in the same runs
# (4 and 8 were worse, 24 and 32 no better; benchmarks/RESULTS.md).
DISPATCH_GROUP = 16


def libp2p_errors() -> tuple[type[BaseException], ...]:
    from libp2p.exceptions import BaseLibp2pError

    return (BaseLibp2pError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class FramedChannel:
    """Frames in and out of one stream. ``run_writer`` must be running."""

    def __init__(self, stream: Any, *, max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.decoder = wire.FrameDecoder(max_frame)
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](math.inf)
        self.closed = False
        self.bytes_out = 0
        self.bytes_in = 0
        self._errors = libp2p_errors()
        self._half_close = False

    def send_nowait(self, msg: wire.Message) -> None:
        """Queue one message. Raises FrameTooLarge for a message the peer
        would refuse; silently drops it if the channel is already closed."""
        data = wire.encode(msg, max_frame=self.max_frame)
        if self.closed:
            return
        try:
            self._out_send.send_nowait(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def send_error_nowait(self, call_id: int, exc: Exception) -> None:
        from ..errors import HandlerError, P2PInferError

        err = exc if isinstance(exc, P2PInferError) else HandlerError(type(exc).__name__)
        try:
            self.send_nowait(wire.Error.from_exception(call_id, err))
        except FrameTooLarge:  # the error data itself is too big: send it bare
            self.send_nowait(wire.Error(call_id, err.code, err.message[:1000], None))

    async def run_writer(self) -> None:
        """Write queued frames until the channel closes; batches small frames."""
        recv = self._out_recv
        try:
            async for first in recv:
                if len(first) >= WRITE_BATCH:
                    data = first
                else:
                    parts = [first]
                    size = len(first)
                    while size < WRITE_BATCH:
                        try:
                            nxt = recv.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        parts.append(nxt)
                        size += len(nxt)
                    data = b"".join(parts) if len(parts) > 1 else first
                await self.stream.write(data)
                self.bytes_out += len(data)
            if self._half_close and hasattr(self.stream, "close_write"):
                await self.stream.close_write()
        except self._errors as exc:
            raise StreamBroken(f"write failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.closed = True

    async def messages(self) -> AsyncIterator[wire.Message | wire.DecodeError]:
        """Decoded frames until the peer closes the stream (then returns)."""
        from libp2p.network.stream.exceptions import StreamEOF
        from libp2p.stream_muxer.exceptions import MuxedStreamEOF

        eof = (StreamEOF, MuxedStreamEOF, EOFError)
        while True:
            try:
                data = await self.stream.read(READ_SIZE)
            except eof:
                return
            except self._errors as exc:
                raise StreamBroken(f"read failed: {type(exc).__name__}: {exc}") from exc
            if not data:
                return
            self.bytes_in += len(data)
            n = 0
            for item in self.decoder.feed(data):
                yield item
                n += 1
                if n == DISPATCH_GROUP:
                    n = 0
                    await trio.lowlevel.checkpoint()

    def close_writer(self) -> None:
        self.closed = True
        self._out_send.close()

    def finish(self) -> None:
        """Send what is queued, then half-close the stream: the peer sees
        the end of our frames and can still answer."""
        self._half_close = True
        self.close_writer()

    async def aclose(self, *, reset: bool = False) -> None:
        self.close_writer()
        with trio.move_on_after(1) as cs:
            cs.shield = True
            try:
                if reset:
                    await self.stream.reset()
                else:
                    await self.stream.close()
            except Exception:
                log.debug("closing stream failed", exc_info=True)
