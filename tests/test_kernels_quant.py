"""Torch fallbacks of the blockwise quantizers against float64 references."""

from __future__ import annotations

import pytest
import torch
from swarmd.kernels import (
    QuantizedBlocks,
    dequantize_int4,
    dequantize_int8,
    dequantize_int8_accumulate,
    dequantize_int8_pair_average,
    quantize_int4_ef,
    quantize_int8_ef,
)

SIZES = [1, 63, 1000, 4097]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKS = [64, 100, 256, 4096]


def _inputs(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * 3).to(dtype)
    residual = torch.randn(n, generator=g) * 0.05
    return x, residual


def _reference(x: torch.Tensor, residual: torch.Tensor | None, block_size: int, qmax: int):
    """float64 reference: y (as the fp32 sum the kernel sees), per-block scale, unrounded code values."""
    y32 = x.float() + (residual if residual is not None else 0.0)
    y = y32.double()
    n = y.numel()
    nb = -(-n // block_size)
    padded = torch.zeros(nb * block_size, dtype=torch.float64)
    padded[:n] = y
    scale = padded.view(nb, block_size).abs().amax(dim=1) / qmax
    per_elem = scale.repeat_interleave(block_size)[:n]
    v = torch.where(per_elem > 0, y / per_elem.clamp_min(1e-300), torch.zeros_like(y))
    return y, scale, per_elem, v


def _codes_int4(q: QuantizedBlocks) -> torch.Tensor:
    lo = (q.codes & 0xF).to(torch.int64) - 8
    hi = (q.codes >> 4).to(torch.int64) - 8
    return torch.stack([lo, hi], dim=1).reshape(-1)[: q.numel]


def _check_nearest(codes: torch.Tensor, scales: torch.Tensor, ref, qmax: int) -> None:
    _, scale64, _, v = ref
    torch.testing.assert_close(scales.double(), scale64, rtol=2e-7, atol=0)
    codes = codes.to(torch.float64)
    assert codes.abs().max() <= qmax
    # Nearest: within half a step of the exact value (plus fp32 slack), and exactly round(v) away from ties.
    assert ((codes - v).abs() <= 0.5 + 1e-4).all()
    clear = ((v - v.floor()) - 0.5).abs() > 1e-4
    assert torch.equal(codes[clear], torch.round(v)[clear])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCKS)
def test_int8_matches_float64_reference(n: int, dtype: torch.dtype, block_size: int) -> None:
    x, residual = _inputs(n, dtype, seed=n + block_size)
    q, new_residual = quantize_int8_ef(x, residual, block_size=block_size, backend="torch")
    assert q.codes.dtype == torch.int8 and q.codes.numel() == n and q.bits == 8
    assert q.scales.numel() == -(-n // block_size) and q.block_size == block_size
    ref = _reference(x, residual, block_size, 127)
    _check_nearest(q.codes, q.scales, ref, 127)
    # Error feedback: decoded + new residual == input + old residual, to fp32 rounding.
    decoded = dequantize_int8(q, backend="torch")
    torch.testing.assert_close((decoded + new_residual).double(), ref[0], rtol=1e-6, atol=1e-6)
    assert (new_residual.double().abs() <= ref[2] / 2 * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [64, 256, 4096])
def test_int4_nearest_matches_float64_reference(n: int, dtype: torch.dtype, block_size: int) -> None:
    x, residual = _inputs(n, dtype, seed=7 * n + block_size)
    q, new_residual = quantize_int4_ef(x, residual, block_size=block_size, backend="torch")
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == (n + 1) // 2 and q.bits == 4
    ref = _reference(x, residual, block_size, 7)
    _check_nearest(_codes_int4(q), q.scales, ref, 7)
    decoded = dequantize_int4(q, backend="torch")
    torch.testing.assert_close((decoded + new_residual).double(), ref[0], rtol=1e-6, atol=1e-6)
    if n % 2:
        assert int(q.codes[-1]) >> 4 == 8  # the padding nibble is code 0


def test_round_half_to_even_on_exact_ties() -> None:
    # absmax 127 -> scale exactly 1, so these values sit exactly on .5 ties.
    vals = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5]
    x = torch.tensor(vals + [0.0] * (64 - len(vals)))
    q, _ = quantize_int8_ef(x, block_size=64, backend="torch")
    assert q.scales.tolist() == [1.0]
    assert q.codes[: len(vals)].tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -126, 4]
    # 4 bits: absmax 7 -> scale 1.
    x4 = torch.tensor([7.0, 0.5, 1.5, 2.5, -3.5, 6.5] + [0.0] * 58)
    q4, _ = quantize_int4_ef(x4, block_size=64, backend="torch")
    assert _codes_int4(q4)[:6].tolist() == [7, 0, 2, 2, -4, 6]


