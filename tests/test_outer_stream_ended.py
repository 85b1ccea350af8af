"""A partner that dies in the middle of sending an outer chunk (its stream ends mid-frame), over a real p2pd:
the transport drops the request (swarmd_dropped_requests_total, not a "malformed" rejection) and tells the
service, and the outer exchange fails ("failed") without a ban. A whole bad chunk is still a rejection."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hivemind.p2p import PeerID
from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.outer_exchange import Exchange, Failed, Rejected
from swarmd.daemon.outer_service import NoLoCoService
from swarmd.daemon.p2p_host import create_p2p
from swarmd.daemon.spec import AveragingConfig
from swarmd.daemon.transport import Transport
from swarmd.protocols import rpc
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.protocols.wire import StreamEnded, read_frame, write_frame

pytestmark = pytest.mark.slow

P2P_OPTIONS = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "nat_port_map": False, "auto_nat": False,
               "use_relay": False}


def _counter(metrics: NodeMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def _send(client, server_id: str, data: bytes, *, whole: bool) -> bytes | None:
    """A request to the server's outer-chunk handler: the whole frame (returns the reply), or only part of
    it before hanging up (a sender that died)."""
    _, reader, writer = await client.call_binary_stream_handler(PeerID.from_base58(server_id), rpc.OUTER_CHUNK)
    try:
        if whole:
            await write_frame(writer, data)
            return await asyncio.wait_for(read_frame(reader, 1 << 20), 10)
        writer.write(struct.pack(">Q", 1000) + data[:10])  # 10 of the 1000 bytes it announced
        await writer.drain()
        return None
    finally:
        writer.close()


def test_a_stream_that_ends_mid_frame_is_dropped_not_rejected():
    async def scenario() -> None:
        server = await create_p2p(**P2P_OPTIONS)
        client = await create_p2p(initial_peers=[str(a) for a in await server.get_visible_maddrs()], **P2P_OPTIONS)
        metrics = NodeMetrics()
        transport = Transport(server, metrics, DEFAULT_LIMITS)
        told: list[ProtocolError] = []

        async def handler(sender, message):
            raise AssertionError("no request should reach the handler")

        try:
            await transport.serve(rpc.OUTER_CHUNK, "outer_chunk", handler, ("outer_chunk",), channel="averaging",
                                  on_reject=lambda sender, error: told.append(error))
            server_id = server.peer_id.to_base58()
            await _send(client, server_id, b"x" * 100, whole=False)
            for _ in range(100):
                if told:
                    break
                await asyncio.sleep(0.05)
            assert len(told) == 1 and isinstance(told[0], StreamEnded)
            assert _counter(metrics, "swarmd_dropped_requests_total") == 1
            assert _counter(metrics, "swarmd_rejected_messages_total", reason="malformed") == 0

            reply = await _send(client, server_id, b"\xc1" * 100, whole=True)  # whole, and garbage
            assert reply is not None and len(told) == 2 and not isinstance(told[1], StreamEnded)
            assert _counter(metrics, "swarmd_rejected_messages_total", reason=told[1].reason) == 1
            assert _counter(metrics, "swarmd_dropped_requests_total") == 1
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(scenario())


def test_the_outer_service_fails_the_exchange_on_a_dropped_chunk_and_rejects_a_bad_one():
    """NoLoCoService._on_reject: a StreamEnded from its partner is a failure (the step is "failed", no ban);
    a bad chunk a rejection (banned); our own refusals ("busy") a failure."""
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        service = NoLoCoService(
            run_id="t", stage=0, peer_id="b", board_subkey=b"", config=AveragingConfig(), codec="none",
            block_size=256, transport=None, dht=None, lane=None, replica=None, metrics=NodeMetrics(),
            limits=DEFAULT_LIMITS, rng=None,
        )
        service.pairing.open()
        assert service.pairing.on_proposal("a", b"s" * 16) is None  # paired with "a"
        for error, expected in ((StreamEnded("stream ended after 10 of 1000 frame bytes"), Failed),
                                (ProtocolError("busy", "too many"), Failed),
                                (ProtocolError("nonfinite", "NaN"), Rejected)):
            ex = Exchange(numel=1, bounds=[(0, 1)], own_chunks=[], own_phi=None, own_phi_norm=1.0,
                           own_progress_norm=1.0, own_move_norm=0.0, theta_snap=None, partner_phi=[None], partner_progress=[None])
            ex.failure = loop.create_future()
            service._exchange = ex
            service._on_reject("someone-else", error)  # not our partner: ignored
            assert not ex.failure.done()
            service._on_reject("a", error)
            assert isinstance(ex.failure.exception(), expected), error

    asyncio.run(scenario())
