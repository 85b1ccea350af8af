"""torch.compile of the CPU fallbacks' hot expressions (the int8/int4 quantizers here, and the fused NoLoCo
update's rule from ``noloco_torch``).

Inductor turns each expression into one C++ loop over the data, where eager torch runs a pass per operation.
The expressions are the fallbacks' own arithmetic, operation for operation (IEEE division, round half to
even, no fused multiply-add), so the results are bit-identical to the eager fallbacks and hence to the
Triton kernels; tests/test_kernels_quant.py checks it.

Compiled once per process, expression and size, on the first call of at least ``COMPILE_MIN_ELEMS`` elements: below that, eager torch is as fast
and a compile (a few CPU seconds) would not pay. ``SWARMD_COMPILE_KERNELS=0`` turns it off; if compiling
or running fails (no C++ compiler, an old torch), a warning is logged once and the eager path serves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

COMPILE_MIN_ELEMS = 1 << 20
ENV_SWITCH = "SWARMD_COMPILE_KERNELS"
RECOMPILE_LIMIT = 32

_compiled: dict[Callable, Callable | None] = {}


def wanted(t: torch.Tensor, numel: int) -> bool:
    """Whether a call on ``numel`` elements of ``t`` should take the compiled path."""
    return t.device.type == "cpu" and numel >= COMPILE_MIN_ELEMS and os.environ.get(ENV_SWITCH, "1") != "0"


def call(fn: Callable, *args: object) -> object | None:
    """``fn(*args)`` through torch.compile, or None where that is unavailable (the caller then runs eager).

    Shapes are static: each new size compiles once (a few seconds; the static loops run about 15% faster
    than dynamic-shape ones here). The daemon's payloads come in few sizes: its chunks and the last one.
    """
    if fn not in _compiled:
        try:
            # one compiled variant per size, input dtype, bit width and residual or not, counted per function
            # by dynamo against a process-wide limit of 8: raise it so that a few sizes of each fit
            limit = getattr(torch._dynamo.config, "recompile_limit", None)
            if limit is not None and limit < RECOMPILE_LIMIT:
                torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
            _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
        except Exception as e:  # noqa: BLE001 - any failure means: run eager
            logger.warning("torch.compile unavailable for %s, running eager: %s", fn.__name__, e)
            _compiled[fn] = None
    compiled = _compiled[fn]
    if compiled is None:
        return None
    try:
        return compiled(*args)
    except Exception as e:  # noqa: BLE001
        logger.warning("compiled %s failed, running eager from now on: %s: %s", fn.__name__, type(e).__name__, e)
        _compiled[fn] = None
        return None


def quantize_blocks(x: torch.Tensor, residual: torch.Tensor | None, qmax: int, bits: int):
    """Codes, per-block absmax and new residual of (x + residual) in whole blocks, x and residual as
    (blocks, block_size) views: quant_torch.quantize_torch's arithmetic (where its clamp is skipped, the clamp
    here changes nothing). The caller divides the absmax by ``qmax`` for the scales (the same IEEE division as
    here): with the scales as a separate output, inductor computes them in a loop of their own between the
    block reduction and the quantization, and then reads x and residual twice; returning the absmax lets it
    fuse everything into one pass over each block while it is in cache."""
    y = x.float() if residual is None else x.float() + residual
    absmax = y.abs().amax(dim=1, keepdim=True)  # NaN propagates: the caller's finiteness check sees it
    scales = absmax / qmax
    nonzero = scales > 0
    safe = torch.where(nonzero, scales, 1.0)
    v = torch.div(y, safe).clamp(-qmax, qmax).round()
    v = torch.where(nonzero, v, 0.0)
    if bits == 8:
        codes = v.to(torch.int8).reshape(-1)
    else:
        nib = (v.to(torch.int16) + 8).to(torch.uint8).reshape(-1, 2)
        codes = nib[:, 0] | (nib[:, 1] << 4)
    return codes, absmax.reshape(-1), (y - v * scales).reshape(-1)
