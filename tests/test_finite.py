"""all_finite: the fast NaN/Inf check every tensor sent or received goes through."""

from __future__ import annotations

import pytest
import torch
from swarmd.kernels import all_finite

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 7, 64, 1000, 1 << 17])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finds_one_bad_value_anywhere(dtype: torch.dtype, n: int, bad: float):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(dtype)
    assert all_finite(x)
    for position in {0, n // 2, n - 1}:
        y = x.clone()
        y[position] = bad
        assert not all_finite(y)


def test_agrees_with_isfinite_on_mixed_tensors():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        x = torch.randn(3, 5, 7, generator=g) * 1e38  # finite, some near the float32 limit
        mask = torch.rand(x.shape, generator=g) < 0.01 * (trial % 3)
        x[mask] = torch.tensor([float("nan"), float("inf"), -float("inf")])[trial % 3]
        assert all_finite(x) == bool(torch.isfinite(x).all())


def test_integers_empty_and_strided():
    assert all_finite(torch.arange(10))
    assert all_finite(torch.empty(0))
    x = torch.zeros(4, 6)
    x[1, 3] = float("nan")
    assert not all_finite(x.t())  # non-contiguous view
    assert all_finite(x[::2])
    assert not all_finite(torch.tensor([1 + 1j, complex(float("inf"), 0)]))