def test_zero_blocks_get_zero_scale_and_codes() -> None:
    x = torch.zeros(300)
    x[200:] = torch.linspace(-1, 1, 100)
    q, res = quantize_int8_ef(x, block_size=64, backend="torch")
    assert q.scales[:3].tolist() == [0.0, 0.0, 0.0] and q.scales[3] > 0
    assert not q.codes[:192].any()
    assert torch.equal(res[:192], torch.zeros(192))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_raises(bad: float) -> None:
    x = torch.randn(130)
    x[77] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int8_ef(x, block_size=64, backend="torch")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int4_ef(x, block_size=64, backend="torch")
    residual = torch.zeros(130)
    residual[3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int8_ef(torch.randn(130), residual, block_size=64, backend="torch")


@pytest.mark.parametrize("block_size", [0, 32, 63, 4097, 8192])
def test_block_size_out_of_range_raises(block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        quantize_int8_ef(torch.randn(10), block_size=block_size)


def test_int4_needs_even_block_size() -> None:
    quantize_int8_ef(torch.randn(10), block_size=65)  # fine for 8 bits
    with pytest.raises(ValueError, match="even"):
        quantize_int4_ef(torch.randn(10), block_size=65)


def test_rejects_integer_input() -> None:
    with pytest.raises(ValueError, match="float"):
        quantize_int8_ef(torch.arange(10))


def test_stochastic_int4_is_reproducible_and_unbiased() -> None:
    x = torch.randn(4001) * 2
    a, ra = quantize_int4_ef(x, block_size=128, stochastic=True, seed=42, backend="torch")
    b, rb = quantize_int4_ef(x, block_size=128, stochastic=True, seed=42, backend="torch")
    c, _ = quantize_int4_ef(x, block_size=128, stochastic=True, seed=43, backend="torch")
    assert torch.equal(a.codes, b.codes) and torch.equal(ra, rb)
    assert not torch.equal(a.codes, c.codes)
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    d1, _ = quantize_int4_ef(x, block_size=128, stochastic=True, generator=g1)
    d2, _ = quantize_int4_ef(x, block_size=128, stochastic=True, generator=g2)
    assert torch.equal(d1.codes, d2.codes)
    # Every code is the floor or the ceiling of the exact value; error feedback holds.
    _, _, _, v = _reference(x, None, 128, 7)
    codes = _codes_int4(a).double()
    assert ((codes >= v.floor() - 1e-9) & (codes <= v.ceil() + 1e-9)).all()
    torch.testing.assert_close(dequantize_int4(a) + ra, x, rtol=1e-6, atol=1e-6)
    # Unbiased: the mean over many seeds approaches the exact value (step 1 in code units).
    x_small = torch.randn(256)
    mean = torch.stack(
        [
            _codes_int4(quantize_int4_ef(x_small, block_size=256, stochastic=True, seed=s)[0]).double()
            for s in range(400)
        ]
    ).mean(0)
    _, _, _, v_small = _reference(x_small, None, 256, 7)
    assert (mean - v_small).abs().max() < 0.15


@pytest.mark.parametrize("n", SIZES)
def test_fused_decoders_match_reference(n: int) -> None:
    x, _ = _inputs(n, torch.float32, seed=3 * n)
    q, _ = quantize_int8_ef(x, block_size=100, backend="torch")
    per_elem = q.scales.double().repeat_interleave(100)[:n]
    decoded64 = q.codes.double() * per_elem
    torch.testing.assert_close(dequantize_int8(q).double(), decoded64, rtol=1e-7, atol=0)
    out_bf16 = torch.empty(n, dtype=torch.bfloat16)
    assert dequantize_int8(q, out_bf16) is out_bf16
    torch.testing.assert_close(out_bf16.double(), decoded64, rtol=1e-2, atol=1e-2)
    acc = torch.randn(n)
    acc0 = acc.double().clone()
    assert dequantize_int8_accumulate(q, acc) is acc
    torch.testing.assert_close(acc.double(), acc0 + decoded64, rtol=1e-6, atol=1e-6)
    own = torch.randn(n)
    avg = dequantize_int8_pair_average(q, own)
    torch.testing.assert_close(avg.double(), (own.double() + decoded64) / 2, rtol=1e-6, atol=1e-6)
    own_copy = own.clone()
    dequantize_int8_pair_average(q, own_copy, out=own_copy)  # in place on own
    torch.testing.assert_close(own_copy, avg, rtol=0, atol=0)


def test_decoders_check_their_arguments() -> None:
    q, _ = quantize_int8_ef(torch.randn(100), block_size=64)
    with pytest.raises(ValueError, match="4-bit"):
        dequantize_int4(q)
    with pytest.raises(ValueError, match="float32"):
        dequantize_int8_accumulate(q, torch.zeros(100, dtype=torch.float16))
    with pytest.raises(ValueError, match="numel"):
        dequantize_int8(q, torch.empty(99))
    bad = QuantizedBlocks(q.codes, q.scales[:1], q.numel, q.block_size, 8)
    with pytest.raises(ValueError, match="scales"):
        dequantize_int8(bad)


def test_shapes_and_empty_tensor() -> None:
    x = torch.randn(3, 5, 7, dtype=torch.float16)
    _, res = quantize_int8_ef(x, block_size=64)
    assert res.shape == x.shape and res.dtype == torch.float32
    q0, r0 = quantize_int8_ef(torch.empty(0), block_size=64)
    assert q0.codes.numel() == 0 and q0.scales.numel() == 0 and r0.numel() == 0
    assert dequantize_int8(q0).numel() == 0


@pytest.mark.parametrize("n", [1000, 4097, 3 * 512 + 64 + 5])
def test_chunked_fallbacks_do_not_depend_on_the_chunk(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU fallbacks run chunk by chunk (swarmd.kernels.quant_torch.CHUNK_ELEMS): the chunk size changes
    no code, scale, residual or NoLoCo update, bit for bit (so the Triton comparisons, made at small sizes,
    hold at any size)."""
    from swarmd.kernels import noloco_outer_update_, quant_torch

    g = torch.Generator().manual_seed(n)
    x, residual = _inputs(n, torch.float32, seed=n)
    phi, theta, delta = (torch.randn(n, generator=g) for _ in range(3))

    def run() -> list[torch.Tensor]:
        out = []
        q8, r8 = quantize_int8_ef(x, residual, block_size=64, backend="torch")
        q4, r4 = quantize_int4_ef(x, residual, block_size=64, backend="torch")
        qs, rs = quantize_int4_ef(x, residual, block_size=128, stochastic=True, seed=9, backend="torch")
        out += [q8.codes, q8.scales, r8, q4.codes, q4.scales, r4, qs.codes, rs]
        for payload in ((q8, q4), (x, residual), (None, None)):
            state = [phi.clone(), theta.clone(), delta.clone()]
            noloco_outer_update_(*state, *payload, beta=0.7, gamma=0.6, mu=0.5, backend="torch")
            out += state
        return out

    whole = run()
    monkeypatch.setattr(quant_torch, "CHUNK_ELEMS", 512)
    monkeypatch.setattr("swarmd.kernels.noloco_torch.CHUNK_ELEMS", 512)
    for a, b in zip(whole, run(), strict=True):
        assert torch.equal(a, b)


def test_subnormal_scales_still_clamp_codes() -> None:
    """A block whose scale absmax / 127 is subnormal: the rounded scale can be far off, so y / scale may pass
    127; codes stay in -127..127 and decode + residual still equals the input."""
    x = torch.zeros(128)
    x[:64] = torch.linspace(-190, 190, 64) * 2.0**-149  # absmax 190 * 2**-149: scale rounds to 2**-149
    x[64:] = torch.randn(64)
    q, res = quantize_int8_ef(x, block_size=64, backend="torch")
    assert q.scales[0] > 0 and q.scales[0] < 2.0**-126
    assert int(q.codes.abs().max()) <= 127 and int(q.codes[:64].abs().max()) == 127
    assert torch.equal(dequantize_int8(q) + res, x)


@pytest.mark.parametrize("n", [64 * 40 + 37, 64 * 40])  # a partial last block; whole blocks only (no slices)
def test_compiled_fallbacks_are_bit_identical_to_eager(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Large CPU tensors take torch.compile of the same expressions (swarmd.kernels.compiled): codes, scales,
    residuals and the NoLoCo update equal the eager fallbacks bit for bit (whole blocks compiled, a partial
    last block eager). Small sizes here, with the size threshold lowered: a few seconds of compiling."""
    from swarmd.kernels import compiled, noloco_outer_update_
    from swarmd.kernels.noloco_torch import noloco_blocks_

    g = torch.Generator().manual_seed(3)
    x, residual = _inputs(n, torch.float32, seed=11)
    x[:64] = 0.0  # a zero block
    phi, theta, delta = (torch.randn(n, generator=g) for _ in range(3))

    def run() -> list[torch.Tensor]:
        q8, r8 = quantize_int8_ef(x, residual, block_size=64, backend="torch")
        q4, r4 = quantize_int4_ef(x, None, block_size=64, backend="torch")
        out = [q8.codes, q8.scales, r8, q4.codes, q4.scales, r4]
        for payload in ((q8, q8), (None, None)):
            state = [phi.clone(), theta.clone(), delta.clone()]
            noloco_outer_update_(*state, *payload, beta=0.7, gamma=0.6, mu=0.5, backend="torch")
            out += state
        return out

    monkeypatch.setenv(compiled.ENV_SWITCH, "0")
    eager = run()
    monkeypatch.setenv(compiled.ENV_SWITCH, "1")
    monkeypatch.setattr(compiled, "COMPILE_MIN_ELEMS", 1)
    through_compile = run()
    if not all(compiled._compiled.get(f) for f in (compiled.quantize_blocks, noloco_blocks_)):
        pytest.skip("torch.compile is unavailable here: the eager fallbacks serve")
    for a, b in zip(eager, through_compile, strict=True):
        assert torch.equal(a, b)
