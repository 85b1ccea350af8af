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
BAN_FORGET_S = 600.0  # a peer whose last ban ended this long ago is forgotten: its next ban starts at base_s


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
    """Temporary bans with exponential backoff: base, 2·base, 4·base, ... up to ``max_s`` per consecutive failure.

    A peer is remembered until ``forget_s`` after its last ban ended, so the table holds only peers banned in
    the last ``max_s + forget_s`` seconds or so, however many ids a node sees over days.
    """

    def __init__(self, base_s: float = BAN_BASE_S, max_s: float = BAN_MAX_S, forget_s: float = BAN_FORGET_S):
        if not 0 < base_s <= max_s:
            raise ValueError(f"need 0 < base_s <= max_s, got base_s={base_s}, max_s={max_s}")
        if not forget_s > 0:
            raise ValueError(f"need forget_s > 0, got {forget_s}")
        self.base_s = base_s
        self.max_s = max_s
        self.forget_s = forget_s
        self._failures: dict[str, int] = {}  # consecutive failures, kept after a ban ends so the next one doubles
        self._until: dict[str, float] = {}
        self._next_prune = -math.inf

    def __len__(self) -> int:
        """Peers remembered (banned now, or recently)."""
        return len(self._until)

    def ban(self, peer_id: str, now: float) -> float:
        """Record a failure of ``peer_id`` and ban it from ``now``; returns the ban duration in seconds."""
        self._prune(now)
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        duration = min(self.base_s * 2.0 ** min(failures - 1, 64), self.max_s)  # min(..., 64): no float overflow
        self._until[peer_id] = now + duration
        return duration

    def _prune(self, now: float) -> None:
        """Forget peers whose ban ended over ``forget_s`` ago (a sweep at most every ``forget_s / 2``: bans are
        the only way in, so the table stays bounded by the bans of the last few ``forget_s``)."""
        if now < self._next_prune:
            return
        self._next_prune = now + self.forget_s / 2
        for peer_id in [p for p, until in self._until.items() if until + self.forget_s < now]:
            del self._until[peer_id]
            self._failures.pop(peer_id, None)

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
