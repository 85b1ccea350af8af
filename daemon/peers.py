"""The swarm as this node sees it: live peers and members per stage, refreshed from signed DHT heartbeats."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time
from swarmd.daemon.records import Heartbeat, StageEntry, stage_entries, stage_key
from swarmd.swarm.routing import PeerInfo

logger = logging.getLogger(__name__)

EntryPolicy = Callable[[StageEntry, int], bool]  # (entry, stage) -> may it count (e.g. a private run's token check)


class PeerTable:
    """Live peers per stage, and the run's members. Entries carry their record's expiration; expired ones
    are never returned, and each refresh replaces a stage's entries wholesale (nothing accumulates).

    A member is the owner of a live, validly signed entry (serving, joining or leaving) that ``policy``
    accepts; a routable peer is a member that serves (neither joining nor leaving).
    """

    def __init__(self, num_stages: int, policy: EntryPolicy | None = None):
        self.num_stages = num_stages
        self.policy = policy
        self._entries: list[list[StageEntry]] = [[] for _ in range(num_stages)]
        self._expires: dict[str, float] = {}  # member peer id -> when its latest entry expires
        self.refreshed_at = 0.0  # get_dht_time() of the last refresh

    def serving(self, stage: int) -> list[StageEntry]:
        """The live entries of ``stage``'s routable peers (neither joining nor leaving)."""
        now = get_dht_time()
        return [e for e in self._entries[stage] if e.expires > now and not (e.beat.joining or e.beat.leaving)]

    def stage(self, stage: int) -> list[PeerInfo]:
        return [e.info(stage) for e in self.serving(stage)]

    def all(self) -> list[PeerInfo]:
        return [p for s in range(self.num_stages) for p in self.stage(s)]

    def counts(self) -> list[int]:
        return [len(self.stage(s)) for s in range(self.num_stages)]

    def heartbeat(self, peer_id: str) -> Heartbeat | None:
        """The latest live heartbeat of ``peer_id`` in any stage (None: not a member now)."""
        now = get_dht_time()
        beats = [e for entries in self._entries for e in entries if e.peer_id == peer_id and e.expires > now]
        return max(beats, key=lambda e: e.expires).beat if beats else None

    def is_member(self, peer_id: str) -> bool:
        """Asked on every inbound request: one lookup in a table rebuilt at each refresh."""
        return self._expires.get(peer_id, 0.0) > get_dht_time()

    async def refresh(self, dht: DHTNode, run_id: str) -> None:
        """Read every stage's record from the DHT (concurrently); a stage whose read fails keeps its entries
        (they still expire on time)."""
        keys = [stage_key(run_id, s) for s in range(self.num_stages)]
        records = await asyncio.gather(*(dht.get(k, latest=True) for k in keys), return_exceptions=True)
        for s, record in enumerate(records):
            if isinstance(record, BaseException):
                logger.debug("reading stage %d record failed: %s", s, record)
                continue
            self._entries[s] = [e for e in stage_entries(record) if self.policy is None or self.policy(e, s)]
        expires: dict[str, float] = {}
        for e in (e for entries in self._entries for e in entries):
            expires[e.peer_id] = max(expires.get(e.peer_id, 0.0), e.expires)
        self._expires = expires
        self.refreshed_at = get_dht_time()


async def announce(dht: DHTNode, run_id: str, stage: int, subkey: bytes, beat: Heartbeat, ttl: float) -> bool:
    """Publish (or refresh) this peer's heartbeat under its stage's key, signed under its owner ``subkey``;
    it expires after ``ttl`` seconds."""
    return bool(await dht.store(stage_key(run_id, stage), beat.encode(), get_dht_time() + ttl, subkey=subkey))
