"""``swarmd status``: join the DHT as a client and print the swarm's stages, peers, steps and loss (as a table, or
as the status page's JSON document)."""

from __future__ import annotations

import asyncio

from hivemind.dht.node import DHTNode
from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.p2p_host import NetworkStartError, create_p2p, peer_id_of
from swarmd.daemon.peers import PeerTable
from swarmd.daemon.records import record_signer
from swarmd.daemon.spec import RunSpec, verify_spec_record
from swarmd.daemon.status_page import encode_document, status_document
from swarmd.daemon.swarm_view import swarm_view
from swarmd.daemon.transport import Transport
from swarmd.protocols import rpc
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.protocols.wire import encode_message


def format_swarm(spec: RunSpec, table: PeerTable) -> str:
    """The status table: one block per stage, one line per live peer."""
    lines = [f"run {spec.run_id!r}: {spec.pipeline.stages} stage(s), model dim {spec.model.dim} x "
             f"{spec.model.n_layers} layers"]
    view = swarm_view([table.serving(s) for s in range(spec.pipeline.stages)])
    for stage in view.stages:
        loss = f", loss {stage.loss:.4f}" if stage.loss is not None else ""
        lines.append(f"stage {stage.stage}: {stage.peers} peer(s), {stage.throughput:.1f} samples/s{loss}")
        for e in sorted(table.serving(stage.stage), key=lambda e: e.peer_id):
            b = e.beat
            loss = f"  loss {b.loss:.4f}" if b.loss is not None else ""
            lines.append(f"  {e.peer_id}  step {b.inner_step:>6}  {b.throughput:8.1f} samples/s  "
                         f"queue {b.queue_depth:>2}  samples {b.samples}{loss}")
    return "\n".join(lines)


def status_json(spec: RunSpec, table: PeerTable) -> str:
    """The status page's document without a node or its history (``"node": null``, ``"history": []``)."""
    view = swarm_view([table.serving(s) for s in range(spec.pipeline.stages)])
    return encode_document(status_document(spec.run_id, view)).decode()


async def run_status(maddrs: list[str], seed_ids: list[str], watch_s: float, as_json: bool = False) -> int:
    """Print the swarm once, or every ``watch_s`` seconds until interrupted (JSON: one document a line)."""
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
            print(status_json(spec, table) if as_json else format_swarm(spec, table), flush=True)
            if watch_s <= 0:
                return 0
            await asyncio.sleep(watch_s)
            if not as_json:
                print()
    finally:
        if dht is not None:
            await dht.shutdown()
        await p2p.shutdown()
