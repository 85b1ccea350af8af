"""Triton kernels under TRITON_INTERPRET=1 equal the torch fallbacks.

triton.jit reads TRITON_INTERPRET when a kernel is defined, so the checks run in a subprocess
with the variable set: nothing leaks into other test modules. Run this file directly
(``TRITON_INTERPRET=1 python tests/test_kernels_triton.py``) to see the checks one by one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

SIZES = [1, 63, 1000, 4097]


def _equal_blocks(a, b) -> None:
    assert torch.equal(a.codes, b.codes), "codes differ"
    assert torch.equal(a.scales, b.scales), "scales differ"
    assert (a.numel, a.block_size, a.bits) == (b.numel, b.block_size, b.bits)


def check_quantizers() -> None:
    """Codes and scales identical, residuals equal to fp32 rounding, for int8 and int4 (both roundings)."""
    from swarmd.kernels import quantize_int4_ef, quantize_int8_ef

    g = torch.Generator().manual_seed(0)
    for n in SIZES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = (torch.randn(n, generator=g) * 4).to(dtype)
            residual = torch.randn(n, generator=g) * 0.05
            for block_size in (64, 100, 256, 4096):
                for r in (None, residual):
                    a, ra = quantize_int8_ef(x, r, block_size=block_size, backend="torch")
                    b, rb = quantize_int8_ef(x, r, block_size=block_size, backend="triton")
                    _equal_blocks(a, b)
                    torch.testing.assert_close(ra, rb, rtol=1e-6, atol=1e-7)
                    if block_size % 2:
                        continue
                    for stochastic in (False, True):
                        kw = {"block_size": block_size, "stochastic": stochastic, "seed": 1234 + n}
                        a, ra = quantize_int4_ef(x, r, backend="torch", **kw)
                        b, rb = quantize_int4_ef(x, r, backend="triton", **kw)
                        _equal_blocks(a, b)
                        torch.testing.assert_close(ra, rb, rtol=1e-6, atol=1e-7)


def check_ties_zeros_and_nonfinite() -> None:
    """Exact .5 ties round half to even, zero blocks give zeros, NaN/Inf raise, on the Triton path."""
    from swarmd.kernels import quantize_int4_ef, quantize_int8_ef

    x = torch.zeros(256)
    x[:10] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5])
    q, _ = quantize_int8_ef(x, block_size=128, backend="triton")
    assert q.scales.tolist() == [1.0, 0.0]
    assert q.codes[:10].tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -126, 4]
    assert not q.codes[128:].any()
    for bad in (float("nan"), float("inf")):
        y = torch.randn(300)
        y[299] = bad
        for quantize in (quantize_int8_ef, quantize_int4_ef):
            try:
                quantize(y, block_size=64, backend="triton")
            except ValueError:
                pass
            else:
                raise AssertionError(f"{quantize.__name__} accepted {bad}")


def check_decoders() -> None:
    """Decode, accumulate and pair-average equal the fallbacks."""
    from swarmd.kernels import (
        dequantize_int4,
        dequantize_int8,
        dequantize_int8_accumulate,
        dequantize_int8_pair_average,
        quantize_int4_ef,
        quantize_int8_ef,
    )

    g = torch.Generator().manual_seed(1)
    for n in SIZES:
        x = torch.randn(n, generator=g)
        q8, _ = quantize_int8_ef(x, block_size=100)
        q4, _ = quantize_int4_ef(x, block_size=64)
        assert torch.equal(dequantize_int8(q8, backend="torch"), dequantize_int8(q8, backend="triton"))
        assert torch.equal(dequantize_int4(q4, backend="torch"), dequantize_int4(q4, backend="triton"))
        out16 = torch.empty(n, dtype=torch.bfloat16)
        dequantize_int8(q8, out16, backend="triton")
        # The interpreter's fp32->bf16 cast may truncate instead of rounding: allow one bf16 step.
        torch.testing.assert_close(out16, dequantize_int8(q8).to(torch.bfloat16), rtol=2**-7, atol=0)
        acc = torch.randn(n, generator=g)
        acc_t = acc.clone()
        dequantize_int8_accumulate(q8, acc, backend="torch")
        dequantize_int8_accumulate(q8, acc_t, backend="triton")
        torch.testing.assert_close(acc, acc_t, rtol=1e-6, atol=1e-7)
        own = torch.randn(n, generator=g)
        a = dequantize_int8_pair_average(q8, own, backend="torch")
        b = dequantize_int8_pair_average(q8, own, backend="triton")
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def check_noloco() -> None:
    """The fused NoLoCo kernel equals its fallback, paired and solo."""
    from swarmd.kernels import noloco_outer_update_, quantize_int8_ef

    g = torch.Generator().manual_seed(2)
    for n in SIZES:
        phi = torch.randn(n, generator=g)
        theta = phi + 0.1 * torch.randn(n, generator=g)
        delta = 0.05 * torch.randn(n, generator=g)
        qphi, _ = quantize_int8_ef(phi + 0.01 * torch.randn(n, generator=g), block_size=256)
        qprog, _ = quantize_int8_ef(0.1 * torch.randn(n, generator=g), block_size=64)
        for payload in ((qphi, qprog), (None, None)):
            states = [(phi.clone(), theta.clone(), delta.clone()) for _ in range(2)]
            for (p, t, d), backend in zip(states, ("torch", "triton")):
                noloco_outer_update_(p, t, d, *payload, beta=0.7, gamma=0.6, mu=0.5, backend=backend)
            for a, b in zip(*states):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


CHECKS = [check_quantizers, check_ties_zeros_and_nonfinite, check_decoders, check_noloco]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
def test_triton_interpreter_equals_fallback(check: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(  # noqa: PLW1510 - the return code is asserted below
        [sys.executable, __file__, check], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    names = sys.argv[1:] or [c.__name__ for c in CHECKS]
    for c in CHECKS:
        if c.__name__ in names:
            c()
            print(f"ok {c.__name__}")
