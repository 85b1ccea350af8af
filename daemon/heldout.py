"""Held-out loss of a run: the spec's validation windows through stage models built fresh or loaded from
node checkpoints. ``swarmd demo`` prints it at start and at end; the benches judge runs by it."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import torch
from swarmd.daemon.checkpoint import model_state, read_checkpoint_tensors
from swarmd.daemon.spec import RunSpec
from swarmd.swarm.data import builtin_corpus, load_corpus, split_corpus, validation_batches
from swarmd.swarm.evaluation import heldout_loss
from swarmd.swarm.model import StageModel, build_stage

MAX_COMBINATIONS = 16  # stage-replica chains evaluated at stop (R ** S grows fast)


def run_corpus(spec: RunSpec) -> tuple[bytes, bytes]:
    """(train, validation) bytes of the run's corpus, split as every driver splits it."""
    data = spec.data
    corpus = builtin_corpus() if data.source == "builtin" else load_corpus(list(data.paths), data.jsonl_field)
    return split_corpus(corpus, data.val_fraction)


def validation_set(spec: RunSpec, max_batches: int = 1 << 20) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The run's validation windows (all of them by default) as batches of the spec's microbatch size."""
    _, val = run_corpus(spec)
    p = spec.pipeline
    return validation_batches(val, p.seq_len, p.microbatch_size, max_batches)


def initial_heldout_loss(spec: RunSpec, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Held-out loss of the run's initial weights (every node starts from the same seeded model)."""
    n = spec.pipeline.stages
    return heldout_loss([build_stage(spec.model, s, n, spec.seed) for s in range(n)], batches)


def load_stage_checkpoint(spec: RunSpec, path: Path) -> StageModel:
    """The stage model saved in a node's ``checkpoint.pt``. Raises ValueError naming the file when it is
    unreadable or belongs to another run."""
    try:
        info, tensors = read_checkpoint_tensors(path)
        if info.run_id != spec.run_id:
            raise ValueError(f"it is for run {info.run_id!r}, not {spec.run_id!r}")
        model = build_stage(spec.model, info.stage, spec.pipeline.stages, spec.seed)
        model.load_state_dict(model_state(tensors))
    except Exception as e:
        raise ValueError(f"cannot load checkpoint {path}: {e}") from None
    return model


def checkpoint_heldout_loss(
    spec: RunSpec, checkpoints: Iterable[Path], batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Mean held-out loss over the pipelines that the checkpointed replicas form (one replica per stage;
    at most ``MAX_COMBINATIONS`` chains). Raises ValueError when some stage has no checkpoint."""
    by_stage: dict[int, list[StageModel]] = {}
    for path in checkpoints:
        model = load_stage_checkpoint(spec, path)
        by_stage.setdefault(model.stage, []).append(model)
    missing = [s for s in range(spec.pipeline.stages) if s not in by_stage]
    if missing:
        raise ValueError(f"no checkpoint of stage(s) {missing}")
    chains = itertools.islice(itertools.product(*(by_stage[s] for s in sorted(by_stage))), MAX_COMBINATIONS)
    losses = [heldout_loss(list(chain), batches) for chain in chains]
    return sum(losses) / len(losses)
