"""The stage state's layout, chunk plan, digests, snapshots and in-place loading (pure functions)."""

from __future__ import annotations

import pytest
import torch
from swarmd.swarm.model import ModelConfig, build_stage, count_parameters
from swarmd.swarm.outer import OuterState, flatten_parameters
from swarmd.swarm.stage import StageWorker
from swarmd.swarm.state_layout import (
    Entry, LayoutError, check_layout, check_parts, chunk_digest, plan_chunks, prepare_target, read_chunk,
    stage_layout, state_bytes, take_snapshot, write_chunk,
)

TINY = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, max_seq_len=32)


def worker(seed: int) -> StageWorker:
    return StageWorker(build_stage(TINY, 1, 2, seed), lr=1e-3)


def train_one_step(w: StageWorker, seed: int) -> None:
    """One AdamW step on a fixed random objective (so the optimizer has moments)."""
    hidden = torch.randn(2, 8, TINY.dim, generator=torch.Generator().manual_seed(seed))
    w.model(hidden).square().mean().backward()
    w.optimizer.step()
    w.optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("chunk_bytes, max_parts", [(1 << 10, 64), (4096, 3), (1 << 24, 64), (7, 64)])
def test_the_plan_covers_every_element_once_within_its_bounds(chunk_bytes, max_parts):
    entries = [Entry("a", (100, 30), torch.float32), Entry("b", (), torch.float32), Entry("c", (7,), torch.bfloat16),
               Entry("d", (0,), torch.float32), Entry("e", (5000,), torch.float32)]
    plan = plan_chunks(entries, chunk_bytes, max_parts)
    assert plan == plan_chunks(entries, chunk_bytes, max_parts)  # both ends compute the same plan
    covered = {i: [] for i in range(len(entries))}
    for chunk in plan:
        assert 1 <= len(chunk) <= max_parts
        size = sum((stop - start) * torch.empty((), dtype=entries[i].dtype).element_size() for i, start, stop in chunk)
        assert size <= max(chunk_bytes, 4)  # one element even when it is larger than a chunk
        for i, start, stop in chunk:
            covered[i].append((start, stop))
    for i, entry in enumerate(entries):
        ranges = sorted(covered[i])
        assert sum(stop - start for start, stop in ranges) == entry.numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_a_layout_check_accepts_our_own_and_names_the_first_difference():
    w = worker(1)
    assert check_layout(stage_layout(w.model, w.optimizer, True, True), w.model, w.optimizer, True) is True
    assert check_layout(stage_layout(w.model, w.optimizer, False, False), w.model, w.optimizer, False) is False
    other = StageWorker(build_stage(ModelConfig(vocab_size=256, dim=48, n_layers=2, n_heads=2, max_seq_len=32), 1, 2, 0),
                        lr=1e-3)
    with pytest.raises(LayoutError, match="where this stage has"):
        check_layout(stage_layout(other.model, other.optimizer, True, True), w.model, w.optimizer, True)
    with pytest.raises(LayoutError, match="state entries"):
        check_layout(stage_layout(w.model, w.optimizer, True, False), w.model, w.optimizer, True)


def test_parts_must_match_their_slices():
    entries = [Entry("a", (10,), torch.float32)]
    check_parts(entries, [(0, 2, 5)], [torch.zeros(3)])
    for bad in ([torch.zeros(4)], [torch.zeros(3, dtype=torch.float16)], [torch.zeros(3), torch.zeros(1)]):
        with pytest.raises(LayoutError):
            check_parts(entries, [(0, 2, 5)], bad)


def test_digests_tell_chunks_apart():
    a = [torch.arange(10.0), torch.ones(3)]
    assert chunk_digest(a) == chunk_digest([t.clone() for t in a])
    b = [torch.arange(10.0), torch.ones(3)]
    b[1][2] = 1.0000001
    assert chunk_digest(a) != chunk_digest(b)


def test_a_snapshot_written_chunk_by_chunk_clones_the_replica():
    source, joiner = worker(1), worker(2)
    train_one_step(source, 0)
    source.inner_step = 9
    numel = count_parameters(source.model)
    outer = OuterState(phi=torch.randn(numel), delta=torch.randn(numel), outer_step=4)
    snap = take_snapshot(source, outer)
    assert snap.inner_step == 9 and snap.outer_step == 4
    assert state_bytes(snap.entries) > 4 * numel * 4  # weights, two moments, phi, delta
    with_optimizer = check_layout(snap.entries, joiner.model, joiner.optimizer, True)
    targets, buffers = prepare_target(joiner, with_optimizer, True)
    for chunk in plan_chunks(snap.entries, 2048):
        write_chunk(targets, chunk, read_chunk(snap.tensors, chunk))
    assert torch.equal(flatten_parameters(joiner.model.parameters()), flatten_parameters(source.model.parameters()))
    assert torch.equal(buffers[0], outer.phi) and torch.equal(buffers[1], outer.delta)
    train_one_step(source, 1)
    train_one_step(joiner, 1)  # the moments came along: the same step moves both copies identically
    assert torch.equal(flatten_parameters(joiner.model.parameters()), flatten_parameters(source.model.parameters()))


def test_a_snapshot_is_a_copy():
    w = worker(1)
    snap = take_snapshot(w, None)
    before = [t.clone() for t in snap.tensors]
    train_one_step(w, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, snap.tensors))
