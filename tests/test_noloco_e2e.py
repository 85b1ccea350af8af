"""NoLoCo outer steps between real swarmd processes on 127.0.0.1: pairing, exchange, faults."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from swarm_harness import swarm, wait_for, write_spec
from swarmd.daemon.checkpoint import model_state, read_checkpoint_tensors
from swarmd.daemon.demo import stop_children, wait_all_steps

pytestmark = pytest.mark.slow

ADVERSARY = (str(Path(__file__).with_name("adversary_node.py")),)
NAMES = ("v0", "v1", "v2", "v3")  # v0, v2 on stage 0 (drivers); v1, v3 on stage 1


def _outer(metrics: dict[str, float], result: str) -> float:
    return metrics[f'swarmd_outer_steps_total{{result="{result}"}}']


def _relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def _checkpoint(path: Path) -> dict:
    """A node's checkpoint as {"model": state_dict, "phi": outer phi}."""
    _, tensors = read_checkpoint_tensors(path)
    return {"model": model_state(tensors), "phi": tensors.get("outer/phi")}


def _flat_weights(checkpoint: dict) -> torch.Tensor:
    return torch.cat([t.float().reshape(-1) for t in checkpoint["model"].values()])


def _train_2x2(tmp_path: Path, env: dict[str, str], outer: str, steps: int, paired: int = 0) -> dict[str, dict]:
    """Seed + 2x2 volunteers until each took ``steps`` inner steps (and ``paired`` paired outer steps);
    returns each volunteer's checkpoint and final metrics."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = write_spec(tmp_path / "run.toml", outer=outer, inner_steps=10, chunk_elements=16384)
    with swarm(tmp_path, env) as s:
        s.start_seed(spec, "--no-train")
        # stage 1 first, so that both its replicas take their first microbatch together: a replica up seconds
        # after the other starts more than H steps behind and catches up (test_replica_that_started_late_catches_up)
        s.join_all({n: ["--stage", "1"] for n in NAMES[1::2]})
        s.join_all({n: ["--stage", "0"] for n in NAMES[0::2]})
        for n in NAMES:  # on a loaded machine, outer steps can lag behind inner steps
            wait_for(lambda: _outer(s.metrics(n), "paired") >= paired, 180, f"{n}'s paired outer steps")
        wait_all_steps([s.child(n) for n in ("seed", *NAMES)], [s.ready[n]["metrics_port"] for n in NAMES], steps, 240)
        metrics = {n: s.metrics(n) for n in NAMES}
        stop_children(s.children)
        for n in NAMES:
            assert s.child(n).process.returncode == 0, s.output(n)
        return {n: {**_checkpoint(tmp_path / n / "checkpoint.pt"), "metrics": metrics[n], "output": s.output(n)}
                for n in NAMES}


def test_pairs_average_and_stay_closer_than_without_averaging(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """2x2, H=10: every replica takes >= 3 paired outer steps, and the replicas of a stage end closer
    together than in the same run with outer = "none". Stopped together, the replicas of a stage take a last
    outer step with each other and leave far closer weights than between two outer steps."""
    steps = 60
    noloco = _train_2x2(tmp_path / "noloco", swarm_env, "noloco", steps, paired=3)
    steps = int(max(noloco[n]["metrics"]["swarmd_inner_steps_total"] for n in NAMES))  # the same budget
    alone = _train_2x2(tmp_path / "none", swarm_env, "none", steps)
    for n in NAMES:
        m = noloco[n]["metrics"]
        assert _outer(m, "paired") >= 3, f"{n}: {m}"
        assert _outer(m, "rejected") == 0 and m['swarmd_sent_bytes_total{channel="averaging"}'] > 0
        assert 0 < m["swarmd_replica_divergence"] < 0.5
        assert _outer(alone[n]["metrics"], "paired") == 0
    for a, b in (("v0", "v2"), ("v1", "v3")):
        phi_gap = _relative_distance(noloco[a]["phi"], noloco[b]["phi"])
        theta_gap = _relative_distance(_flat_weights(noloco[a]), _flat_weights(noloco[b]))
        alone_gap = _relative_distance(_flat_weights(alone[a]), _flat_weights(alone[b]))
        assert phi_gap < alone_gap and theta_gap < alone_gap, (a, b, phi_gap, theta_gap, alone_gap)
        last = [re.findall(r"last outer step: (\w+)", noloco[n]["output"]) for n in (a, b)]
        assert not any("last outer step" in alone[n]["output"] for n in (a, b))
        print(f"{a}, {b}: last outer steps {last}, theta gap {theta_gap:.2e}, without averaging {alone_gap:.2e}")
        if last == [["paired"], ["paired"]]:  # (none when both stopped with no inner step since their last one)
            assert theta_gap < 0.1 * alone_gap, (a, b, theta_gap, alone_gap)


def test_diloco_baseline_all_reduces(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """outer = "diloco": the replicas of each stage all-reduce through hivemind's averager (>= 2 rounds).
    A late joiner downloads a replica's weights with its outer state (the stage's shared phi, momentum
    and step count) and all-reduces with the others."""
    spec = write_spec(tmp_path / "run.toml", outer="diloco", inner_steps=10)
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--no-train")
        s.join_all({n: ["--stage", str(i % 2)] for i, n in enumerate(NAMES)})
        for n in NAMES:
            wait_for(lambda: _outer(s.metrics(n), "paired") >= 2, 180, f"{n}'s second DiLoCo all-reduce")
        s.join_all({"late": ["--stage", "1"]})
        adopted = wait_for(lambda: re.search(r"adopted the outer state of \S+ \(outer step (\d+)\)", s.output("late")),
                           30, "the late joiner's adoption of a replica's outer state")
        assert int(adopted.group(1)) >= 2, s.output("late")
        wait_for(lambda: _outer(s.metrics("late"), "paired") >= 1, 180, "the late joiner's first DiLoCo all-reduce")
        stop_children(s.children)
    for n in (*NAMES, "late"):
        assert torch.isfinite(_checkpoint(tmp_path / n / "checkpoint.pt")["phi"]).all()


def test_partner_killed_mid_exchange(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """The partner freezes after the first chunk and is killed: the survivor steps solo ("failed")
    within its exchange deadline and keeps training."""
    exchange_timeout = 6.0
    spec = write_spec(tmp_path / "run.toml", outer="noloco", inner_steps=10, chunk_elements=16384,
                      exchange_timeout_s=exchange_timeout, hop_timeout_s=2.0, deadline_s=8.0)
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--no-train")
        s.join_all({n: ["--stage", str(i % 2)] for i, n in enumerate(NAMES)}, launchers={"v3": (*ADVERSARY, "hang")})
        wait_for(lambda: (tmp_path / "v3" / "hung").exists(), 90, "the adversary to hang mid-exchange")
        os.kill(s.child("v3").process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # the step itself is bounded by exchange_timeout; the slack is for a loaded 2-core CI machine
        wait_for(lambda: _outer(s.metrics("v1"), "failed") >= 1, exchange_timeout + 30, "v1's solo step")
        assert time.monotonic() - killed_at <= exchange_timeout + 30
        steps = s.metrics("v1")["swarmd_inner_steps_total"]
        wait_for(lambda: s.metrics("v1")["swarmd_inner_steps_total"] > steps + 10, 60, "v1 to keep training")
        assert s.child("v1").process.poll() is None


def test_bad_payloads_are_rejected(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """Two partners of the victim's stage, one sending NaN, one phi' = -9 phi (under a 10x norm bound, but far
    from the victim's phi): each rejected, counted by its reason and banned; the victim's weights stay finite."""
    spec = write_spec(tmp_path / "run.toml", outer="noloco", inner_steps=10, chunk_elements=16384)
    reasons = {"v3": "nonfinite", "v5": "norm"}  # the adversaries of stage 1, by what the victim rejects them for
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--no-train")
        s.join_all({**{n: ["--stage", str(i % 2)] for i, n in enumerate(NAMES)}, "v5": ["--stage", "1"]},
                   launchers={"v3": (*ADVERSARY, "nan"), "v5": (*ADVERSARY, "flip")})

        def rejected(reason: str) -> float:
            return s.metrics("v1")[f'swarmd_rejected_messages_total{{reason="{reason}"}}']

        wait_for(lambda: all(rejected(r) >= 1 for r in reasons.values()), 120, "v1 to reject both adversaries")
        assert _outer(s.metrics("v1"), "paired") == 0  # its only partners are the adversaries
        for n, reason in reasons.items():
            tag = s.ready[n]["peer_id"][-8:]
            assert re.search(rf"outer step with {tag}: rejected its payload \({reason}\).*banned it", s.output("v1")), \
                s.output("v1")
        stop_children(s.children)
        assert s.child("v1").process.returncode == 0, s.output("v1")
    victim = _checkpoint(tmp_path / "v1" / "checkpoint.pt")
    assert torch.isfinite(victim["phi"]).all() and torch.isfinite(_flat_weights(victim)).all()
    assert float(victim["phi"].abs().max()) < 100, "an adversary's payload leaked into the victim's weights"


def test_pair_requests_from_off_the_ready_board_are_refused(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """A member of stage 1 that never posts itself on the ready board but reads it and proposes to everyone on
    it, over and over: refused as "unknown_peer"; the honest replicas of the stage keep pairing with each other
    and never take it as a partner."""
    spec = write_spec(tmp_path / "run.toml", outer="noloco", inner_steps=10, chunk_elements=16384)
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--no-train")
        s.join_all({**{n: ["--stage", str(i % 2)] for i, n in enumerate(NAMES)}, "x": ["--stage", "1"]},
                   launchers={"x": (*ADVERSARY, "propose")})
        for n in ("v1", "v3"):
            wait_for(lambda: _outer(s.metrics(n), "paired") >= 3, 180, f"{n}'s paired outer steps")
        refused = sum(s.metrics(n)['swarmd_rejected_messages_total{reason="unknown_peer"}'] for n in ("v1", "v3"))
        assert refused >= 1
        outsider = s.ready["x"]["peer_id"][-8:]
        for n in ("v1", "v3"):  # no exchange with it ever started (nor failed); a catch-up may download from it
            assert f"with {outsider}" not in s.output(n), s.output(n)
        stop_children(s.children)


def test_replica_that_started_late_catches_up(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """A replica that starts from the initial weights while the stage's other replica has trained ahead (two
    joiners read the stage untrained, one started late) adopts the leader's state at its first boundary
    instead of offering it a payload from far behind: then the two pair, and neither finds the other's phi too
    far from its own (a progress-ratio verdict between replicas of unequal speed is another matter)."""
    # a short pair timeout: a lone replica's solo steps then cover ~100 inner steps, not the ~500 of a 5 s wait
    # (early in training that many steps move phi by more than its own norm: past max_divergence)
    spec = write_spec(tmp_path / "run.toml", outer="noloco", inner_steps=10, pair_timeout_s=1.0,
                      chunk_elements=16384)
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--stage", "0")
        s.join("v1", "--stage", "1")
        wait_for(lambda: s.metrics("v1")["swarmd_inner_steps_total"] >= 50, 120, "v1 to train ahead")
        s.join_all({"v3": ["--stage", "1"]}, launchers={"v3": (*ADVERSARY, "late")})
        wait_for(lambda: "re-entering the stage to adopt it" in s.output("v3"), 120, "v3 to catch up")
        for n in ("v1", "v3"):
            wait_for(lambda: _outer(s.metrics(n), "paired") >= 2, 180, f"{n}'s paired outer steps")
        for n in ("v1", "v3"):
            assert "phi's norm away" not in s.output(n) and "own drift" not in s.output(n), s.output(n)
        stop_children(s.children)


def test_partner_that_stalls_is_banned(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """A partner that pairs and then sends nothing: after the stall timeout the victim steps solo ("failed"),
    counts it as "stalled" and bans it (no more outer steps with it while the ban lasts), and keeps training."""
    spec = write_spec(tmp_path / "run.toml", outer="noloco", inner_steps=10, chunk_elements=16384)
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--no-train")
        s.join_all({n: ["--stage", str(i % 2)] for i, n in enumerate(NAMES)}, launchers={"v3": (*ADVERSARY, "stall")})
        # the step is counted once applied, a moment after the stall is
        m = wait_for(lambda: (m := s.metrics("v1"))['swarmd_rejected_messages_total{reason="stalled"}'] >= 1
                     and _outer(m, "failed") >= 1 and m, 120, "v1 to give up on the stalling partner")
        assert _outer(m, "paired") == 0, m
        assert "stalled" in s.output("v1") and "banned it" in s.output("v1"), s.output("v1")
        steps = m["swarmd_inner_steps_total"]
        wait_for(lambda: s.metrics("v1")["swarmd_inner_steps_total"] > steps + 10, 60, "v1 to keep training")
        stop_children(s.children)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
