"""Poisoning (bench/poisoning.py --quick, in process): among 6 NoLoCo replicas of a stage, one sends
phi' = -9 phi, or a phi that drifts by twice its honest update per outer step. The honest replicas end within
2% of the validation loss of the same run without it, and every honest replica that was paired with it bans
it. The payload checks, the ban rule and the clipped update are the daemon's own (swarmd.swarm.outer)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import poisoning  # noqa: E402  (bench/poisoning.py)


@pytest.fixture(scope="module")
def outcomes() -> dict[str, poisoning.Outcome]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runs are small: one thread is fastest, and deterministic
    try:
        return poisoning.run_all(poisoning.make_setup(quick=True))
    finally:
        torch.set_num_threads(threads)


def test_honest_pairs_stay_inside_the_bounds(outcomes):
    """Without a poisoner nothing is rejected and no pull or move is clipped: the bounds leave honest replicas
    alone."""
    honest = outcomes["none"].honest
    assert honest.pairs > 0 and honest.rejected == 0 and honest.pulls_clipped == 0 and honest.clipped == 0
    a = poisoning.make_setup(quick=True).averaging
    assert honest.distance_ratio < a.max_distance_ratio / 1.5 and honest.progress_ratio < a.max_progress_ratio
    assert honest.move < a.max_move


@pytest.mark.parametrize("mode", ["flip", "drift"])
def test_poisoner_is_banned_and_does_no_harm(outcomes, mode: str):
    """Within 2% of the run without a poisoner, and banned by every honest replica that was paired with it."""
    assert poisoning.holds(outcomes["none"], outcomes[mode]), poisoning.table(outcomes)
    if mode == "flip":  # far from every honest phi: never accepted
        assert outcomes[mode].accepted_from_poisoner == 0
