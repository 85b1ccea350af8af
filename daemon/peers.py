"""The swarm as this node sees it: live peers per stage, refreshed from DHT heartbeats."""

from __future__ import annotations

import asyncio
import logging

from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time
from swarmd.daemon.records import Heartbeat, peers_from_record, stage_key
from swarmd.swarm.routing import PeerInfo

logger = logging.getLogger(__name__)


class PeerTable:
    """Live peers per stage. Entries carry their record's expiration; expired ones are never returned."""

    def __init__(self, num_stages: int):
        self.num_stages = num_stages
        self._by_stage: list[list[PeerInfo]] = [[] for _ in range(num_stages)]
        self.heartbeats: dict[str, Heartbeat] = {}

    def stage(self, stage: int) -> list[PeerInfo]:
        now = get_dht_time()
        return [p for p in self._by_stage[stage] if p.expires > now]

    def all(self) -> list[PeerInfo]:
        return [p for s in range(self.num_stages) for p in self.stage(s)]

    def counts(self) -> list[int]:
        return [len(self.stage(s)) for s in range(self.num_stages)]

    async def refresh(self, dht: DHTNode, run_id: str) -> None:
        """Read every stage's record from the DHT (concurrently)."""
        keys = [stage_key(run_id, s) for s in range(self.num_stages)]
        records = await asyncio.gather(*(dht.get(k, latest=True) for k in keys), return_exceptions=True)
        for s, record in enumerate(records):
            if isinstance(record, BaseException):
                logger.debug("reading stage %d record failed: %s", s, record)
                continue
            entries = peers_from_record(s, record)
            self._by_stage[s] = [info for info, _ in entries]
            self.heartbeats.update({info.peer_id: beat for info, beat in entries})


async def announce(dht: DHTNode, run_id: str, stage: int, peer_id: str, beat: Heartbeat, ttl: float) -> bool:
    """Publish (or refresh) this peer's heartbeat under its stage's key; it expires after ``ttl`` seconds."""
    return bool(await dht.store(stage_key(run_id, stage), beat.encode(), get_dht_time() + ttl, subkey=peer_id))
