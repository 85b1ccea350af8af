"""NoLoCo outer step: the pure torch reference of the update rule (no communication here).

Each replica keeps an outer copy ``phi`` of the parameters, its inner-optimized parameters
``theta`` and an outer momentum ``delta``. Every ``inner_steps`` it pairs with one partner j and,
instead of an all-reduce, averages pseudo-gradients with that partner only:

    progress      = theta - phi
    mean_progress = (progress + partner_progress) / 2
    mean_phi      = (phi + partner_phi) / 2
    delta         = mu * delta + beta * mean_progress + gamma * (mean_phi - phi)
    phi           = phi + delta
    theta         = phi

The gamma term pulls the two outer copies together, which is what keeps replicas from drifting
apart without global synchronization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoLoCoConfig:
    """Hyperparameters of NoLoCo: inner steps between outer steps and the outer-update coefficients."""

    inner_steps: int = 50
    beta: float = 0.7  # weight of the averaged pseudo-gradient (outer learning rate)
    gamma: float = 0.7  # pull toward the pair's mean outer parameters
    mu: float = 0.5  # outer momentum


def noloco_update(
    phi: torch.Tensor,
    theta: torch.Tensor,
    delta: torch.Tensor,
    partner_phi: torch.Tensor | None = None,
    partner_progress: torch.Tensor | None = None,
    *,
    beta: float = 0.7,
    gamma: float = 0.7,
    mu: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One NoLoCo outer step for one replica. Returns new (phi, theta, delta); inputs are not modified.

    With no partner (both partner tensors None) the pair is the replica alone: mean_progress is its
    own progress and the consensus term vanishes. ``theta`` comes back as a copy of the new ``phi``.
    """
    if (partner_phi is None) != (partner_progress is None):
        raise ValueError("give both partner_phi and partner_progress, or neither")
    progress = theta - phi
    if partner_phi is None:
        mean_progress = progress
        consensus = torch.zeros_like(phi)
    else:
        mean_progress = (progress + partner_progress) / 2
        mean_phi = (phi + partner_phi) / 2
        consensus = mean_phi - phi
    new_delta = mu * delta + beta * mean_progress + gamma * consensus
    new_phi = phi + new_delta
    return new_phi, new_phi.clone(), new_delta
