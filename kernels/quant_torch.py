"""Torch fallbacks of the blockwise quantization kernels (the CPU path and the reference for Triton).

Every function here uses exactly the arithmetic of the Triton kernels in ``quant_triton``:
scale = absmax / qmax, v = y / scale (IEEE division), codes = round-half-even(clamp(v)), and
decode = code * scale in fp32, so both backends produce identical codes and scales.
"""

from __future__ import annotations

import torch
from swarmd.kernels.blocks import (
    INT4_OFFSET,
    INT4_QMAX,
    INT8_QMAX,
    QuantizedBlocks,
    num_blocks,
)
from swarmd.kernels.hashrng import uniform_from_index


def _padded_sum(x: torch.Tensor, residual: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """y = x + residual in a new fp32 buffer, zero-padded to whole blocks, as an (nblocks, block_size) view."""
    n = x.numel()
    flat = x.reshape(-1)
    padded = num_blocks(n, block_size) * block_size
    if padded == n:  # one pass: no zero fill, no separate copy
        if residual is not None:
            y = torch.add(flat, residual.reshape(-1), out=torch.empty(n, dtype=torch.float32, device=x.device))
        else:
            y = flat.to(torch.float32, copy=True)  # upcasts bf16/fp16 exactly
        return y.view(-1, block_size)
    y = torch.zeros(padded, dtype=torch.float32, device=x.device)
    y[:n] = flat
    if residual is not None:
        y[:n] += residual.reshape(-1)
    return y.view(-1, block_size)


def _block_codes(y: torch.Tensor, qmax: int, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (as fp32 integers) and scales of the blocked view ``y``. Raises ValueError on non-finite input."""
    # max |y| per block as max(max y, -min y): the same value as abs().amax() without a full-size temporary;
    # NaN propagates through both, so one check covers NaN and Inf.
    absmax = torch.maximum(y.amax(dim=1), y.amin(dim=1).neg_()).abs_()  # abs_: +0.0, never -0.0
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("cannot quantize a tensor holding NaN or Inf (input plus residual)")
    scales = absmax / qmax
    nonzero = scales > 0
    # A zero scale only comes with an all-zero block (or one so tiny the scale underflows): codes 0.
    safe = torch.where(nonzero, scales, torch.ones_like(scales))
    v = torch.div(y, safe[:, None]).clamp_(-qmax, qmax)
    if seed is None:
        v.round_()  # round half to even
    else:
        idx = torch.arange(y.numel(), dtype=torch.int64, device=y.device).view_as(y)
        v.add_(uniform_from_index(idx, seed)).floor_().clamp_(-qmax, qmax)
    if not bool(nonzero.all()):
        v.masked_fill_(~nonzero[:, None], 0.0)
    return v, scales


def quantize_torch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    block_size: int,
    bits: int,
    seed: int | None = None,
) -> tuple[QuantizedBlocks, torch.Tensor]:
    """Quantize x + residual blockwise at ``bits`` (8 or 4). Returns the blocks and the new fp32 residual.

    ``seed`` selects stochastic rounding (4 bits only at the public API); None rounds to nearest even.
    The residual comes back flat, ``y - decode(codes)`` for every element.
    """
    n = x.numel()
    y = _padded_sum(x, residual, block_size)  # our own buffer: it becomes the residual below
    v, scales = _block_codes(y, INT8_QMAX if bits == 8 else INT4_QMAX, seed)
    flat = v.reshape(-1)[:n]
    if bits == 8:
        codes = flat.to(torch.int8)
    else:
        nib = (flat.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
        if n % 2:  # the missing partner of the last element is code 0
            nib = torch.cat([nib, nib.new_full((1,), INT4_OFFSET)])
        codes = nib[0::2] | (nib[1::2] << 4)
    new_residual = y.sub_(v.mul_(scales[:, None])).reshape(-1)[:n]  # y - code * scale, in y's buffer
    if new_residual.numel() != y.numel():
        new_residual = new_residual.clone()  # do not keep the padding alive
    return QuantizedBlocks(codes, scales, n, block_size, bits), new_residual


def _codes_f32(q: QuantizedBlocks) -> torch.Tensor:
    """The integer codes of ``q`` as a flat fp32 tensor of ``q.numel`` entries."""
    if q.bits == 8:
        return q.codes.to(torch.float32)
    lo = (q.codes & 0xF).to(torch.float32) - INT4_OFFSET
    hi = (q.codes >> 4).to(torch.float32) - INT4_OFFSET
    return torch.stack([lo, hi], dim=1).reshape(-1)[: q.numel]


def _decode_into(q: QuantizedBlocks, out: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """out = code * scale (+ add_to), on flat fp32 tensors; whole blocks as a 2-D view, the tail apart."""
    # Codes are converted to fp32 first (exact for int8 and int4): multiplying int8 by fp32 directly gives
    # the same values, but CPU torch takes a mixed-dtype path about 15x slower than convert-then-multiply.
    c = _codes_f32(q)
    bs, n = q.block_size, q.numel
    nfull = n // bs
    full = nfull * bs
    head_codes, head_scales = c[:full].view(-1, bs), q.scales[:nfull, None]
    if add_to is None:
        torch.mul(head_codes, head_scales, out=out[:full].view(-1, bs))
        if full < n:
            torch.mul(c[full:], q.scales[-1], out=out[full:])
    else:
        torch.add(add_to[:full], (head_codes * head_scales).view(-1), out=out[:full])
        if full < n:
            torch.add(add_to[full:], c[full:] * q.scales[-1], out=out[full:])
    return out


def decode_torch(q: QuantizedBlocks) -> torch.Tensor:
    """Decode ``q`` to a flat fp32 tensor: code * scale of its block."""
    return _decode_into(q, torch.empty(q.numel, dtype=torch.float32, device=q.codes.device))


def dequantize_torch(q: QuantizedBlocks, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode into ``out`` (any float dtype, numel entries) or a new flat fp32 tensor."""
    if out is None:
        return decode_torch(q)
    if out.dtype == torch.float32:
        _decode_into(q, out.view(-1))
    else:
        out.view(-1).copy_(decode_torch(q))
    return out


def dequantize_accumulate_torch(q: QuantizedBlocks, acc: torch.Tensor) -> torch.Tensor:
    """acc += decode(q), in place on the fp32 buffer ``acc``; returns ``acc``."""
    flat = acc.view(-1)
    _decode_into(q, flat, add_to=flat)
    return acc


def dequantize_pair_average_torch(
    q: QuantizedBlocks, own: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(own + decode(q)) * 0.5 into ``out`` (may be ``own``) or a new fp32 tensor shaped like ``own``."""
    flat_own = own.reshape(-1).to(torch.float32)
    if out is None or out.dtype != torch.float32:
        avg = _decode_into(q, torch.empty_like(flat_own), add_to=flat_own).mul_(0.5)
        if out is None:
            return avg.view(own.shape)
        out.view(-1).copy_(avg)
        return out
    _decode_into(q, out.view(-1), add_to=flat_own).mul_(0.5)  # safe when out is own: elementwise
    return out
