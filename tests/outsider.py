"""An outsider of a run, built only on hivemind (its P2P and a DHT node without the run's validators), for
multi-process tests: it knows the run's id, a member's address and peer id, and what the DHT ready board
and heartbeats look like, and tries to use them.

usage: python tests/outsider.py SEED_MADDR VICTIM_PEER_ID RUN_ID STAGE

Prints one JSON object: for each RPC it tried, the reply's error reason (or "ok"); for each forged record,
whether the DHT accepted the store.
"""

from __future__ import annotations

import asyncio
import json
import sys

import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time
from swarmd.protocols import rpc
from swarmd.protocols.codecs import encode_tensor
from swarmd.protocols.wire import decode_reply, encode_message, read_frame, write_frame


async def ask(p2p: P2P, peer: str, name: str, data: bytes) -> str:
    """One request; the reply's error reason, or "ok"."""
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), name)
    try:
        await write_frame(writer, data)
        reply = await asyncio.wait_for(read_frame(reader, 1 << 24), 15)
    finally:
        writer.close()
    try:
        decode_reply(reply)
    except Exception as e:
        return getattr(e, "reason", type(e).__name__)
    return "ok"


async def main(seed: str, victim: str, run_id: str, stage: int) -> dict:
    p2p = await P2P.create(initial_peers=[seed], host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False,
                           auto_nat=False, use_relay=False, use_auto_relay=False)
    # hivemind's own signature validator (with a key of its own) to read the run's signed records
    dht = await DHTNode.create(p2p=p2p, initial_peers=[seed], record_validator=RSASignatureValidator(RSAPrivateKey()))
    me = p2p.peer_id.to_base58()
    results: dict[str, object] = {}
    try:
        acts = encode_tensor(torch.randn(8, 32, 64), "none")
        targets = encode_tensor(torch.randint(0, 256, (8, 32)), "none")
        requests = {
            "pair": (rpc.PAIR, encode_message("pair_request", {"session": b"s" * 16, "stage": stage, "numel": 1})),
            "forward": (rpc.FORWARD, encode_message(
                "forward", {"mb_id": b"m" * 16, "stage": stage, "route": [me], "deadline_s": 10.0}, [acts, targets])),
            "backward": (rpc.BACKWARD, encode_message("backward", {"mb_id": b"m" * 16, "stage": stage, "loss": 1.0},
                                                      [acts])),
            "state_manifest": (rpc.STATE_MANIFEST, encode_message("state_manifest_request", {"stage": stage})),
            "info": (rpc.INFO, encode_message("info_request", {})),  # open to all: a joiner asks it first
        }
        for what, (name, data) in requests.items():
            try:
                results[what] = await ask(p2p, victim, name, data)
            except Exception as e:
                results[what] = f"error {type(e).__name__}: {e}"
        # Forged records: a fake peer under a bare peer id (routing black hole), the victim's own entries
        # (heartbeat and ready board, "paired") without its signature.
        victim_marker = None
        record = await asyncio.wait_for(dht.get(f"swarmd/{run_id}/stage/{stage}", latest=True), 30)
        for subkey in (record.value if record is not None else {}):
            victim_marker = subkey  # any member's marker will do: none of them is ours to sign
        beat = MSGPackSerializer.dumps({"tput": 1e9, "queue": 0, "step": 10**9, "samples": 0, "maddrs": []})
        ready = MSGPackSerializer.dumps({"outer": 0, "numel": 1, "paired": True})
        expiration = get_dht_time() + 30
        results["members_seen"] = len(record.value) if record is not None else 0
        results["store_fake_peer"] = await dht.store(f"swarmd/{run_id}/stage/{stage}", beat, expiration, subkey=me)
        results["store_forged_heartbeat"] = bool(victim_marker) and await dht.store(
            f"swarmd/{run_id}/stage/{stage}", beat, expiration, subkey=victim_marker)
        results["store_forged_ready"] = bool(victim_marker) and await dht.store(
            f"swarmd/{run_id}/ready/{stage}", ready, expiration, subkey=victim_marker)
    finally:
        await dht.shutdown()
        await p2p.shutdown()
    return results


if __name__ == "__main__":
    seed_maddr, victim_id, run, stage_arg = sys.argv[1:5]
    print(json.dumps(asyncio.run(main(seed_maddr, victim_id, run, int(stage_arg)))), flush=True)
