"""Public entry points: validate arguments, then run the Triton kernel (CUDA) or the torch fallback (CPU).

``backend`` is "auto" (Triton for CUDA tensors when triton is installed, torch otherwise), "torch",
or "triton" (on CPU only under TRITON_INTERPRET=1, which is how the tests exercise the kernels).
"""

from __future__ import annotations

import torch
from swarmd.kernels import quant_torch
from swarmd.kernels.blocks import QuantizedBlocks, check_block_size, check_quantized
from swarmd.kernels.noloco_torch import noloco_outer_update_torch_
from swarmd.kernels.triton_support import resolve_backend

FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
MODE_WRITE, MODE_ACCUMULATE, MODE_PAIR_AVERAGE = 0, 1, 2  # same values as quant_triton


def _check_input(x: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dtype not in FLOAT_INPUTS:
        raise ValueError(f"can only quantize float32/bfloat16/float16, got {x.dtype}")
    if residual is not None and (
        residual.dtype != torch.float32 or residual.numel() != x.numel() or residual.device != x.device
    ):
        raise ValueError("residual must be float32 with the input's numel, on the input's device")


def _quantize(
    x: torch.Tensor, residual: torch.Tensor | None, block_size: int, bits: int, seed: int | None, backend: str
) -> tuple[QuantizedBlocks, torch.Tensor]:
    check_block_size(block_size, bits)
    _check_input(x, residual)
    if resolve_backend(backend, x) == "triton":
        from swarmd.kernels.quant_triton import quantize_triton  # lazy: triton is optional

        q, res = quantize_triton(x, residual, block_size, bits, seed)
    else:
        q, res = quant_torch.quantize_torch(x, residual, block_size, bits, seed)
    return q, res.view(x.shape)


def quantize_int8_ef(
    x: torch.Tensor, residual: torch.Tensor | None = None, *, block_size: int = 256, backend: str = "auto"
) -> tuple[QuantizedBlocks, torch.Tensor]:
    """Quantize x + residual to int8 blocks (scale = absmax / 127, round half to even).

    Returns the blocks and the new fp32 residual ``x + residual - decode(blocks)``, shaped like x.
    Raises ValueError on NaN/Inf in x + residual, a bad dtype, or block_size outside 64..4096.
    """
    return _quantize(x, residual, block_size, 8, None, backend)


def quantize_int4_ef(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    block_size: int = 256,
    stochastic: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> tuple[QuantizedBlocks, torch.Tensor]:
    """Quantize x + residual to 4-bit blocks (scale = absmax / 7, codes -7..7, two per byte).

    Nearest rounding is half to even; ``stochastic=True`` rounds up with probability equal to the
    fractional part, using noise that is a pure function of ``seed`` and the element index (if no
    seed is given, one is drawn from ``generator`` or torch's default generator). block_size must be even.
    """
    if stochastic and seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return _quantize(x, residual, block_size, 4, seed if stochastic else None, backend)


def _decode(
    q: QuantizedBlocks, bits: int, out: torch.Tensor, own: torch.Tensor | None, mode: int, backend: str
) -> torch.Tensor:
    check_quantized(q)
    if q.bits != bits:
        raise ValueError(f"expected {bits}-bit blocks, got {q.bits}-bit")
    if out.numel() != q.numel or not out.is_contiguous() or out.device != q.codes.device:
        raise ValueError("output must be contiguous, on the codes' device, with numel entries")
    if mode == MODE_ACCUMULATE and out.dtype != torch.float32:
        raise ValueError("the accumulation buffer must be float32")
    if own is not None and own.numel() != q.numel:
        raise ValueError("own tensor must have numel entries")
    if resolve_backend(backend, out) == "triton":
        from swarmd.kernels.quant_triton import decode_triton

        return decode_triton(q, out, own, mode)
    if mode == MODE_ACCUMULATE:
        return quant_torch.dequantize_accumulate_torch(q, out)
    if mode == MODE_PAIR_AVERAGE:
        return quant_torch.dequantize_pair_average_torch(q, own, out)
    return quant_torch.dequantize_torch(q, out)


def _new_out(q: QuantizedBlocks, out: torch.Tensor | None) -> torch.Tensor:
    return out if out is not None else torch.empty(q.numel, dtype=torch.float32, device=q.codes.device)


def dequantize_int8(q: QuantizedBlocks, out: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Decode int8 blocks into ``out`` (any float dtype) or a new flat fp32 tensor."""
    return _decode(q, 8, _new_out(q, out), None, MODE_WRITE, backend)


def dequantize_int4(q: QuantizedBlocks, out: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Decode 4-bit blocks into ``out`` (any float dtype) or a new flat fp32 tensor."""
    return _decode(q, 4, _new_out(q, out), None, MODE_WRITE, backend)


def dequantize_int8_accumulate(q: QuantizedBlocks, acc: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """acc += decode(q) in one pass, in place on the contiguous fp32 buffer ``acc``; returns ``acc``."""
    return _decode(q, 8, acc, None, MODE_ACCUMULATE, backend)


def dequantize_int8_pair_average(
    q: QuantizedBlocks, own: torch.Tensor, out: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """(own + decode(q)) / 2 in one pass, into ``out`` (may be ``own`` itself) or a new fp32 tensor."""
    if out is None:
        out = torch.empty(own.shape, dtype=torch.float32, device=own.device)
    return _decode(q, 8, out, own, MODE_PAIR_AVERAGE, backend)


Payload = QuantizedBlocks | torch.Tensor  # a partner's payload as received: int8/int4 blocks, or float32 values


def noloco_outer_update_(
    phi: torch.Tensor,
    theta: torch.Tensor,
    delta: torch.Tensor,
    partner_phi: Payload | None = None,
    partner_progress: Payload | None = None,
    *,
    beta: float = 0.7,
    gamma: float = 0.7,
    mu: float = 0.5,
    backend: str = "auto",
) -> None:
    """The NoLoCo outer step (the one implementation of the rule), in place on contiguous fp32 ``phi``,
    ``theta``, ``delta`` (a whole replica, or one chunk of it: the rule is elementwise)::

        delta <- mu * delta + beta * mean_pair(theta - phi) + gamma * (mean_pair(phi) - phi)
        phi   <- phi + delta
        theta <- phi

    The partner's phi and progress (theta - phi) come as received: int8 blocks (one fused pass, Triton on
    CUDA), or 4-bit blocks or float32 tensors (the torch path, on any device). Both None: a solo step (the
    pair is the replica alone: no consensus term).
    """
    for name, t in (("theta", theta), ("delta", delta)):
        if t.shape != phi.shape or t.device != phi.device:
            raise ValueError(f"{name} must match phi's shape and device")
    for name, t in (("phi", phi), ("theta", theta), ("delta", delta)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor")
    if (partner_phi is None) != (partner_progress is None):
        raise ValueError("give both partner payloads, or neither")
    for q in (partner_phi, partner_progress):
        if isinstance(q, QuantizedBlocks):
            check_quantized(q)
            if q.numel != phi.numel() or q.codes.device != phi.device:
                raise ValueError("partner payloads must have phi's numel, on phi's device")
        elif q is not None and (q.dtype != torch.float32 or q.numel() != phi.numel() or q.device != phi.device):
            raise ValueError("partner tensors must be float32 with phi's numel, on phi's device")
    int8_blocks = all(isinstance(q, QuantizedBlocks) and q.bits == 8 for q in (partner_phi, partner_progress))
    if (partner_phi is None or int8_blocks) and resolve_backend(backend, phi) == "triton":
        from swarmd.kernels.noloco_triton import noloco_outer_update_triton_

        noloco_outer_update_triton_(phi, theta, delta, partner_phi, partner_progress, beta, gamma, mu)
    else:
        noloco_outer_update_torch_(phi, theta, delta, partner_phi, partner_progress, beta, gamma, mu)
