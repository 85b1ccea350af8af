"""The NoLoCo outer rule restated in float64, plainly: the reference the one implementation
(swarmd.kernels.noloco_outer_update_, which the daemon's outer step runs chunk by chunk) is checked against.
Used by tests only; nothing that trains calls it.

Each replica keeps an outer copy ``phi`` of the parameters, its inner-optimized parameters ``theta`` and an
outer momentum ``delta``. Every H inner steps it pairs with one partner j and, instead of an all-reduce,
averages pseudo-gradients with that partner only::

    delta <- mu * delta + beta * mean_pair(theta - phi) + gamma * (mean_pair(phi) - phi)
    phi   <- phi + delta
    theta <- phi

Solo (no partner), the pair is the replica alone: its own progress, no consensus term.
"""

from __future__ import annotations

import torch


def noloco_update64(
    phi: torch.Tensor,
    theta: torch.Tensor,
    delta: torch.Tensor,
    partner_phi: torch.Tensor | None = None,
    partner_progress: torch.Tensor | None = None,
    *,
    beta: float,
    gamma: float,
    mu: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One outer step in float64. Returns new (phi, theta, delta); the inputs are not modified."""
    if (partner_phi is None) != (partner_progress is None):
        raise ValueError("give both partner_phi and partner_progress, or neither")
    phi, theta, delta = phi.double(), theta.double(), delta.double()
    progress = theta - phi
    if partner_phi is None:
        mean_progress, consensus = progress, torch.zeros_like(phi)
    else:
        mean_progress = (progress + partner_progress.double()) / 2
        consensus = (phi + partner_phi.double()) / 2 - phi
    new_delta = mu * delta + beta * mean_progress + gamma * consensus
    new_phi = phi + new_delta
    return new_phi, new_phi.clone(), new_delta
