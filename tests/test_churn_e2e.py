"""Churn between real swarmd processes on 127.0.0.1: volunteers killed with SIGKILL and replaced, a whole
stage lost and brought back from a checkpoint, and a peer moving to the stage that limits the swarm."""

from __future__ import annotations

import os
import random
import re
import signal
import statistics
import time
from pathlib import Path

import pytest
from swarm_harness import Swarm, swarm, wait_for, write_spec
from swarmd.daemon.demo import Child, stop_children

pytestmark = pytest.mark.slow

CHAOS_S = 45.0  # scripted churn after the warm-up: 3 or 4 kills and joins, the stage wipe among them
SETTLE_S = 15.0  # after the last join: every joiner trains
KILL_EVERY_S = (10.0, 15.0)


def kill9(child: Child) -> None:
    """A machine dying: SIGKILL the node and its p2pd (its process group), no chance to clean up."""
    try:
        os.killpg(child.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.process.wait()


def last_stage_loss(s: Swarm, names: list[str]) -> float:
    losses = []
    for n in names:
        try:
            value = s.metrics(n).get("swarmd_loss", float("nan"))
        except OSError:
            continue
        if value == value and value > 0:
            losses.append(value)
    return statistics.mean(losses) if losses else float("nan")


def steps_of(s: Swarm, name: str) -> list[int]:
    """The inner steps a node printed in its progress lines, in order."""
    return [int(m) for m in re.findall(r"\] step (\d+)", s.output(name))]


def test_a_run_survives_kills_joins_and_the_loss_of_a_whole_stage(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    rng = random.Random(0)
    spec = write_spec(tmp_path / "run.toml", outer="noloco", inner_steps=10, checkpoint_every=1,
                      chunk_elements=16384, deadline_s=20.0, hop_timeout_s=5.0)
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--no-train")
        stage_of = {f"v{i}": i % 2 for i in range(6)}
        s.join_all({n: ["--stage", str(st)] for n, st in stage_of.items()})
        alive = set(stage_of)
        wait_for(lambda: all((tmp_path / n / "checkpoint.pt").exists() for n in alive), 120, "every first checkpoint")
        before = last_stage_loss(s, [n for n in alive if stage_of[n] == 1])
        steps_before = {n: max(steps_of(s, n), default=0) for n in alive}
        killed: list[str] = []
        fresh = 0
        start = time.monotonic()
        wiped = False
        while time.monotonic() - start < CHAOS_S:
            time.sleep(rng.uniform(*KILL_EVERY_S))
            if not wiped and time.monotonic() - start > CHAOS_S / 3:
                # every replica of stage 1 dies; one comes back from its node directory
                wiped = True
                victims = [n for n in alive if stage_of[n] == 1]
                for n in victims:
                    kill9(s.child(n))
                alive -= set(victims)
                time.sleep(3)
                back = victims[0]
                restarted = s.join(back)
                alive.add(back)
                restored = wait_for(lambda: re.search(r"restored stage 1 from \S+ \(step (\d+)", "\n".join(restarted.lines)),
                                    10, "the restored stage's step")
                assert int(restored.group(1)) > 0, "\n".join(restarted.lines)
                killed += [n for n in victims if n != back]
                continue
            victim = rng.choice(sorted(n for n in alive if sum(stage_of[m] == stage_of[n] for m in alive) > 1))
            kill9(s.child(victim))
            alive.discard(victim)
            killed.append(victim)
            if rng.random() < 0.5 and killed:
                name = killed.pop(rng.randrange(len(killed)))  # back with its old node directory
            else:
                fresh += 1
                name = f"f{fresh}"
            s.join(name)
            stage_of[name] = s.ready[name]["stage"]
            alive.add(name)
        time.sleep(SETTLE_S)
        after = last_stage_loss(s, [n for n in alive if stage_of[n] == 1])
        survivors = [n for n in alive if n in steps_before]
        advanced = {n: max(steps_of(s, n), default=0) > steps_before[n] for n in survivors}
        joiners = [n for n in alive if n.startswith("f")]
        running = [c for c in s.children if c.process.poll() is None]
        stop_children(s.children)
    assert all(advanced.values()), advanced
    assert after < before, (before, after)
    for child in running:
        assert child.process.returncode == 0, "\n".join(child.lines)
        assert "Traceback" not in "\n".join(child.lines), "\n".join(child.lines)
    for n in joiners:  # fresh volunteers downloaded a stage's state and trained
        lines = s.output(n)
        assert "state sync: done" in lines and max(steps_of(s, n), default=0) > 0, lines


def test_a_peer_moves_to_the_bottleneck_stage_and_then_stays(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """3 volunteers on stage 0 and 1 on stage 1: one of the three moves to stage 1 within a bounded time,
    then nobody moves again for 40 s (about 10 balancing checks per peer)."""
    spec = write_spec(tmp_path / "run.toml", balancing=True, min_dwell_s=5.0, check_every_s=4.0)
    movers = ("a", "b", "c")
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--no-train")
        s.join_all({"v1": ["--stage", "1"], **{n: ["--stage", "0"] for n in movers}})
        moved = wait_for(lambda: [n for n in movers if "moved to stage 1" in s.output(n)], 90, "a move to stage 1")
        time.sleep(40)
        moves = {n: s.output(n).count("moved to stage") for n in ("v1", *movers)}
        stage_one = [n for n in movers if s.metrics(n)["swarmd_stage"] == 1]
        stop_children(s.children)
    assert len(moved) == 1 and sum(moves.values()) == 1, moves
    assert stage_one == moved


def test_sigterm_leaves_cleanly_and_a_trained_stage_is_never_restarted_from_scratch(
        tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """SIGTERM: the node withdraws (peers stop counting it within a heartbeat), writes its checkpoint and
    exits 0 within 15 s without a traceback. Then, with every replica of stage 1 gone, a fresh volunteer for
    stage 1 (no checkpoint) says so in one line and exits; it does not start the stage from scratch."""
    spec = write_spec(tmp_path / "run.toml", outer="noloco", inner_steps=10, checkpoint_every=1)
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--no-train")
        s.join_all({"v0": ["--stage", "0"], "v1": ["--stage", "1"], "v3": ["--stage", "1"]})
        wait_for(lambda: (tmp_path / "v3" / "checkpoint.pt").exists(), 120, "v3's first checkpoint")
        wait_for(lambda: s.metrics("v0")['swarmd_live_peers{stage="1"}'] == 2, 30, "v0 seeing both stage-1 peers")
        before = (tmp_path / "v3" / "checkpoint.pt").stat().st_mtime
        leaving = s.child("v3")
        start = time.monotonic()
        leaving.process.send_signal(signal.SIGTERM)
        wait_for(lambda: s.metrics("v0")['swarmd_live_peers{stage="1"}'] == 1, 5, "v3's withdrawal seen by v0")
        leaving.process.wait(15)
        took = time.monotonic() - start
        assert leaving.process.returncode == 0 and took < 15, (took, s.output("v3"))
        assert "Traceback" not in s.output("v3") and "stopped" in s.output("v3")
        assert (tmp_path / "v3" / "checkpoint.pt").stat().st_mtime > before
        kill9(s.child("v1"))
        time.sleep(7)  # v1's heartbeat expires
        fresh = s.join("x", "--stage", "1", "--state-wait", "4", wait=False)
        fresh.process.wait(90)
        out = s.output("x")
        assert fresh.process.returncode == 2, out
        assert "Traceback" not in out and re.search(r"error: stage 1 has trained .* no replica serves it", out), out
        assert not (tmp_path / "x" / "checkpoint.pt").exists()
        stop_children(s.children)
