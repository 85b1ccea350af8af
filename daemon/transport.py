"""RPC over hivemind binary streams: one length-prefixed request, one reply, per stream.

Large tensors travel as raw stream bytes (no protobuf, no 4 MiB unary cap). Every incoming request
is size-checked before it is read, decoded and validated before its handler sees it, and answered
with an ``error`` message on rejection; the node keeps serving whatever a peer sends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection

from hivemind.p2p import P2P, PeerID
from swarmd.daemon.metrics import NodeMetrics
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import Limits
from swarmd.protocols.wire import (
    Message, StreamEnded, decode_message, decode_reply, error_message, read_frame, write_frame,
)

logger = logging.getLogger(__name__)

Handler = Callable[[str, Message], Awaitable[bytes]]

OFF_LOOP_DECODE_BYTES = 1 << 20  # frames this large are decoded in a worker thread, not on the event loop


async def _decode(decode: Callable[..., Message], data: bytes, limits: Limits,
                  expected_kinds: Collection[str]) -> Message:
    """Decode a frame; a large one (an outer-step chunk: ~10 ms of tensor work) off the event loop."""
    if len(data) < OFF_LOOP_DECODE_BYTES:
        return decode(data, limits, expected_kinds=expected_kinds)
    return await asyncio.to_thread(decode, data, limits, expected_kinds=expected_kinds)


class Transport:
    """Calls peers and serves handlers for one node, counting bytes, latency and rejections."""

    def __init__(self, p2p: P2P, metrics: NodeMetrics, limits: Limits):
        self.p2p = p2p
        self.metrics = metrics
        self.limits = limits
        self._served: set[str] = set()

    async def call(
        self, peer_id: str, rpc: str, label: str, request: bytes, *, timeout: float,
        channel: str | None = None, expected_kinds: Collection[str] = ("ack",),
    ) -> Message:
        """Send ``request`` to ``peer_id``'s ``rpc`` handler and return its decoded reply.

        Raises RemoteError if the peer rejected the request, ProtocolError if its reply is malformed,
        asyncio.TimeoutError past ``timeout``, and the transport's own errors if it is unreachable.
        """
        start = time.perf_counter()
        reply = await asyncio.wait_for(self._exchange(peer_id, rpc, request), timeout)
        self.metrics.rpc_latency.labels(label).observe(time.perf_counter() - start)
        if channel is not None:
            self.metrics.bytes_sent.labels(channel).inc(len(request))
            self.metrics.bytes_received.labels(channel).inc(len(reply))
        return await _decode(decode_reply, reply, self.limits, expected_kinds)

    async def _exchange(self, peer_id: str, rpc: str, request: bytes) -> bytes:
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), rpc)
        try:
            await write_frame(writer, request)
            try:
                return await read_frame(reader, self.limits.max_message_bytes)
            except StreamEnded as e:  # no reply: the peer died or dropped us, not a bad message
                raise ConnectionError(f"peer closed the stream without a reply ({e.args[0]})") from None
        finally:
            writer.close()

    async def serve(
        self, rpc: str, label: str, handler: Handler, expected_kinds: Collection[str], channel: str | None = None,
        on_reject: Callable[[str, ProtocolError], None] | None = None,
    ) -> None:
        """Register ``handler`` for ``rpc``: it gets (caller peer id, validated message), returns the reply.

        ``on_reject(peer_id, error)`` is told of every rejected request, including those that never
        reached the handler (undecodable, non-finite, ...), so a service can react to a bad peer.
        """

        async def on_stream(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            start = time.perf_counter()
            peer_id = stream_info.peer_id.to_base58()
            try:
                try:
                    data = await read_frame(reader, self.limits.max_message_bytes)
                    if channel is not None:
                        self.metrics.bytes_received.labels(channel).inc(len(data))
                    message = await _decode(decode_message, data, self.limits, expected_kinds)
                    reply = await handler(peer_id, message)
                except ProtocolError as e:
                    self.metrics.rejected.labels(e.reason).inc()
                    logger.info("rejected %s from %s: %s", label, peer_id[-8:], e)
                    reply = error_message(e)
                    if on_reject is not None:
                        on_reject(peer_id, e)
                await write_frame(writer, reply)
                if channel is not None:
                    self.metrics.bytes_sent.labels(channel).inc(len(reply))
                self.metrics.handler_latency.labels(label).observe(time.perf_counter() - start)
                await _linger(reader)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                logger.debug("%s stream from %s broke: %s", label, peer_id[-8:], e)
            except Exception:  # a handler bug must not take the node down
                logger.exception("%s handler failed on a request from %s", label, peer_id[-8:])
            finally:
                writer.close()

        if rpc in self._served:  # a stage move re-registers its handlers, bound to the new stage's services
            await self.p2p.remove_binary_stream_handler(rpc)
        await self.p2p.add_binary_stream_handler(rpc, on_stream)
        self._served.add(rpc)


REPLY_LINGER_S = 5.0  # how long a server waits for the caller to hang up after the reply


async def _linger(reader: asyncio.StreamReader) -> None:
    """Wait until the caller closes the stream (it does once it has read the reply).

    Closing our end first can make p2pd reset the libp2p stream and drop reply bytes still in its
    buffers: the caller then sees an empty stream although the request was served (seen on loopback
    a few times a minute under load). The caller's close is the acknowledgement that it has the reply.
    """
    try:
        await asyncio.wait_for(reader.read(1), REPLY_LINGER_S)
    except (asyncio.TimeoutError, ConnectionError):
        pass
