"""The quantized-tensor container and the block-layout arithmetic shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 4096
INT8_QMAX = 127  # symmetric range: -128 is never produced, so negation is exact
INT4_QMAX = 7
INT4_OFFSET = 8  # a 4-bit code c is stored as the nibble c + 8 (1..15)


@dataclass
class QuantizedBlocks:
    """A flat tensor quantized in blocks of ``block_size`` elements, one fp32 scale per block.

    ``codes`` is int8 with ``numel`` entries for 8 bits, or uint8 with ``ceil(numel / 2)`` entries
    for 4 bits (element 2k in the low nibble of byte k, element 2k+1 in the high nibble).
    Element i decodes to ``code_i * scales[i // block_size]``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    numel: int
    block_size: int
    bits: int


def check_block_size(block_size: int, bits: int = 8) -> None:
    """Raise ValueError unless ``block_size`` is an integer in 64..4096 (and even for 4 bits)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ValueError(f"block_size must be an int, got {block_size!r}")  # noqa: TRY004 - one error type for callers
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size {block_size} outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")
    # 4-bit blocks must start on a byte boundary so that each block packs independently.
    if bits == 4 and block_size % 2:
        raise ValueError(f"4-bit block_size must be even, got {block_size}")


def num_blocks(numel: int, block_size: int) -> int:
    """Number of blocks covering ``numel`` elements (the last one may be partial)."""
    return -(-numel // block_size)


def codes_nbytes(numel: int, bits: int) -> int:
    """Bytes of packed codes for ``numel`` elements at ``bits`` per code."""
    if bits == 8:
        return numel
    if bits == 4:
        return (numel + 1) // 2
    raise ValueError(f"unsupported bit width {bits}")


def check_quantized(q: QuantizedBlocks) -> None:
    """Raise ValueError if the codes and scales of ``q`` do not match its numel, block size and bits."""
    check_block_size(q.block_size, q.bits)
    want_dtype = torch.int8 if q.bits == 8 else torch.uint8
    if q.codes.dtype != want_dtype or q.codes.numel() != codes_nbytes(q.numel, q.bits):
        raise ValueError(
            f"{q.bits}-bit codes must be {want_dtype} with {codes_nbytes(q.numel, q.bits)} entries, "
            f"got {q.codes.dtype} with {q.codes.numel()}"
        )
    nb = num_blocks(q.numel, q.block_size)
    if q.scales.dtype != torch.float32 or q.scales.numel() != nb:
        raise ValueError(f"scales must be float32 with {nb} entries, got {q.scales.dtype} with {q.scales.numel()}")
