"""Make a hostile test client a member of a run: an identity, a P2P host on it, and a signed "joining"
heartbeat kept alive in the run's records. A member is who the daemon serves at all; what it then sends is
the test's business (malformed frames, floods, ...)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from swarmd.daemon.identity import NodeIdentity
from swarmd.daemon.p2p_host import create_p2p
from swarmd.daemon.peers import PeerTable, announce
from swarmd.daemon.records import Heartbeat, record_signer

HEARTBEAT_S = 2.0


@contextlib.asynccontextmanager
async def member(seed_maddr: str, run_id: str, stages: int, stage: int, identity_dir: Path) -> AsyncIterator[P2P]:
    """A P2P host whose peer holds a live signed heartbeat under ``stage`` of ``run_id`` while the block runs
    (and until the daemon under test has seen it)."""
    identity = NodeIdentity.load_or_create(identity_dir)
    p2p = await create_p2p(initial_peers=[seed_maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                           identity_path=str(identity.path), nat_port_map=False, auto_nat=False, use_relay=False)
    signer = record_signer(run_id, stages, identity)
    dht = await DHTNode.create(p2p=p2p, initial_peers=[seed_maddr], record_validator=signer.validator)
    beat = Heartbeat(throughput=0.0, queue_depth=0, inner_step=0, samples=0, maddrs=(), joining=True)

    async def keep_alive() -> None:
        while True:
            await announce(dht, run_id, stage, signer.subkey, beat, ttl=3 * HEARTBEAT_S)
            await asyncio.sleep(HEARTBEAT_S)

    task = asyncio.create_task(keep_alive())
    try:
        table = PeerTable(stages)
        for _ in range(50):  # until the record is readable: then the daemon finds it too
            await table.refresh(dht, run_id)
            if table.is_member(identity.peer_id):
                break
            await asyncio.sleep(0.2)
        yield p2p
    finally:
        task.cancel()
        await dht.shutdown()
        await p2p.shutdown()
