"""A 125M-parameter run (Llama-style, dim 768 x 18 layers, byte vocabulary) split into 2 stages, on CPU with
tiny microbatches: a joiner downloads a stage state of over 1 GiB (weights, AdamW moments, outer phi and
delta) as a stream of chunks and trains; a second joiner whose lead donor is killed mid-transfer completes
from the other donor. Each joiner's peak RSS is reported against the state's size."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from swarm_harness import swarm, wait_for, wait_ready
from swarmd.daemon.spec import RunSpec
from swarmd.swarm.model import build_stage
from swarmd.swarm.stage import StageWorker
from swarmd.swarm.state_layout import stage_layout, state_bytes

pytestmark = pytest.mark.slow

SPEC = """
[run]
id = "large"
outer = "noloco"
[model]
dim = 768
n_layers = 18
n_heads = 12
max_seq_len = 64
[pipeline]
stages = 2
microbatch_size = 1
seq_len = 16
max_inflight = 1
hop_timeout_s = 30.0
microbatch_deadline_s = 120.0
[averaging]
inner_steps = 1000
[evaluation]
every_steps = 0
[checkpoint]
every_outer_steps = 0
[balancing]
enabled = false
"""


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024


def stage_state_bytes(spec: RunSpec, stage: int) -> int:
    model = build_stage(spec.model, stage, spec.pipeline.stages, spec.seed)
    worker = StageWorker(model, lr=1e-3)
    return state_bytes(stage_layout(worker.model, worker.optimizer, True, True))


@pytest.mark.timeout(480)  # two 1.2 GiB downloads and a 125M model's first steps on 2 loaded cores
def test_joiners_stream_a_stage_of_over_a_gibibyte_and_survive_a_dead_donor(tmp_path: Path, swarm_env: dict[str, str]):
    spec_path = tmp_path / "large.toml"
    spec_path.write_text(SPEC)
    spec = RunSpec.load(spec_path)
    total = stage_state_bytes(spec, 1)
    assert total > 1 << 30
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec_path, "--no-train")
        s.join_all({"driver": ["--stage", "0"], "first": ["--stage", "1"]})
        wait_for(lambda: s.metrics("first")["swarmd_inner_steps_total"] >= 2, 300, "the first replica's first steps")
        s.join("second", "--stage", "1")  # joiner 1: the whole state from the first replica
        second_out = s.output("second")
        assert "state sync: done" in second_out, second_out
        wait_for(lambda: s.metrics("second")["swarmd_inner_steps_total"] >= 2, 300, "joiner 1's training")
        rss_second = peak_rss(s.child("second").process.pid)

        third = s.join("third", "--stage", "1", wait=False)  # joiner 2: its lead donor dies mid-transfer
        lead = wait_for(lambda: re.search(r"lead (\S+) at step", "\n".join(third.lines)), 120, "joiner 2's sync")
        victim = next(n for n in ("first", "second") if s.ready[n]["peer_id"] == lead.group(1))
        os.killpg(s.child(victim).process.pid, signal.SIGKILL)
        s.child(victim).process.wait()
        s.ready["third"] = wait_ready(third, 300)
        wait_for(lambda: s.metrics("third")["swarmd_inner_steps_total"] >= 1, 300, "joiner 2's training")
        rss_third = peak_rss(third.process.pid)
        third_out = s.output("third")
    done = re.search(r"state sync: done, (\d+) MiB in ([\d.]+) s .* from (\d+) donor", third_out)
    assert done, third_out
    # the lead died mid-transfer: its chunks failed, so the other donor delivered the rest
    assert re.search(rf"donor {s.ready[victim]['peer_id'][-8:]} failed on chunk", third_out), third_out
    print(f"\nstage state {total / 2**30:.2f} GiB; peak RSS joiner 1 {rss_second / 2**30:.2f} GiB "
          f"({rss_second / total:.2f}x), joiner 2 {rss_third / 2**30:.2f} GiB ({rss_third / total:.2f}x)")
    assert rss_second < 2.5 * total and rss_third < 2.5 * total
