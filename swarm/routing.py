"""SWARM stochastic wiring: pick the next-stage peer for a microbatch at random, weighted by spare capacity.

Pure functions and plain classes: time is always passed in (``now``), randomness comes from the caller's
``random.Random``, so every decision is reproducible in tests. No network code here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass

MIN_THROUGHPUT = 0.01  # samples/s floor: a fresh peer with no measurement yet still gets some traffic
BAN_BASE_S = 1.0
BAN_MAX_S = 60.0


@dataclass(frozen=True)
class PeerInfo:
    """What a peer announces about itself for one stage (a DHT record, already decoded and checked)."""

    peer_id: str
    stage: int
    throughput: float  # samples/s this peer has recently processed
    queue_depth: int  # microbatches waiting in its queue
    inner_step: int  # its inner optimizer step (for staleness checks upstream)
    expires: float  # the record's expiry time, same clock as ``now``


def routing_weight(peer: PeerInfo, floor: float = MIN_THROUGHPUT) -> float:
    """max(throughput, floor) / (1 + queue_depth): fast, idle peers get proportionally more microbatches."""
    throughput = peer.throughput if math.isfinite(peer.throughput) else 0.0  # a NaN/inf claim earns nothing extra
    return max(throughput, floor) / (1 + max(peer.queue_depth, 0))


class BanList:
    """Temporary bans with exponential backoff: base, 2·base, 4·base, ... up to ``max_s`` per consecutive failure."""

    def __init__(self, base_s: float = BAN_BASE_S, max_s: float = BAN_MAX_S):
        if not 0 < base_s <= max_s:
            raise ValueError(f"need 0 < base_s <= max_s, got base_s={base_s}, max_s={max_s}")
        self.base_s = base_s
        self.max_s = max_s
        self._failures: dict[str, int] = {}  # consecutive failures, kept after a ban ends so the next one doubles
        self._until: dict[str, float] = {}

    def ban(self, peer_id: str, now: float) -> float:
        """Record a failure of ``peer_id`` and ban it from ``now``; returns the ban duration in seconds."""
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        duration = min(self.base_s * 2.0 ** min(failures - 1, 64), self.max_s)  # min(..., 64): no float overflow
        self._until[peer_id] = now + duration
        return duration

    def is_banned(self, peer_id: str, now: float) -> bool:
        """True while ``peer_id``'s current ban lasts."""
        return self._until.get(peer_id, -math.inf) > now

    def record_success(self, peer_id: str) -> None:
        """A successful exchange resets the backoff (and lifts any ban)."""
        self._failures.pop(peer_id, None)
        self._until.pop(peer_id, None)

    def failures(self, peer_id: str) -> int:
        """Consecutive failures recorded for ``peer_id``."""
        return self._failures.get(peer_id, 0)

    def banned(self, now: float) -> set[str]:
        """Ids banned at ``now``."""
        return {peer_id for peer_id, until in self._until.items() if until > now}


def choose_peer(
    peers: Iterable[PeerInfo],
    bans: BanList | None,
    rng: random.Random,
    now: float,
    exclude: Collection[str] = (),
) -> PeerInfo | None:
    """Draw one peer with probability proportional to ``routing_weight``, skipping banned, excluded and
    expired peers (``expires <= now``). Returns None when nobody is eligible.

    Peers are sorted by id (duplicates of one id keep the freshest record) before a single ``rng.random()``
    draw, so the same rng state gives the same choice whatever the input order.
    """
    freshest: dict[str, PeerInfo] = {}
    for peer in peers:
        if peer.expires <= now or peer.peer_id in exclude:
            continue
        if bans is not None and bans.is_banned(peer.peer_id, now):
            continue
        known = freshest.get(peer.peer_id)
        if known is None or peer.expires > known.expires:
            freshest[peer.peer_id] = peer
    if not freshest:
        return None
    candidates = [freshest[peer_id] for peer_id in sorted(freshest)]
    weights = [routing_weight(peer) for peer in candidates]
    point = rng.random() * math.fsum(weights)
    cumulative = 0.0
    for peer, weight in zip(candidates, weights):
        cumulative += weight
        if point < cumulative:
            return peer
    return candidates[-1]  # float rounding put the point at the very end
