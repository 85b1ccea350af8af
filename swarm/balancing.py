"""Which stage a peer should serve: the pipeline runs at the speed of its slowest stage, so join that one.

Modelled on Petals' ``block_selection.py``. Everything is pure and order-independent: every peer that sees
the same set of records computes the same floats and picks the same stage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .routing import PeerInfo


def _usable(throughput: float) -> float:
    # A negative or non-finite claim must not make a stage look empty or infinitely fast.
    return throughput if math.isfinite(throughput) and throughput > 0 else 0.0


def stage_throughputs(peers: Iterable[PeerInfo], num_stages: int) -> list[float]:
    """Total announced throughput (samples/s) per stage, ``num_stages`` entries.

    Values are summed in sorted order with ``math.fsum`` so the result does not depend on the order records
    arrived in. Peers announcing a stage outside [0, num_stages) (e.g. a stale config) are ignored.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    per_stage: list[list[float]] = [[] for _ in range(num_stages)]
    for peer in peers:
        if 0 <= peer.stage < num_stages:
            per_stage[peer.stage].append(_usable(peer.throughput))
    return [math.fsum(sorted(values)) for values in per_stage]


def stage_peer_counts(peers: Iterable[PeerInfo], num_stages: int) -> list[int]:
    """Number of peers announcing each stage (out-of-range stages ignored)."""
    counts = [0] * num_stages
    for peer in peers:
        if 0 <= peer.stage < num_stages:
            counts[peer.stage] += 1
    return counts


def choose_stage(peers: Iterable[PeerInfo], num_stages: int) -> int:
    """The stage with the least total throughput; ties go to the stage with fewest peers, then the lowest index.

    Pass the *other* peers' records (leave out your own, as Petals does when it considers moving): the
    answer is where this peer's capacity is missing most.
    """
    peers = list(peers)  # iterated twice
    totals = stage_throughputs(peers, num_stages)
    counts = stage_peer_counts(peers, num_stages)
    return min(range(num_stages), key=lambda stage: (totals[stage], counts[stage], stage))


def bottleneck(totals: list[float]) -> float:
    """The swarm's throughput: the least total throughput over the stages."""
    return min(totals)


def choose_move(peers: Iterable[PeerInfo], num_stages: int, own_stage: int, own_throughput: float,
                min_gain: float) -> int | None:
    """The stage this peer should move to, or None to stay.

    ``peers`` are the *other* peers' records. A move is worth it when the bottleneck with this peer moved
    there is at least ``1 + min_gain`` times the bottleneck with it where it is (Petals' rule, with a margin
    for hysteresis: a move that only trades places with noise never pays its state download).

    Stages differ in cost per sample (the last one also runs the head and the loss), so this peer's speed
    there is estimated as its speed here scaled by how fast that stage's peers are relative to this one's.
    A peer leaves a stage only if two others stay (one, to refill an empty stage): peers that decide on the
    same records at once must not empty it between them.
    """
    peers = list(peers)  # iterated three times
    totals = stage_throughputs(peers, num_stages)
    counts = stage_peer_counts(peers, num_stages)
    target = choose_stage(peers, num_stages)
    if target == own_stage or counts[own_stage] < (1 if counts[target] == 0 else 2):
        return None
    mine = _usable(own_throughput)
    here = list(totals)
    here[own_stage] += mine
    if counts[target]:
        mean_here = here[own_stage] / (counts[own_stage] + 1)
        mine_there = mine * (totals[target] / counts[target]) / mean_here if mean_here > 0 else 0.0
    else:
        mine_there = mine  # nobody to compare with; any throughput beats an empty stage
    there = list(totals)
    there[target] += mine_there
    return target if bottleneck(there) > bottleneck(here) * (1 + min_gain) else None
