"""Torch fallbacks of the blockwise quantization kernels (the CPU path and the reference for Triton).

Every function here uses exactly the arithmetic of the Triton kernels in ``quant_triton``:
scale = absmax / qmax, v = y / scale (IEEE division), codes = round-half-even(clamp(v)), and
decode = code * scale in fp32, so both backends produce identical codes and scales.
"""

from __future__ import annotations

import torch
from swarmd.kernels import compiled
from swarmd.kernels.blocks import (
    INT4_OFFSET,
    INT4_QMAX,
    INT8_QMAX,
    QuantizedBlocks,
    num_blocks,
)
from swarmd.kernels.finite import all_finite
from swarmd.kernels.hashrng import uniform_from_index

# Elements per pass of the chunked loops below. The ops of one chunk (sum, block max, divide, round,
# codes, residual) each re-read the chunk, so it must stay in cache between them: 2**18 fp32 elements
# are 1 MiB a buffer, half of that per thread with torch's 2-way split; larger chunks spill to memory,
# smaller ones pay torch's per-op overhead (a few microseconds) too often. Figures: bench/RESULTS.md.
CHUNK_ELEMS = 1 << 18
# Smallest normal fp32. Above it a block's scale absmax / qmax is correctly rounded to 24 bits, so
# |y / scale| <= qmax (1 + 2**-23) and rounding to nearest already lands in -qmax..qmax: the clamp
# changes nothing and is skipped. A subnormal scale can be far off (y / scale up to ~2 qmax), so then
# the clamp runs.
_FLT_MIN_NORMAL = 2.0**-126


