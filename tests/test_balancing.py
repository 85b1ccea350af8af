"""Stage selection: join the stage with the least total throughput."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.swarm.balancing import choose_move, choose_stage, stage_peer_counts, stage_throughputs
from swarmd.swarm.routing import PeerInfo


def peer(peer_id: str, stage: int, throughput: float) -> PeerInfo:
    return PeerInfo(peer_id=peer_id, stage=stage, throughput=throughput, queue_depth=0, inner_step=0, expires=1e9)


def test_stage_throughputs():
    peers = [peer("a", 0, 1.5), peer("b", 0, 2.5), peer("c", 2, 7.0), peer("x", 5, 100.0), peer("n", 1, float("nan"))]
    assert stage_throughputs(peers, 3) == [4.0, 0.0, 7.0]  # out-of-range stage and NaN ignored
    assert stage_peer_counts(peers, 3) == [2, 1, 1]
    with pytest.raises(ValueError):
        stage_throughputs(peers, 0)


def test_least_throughput_stage():
    peers = [peer("a", 0, 10.0), peer("b", 1, 3.0), peer("c", 1, 4.0), peer("d", 2, 5.0)]
    assert choose_stage(peers, 3) == 2
    assert choose_stage(peers, 4) == 3  # an empty stage comes first
    assert choose_stage([], 3) == 0


def test_tie_breaking():
    # Equal totals: fewer peers wins.
    peers = [peer("a", 0, 2.0), peer("b", 0, 2.0), peer("c", 1, 4.0)]
    assert choose_stage(peers, 2) == 1
    # Equal totals and counts: lowest index wins.
    peers = [peer("a", 0, 4.0), peer("c", 1, 4.0), peer("d", 2, 4.0)]
    assert choose_stage(peers, 3) == 0
    peers = [peer("a", 0, 5.0), peer("c", 1, 4.0), peer("d", 2, 4.0)]
    assert choose_stage(peers, 3) == 1
    # Peers with no throughput measurement yet still count as peers.
    assert choose_stage([peer("a", 0, 0.0)], 2) == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False)),
        max_size=30,
    ),
    st.randoms(use_true_random=False),
)
def test_order_independence(entries, rnd: random.Random):
    peers = [peer(f"p{i}", stage, throughput) for i, (stage, throughput) in enumerate(entries)]
    shuffled = peers[:]
    rnd.shuffle(shuffled)
    assert stage_throughputs(peers, 4) == stage_throughputs(shuffled, 4)  # bit-identical floats
    assert choose_stage(peers, 4) == choose_stage(shuffled, 4)


def _peers(stages_and_tputs: list[tuple[int, float]]) -> list[PeerInfo]:
    return [PeerInfo(peer_id=f"p{i}", stage=s, throughput=t, queue_depth=0, inner_step=0, expires=1e18)
            for i, (s, t) in enumerate(stages_and_tputs)]


def test_a_peer_moves_to_the_bottleneck_when_it_raises_the_swarm_throughput():
    # 3 peers on stage 0, 1 on stage 1: a stage-0 peer moving makes it 2 + 2
    others = _peers([(0, 10.0), (0, 10.0), (1, 10.0)])
    assert choose_move(others, 2, own_stage=0, own_throughput=10.0, min_gain=0.2) == 1
    # the lone stage-1 peer stays: leaving would empty its stage
    assert choose_move(_peers([(0, 10.0)] * 3), 2, own_stage=1, own_throughput=10.0, min_gain=0.2) is None
    # an emptied stage is refilled from a stage of two
    assert choose_move(_peers([(0, 10.0)]), 2, own_stage=0, own_throughput=10.0, min_gain=0.2) == 1


def test_no_move_once_balanced_and_none_for_gains_below_the_margin():
    assert choose_move(_peers([(0, 10.0), (1, 10.0), (1, 10.0)]), 2, 0, 10.0, 0.2) is None  # 2 + 2
    assert choose_move(_peers([(0, 10.0), (0, 10.0), (1, 10.0)]), 2, 1, 10.0, 0.2) is None  # 2 + 2
    # stage 1 is short by 10% of what a move would bring: below the 20% margin, above a 5% one
    others = _peers([(0, 5.5), (0, 5.5), (1, 10.0)])
    assert choose_move(others, 2, 0, 1.0, 0.2) is None
    assert choose_move(others, 2, 0, 1.0, 0.05) == 1


def test_a_stage_keeps_a_spare_so_peers_deciding_at_once_cannot_empty_it():
    # two stage-0 peers that both read 2 + 1 would both move and leave stage 0 empty: neither does
    assert choose_move(_peers([(0, 10.0), (1, 1.0)]), 2, 0, 10.0, 0.2) is None


def test_the_speed_a_mover_brings_is_scaled_by_the_target_stage_cost():
    # stage 1 costs 3x per sample: its peers run at 10 where stage-0 peers run at 30
    assert choose_move(_peers([(0, 30.0), (0, 30.0), (1, 10.0)]), 2, 0, 30.0, 0.2) == 1  # bottleneck 10 -> 20
    assert choose_move(_peers([(0, 30.0)] * 3 + [(1, 10.0)] * 2), 2, 0, 30.0, 0.2) == 1  # 20 -> 30
    # 120 + 60: bringing 30 there would look like 60 -> 90; it brings 10, and 60 -> 70 is under the margin
    assert choose_move(_peers([(0, 30.0)] * 3 + [(1, 10.0)] * 6), 2, 0, 30.0, 0.2) is None
