"""A swarmd volunteer that misbehaves in NoLoCo outer steps (and only there), or starts late, for multi-process
tests.

usage: python tests/adversary_node.py MODE <swarmd join arguments...>

MODE is one of
  nan    every outer payload chunk it sends carries a NaN block scale (a corrupt or hostile payload)
  flip   its outer payload's phi is -9 x its phi (finite, a norm only 9x ours, but far from any honest phi)
  stall  it pairs, then never sends its payload (it still takes the partner's)
  propose  at its outer boundaries it never posts itself on the ready board, but reads it and proposes to
         everyone on it, over and over until its pairing deadline (a member trying to take pairing over)
  hang   once it received the first chunk of a partner's payload it writes ``<node dir>/hung`` and
         freezes (the test then kills it with SIGKILL: a partner dying mid-exchange)
  late   the first time it enters its stage it starts from the run's initial weights, whatever the stage's
         progress (an honest volunteer that read an untrained stage together with another replica, then
         started training late)

Everything else (pipeline, DHT, heartbeats) is the real swarmd, run through its real CLI.
"""

from __future__ import annotations

import asyncio
import math
import os
import struct
import sys
import time
from pathlib import Path

import swarmd.daemon.outer_exchange as exchange
import swarmd.daemon.outer_service as outer
import swarmd.swarm.outer as payloads  # encode_payload: what a replica sends in an outer step
from swarmd.daemon import cli
from swarmd.daemon.node import Node
from swarmd.protocols import rpc
from swarmd.protocols.codecs import encode_tensor
from swarmd.protocols.wire import encode_message


def _node_dir(args: list[str]) -> Path:
    return Path(args[args.index("--node-dir") + 1])


def main() -> int:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "nan":
        def encode_with_nan_scale(tensor, codec="none", **kw):
            encoded = encode_tensor(tensor, codec, **kw)
            encoded.payload = encoded.payload[:-4] + struct.pack("<f", math.nan)  # the last block's scale
            return encoded

        payloads.encode_tensor = encode_with_nan_scale
    elif mode == "flip":
        encode = outer.encode_payload

        def encode_flipped(state, theta, bounds, codec, block_size):
            chunks = encode(state, theta, bounds, codec, block_size)
            return [(encode_tensor(-9.0 * state.phi[start:end], codec, block_size=block_size), progress)
                    for (start, end), (_, progress) in zip(bounds, chunks)]

        outer.encode_payload = encode_flipped
    elif mode == "stall":
        async def send_nothing(self, ex, partner, session):
            await asyncio.Event().wait()  # until the exchange gives up on us

        outer.NoLoCoService._send_payload = send_nothing
    elif mode == "propose":
        async def propose_from_off_the_board(self):
            deadline = time.monotonic() + self.config.pair_timeout_s
            while time.monotonic() < deadline:
                for peer in await self.board.read(self.state.numel):
                    request = encode_message("pair_request", {"session": os.urandom(16), "stage": self.stage,
                                                              "numel": self.state.numel})
                    try:
                        await self.transport.call(peer, rpc.PAIR, "pair", request, timeout=5.0, channel="averaging")
                    except Exception:  # noqa: BLE001  (refused: try again)
                        pass
                await asyncio.sleep(0.1)
            return "solo"

        outer.NoLoCoService.outer_step = propose_from_off_the_board
    elif mode == "hang":
        store, marker = exchange.Exchange.store, _node_dir(args) / "hung"

        def store_then_hang(self, *a, **kw):
            store(self, *a, **kw)
            marker.write_text("hung mid-exchange\n")
            time.sleep(3600)  # blocks the event loop: the node stops answering anyone

        exchange.Exchange.store = store_then_hang
    elif mode == "late":
        stage_state, entries = Node._stage_state, []

        async def from_initial_weights_once(self, stage):
            entries.append(stage)
            return None if len(entries) == 1 else await stage_state(self, stage)

        Node._stage_state = from_initial_weights_once
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
