"""Membership with real daemons: an outsider (a plain hivemind peer) is refused and cannot forge records;
a private run admits only volunteers holding a valid join token, and a revoked token ends its holder's part."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from swarm_harness import LOCAL, swarm, wait_for, write_spec
from swarmd.daemon.demo import node_command

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def _stage_peers(s, name: str) -> list[float]:
    metrics = s.metrics(name)
    return [metrics.get(f'swarmd_live_peers{{stage="{i}"}}', 0.0) for i in range(2)]


def test_outsider_is_refused_and_cannot_forge_records(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    spec = write_spec(tmp_path / "run.toml", outer="noloco", inner_steps=20)
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--stage", "0")
        s.join_all({"v1": ["--stage", "1"], "v2": ["--stage", "1"]})
        wait_for(lambda: _stage_peers(s, "seed") == [1.0, 2.0], 30, "the seed to see every replica")
        victim = s.ready["v1"]["peer_id"]
        out = subprocess.run([sys.executable, str(HERE / "outsider.py"), s.seed_addr, victim, "test", "1"],
                             env=swarm_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        results = json.loads(out.stdout.strip().splitlines()[-1])
        for rpc in ("pair", "forward", "backward", "state_manifest"):
            assert results[rpc] == "unauthorized", results
        assert results["info"] == "ok", results  # a joiner's first question stays open
        assert results["members_seen"] == 2, results  # it reads the records like anyone...
        # ...but no honest node stores what it forges
        assert results["store_fake_peer"] is False and results["store_forged_heartbeat"] is False, results
        assert results["store_forged_ready"] is False, results
        time.sleep(4)  # two heartbeat rounds: a forged entry that got in would show by now
        assert _stage_peers(s, "seed") == [1.0, 2.0] and _stage_peers(s, "v1") == [1.0, 2.0]
        assert s.metrics("v1").get('swarmd_rejected_messages_total{reason="unauthorized"}', 0) >= 4
        # the stage's two replicas keep pairing with each other, and only with each other
        paired = 'swarmd_outer_steps_total{result="paired"}'
        before = s.metrics("v1").get(paired, 0)
        wait_for(lambda: s.metrics("v1").get(paired, 0) > before, 90, "another paired outer step")
        for name in ("v1", "v2"):
            m = s.metrics(name)
            assert m.get('swarmd_outer_steps_total{result="failed"}', 0) == 0, m
            assert m.get('swarmd_outer_steps_total{result="rejected"}', 0) == 0, m


def _mint(node_dir: Path, spec: Path, env: dict[str, str], *extra: str) -> tuple[str, str]:
    out = subprocess.run(node_command("token", "mint", "--node-dir", str(node_dir), "--spec", str(spec), *extra),
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    token_id = out.stderr.split("token id ")[1].split()[0]
    return out.stdout.strip(), token_id


def _join_fails(s, env: dict[str, str], *extra: str) -> str:
    """Run a join that must be refused; return its one error line."""
    out = subprocess.run(node_command("join", s.seed_addr, *LOCAL, "--node-dir", str(s.root / "refused"), *extra),
                         env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    return lines[0]


def test_private_run_needs_a_valid_token(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    spec = write_spec(tmp_path / "run.toml")
    spec.write_text(spec.read_text().replace('outer = "none"', 'outer = "none"\naccess = "private"'))
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--stage", "0")
        assert "private" in _join_fails(s, swarm_env)
        expired, _ = _mint(tmp_path / "seed", spec, swarm_env, "--ttl", "1s")
        other_stage, _ = _mint(tmp_path / "seed", spec, swarm_env, "--stages", "0")
        token, token_id = _mint(tmp_path / "seed", spec, swarm_env, "--ttl", "1h")
        time.sleep(1.5)
        assert "expired" in _join_fails(s, swarm_env, "--token", expired)
        assert "stages" in _join_fails(s, swarm_env, "--token", other_stage, "--stage", "1")
        s.join("v1", "--stage", "1", "--token", token)
        wait_for(lambda: s.metrics("v1").get("swarmd_inner_steps_total", 0) > 3, 60, "the token holder to train")
        revoke = subprocess.run(node_command("token", "revoke", token_id, "--node-dir", str(tmp_path / "seed")),
                                env=swarm_env, capture_output=True, text=True, timeout=60)
        assert revoke.returncode == 0, revoke.stderr
        wait_for(lambda: s.child("v1").process.poll() is not None, 60, "the revoked volunteer to stop")
        assert "revoked" in s.output("v1")
        assert "revoked" in _join_fails(s, swarm_env, "--token", token)