def _chunk_rows(block_size: int) -> int:
    """Whole blocks per chunk of the chunked loops (at least one)."""
    return max(1, CHUNK_ELEMS // block_size)


def _block_codes_into(
    y: torch.Tensor, v: torch.Tensor, scales: torch.Tensor, qmax: int, seed: int | None, first: int
) -> None:
    """Codes (as fp32 integers, into ``v``) and scales (into ``scales``) of the blocked view ``y``.

    ``first`` is the flat index of y's first element (the stochastic noise is a function of it).
    A non-finite input gives a non-finite scale; the caller checks the scales once at the end.
    """
    # max |y| per block as max(max y, -min y): the same value as abs().amax() without a full-size temporary;
    # NaN propagates through both. abs_: +0.0, never -0.0.
    # (two reductions: torch.aminmax is several times slower than amax plus amin on CPU)
    torch.div(torch.maximum(y.amax(dim=1), y.amin(dim=1).neg_()).abs_(), qmax, out=scales)
    nonzero = scales > 0
    all_nonzero = bool(nonzero.all())
    # A zero scale only comes with an all-zero block (or one so tiny the scale underflows): codes 0.
    safe = scales if all_nonzero else torch.where(nonzero, scales, torch.ones_like(scales))
    torch.div(y, safe[:, None], out=v)
    if seed is None:
        if not all_nonzero or float(scales.amin()) < _FLT_MIN_NORMAL:  # see _FLT_MIN_NORMAL
            v.clamp_(-qmax, qmax)
        v.round_()  # round half to even
    else:
        v.clamp_(-qmax, qmax)
        idx = torch.arange(first, first + y.numel(), dtype=torch.int64, device=y.device).view_as(y)
        v.add_(uniform_from_index(idx, seed)).floor_().clamp_(-qmax, qmax)
    if not all_nonzero:
        v.masked_fill_(~nonzero[:, None], 0.0)


def _pack_int4(flat: torch.Tensor, out: torch.Tensor) -> None:
    """Pack fp32 integer codes -7..7 (even count) as nibbles c + 8, element 2k low, 2k+1 high, into uint8 ``out``."""
    nib = (flat.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    torch.bitwise_or(nib[0::2], nib[1::2] << 4, out=out)


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

    Large CPU tensors (nearest rounding) go through torch.compile (``swarmd.kernels.compiled``), the rest
    through eager torch one chunk of whole blocks at a time (``CHUNK_ELEMS``), so each element's sum, codes
    and residual are computed while it is in cache; the sum y = x + residual is formed in the new residual's
    own buffer and turned into the residual there. Raises ValueError on NaN/Inf in x + residual.
    """
    n = x.numel()
    qmax = INT8_QMAX if bits == 8 else INT4_QMAX
    xf = x.reshape(-1)
    rf = residual.reshape(-1) if residual is not None else None
    if seed is None and n >= block_size and compiled.wanted(x, n):
        got = _quantize_compiled(xf, rf, block_size, bits, qmax)
        if got is not None:
            return got
    return _quantize_eager(xf, rf, block_size, bits, seed)


def _quantize_eager(
    xf: torch.Tensor, rf: torch.Tensor | None, block_size: int, bits: int, seed: int | None
) -> tuple[QuantizedBlocks, torch.Tensor]:
    """quantize_torch in eager torch, on flat x and residual."""
    n = xf.numel()
    dev = xf.device
    qmax = INT8_QMAX if bits == 8 else INT4_QMAX
    nb = num_blocks(n, block_size)
    scales = torch.empty(nb, dtype=torch.float32, device=dev)
    if bits == 8:
        codes = torch.empty(n, dtype=torch.int8, device=dev)
    else:
        codes = torch.empty((n + 1) // 2, dtype=torch.uint8, device=dev)
    new_residual = torch.empty(n, dtype=torch.float32, device=dev)
    rows = _chunk_rows(block_size)
    step = rows * block_size
    v_buf = torch.empty(min(step, nb * block_size), dtype=torch.float32, device=dev)
    for start in range(0, n, step):
        stop = min(n, start + step)
        m = stop - start
        y = new_residual[start:stop]
        if rf is not None:
            torch.add(xf[start:stop], rf[start:stop], out=y)
        else:
            y.copy_(xf[start:stop])  # upcasts bf16/fp16 exactly
        b0 = start // block_size
        mb = num_blocks(m, block_size)
        padded = mb * block_size
        # the last chunk may end in a partial block: zero-pad it in a scratch copy (zeros change no absmax)
        yb = y if padded == m else torch.cat([y, y.new_zeros(padded - m)])
        v = v_buf[:padded]
        sc = scales[b0 : b0 + mb]
        _block_codes_into(yb.view(mb, block_size), v.view(mb, block_size), sc, qmax, seed, start)
        vm = v[:m]
        if bits == 8:
            codes[start:stop].copy_(vm)
        else:
            # chunks start on whole blocks, and 4-bit blocks are even: byte start // 2 holds element start
            # an odd last chunk takes one padding element along, whose code is 0 (its y is the zero pad)
            vp = v[: m + m % 2]
            _pack_int4(vp, codes[start // 2 : start // 2 + vp.numel() // 2])
        v.view(mb, block_size).mul_(sc[:, None])
        y.sub_(vm)  # y - code * scale, in place: the new residual
    if not all_finite(scales):
        raise ValueError("cannot quantize a tensor holding NaN or Inf (input plus residual)")
    return QuantizedBlocks(codes, scales, n, block_size, bits), new_residual


def _quantize_compiled(
    xf: torch.Tensor, rf: torch.Tensor | None, block_size: int, bits: int, qmax: int
) -> tuple[QuantizedBlocks, torch.Tensor] | None:
    """quantize_torch through torch.compile (whole blocks; a partial last block eager). None if unavailable."""
    n = xf.numel()
    full = n // block_size * block_size
    whole = full == n  # then no slices: a view of a slice costs the compiled call a little more
    head = compiled.call(compiled.quantize_blocks, (xf if whole else xf[:full]).view(-1, block_size),
                         None if rf is None else (rf if whole else rf[:full]).view(-1, block_size), qmax, bits)
    if head is None:
        return None
    codes, absmax, residual = head
    scales = absmax.div_(qmax)  # what the compiled loop divided by (see compiled.quantize_blocks)
    if full < n:
        tail, tail_res = _quantize_eager(xf[full:], None if rf is None else rf[full:], block_size, bits, None)
        codes, scales = torch.cat([codes, tail.codes]), torch.cat([scales, tail.scales])
        residual = torch.cat([residual, tail_res])
    if not all_finite(scales):
        raise ValueError("cannot quantize a tensor holding NaN or Inf (input plus residual)")
    return QuantizedBlocks(codes, scales, n, block_size, bits), residual


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


def decode_range_into(q: QuantizedBlocks, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """Decode elements start..stop of ``q`` into the flat fp32 ``out`` (stop - start entries); returns ``out``.

    ``start`` must be a multiple of the block size (a whole block, and for 4 bits a whole byte).
    """
    bs = q.block_size
    if q.bits == 8:
        out.copy_(q.codes[start:stop])  # exact int8 -> fp32, then the multiply (see _decode_into)
    else:
        out.copy_(_codes_f32(QuantizedBlocks(q.codes[start // 2 : (stop + 1) // 2], q.scales, stop - start, bs, 4)))
    m = stop - start
    b0, full = start // bs, (stop - start) // bs * bs
    out[:full].view(-1, bs).mul_(q.scales[b0 : b0 + full // bs, None])
    if full < m:
        out[full:].mul_(q.scales[b0 + full // bs])
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
