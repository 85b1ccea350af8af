"""Torch fallback of the fused NoLoCo outer update: the rule of ``dispatch.noloco_outer_update_``, on any device
(CPU volunteers run it; on CUDA it serves payloads that are not int8 blocks).

It runs the Triton kernel's arithmetic operation for operation (same operands, same order, no fused
multiply-add). On large CPU tensors with int8 payloads (or solo) through torch.compile, one loop over the
data (``swarmd.kernels.compiled``); otherwise in eager torch one chunk of elements at a time: the dozen
elementwise steps of a chunk then read and write two scratch buffers that stay in cache, instead of a dozen
model-sized temporaries.
"""

from __future__ import annotations

import math

import torch
from swarmd.kernels import compiled
from swarmd.kernels.blocks import QuantizedBlocks
from swarmd.kernels.quant_torch import CHUNK_ELEMS, decode_range_into


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
    n = phi.numel()
    paired = partner_phi is not None and partner_progress is not None
    begin = _update_compiled(phi, theta, delta, partner_phi, partner_progress, beta, gamma, mu) if (
        compiled.wanted(phi, n)) else 0
    step = CHUNK_ELEMS
    if paired:  # chunks start on block boundaries of both payloads, so each decodes on its own
        for q in (partner_phi, partner_progress):
            if isinstance(q, QuantizedBlocks):
                step = math.lcm(step, q.block_size)
    p_all, t_all, d_all = phi.view(-1), theta.view(-1), delta.view(-1)
    size = min(step, n - begin)
    a = torch.empty(size, dtype=torch.float32, device=phi.device) if paired else None
    b = torch.empty(size, dtype=torch.float32, device=phi.device) if paired else None
    for start in range(begin, n, step):  # begin: whole blocks of both payloads (what the compiled update did)
        stop = min(n, start + step)
        m = stop - start
        pphi = _values(partner_phi, start, stop, a[:m]) if paired else None
        pprog = _values(partner_progress, start, stop, b[:m]) if paired else None
        noloco_rule_(p_all[start:stop], t_all[start:stop], d_all[start:stop], pphi, pprog, beta, gamma, mu)


def noloco_rule_(phi: torch.Tensor, theta: torch.Tensor, delta: torch.Tensor, partner_phi: torch.Tensor | None,
                 partner_progress: torch.Tensor | None, beta: float, gamma: float, mu: float) -> None:
    """The rule, in place on flat fp32 ``phi``, ``theta``, ``delta`` with the partner's decoded values (None:
    solo), in the Triton kernel's order of operations. Eager on a chunk, or traced whole by torch.compile."""
    progress = theta - phi
    if partner_phi is None or partner_progress is None:
        new_delta = mu * delta + beta * progress  # the consensus term is exactly zero when solo
    else:
        mean_progress = (progress + partner_progress) * 0.5
        consensus = (phi + partner_phi) * 0.5 - phi
        new_delta = mu * delta + beta * mean_progress + gamma * consensus
    new_phi = phi + new_delta
    delta.copy_(new_delta)
    phi.copy_(new_phi)
    theta.copy_(new_phi)


def noloco_blocks_(phi: torch.Tensor, theta: torch.Tensor, delta: torch.Tensor, c1: torch.Tensor | None,
                   s1: torch.Tensor | None, c2: torch.Tensor | None, s2: torch.Tensor | None,
                   beta: float, gamma: float, mu: float) -> bool:
    """The rule with the partner's int8 codes as (blocks, block_size) views and their scales (c1 = None: solo),
    decoded as the dequantizer does: what torch.compile fuses into one loop. Returns True."""
    pphi = None if c1 is None else (c1.float() * s1[:, None]).reshape(-1)
    pprog = None if c2 is None else (c2.float() * s2[:, None]).reshape(-1)
    noloco_rule_(phi, theta, delta, pphi, pprog, beta, gamma, mu)
    return True


def _values(payload: QuantizedBlocks | torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """Elements start..stop of the payload's values: int8/int4 blocks decoded into ``out``, a float32 tensor as
    a view of it (``out`` unused)."""
    if isinstance(payload, QuantizedBlocks):
        return decode_range_into(payload, start, stop, out)
    return payload.view(-1)[start:stop]



def _update_compiled(phi, theta, delta, partner_phi, partner_progress, beta, gamma, mu) -> int:
    """The update through torch.compile: all of a solo step, or the longest prefix of whole blocks of both int8
    payloads. Returns how many elements it updated (0 if compile is unavailable or the payloads are not int8
    blocks)."""
    n = phi.numel()
    p, t, d = phi.view(-1), theta.view(-1), delta.view(-1)
    if partner_phi is None:
        return n if compiled.call(noloco_blocks_, p, t, d, None, None, None, None, beta, gamma, mu) else 0
    q1, q2 = partner_phi, partner_progress
    if not all(isinstance(q, QuantizedBlocks) and q.bits == 8 for q in (q1, q2)):
        return 0
    full = n // math.lcm(q1.block_size, q2.block_size) * math.lcm(q1.block_size, q2.block_size)
    if full == 0:
        return 0
    def head(x: torch.Tensor, count: int) -> torch.Tensor:
        # whole tensors go unsliced: in-place writes to views of slices cost the compiled call more
        return x if count == x.numel() else x[:count]

    c1, c2 = head(q1.codes, full).view(-1, q1.block_size), head(q2.codes, full).view(-1, q2.block_size)
    s1, s2 = head(q1.scales, c1.shape[0]), head(q2.scales, c2.shape[0])
    ok = compiled.call(noloco_blocks_, head(p, full), head(t, full), head(d, full), c1, s1, c2, s2, beta, gamma, mu)
    return full if ok else 0
