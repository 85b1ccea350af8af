"""Counter-based uniform noise for stochastic rounding, bit-identical in torch and Triton.

The uniform for flat element ``i`` under ``seed`` is a pure function of (seed, i): two rounds of
the ``lowbias32`` integer hash. No generator state is kept, so a Triton kernel and the torch
fallback draw exactly the same numbers and a run is reproducible from its seed alone.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
HASH_MUL1 = 0x7FEB352D
HASH_MUL2 = 0x846CA68B
UNIFORM_SHIFT = 8  # keep the top 24 bits: exactly representable in fp32
UNIFORM_SCALE = 2.0**-24


def lowbias32(x: int) -> int:
    """The lowbias32 hash of one 32-bit Python int (host side, for deriving keys)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * HASH_MUL1) & MASK32
    x ^= x >> 15
    x = (x * HASH_MUL2) & MASK32
    x ^= x >> 16
    return x


def seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys derived from a (possibly 64-bit) seed; both backends take these."""
    k1 = lowbias32(seed & MASK32)
    k2 = lowbias32(k1 ^ ((seed >> 32) & MASK32) ^ 0x9E3779B9)
    return k1, k2


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 on int64 without overflow: split c into 16-bit halves (each product < 2**48).
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def _lowbias32_tensor(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mulmod32(x, HASH_MUL1)
    x = x ^ (x >> 15)
    x = _mulmod32(x, HASH_MUL2)
    return x ^ (x >> 16)


def uniform_from_index(index: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 uniforms in [0, 1) for the int64 flat indices ``index`` (a multiple of 2**-24 each)."""
    k1, k2 = seed_keys(seed)
    x = (index & MASK32) ^ k1
    x = _lowbias32_tensor(_lowbias32_tensor(x) ^ k2)
    return (x >> UNIFORM_SHIFT).to(torch.float32) * UNIFORM_SCALE
