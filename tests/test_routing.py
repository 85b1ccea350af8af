"""SWARM stochastic wiring: weights, bans with backoff, reproducible weighted draws."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from swarmd.swarm.routing import MIN_THROUGHPUT, BanList, PeerInfo, choose_peer, routing_weight


def peer(peer_id: str, throughput: float = 10.0, queue_depth: int = 0, expires: float = 1e9) -> PeerInfo:
    return PeerInfo(
        peer_id=peer_id, stage=1, throughput=throughput, queue_depth=queue_depth, inner_step=0, expires=expires
    )


def test_routing_weight():
    assert routing_weight(peer("a", 10.0, 0)) == 10.0
    assert routing_weight(peer("a", 10.0, 4)) == 2.0
    assert routing_weight(peer("a", 0.0, 0)) == MIN_THROUGHPUT > 0  # new peers still get traffic
    assert routing_weight(peer("a", -5.0, 0)) == MIN_THROUGHPUT
    assert routing_weight(peer("a", float("nan"), 0)) == MIN_THROUGHPUT
    assert routing_weight(peer("a", 10.0, -3)) == 10.0  # a bogus negative queue earns no bonus


def test_ban_backoff_doubles_caps_and_resets():
    bans = BanList()
    assert [bans.ban("x", now=0.0) for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert bans.is_banned("x", 59.0) and not bans.is_banned("x", 60.0)
    bans.record_success("x")
    assert not bans.is_banned("x", 0.0) and bans.failures("x") == 0
    assert bans.ban("x", now=100.0) == 1.0  # backoff starts over after a success
    assert bans.is_banned("x", 100.5) and not bans.is_banned("x", 101.0)


def test_backoff_survives_ban_expiry():
    bans = BanList(base_s=1.0, max_s=60.0)
    bans.ban("x", now=0.0)
    assert not bans.is_banned("x", 5.0)
    assert bans.ban("x", now=5.0) == 2.0  # consecutive failure, even though the first ban had ended
    assert bans.banned(6.0) == {"x"} and bans.banned(7.0) == set()


def test_banned_and_excluded_never_chosen():
    peers = [peer("a", 1000.0), peer("b", 1.0), peer("c", 1.0)]
    bans = BanList()
    bans.ban("a", now=0.0)
    rng = random.Random(0)
    chosen = {choose_peer(peers, bans, rng, now=0.5, exclude=("b",)).peer_id for _ in range(200)}
    assert chosen == {"c"}


def test_none_when_nobody_eligible():
    peers = [peer("a"), peer("b")]
    bans = BanList()
    bans.ban("a", 0.0)
    bans.ban("b", 0.0)
    assert choose_peer(peers, bans, random.Random(0), now=0.5) is None
    assert choose_peer([], None, random.Random(0), now=0.0) is None
    assert choose_peer(peers, None, random.Random(0), now=0.0, exclude={"a", "b"}) is None
    assert choose_peer([peer("a", expires=5.0)], None, random.Random(0), now=5.0) is None  # expired record


def test_choice_independent_of_input_order():
    peers = [peer("d", 3.0), peer("a", 1.0), peer("c", 5.0, 2), peer("b", 2.0)]
    for seed in range(50):
        picks = {
            choose_peer(order, None, random.Random(seed), now=0.0).peer_id
            for order in (peers, peers[::-1], sorted(peers, key=lambda p: p.throughput))
        }
        assert len(picks) == 1


def test_duplicate_records_keep_the_freshest():
    old, new = peer("a", 1.0, expires=10.0), peer("a", 2.0, expires=20.0)
    assert choose_peer([old, new], None, random.Random(0), now=0.0) is new
    assert choose_peer([new, old], None, random.Random(0), now=0.0) is new


def test_frequencies_proportional_to_weights():
    peers = [peer("a", 10.0), peer("b", 30.0), peer("c", 60.0, queue_depth=1), peer("d", 0.0)]
    weights = {p.peer_id: routing_weight(p) for p in peers}
    total = sum(weights.values())
    rng = random.Random(1234)
    draws = 20_000
    counts = Counter(choose_peer(peers, None, rng, now=0.0).peer_id for _ in range(draws))
    for peer_id, weight in weights.items():
        expected = weight / total
        assert counts[peer_id] / draws == pytest.approx(expected, abs=0.015), peer_id
    assert counts["b"] > counts["a"]


def test_banlist_validation():
    with pytest.raises(ValueError):
        BanList(base_s=0.0)
    with pytest.raises(ValueError):
        BanList(base_s=10.0, max_s=5.0)
