"""Stage checkpoints: atomic writes, whole-file checks before anything is loaded, exact restores."""

from __future__ import annotations

import pytest
import torch
from swarmd.daemon.checkpoint import (
    CheckpointError, read_checkpoint_info, restore_checkpoint, write_checkpoint,
)
from swarmd.swarm.model import count_parameters
from swarmd.swarm.outer import OuterState, flatten_parameters
from swarmd.swarm.state_layout import take_snapshot
from test_state_layout import train_one_step, worker


def saved(tmp_path, with_outer: bool = True):
    w = worker(1)
    train_one_step(w, 0)
    w.inner_step = 11
    numel = count_parameters(w.model)
    outer = OuterState(phi=torch.randn(numel), delta=torch.randn(numel), outer_step=2) if with_outer else None
    path = write_checkpoint(tmp_path / "checkpoint.pt", "run-a", 1, take_snapshot(w, outer))
    return w, outer, path


@pytest.mark.parametrize("with_outer", [True, False])
def test_a_checkpoint_restores_weights_moments_steps_and_outer_state(tmp_path, with_outer):
    source, outer, path = saved(tmp_path, with_outer)
    info = read_checkpoint_info(path)
    assert (info.run_id, info.stage, info.inner_step, info.outer_step) == ("run-a", 1, 11, 2 if with_outer else None)
    target = worker(5)
    info, buffers = restore_checkpoint(path, "run-a", 1, target, with_outer)
    assert target.inner_step == 11
    assert torch.equal(flatten_parameters(target.model.parameters()), flatten_parameters(source.model.parameters()))
    if with_outer:
        assert torch.equal(buffers[0], outer.phi) and torch.equal(buffers[1], outer.delta)
    train_one_step(source, 1)
    train_one_step(target, 1)
    assert torch.equal(flatten_parameters(target.model.parameters()), flatten_parameters(source.model.parameters()))
    assert not list(tmp_path.glob("*.tmp"))


def test_no_checkpoint_is_none(tmp_path):
    assert read_checkpoint_info(tmp_path / "checkpoint.pt") is None


def _untouched(target, before) -> bool:
    return torch.equal(flatten_parameters(target.model.parameters()), before) and target.inner_step == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_checkpoint_is_refused_whole_with_its_name(tmp_path, damage):
    _, _, path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF  # inside a tensor's bytes: only the digest can tell
    else:
        data = bytearray(b"not a checkpoint at all")
    path.write_bytes(bytes(data))
    target = worker(5)
    before = flatten_parameters(target.model.parameters())
    with pytest.raises(CheckpointError) as e:
        read_checkpoint_info(path)
        restore_checkpoint(path, "run-a", 1, target, True)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert _untouched(target, before)


@pytest.mark.parametrize("run_id, stage, with_outer, match", [
    ("run-b", 1, True, "is of run 'run-a' stage 1"), ("run-a", 0, True, "is of run 'run-a' stage 1"),
    ("run-a", 1, False, "has outer state"),
])
def test_a_checkpoint_of_another_run_stage_or_setup_is_refused(tmp_path, run_id, stage, with_outer, match):
    _, _, path = saved(tmp_path)
    target = worker(5)
    before = flatten_parameters(target.model.parameters())
    with pytest.raises(CheckpointError, match=match):
        restore_checkpoint(path, run_id, stage, target, with_outer)
    assert _untouched(target, before)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _, _, path = saved(tmp_path)
    good = path.read_bytes()
    w = worker(2)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(path, "run-a", 1, take_snapshot(w, None))
    assert path.read_bytes() == good
