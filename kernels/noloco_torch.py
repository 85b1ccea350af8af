"""Torch fallback of the fused NoLoCo outer update: the rule of ``dispatch.noloco_outer_update_``, on any device
(CPU volunteers run it; on CUDA it serves payloads that are not int8 blocks)."""

from __future__ import annotations

import torch
from swarmd.kernels.blocks import QuantizedBlocks
from swarmd.kernels.quant_torch import decode_torch


def noloco_outer_update_torch_(
    phi: torch.Tensor,
    theta: torch.Tensor,
    delta: torch.Tensor,
    partner_phi: QuantizedBlocks | torch.Tensor | None,
    partner_progress: QuantizedBlocks | torch.Tensor | None,
    beta: float,
    gamma: float,
    mu: float,
) -> None:
    """Update fp32 ``phi``, ``theta``, ``delta`` in place from the partner's payloads (or solo)."""
    progress = theta - phi
    if partner_phi is None or partner_progress is None:
        new_delta = mu * delta + beta * progress  # the consensus term is exactly zero when solo
    else:
        pphi = _values(partner_phi).view(phi.shape)
        pprog = _values(partner_progress).view(phi.shape)
        mean_progress = (progress + pprog) * 0.5
        consensus = (phi + pphi) * 0.5 - phi
        new_delta = mu * delta + beta * mean_progress + gamma * consensus
    delta.copy_(new_delta)
    phi.add_(new_delta)
    theta.copy_(phi)


def _values(payload: QuantizedBlocks | torch.Tensor) -> torch.Tensor:
    return decode_torch(payload) if isinstance(payload, QuantizedBlocks) else payload
