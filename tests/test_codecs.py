"""Codec round trips and rejection of malformed or non-finite quantized payloads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from swarmd.protocols.codecs import CODECS, DTYPES, check_meta, decode_tensor, encode_tensor
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import DEFAULT_LIMITS

QUANT = ["int8", "int8-ef", "int4-ef"]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
STEP = {"int8": 127, "int8-ef": 127, "int4-ef": 7}


def _roundtrip(x: torch.Tensor, codec: str, **kw):
    enc = encode_tensor(x, codec, **kw)
    return enc, decode_tensor(enc.meta, enc.payload, DEFAULT_LIMITS)


def test_codec_registry() -> None:
    assert set(QUANT) <= set(CODECS) and {"none", "fp16"} <= set(CODECS)


@pytest.mark.parametrize("codec", QUANT)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1,), (63,), (10, 100), (4097,), (2, 0, 3)])
def test_quantized_roundtrip(codec: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape).to(dtype)
    enc, y = _roundtrip(x, codec, block_size=128)
    assert y.dtype == dtype and y.shape == x.shape
    assert enc.meta == {"dtype": str(dtype).split(".")[1], "shape": list(shape), "codec": codec, "block_size": 128}
    if x.numel():
        # Each element is off by at most half a step of its block (plus the cast back to dtype).
        bound = x.float().abs().max() / STEP[codec] / 2
        assert (y.float() - x.float()).abs().max() <= bound * 1.01 + 2e-2 * x.float().abs().max()
    if codec.endswith("-ef"):
        assert enc.residual is not None and enc.residual.shape == x.shape
        torch.testing.assert_close(
            decode_tensor(enc.meta, enc.payload, DEFAULT_LIMITS).float() + enc.residual, x.float(), rtol=1e-2, atol=1e-2
        )
    else:
        assert enc.residual is None


def test_payload_layout_is_codes_then_scales() -> None:
    x = torch.zeros(200)
    x[0] = 127.0
    x[130] = -12.7
    enc = encode_tensor(x, "int8", block_size=128)
    codes = np.frombuffer(enc.payload[:200], dtype=np.int8)
    scales = np.frombuffer(enc.payload[200:], dtype="<f4")
    assert codes[0] == 127 and codes[130] == -127 and scales.tolist() == pytest.approx([1.0, 0.1])
    enc4 = encode_tensor(torch.tensor([7.0, -7.0, 1.0] + [0.0] * 61), "int4-ef", block_size=64)
    assert enc4.payload[0] == (8 + 7) | ((8 - 7) << 4) and enc4.payload[1] == (8 + 1) | (8 << 4)
    assert len(enc4.payload) == 32 + 4


def test_error_feedback_carries_over_steps() -> None:
    # Summed over steps, what was sent tracks what was meant to be sent: the residual stays bounded.
    g = torch.Generator().manual_seed(0)
    residual, sent, meant = None, torch.zeros(1000), torch.zeros(1000)
    for _ in range(20):
        x = torch.randn(1000, generator=g)
        enc = encode_tensor(x, "int4-ef", block_size=64, residual=residual)
        residual = enc.residual
        sent += decode_tensor(enc.meta, enc.payload, DEFAULT_LIMITS)
        meant += x
    torch.testing.assert_close(sent + residual, meant, rtol=1e-4, atol=1e-4)
    assert residual.abs().max() < 0.5


def test_encode_rejects() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_tensor(torch.tensor([1.0, float("nan")]), "int8")
    with pytest.raises(ValueError, match="float"):
        encode_tensor(torch.arange(5), "int8-ef")
    with pytest.raises(ValueError, match="residual"):
        encode_tensor(torch.randn(5), "int8", residual=torch.zeros(5))
    with pytest.raises(ValueError, match="block_size"):
        encode_tensor(torch.randn(5), "int8", block_size=32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_tensor(torch.randn(5), "int8-ef", residual=torch.tensor([0.0, 0, float("inf"), 0, 0]))


def _reason(meta, payload) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_tensor(meta, payload, DEFAULT_LIMITS)
    return info.value.reason


@pytest.mark.parametrize("codec", QUANT)
def test_decode_rejects_malformed(codec: str) -> None:
    enc = encode_tensor(torch.randn(300), codec, block_size=64)
    meta, payload = enc.meta, enc.payload
    assert _reason({**meta, "codec": "int3"}, payload) == "codec"
    for bs in (32, 4097, 0, -64, "64", 64.0, True, None):
        assert _reason({**meta, "block_size": bs}, payload) == "codec"
    assert _reason({**meta, "dtype": "int32"}, payload) == "codec"
    assert _reason({**meta, "block_size": 128}, payload) == "shape"  # fewer scales expected
    assert _reason(meta, payload[:-1]) == "shape"
    assert _reason(meta, payload + b"\0") == "shape"
    assert _reason({**meta, "shape": [301]}, payload) == "shape"
    n_codes = len(payload) - 5 * 4
    for bad in (float("nan"), float("inf"), float("-inf")):
        tampered = bytearray(payload)
        tampered[n_codes + 8 : n_codes + 12] = np.array([bad], dtype="<f4").tobytes()
        assert _reason(meta, bytes(tampered)) == "nonfinite"
    negative = bytearray(payload)
    negative[n_codes : n_codes + 4] = np.array([-1.0], dtype="<f4").tobytes()
    assert _reason(meta, bytes(negative)) == "codec"
    # Finite scales whose decoded values overflow the target dtype are non-finite too.
    huge = bytearray(payload)
    huge[n_codes : n_codes + 4] = np.array([3e38], dtype="<f4").tobytes()
    assert _reason(meta, bytes(huge)) == "nonfinite"
    fp16 = encode_tensor(torch.randn(300, dtype=torch.float16), codec, block_size=64)
    big = bytearray(fp16.payload)
    big[n_codes : n_codes + 4] = np.array([1e4], dtype="<f4").tobytes()
    assert _reason(fp16.meta, bytes(big)) == "nonfinite"


def test_int4_needs_even_block_size_on_the_wire() -> None:
    enc = encode_tensor(torch.randn(100), "int4-ef", block_size=64)
    assert _reason({**enc.meta, "block_size": 65}, enc.payload) == "codec"
    enc8 = encode_tensor(torch.randn(100), "int8", block_size=65)  # odd is fine for int8
    assert decode_tensor(enc8.meta, enc8.payload, DEFAULT_LIMITS).shape == (100,)


def test_check_meta_validates_codec_params_before_payload() -> None:
    meta = {"dtype": "float32", "shape": [10], "codec": "int8-ef", "block_size": 64}
    assert check_meta(meta, DEFAULT_LIMITS) == (torch.float32, [10], 10)
    with pytest.raises(ProtocolError) as info:
        check_meta({**meta, "block_size": 8192}, DEFAULT_LIMITS)
    assert info.value.reason == "codec"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.sampled_from(QUANT),
    dtype_name=st.sampled_from(["float32", "bfloat16", "float16"]),
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    block_size=st.sampled_from([64, 66, 128, 1000, 4096]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31),
)
def test_roundtrip_property(codec, dtype_name, shape, block_size, scale, seed) -> None:
    dtype = DTYPES[dtype_name]
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    enc, y = _roundtrip(x, codec, block_size=block_size)
    assert y.dtype == dtype and list(y.shape) == shape
    assert len(enc.payload) == (math.prod(shape) if codec != "int4-ef" else (math.prod(shape) + 1) // 2) + 4 * (
        -(-math.prod(shape) // block_size)
    )
    assert bool(torch.isfinite(y).all())


@settings(max_examples=150, deadline=None)
@given(
    meta=st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["float32", "bfloat16", "float16", "int32", "float64", 3]),
            "shape": st.one_of(st.lists(st.integers(-2, 50), max_size=3), st.text(max_size=3)),
            "codec": st.sampled_from(QUANT + ["int5", ""]),
        },
        optional={"block_size": st.one_of(st.integers(-10, 5000), st.none(), st.booleans(), st.floats())},
    ),
    payload=st.binary(max_size=300),
)
def test_fuzzed_headers_only_raise_protocol_errors(meta, payload) -> None:
    try:
        y = decode_tensor(meta, payload, DEFAULT_LIMITS)
    except ProtocolError:
        return
    assert bool(torch.isfinite(y.float()).all()) and y.dtype == DTYPES[meta["dtype"]]
