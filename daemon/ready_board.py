"""The stage's ready board in the DHT: the replicas waiting for an outer-step partner right now.

Each replica at an outer boundary posts an entry (its outer step, parameter count, "paired" or not) under
its own signed subkey until its pairing deadline; a proposer picks among the entries it reads, and a replica
that gets a proposal checks that the proposer is on the board. The record format is swarmd.daemon.records.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from hivemind.dht.node import DHTNode
from swarmd.daemon.records import encode_ready, ready_key, ready_peers

logger = logging.getLogger(__name__)

BOARD_POLL_S = 0.25  # how often a waiting replica rereads the ready board
BOARD_CHECK_S = 2.0  # the longest a proposal waits for a fresh read of the board (its sender was not on our last)


class ReadyBoard:
    """One replica's view of its stage's ready board: what it last read, and its own entries."""

    def __init__(self, dht: DHTNode, run_id: str, stage: int, peer_id: str, subkey: bytes):
        self.dht, self.key, self.peer_id = dht, ready_key(run_id, stage), peer_id
        self.subkey = subkey  # our owner marker: the subkey our signed entries sit under
        self.peers: set[str] = set()  # who was on the board at the last read (this outer step)
        self.read_at = -math.inf  # time.monotonic() when that read started

    def forget(self) -> None:
        """A new outer step: the last step's board says nothing about this one."""
        self.peers, self.read_at = set(), -math.inf

    async def post(self, outer_step: int, numel: int, expiration: float, paired: bool) -> bool:
        """Post our entry (ready, or taken off the board as ``paired``) until ``expiration`` (DHT time)."""
        try:
            return bool(await self.dht.store(self.key, encode_ready(outer_step, numel, paired), expiration,
                                             subkey=self.subkey))
        except Exception as e:
            logger.debug("posting on the ready board failed: %s", e)
            return False

    async def read(self, numel: int) -> list[str]:
        """The others ready on the board now, with our parameter count (also kept for ``holds``)."""
        self.read_at = time.monotonic()
        try:
            record = await self.dht.get(self.key, latest=True)
        except Exception as e:
            logger.debug("reading the ready board failed: %s", e)
            return []
        self.peers = set(ready_peers(record, numel))
        return [p for p in self.peers if p != self.peer_id]

    async def holds(self, peer: str, numel: int) -> bool:
        """Whether ``peer`` is ready on the board for this outer step (live, unpaired, of ``numel`` parameters):
        the last read, or a fresh one if that is over BOARD_POLL_S old (a proposer's entry may be newer than
        our read; requests from peers not on it cannot make us read more often than that)."""
        if peer not in self.peers and time.monotonic() - self.read_at >= BOARD_POLL_S:
            try:
                await asyncio.wait_for(self.read(numel), BOARD_CHECK_S)
            except asyncio.TimeoutError:
                pass
        return peer in self.peers
