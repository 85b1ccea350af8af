"""``swarmd status``: join the DHT as a client and print the swarm's stages, peers, steps and loss."""

from __future__ import annotations

import asyncio

from hivemind.dht.node import DHTNode
from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.p2p_host import NetworkStartError, create_p2p, peer_id_of
from swarmd.daemon.peers import PeerTable
from swarmd.daemon.records import record_signer
from swarmd.daemon.spec import RunSpec, verify_spec_record
from swarmd.daemon.transport import Transport
from swarmd.protocols import rpc
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.protocols.wire import encode_message


def format_swarm(spec: RunSpec, table: PeerTable) -> str:
    """The status table: one block per stage, one line per live peer."""
    lines = [f"run {spec.run_id!r}: {spec.pipeline.stages} stage(s), model dim {spec.model.dim} x "
             f"{spec.model.n_layers} layers"]
    for stage in range(spec.pipeline.stages):
        peers = sorted(table.stage(stage), key=lambda p: p.peer_id)
        total = sum(sorted(p.throughput for p in peers))
        lines.append(f"stage {stage}: {len(peers)} peer(s), {total:.1f} samples/s")
        for p in peers:
            beat = table.heartbeat(p.peer_id)
            samples = beat.samples if beat else 0
            lines.append(f"  {p.peer_id}  step {p.inner_step:>6}  {p.throughput:8.1f} samples/s  "
                         f"queue {p.queue_depth:>2}  samples {samples}")
    return "\n".join(lines)


async def run_status(maddrs: list[str], seed_ids: list[str], watch_s: float) -> int:
    """Print the swarm once, or every ``watch_s`` seconds until interrupted."""
    local = all("/ip4/127." in m for m in maddrs)
    p2p = await create_p2p(
        initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0" if local else "/ip4/0.0.0.0/tcp/0"],
        nat_port_map=False, auto_nat=False, dht_mode="client",
    )
    dht = None
    try:
        transport = Transport(p2p, NodeMetrics(), DEFAULT_LIMITS)
        trusted = set(seed_ids) | {peer_id_of(m) for m in maddrs}
        try:
            reply = await transport.call(
                peer_id_of(maddrs[0]), rpc.SPEC, "spec", encode_message("spec_request", {}),
                timeout=15, expected_kinds=("spec",),
            )
        except Exception as e:  # whatever the peer did, it is not a node of a run that we can read
            raise ConnectionError(f"{maddrs[0]} sent no run spec ({type(e).__name__}: {e}): check that it is "
                                  "the address of a swarmd node") from None
        spec, _ = verify_spec_record(reply.fields["record"], trusted)
        # a reader's validator: it checks every entry's signature (and strips it) and writes nothing
        signer = record_signer(spec.run_id, spec.pipeline.stages, None)
        try:
            dht = await DHTNode.create(p2p=p2p, initial_peers=maddrs, client_mode=True,
                                       record_validator=signer.validator)
        except RuntimeError as e:  # hivemind's "bootstrap failed": no given peer answered a DHT ping
            raise NetworkStartError(f"no peer answered on the run's DHT ({e}): check that the addresses are "
                                    "live swarmd nodes") from None
        table = PeerTable(spec.pipeline.stages)
        while True:
            await table.refresh(dht, spec.run_id)
            print(format_swarm(spec, table), flush=True)
            if watch_s <= 0:
                return 0
            await asyncio.sleep(watch_s)
            print()
    finally:
        if dht is not None:
            await dht.shutdown()
        await p2p.shutdown()
