"""Triton kernels for blockwise int8/int4 quantization with error feedback, and the fused decoders.

Imported lazily (only when the Triton backend is chosen). The arithmetic mirrors ``quant_torch``
operation for operation so codes and scales are bit-identical: IEEE division (``div_rn``, not
Triton's default approximate divide) and round-half-even through the 1.5 * 2**23 trick, which is
exact for |v| <= 2**22 and needs no libdevice call, so it also runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from swarmd.kernels.blocks import INT4_OFFSET, INT4_QMAX, INT8_QMAX, QuantizedBlocks, codes_nbytes, num_blocks
from swarmd.kernels.hashrng import HASH_MUL1, HASH_MUL2, UNIFORM_SCALE, UNIFORM_SHIFT, seed_keys

# triton.jit only reads module globals wrapped as constexpr.
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: add then subtract rounds an fp32 half to even
_MUL1 = tl.constexpr(HASH_MUL1)
_MUL2 = tl.constexpr(HASH_MUL2)
_USHIFT = tl.constexpr(UNIFORM_SHIFT)
_USCALE = tl.constexpr(UNIFORM_SCALE)
_Q8 = tl.constexpr(float(INT8_QMAX))
_Q4 = tl.constexpr(float(INT4_QMAX))
_OFF4 = tl.constexpr(INT4_OFFSET)
TILE_ELEMS = 4096  # elements per program for the quantizers (rows of blocks x padded block)
DECODE_BLOCK = 2048  # elements (int8) or bytes (int4) per program for the decoders


@triton.jit
def _lowbias32(x):
    x = x ^ (x >> 16)
    x = x * _MUL1
    x = x ^ (x >> 15)
    x = x * _MUL2
    return x ^ (x >> 16)


@triton.jit
def _uniform(idx, k1, k2):
    x = idx.to(tl.uint32) ^ k1.to(tl.uint32)
    x = _lowbias32(_lowbias32(x) ^ k2.to(tl.uint32))
    return (x >> _USHIFT).to(tl.float32) * _USCALE


@triton.jit
def _round_codes(y, safe, nonzero, idx, k1, k2, QMAX: tl.constexpr, STOCH: tl.constexpr):
    """Integer-valued fp32 codes of y / safe, as in quant_torch._block_codes."""
    v = tl.math.div_rn(y, safe)
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    if STOCH:
        v = tl.floor(v + _uniform(idx, k1, k2))
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    else:
        v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    return tl.where(nonzero, v, 0.0)


@triton.jit
def _block_scale(y, QMAX: tl.constexpr):
    # NaN -> +inf so a non-finite input always shows up as a non-finite scale (tl.max may skip NaN).
    a = tl.where(y == y, tl.abs(y), float("inf"))  # noqa: PLR0124 - y != y only for NaN
    absmax = tl.max(a, axis=1)
    return tl.math.div_rn(absmax, tl.full(absmax.shape, QMAX, tl.float32))


@triton.jit
def _quant8_kernel(
    x_ptr,
    r_ptr,
    codes_ptr,
    scales_ptr,
    res_ptr,
    n,
    block_size,
    nblocks,
    k1,
    k2,
    HAS_RES: tl.constexpr,
    STOCH: tl.constexpr,
    ROWS: tl.constexpr,
    BP2: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BP2)
    offs = rows.to(tl.int64)[:, None] * block_size + cols[None, :]
    mask = (cols[None, :] < block_size) & (offs < n) & (rows[:, None] < nblocks)
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        y = y + tl.load(r_ptr + offs, mask=mask, other=0.0)
    scale = _block_scale(y, _Q8)
    nonzero = tl.broadcast_to((scale > 0)[:, None], (ROWS, BP2))
    safe = tl.broadcast_to(tl.where(scale > 0, scale, 1.0)[:, None], (ROWS, BP2))
    v = _round_codes(y, safe, nonzero, offs, k1, k2, _Q8, STOCH)
    tl.store(codes_ptr + offs, v.to(tl.int8), mask=mask)
    tl.store(res_ptr + offs, y - v * safe, mask=mask)
    tl.store(scales_ptr + rows, scale, mask=rows < nblocks)


@triton.jit
def _quant4_kernel(
    x_ptr,
    r_ptr,
    codes_ptr,
    scales_ptr,
    res_ptr,
    n,
    block_size,
    nblocks,
    k1,
    k2,
    HAS_RES: tl.constexpr,
    STOCH: tl.constexpr,
    ROWS: tl.constexpr,
    HP2: tl.constexpr,
):
    # Each row is one block seen as pairs: even elements go to the low nibble, odd to the high one.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    pairs = tl.arange(0, HP2)
    half = block_size // 2
    base = rows.to(tl.int64)[:, None] * block_size
    e = base + 2 * pairs[None, :]
    o = e + 1
    inside = (pairs[None, :] < half) & (rows[:, None] < nblocks)
    me = inside & (e < n)
    mo = inside & (o < n)
    ye = tl.load(x_ptr + e, mask=me, other=0.0).to(tl.float32)
    yo = tl.load(x_ptr + o, mask=mo, other=0.0).to(tl.float32)
    if HAS_RES:
        ye = ye + tl.load(r_ptr + e, mask=me, other=0.0)
        yo = yo + tl.load(r_ptr + o, mask=mo, other=0.0)
    se = _block_scale(ye, _Q4)
    so = _block_scale(yo, _Q4)
    scale = tl.maximum(se, so)  # same as absmax / 7 over the whole block: division is monotone
    nonzero = tl.broadcast_to((scale > 0)[:, None], (ROWS, HP2))
    safe = tl.broadcast_to(tl.where(scale > 0, scale, 1.0)[:, None], (ROWS, HP2))
    ve = _round_codes(ye, safe, nonzero, e, k1, k2, _Q4, STOCH)
    vo = _round_codes(yo, safe, nonzero, o, k1, k2, _Q4, STOCH)
    byte = (ve.to(tl.int32) + _OFF4) | ((vo.to(tl.int32) + _OFF4) << 4)
    tl.store(codes_ptr + rows.to(tl.int64)[:, None] * half + pairs[None, :], byte.to(tl.uint8), mask=me)
    tl.store(res_ptr + e, ye - ve * safe, mask=me)
    tl.store(res_ptr + o, yo - vo * safe, mask=mo)
    tl.store(scales_ptr + rows, scale, mask=rows < nblocks)


@triton.jit
def _emit(out_ptr, own_ptr, offs, val, mask, MODE: tl.constexpr):
    if MODE == 1:
        val = tl.load(out_ptr + offs, mask=mask, other=0.0) + val
    if MODE == 2:
        val = (tl.load(own_ptr + offs, mask=mask, other=0.0).to(tl.float32) + val) * 0.5
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode8_kernel(codes_ptr, scales_ptr, out_ptr, own_ptr, n, block_size, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
    s = tl.load(scales_ptr + offs // block_size, mask=mask, other=0.0)
    _emit(out_ptr, own_ptr, offs, c * s, mask, MODE)


@triton.jit
def _decode4_kernel(codes_ptr, scales_ptr, out_ptr, own_ptr, n, block_size, MODE: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    e = 2 * k
    o = e + 1
    me = e < n
    mo = o < n
    b = tl.load(codes_ptr + k, mask=me, other=0).to(tl.int32)
    ce = ((b & 15) - _OFF4).to(tl.float32)
    co = ((b >> 4) - _OFF4).to(tl.float32)
    se = tl.load(scales_ptr + e // block_size, mask=me, other=0.0)
    so = tl.load(scales_ptr + o // block_size, mask=mo, other=0.0)
    _emit(out_ptr, own_ptr, e, ce * se, me, MODE)
    _emit(out_ptr, own_ptr, o, co * so, mo, MODE)


def quantize_triton(
    x: torch.Tensor, residual: torch.Tensor | None, block_size: int, bits: int, seed: int | None = None
) -> tuple[QuantizedBlocks, torch.Tensor]:
    """Triton twin of ``quant_torch.quantize_torch`` (same arguments, same results)."""
    xf = x.reshape(-1).contiguous()
    n = xf.numel()
    rf = residual.reshape(-1).to(torch.float32).contiguous() if residual is not None else xf
    nb = num_blocks(n, block_size)
    codes = torch.empty(codes_nbytes(n, bits), dtype=torch.int8 if bits == 8 else torch.uint8, device=x.device)
    scales = torch.empty(nb, dtype=torch.float32, device=x.device)
    new_res = torch.empty(n, dtype=torch.float32, device=x.device)
    k1, k2 = seed_keys(seed) if seed is not None else (0, 0)
    if nb:
        width = triton.next_power_of_2(block_size if bits == 8 else block_size // 2)
        rows = max(1, TILE_ELEMS // width)
        grid = (triton.cdiv(nb, rows),)
        kernel = _quant8_kernel if bits == 8 else _quant4_kernel
        kernel[grid](
            xf,
            rf,
            codes,
            scales,
            new_res,
            n,
            block_size,
            nb,
            k1,
            k2,
            residual is not None,
            seed is not None,
            rows,
            width,
        )
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("cannot quantize a tensor holding NaN or Inf (input plus residual)")
    return QuantizedBlocks(codes, scales, n, block_size, bits), new_res


def decode_triton(q: QuantizedBlocks, out: torch.Tensor, own: torch.Tensor | None, mode: int) -> torch.Tensor:
    """Decode ``q`` into ``out``; ``mode`` 0 writes, 1 accumulates, 2 pair-averages with ``own``. Returns ``out``."""
    if q.numel == 0:
        return out
    flat_out = out.view(-1)
    flat_own = own.reshape(-1).contiguous() if own is not None else flat_out
    if q.bits == 8:
        grid = (triton.cdiv(q.numel, DECODE_BLOCK),)
        _decode8_kernel[grid](q.codes, q.scales, flat_out, flat_own, q.numel, q.block_size, mode, DECODE_BLOCK)
    else:
        grid = (triton.cdiv(q.codes.numel(), DECODE_BLOCK),)
        _decode4_kernel[grid](q.codes, q.scales, flat_out, flat_own, q.numel, q.block_size, mode, DECODE_BLOCK)
    return out
