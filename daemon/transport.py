"""RPC over hivemind binary streams: one length-prefixed request, one reply, per stream.

Large tensors travel as raw stream bytes (no protobuf, no 4 MiB unary cap). Every incoming request
is size-checked before it is read, decoded and validated before its handler sees it, and answered
with an ``error`` message on rejection; the node keeps serving whatever a peer sends.

Serving is bounded (protocols.limits): streams open at once, each peer's request rate, each RPC's
request size (checked on the length prefix), the time a request may take to arrive, and the large
frames read and decoded at once. Past a bound a request is refused as "busy", "oversize" or
"stalled", and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection

import torch
from hivemind.p2p import P2P, PeerID
from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.rate_limit import PeerRateLimiter
from swarmd.daemon.spec import RunSpec
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import Limits, RunShape, request_frame_caps
from swarmd.protocols.wire import (
    Message, StreamEnded, decode_message, decode_reply, error_message, read_frame, read_frame_body,
    read_frame_length, write_frame,
)

logger = logging.getLogger(__name__)

Handler = Callable[[str, Message], Awaitable[bytes]]

OFF_LOOP_DECODE_BYTES = 1 << 20  # frames this large are decoded in a worker thread, not on the event loop


async def _decode(decode: Callable[..., Message], data: bytes, limits: Limits,
                  expected_kinds: Collection[str], **options: object) -> Message:
    """Decode a frame; a large one (an outer-step chunk: ~10 ms of tensor work) off the event loop."""
    if len(data) < OFF_LOOP_DECODE_BYTES:
        return decode(data, limits, expected_kinds=expected_kinds, **options)
    return await asyncio.to_thread(decode, data, limits, expected_kinds=expected_kinds, **options)


class Transport:
    """Calls peers and serves handlers for one node, counting bytes, latency and rejections."""

    def __init__(self, p2p: P2P, metrics: NodeMetrics, limits: Limits):
        self.p2p = p2p
        self.metrics = metrics
        self.limits = limits
        # Membership: set by the node once it knows the run. None admits everyone (only before the run is known).
        self.admit: Callable[[str], Awaitable[bool]] | None = None
        self._served: set[str] = set()
        self.frame_caps = request_frame_caps(limits)  # per RPC; ``bound_to`` sizes them to the run
        self._open_streams = 0
        self._decodes = asyncio.Semaphore(limits.max_concurrent_decodes)
        self._rates = PeerRateLimiter(limits.peer_requests_per_s, limits.peer_request_burst,
                                      limits.max_rate_limited_peers)

    def bound_to(self, spec: RunSpec) -> None:
        """Size the forward, backward and outer-chunk request caps to the tensors of ``spec``'s run."""
        p = spec.pipeline
        shape = RunShape(p.microbatch_size, p.seq_len, spec.model.dim, spec.averaging.chunk_elements)
        self.frame_caps = request_frame_caps(self.limits, shape)

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
        on_reject: Callable[[str, ProtocolError], None] | None = None, members_only: bool = True,
        device: torch.device | str = "cpu", keep_blocks: bool = False,
    ) -> None:
        """Register ``handler`` for ``rpc``: it gets (caller peer id, validated message), returns the reply.

        The request's tensors are decoded straight onto ``device`` (the stage's), and with
        ``keep_blocks`` float32 tensors of a blockwise codec stay int8/int4 blocks there (decode_message).

        With ``members_only`` (every RPC but the spec and info a joiner needs first) a caller that
        ``self.admit`` does not know as a member of the run is refused as "unauthorized" before a byte
        of its request is read.

        ``on_reject(peer_id, error)`` is told of every rejected request, including those that never
        reached the handler (undecodable, non-finite, ...), so a service can react to a bad peer. It is
        also told, with a StreamEnded, of a request whose stream ended before the whole request arrived:
        that one is counted as dropped (swarmd_dropped_requests_total), not as rejected.

        Before membership, the load checks: past ``max_open_streams`` or the caller's request rate the
        request is refused as "busy" (non-members are rate-limited too, and cannot make us re-read the
        member records faster than that). A request that does not arrive in time is cut off as "stalled".
        """

        async def on_stream(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            start = time.perf_counter()
            peer_id = stream_info.peer_id.to_base58()
            self._open_streams += 1
            self.metrics.open_streams.set(self._open_streams)
            linger = True
            try:
                try:
                    self._check_load(peer_id)
                    if members_only and self.admit is not None and not await self.admit(peer_id):
                        raise ProtocolError("unauthorized", "you are not a member of this run (no valid signed "
                                                            "heartbeat of yours in its records)")
                    message = await self._receive(rpc, reader, channel, expected_kinds,
                                                  device=device, keep_blocks=keep_blocks)
                    reply = await handler(peer_id, message)
                except StreamEnded as e:  # the caller went away mid-request (it died?): a drop, not a bad message
                    self.metrics.dropped_requests.inc()
                    logger.debug("%s request from %s broke off: %s", label, peer_id[-8:], e)
                    if on_reject is not None:
                        on_reject(peer_id, e)
                    return  # nobody is left to read a reply
                except ProtocolError as e:
                    self.metrics.rejected.labels(e.reason).inc()
                    logger.info("rejected %s from %s: %s", label, peer_id[-8:], e)
                    reply = error_message(e)
                    linger = e.reason != "stalled"  # a stalled caller is cut off, not waited for
                    if on_reject is not None:
                        on_reject(peer_id, e)
                try:
                    await asyncio.wait_for(write_frame(writer, reply), self.limits.frame_deadline_s(len(reply)))
                except asyncio.TimeoutError:  # the caller does not take its reply: same as not sending its request
                    self.metrics.rejected.labels("stalled").inc()
                    logger.info("%s reply to %s not taken in time; stream closed", label, peer_id[-8:])
                    return
                if channel is not None:
                    self.metrics.bytes_sent.labels(channel).inc(len(reply))
                self.metrics.handler_latency.labels(label).observe(time.perf_counter() - start)
                if linger:
                    await _linger(reader)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                logger.debug("%s stream from %s broke: %s", label, peer_id[-8:], e)
            except asyncio.CancelledError:
                # Our P2P shuts down and cancels the stream's task. Nothing awaits that task, and Python 3.11's
                # stream callback calls task.exception() on it and logs the CancelledError as a traceback.
                pass
            except Exception:  # a handler bug must not take the node down
                logger.exception("%s handler failed on a request from %s", label, peer_id[-8:])
            finally:
                writer.close()
                self._open_streams -= 1
                self.metrics.open_streams.set(self._open_streams)

        if rpc in self._served:  # a stage move re-registers its handlers, bound to the new stage's services
            await self.p2p.remove_binary_stream_handler(rpc)
        await self.p2p.add_binary_stream_handler(rpc, on_stream)
        self._served.add(rpc)

    def _check_load(self, peer_id: str) -> None:
        """Refuse a request ("busy") past the open-stream cap (this stream counted) or the caller's rate."""
        if self._open_streams > self.limits.max_open_streams:
            raise ProtocolError("busy", f"this node serves {self.limits.max_open_streams} streams already; retry")
        if not self._rates.allow(peer_id, time.monotonic()):
            raise ProtocolError("busy", f"over {self.limits.peer_requests_per_s:g} requests/s from you; slow down")

    async def _receive(self, rpc: str, reader: asyncio.StreamReader, channel: str | None,
                       expected_kinds: Collection[str], **options: object) -> Message:
        """Read and decode one request: its length checked against the RPC's cap before the body is read,
        the prefix and the body each within their deadline, a large frame only with a decode slot."""
        limits = self.limits
        length = await read_frame_length(reader, self.frame_caps.get(rpc, limits.max_message_bytes),
                                         limits.idle_stream_s)
        async with self._decode_slot(length):
            data = await read_frame_body(reader, length, limits.frame_deadline_s(length))
            if channel is not None:
                self.metrics.bytes_received.labels(channel).inc(len(data))
            return await _decode(decode_message, data, limits, expected_kinds, **options)

    @contextlib.asynccontextmanager
    async def _decode_slot(self, length: int) -> AsyncIterator[None]:
        """Hold one of ``max_concurrent_decodes`` slots while a frame of ``length`` >= OFF_LOOP_DECODE_BYTES
        is read and decoded (smaller ones need none): what requests in progress hold in memory stays
        bounded. A frame that gets no slot within ``decode_wait_s`` is refused as "busy"."""
        if length < OFF_LOOP_DECODE_BYTES:
            yield
            return
        try:
            await asyncio.wait_for(self._decodes.acquire(), self.limits.decode_wait_s)
        except asyncio.TimeoutError:
            raise ProtocolError("busy", f"{self.limits.max_concurrent_decodes} large requests are being read "
                                        "here; retry") from None
        try:
            yield
        finally:
            self._decodes.release()


REPLY_LINGER_S = 5.0  # how long a server waits for the caller to hang up after the reply


async def _linger(reader: asyncio.StreamReader) -> None:
    """Wait until the caller closes the stream (it does once it has read the reply), discarding whatever it
    still sends: the rest of a request refused before its body was read ("oversize", "busy", ...).

    Closing our end first can make p2pd reset the libp2p stream and drop reply bytes still in its
    buffers: the caller then sees an empty stream although the request was served (seen on loopback
    a few times a minute under load), or a refusal it must see (a "busy" peer is retried, not banned).
    The caller's close is the acknowledgement that it has the reply.
    """

    async def until_closed() -> None:
        while await reader.read(1 << 16):
            pass

    try:
        await asyncio.wait_for(until_closed(), REPLY_LINGER_S)
    except (asyncio.TimeoutError, ConnectionError):
        pass
