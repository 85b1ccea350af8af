"""DiLoCo outer step: the pure torch reference of the update rule (no communication here).

Every replica starts each round from the shared outer parameters ``phi``, takes ``inner_steps`` local
optimizer steps to reach ``theta``, and then all replicas average their progress (an all-reduce):

    mean_progress = mean over replicas of (theta - phi)
    g             = -mean_progress                  # the outer pseudo-gradient
    b             = momentum * b + g                # b starts at zero
    step          = g + momentum * b                # Nesterov; plain momentum uses step = b
    phi           = phi - lr * step
    theta         = phi                             # every replica restarts from the new phi

This is exactly ``torch.optim.SGD(lr=lr, momentum=momentum, nesterov=True)`` (dampening 0, no weight
decay) applied to ``phi`` with gradient ``g``. torch creates its buffer on the first step as ``b = g``;
a buffer that starts at zero gives the same ``b = momentum * 0 + g``, so callers keep a zero-initialised
buffer (or pass ``None`` on the first step) and never need a special case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DiLoCoConfig:
    """Hyperparameters of DiLoCo: inner steps between outer steps and the outer Nesterov SGD."""

    inner_steps: int = 50
    lr: float = 0.7  # outer learning rate
    momentum: float = 0.9  # outer Nesterov momentum


def average_progress(phi: torch.Tensor, thetas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over replicas of ``theta - phi``, summed in the given order (callers sort replicas so every
    peer adds in the same order and gets bit-identical results). Inputs are not modified."""
    if not thetas:
        raise ValueError("average_progress needs at least one replica")
    total = torch.zeros_like(phi)
    for theta in thetas:
        total.add_(theta - phi)
    return total.div_(len(thetas))


def diloco_update(
    phi: torch.Tensor,
    mean_progress: torch.Tensor,
    momentum: torch.Tensor | None,
    *,
    lr: float = 0.7,
    momentum_coef: float = 0.9,
    nesterov: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DiLoCo outer step on flat fp32 tensors. Returns new (phi, momentum); inputs are not modified.

    ``mean_progress`` is the replicas' mean of ``theta - phi``; the outer gradient is its negation.
    ``momentum`` is the outer buffer from the previous step: zeros or ``None`` before the first step
    (both give torch's first-step ``b = g``). The new ``phi`` is what every replica restarts from.
    """
    if phi.shape != mean_progress.shape:
        raise ValueError(f"phi {tuple(phi.shape)} and mean_progress {tuple(mean_progress.shape)} differ in shape")
    if momentum is not None and momentum.shape != phi.shape:
        raise ValueError(f"momentum {tuple(momentum.shape)} and phi {tuple(phi.shape)} differ in shape")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 <= momentum_coef < 1:
        raise ValueError(f"momentum_coef must be in [0, 1), got {momentum_coef}")
    grad = -mean_progress
    # Same operation order as torch.optim.SGD (buf.mul_(m).add_(g); g.add(buf, alpha=m)), so the two
    # agree to the last bit or nearly so, not merely algebraically.
    new_momentum = grad.clone() if momentum is None else momentum * momentum_coef + grad
    step = torch.add(grad, new_momentum, alpha=momentum_coef) if nesterov else new_momentum
    new_phi = torch.add(phi, step, alpha=-lr)
    return new_phi, new_momentum
