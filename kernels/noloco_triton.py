"""Triton kernel for the fused NoLoCo outer update: one pass over phi, theta, delta and the
partner's int8 payloads (codes + block scales), writing phi, theta, delta in place.

Per element it reads 3 fp32 + 2 int8 (+ scales, cached) and writes 3 fp32, instead of the
dozen full-size temporaries of the eager formula. Imported lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from swarmd.kernels.blocks import QuantizedBlocks

NOLOCO_BLOCK = 2048


@triton.jit
def _noloco_kernel(
    phi_ptr,
    theta_ptr,
    delta_ptr,
    c1_ptr,
    s1_ptr,
    bs1,
    c2_ptr,
    s2_ptr,
    bs2,
    n,
    beta,
    gamma,
    mu,
    PAIRED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    phi = tl.load(phi_ptr + offs, mask=mask, other=0.0)
    theta = tl.load(theta_ptr + offs, mask=mask, other=0.0)
    delta = tl.load(delta_ptr + offs, mask=mask, other=0.0)
    progress = theta - phi
    if PAIRED:
        pphi = tl.load(c1_ptr + offs, mask=mask, other=0).to(tl.float32) * tl.load(
            s1_ptr + offs // bs1, mask=mask, other=0.0
        )
        pprog = tl.load(c2_ptr + offs, mask=mask, other=0).to(tl.float32) * tl.load(
            s2_ptr + offs // bs2, mask=mask, other=0.0
        )
        mean_progress = (progress + pprog) * 0.5
        consensus = (phi + pphi) * 0.5 - phi
        d = mu * delta + beta * mean_progress + gamma * consensus
    else:
        d = mu * delta + beta * progress
    new_phi = phi + d
    tl.store(delta_ptr + offs, d, mask=mask)
    tl.store(phi_ptr + offs, new_phi, mask=mask)
    tl.store(theta_ptr + offs, new_phi, mask=mask)


def noloco_outer_update_triton_(
    phi: torch.Tensor,
    theta: torch.Tensor,
    delta: torch.Tensor,
    partner_phi: QuantizedBlocks | None,
    partner_progress: QuantizedBlocks | None,
    beta: float,
    gamma: float,
    mu: float,
) -> None:
    """Triton twin of ``noloco_torch.noloco_outer_update_torch_`` (contiguous fp32 tensors)."""
    n = phi.numel()
    if n == 0:
        return
    paired = partner_phi is not None and partner_progress is not None
    # Unpaired: pass phi's own storage as dummy pointers; the PAIRED=False branch never reads them.
    c1, s1, bs1 = (partner_phi.codes, partner_phi.scales, partner_phi.block_size) if paired else (phi, phi, 1)
    c2, s2, bs2 = (
        (partner_progress.codes, partner_progress.scales, partner_progress.block_size) if paired else (phi, phi, 1)
    )
    grid = (triton.cdiv(n, NOLOCO_BLOCK),)
    _noloco_kernel[grid](
        phi, theta, delta, c1, s1, bs1, c2, s2, bs2, n, float(beta), float(gamma), float(mu), paired, NOLOCO_BLOCK
    )
