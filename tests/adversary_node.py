"""A swarmd volunteer that misbehaves in NoLoCo outer steps (and only there), for multi-process tests.

usage: python tests/adversary_node.py MODE <swarmd join arguments...>

MODE is one of
  nan   every outer payload chunk it sends carries a NaN block scale (a corrupt or hostile payload)
  huge  its outer payload is phi and theta - phi scaled by 1e6 (finite but absurd)
  hang  once it received the first chunk of a partner's payload it writes ``<node dir>/hung`` and
        freezes (the test then kills it with SIGKILL: a partner dying mid-exchange)

Everything else (pipeline, DHT, heartbeats) is the real swarmd, run through its real CLI.
"""

from __future__ import annotations

import math
import struct
import sys
import time
from pathlib import Path

import swarmd.daemon.outer as outer
import swarmd.swarm.outer as payloads  # encode_payload: what a replica sends in an outer step
from swarmd.daemon import cli
from swarmd.protocols.codecs import encode_tensor


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
    elif mode == "huge":
        payloads.encode_tensor = lambda tensor, codec="none", **kw: encode_tensor(tensor * 1e6, codec, **kw)
    elif mode == "hang":
        store, marker = outer._Exchange.store, _node_dir(args) / "hung"

        def store_then_hang(self, *a, **kw):
            store(self, *a, **kw)
            marker.write_text("hung mid-exchange\n")
            time.sleep(3600)  # blocks the event loop: the node stops answering anyone

        outer._Exchange.store = store_then_hang
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
