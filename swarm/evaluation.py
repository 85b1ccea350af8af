"""Held-out loss of a pipeline's stage models on fixed validation batches (no network, no state kept)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .model import lm_loss


@torch.no_grad()
def heldout_loss(stages: Sequence[nn.Module], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Token-weighted mean cross-entropy of the chained ``stages`` (stage 0 first) over ``batches``.

    Each batch is (inputs, targets) int64 [b, seq]; the models are switched to eval mode for the pass
    and restored afterwards.
    """
    modes = [stage.training for stage in stages]
    for stage in stages:
        stage.eval()
    total, tokens = 0.0, 0
    try:
        for inputs, targets in batches:
            x = inputs
            for stage in stages:
                x = stage(x.to(next(stage.parameters()).device))
            total += float(lm_loss(x, targets.to(x.device))) * targets.numel()
            tokens += targets.numel()
    finally:
        for stage, mode in zip(stages, modes):
            stage.train(mode)
    if tokens == 0:
        raise ValueError("no validation batches to evaluate on")
    return total / tokens
