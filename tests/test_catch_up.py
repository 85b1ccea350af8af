"""swarmd.swarm.catch_up: when a replica that started without its stage's state fetches it."""

from __future__ import annotations

from swarmd.swarm.catch_up import replica_ahead
from swarmd.swarm.routing import PeerInfo


def _peer(name: str, stage: int, step: int) -> PeerInfo:
    return PeerInfo(peer_id=name, stage=stage, throughput=10.0, queue_depth=0, inner_step=step, expires=1e12)


def test_the_most_advanced_replica_of_our_stage_more_than_the_margin_ahead() -> None:
    peers = [_peer("a", 1, 40), _peer("b", 1, 230), _peer("c", 0, 900)]
    assert replica_ahead(peers, 1, own_step=20, margin=10).peer_id == "b"  # stage 0's lead is not ours


def test_no_catch_up_within_the_margin_or_alone() -> None:
    assert replica_ahead([_peer("a", 1, 30)], 1, own_step=20, margin=10) is None  # 10 ahead: not more
    assert replica_ahead([_peer("a", 1, 31)], 1, own_step=20, margin=10).peer_id == "a"
    assert replica_ahead([_peer("c", 0, 900)], 1, own_step=20, margin=10) is None
    assert replica_ahead([], 1, own_step=0, margin=10) is None
