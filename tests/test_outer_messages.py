"""The NoLoCo outer-step messages (pair_request, outer_chunk, outer_commit): round trips and rejections."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
import torch
from swarmd.protocols.codecs import encode_tensor
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.messages import MAX_OUTER_CHUNKS, MAX_STAGE, SESSION_BYTES
from swarmd.protocols.wire import PROTOCOL_VERSION, decode_message, encode_message

SESSION = bytes(range(SESSION_BYTES))
PAIR = {"session": SESSION, "stage": 2, "numel": 10_000}
CHUNK = {"session": SESSION, "index": 3, "count": 5, "numel": 10_000}
COMMIT = {"session": SESSION, "verdict": "accept"}


def frame(kind: str, fields: dict, metas: list = (), payloads: list[bytes] = ()) -> bytes:
    """A message built by hand, bypassing encode_message's own validation."""
    header = {"v": PROTOCOL_VERSION, "kind": kind, "fields": fields, "tensors": list(metas),
              "sizes": [len(p) for p in payloads]}
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed + b"".join(payloads)


def reason_of(data: bytes, expected_kinds=None) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_message(data, expected_kinds=expected_kinds)
    return info.value.reason


def chunk_tensors(n: int = 100, codec: str = "none", seed: int = 0) -> tuple[list, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    phi, progress = torch.randn(n, generator=g), 0.01 * torch.randn(n, generator=g)
    return [encode_tensor(phi, codec), encode_tensor(progress, codec)], [phi, progress]


def raw_metas(encoded) -> tuple[list, list[bytes]]:
    return [t.meta for t in encoded], [t.payload for t in encoded]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("stage", [0, MAX_STAGE])
def test_pair_request_round_trip(stage: int):
    msg = decode_message(encode_message("pair_request", {**PAIR, "stage": stage}), expected_kinds=("pair_request",))
    assert msg.kind == "pair_request" and msg.fields == {**PAIR, "stage": stage} and msg.tensors == []


@pytest.mark.parametrize("verdict", ["accept", "reject"])
def test_outer_commit_round_trip(verdict: str):
    msg = decode_message(encode_message("outer_commit", {**COMMIT, "verdict": verdict}))
    assert msg.kind == "outer_commit" and msg.fields == {**COMMIT, "verdict": verdict}


def test_outer_chunk_round_trip_exact():
    encoded, (phi, progress) = chunk_tensors()
    msg = decode_message(encode_message("outer_chunk", CHUNK, encoded), expected_kinds=("outer_chunk",))
    assert msg.fields == CHUNK
    assert torch.equal(msg.tensors[0], phi) and torch.equal(msg.tensors[1], progress)


@pytest.mark.parametrize("codec", ["int8", "int8-ef", "int4-ef", "fp16"])
def test_outer_chunk_round_trip_compressed(codec: str):
    encoded, originals = chunk_tensors(n=1000, codec=codec, seed=1)
    msg = decode_message(encode_message("outer_chunk", CHUNK, encoded))
    for got, want in zip(msg.tensors, originals):
        assert got.dtype == torch.float32 and got.shape == want.shape
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= scale * (0.2 if codec == "int4-ef" else 0.01)


@pytest.mark.parametrize(
    "fields", [{"index": 0, "count": 1}, {"index": MAX_OUTER_CHUNKS - 1, "count": MAX_OUTER_CHUNKS}, {"numel": 0}]
)
def test_outer_chunk_bounds_accepted(fields: dict):
    encoded, _ = chunk_tensors(n=4)
    msg = decode_message(encode_message("outer_chunk", {**CHUNK, **fields}, encoded))
    assert msg.fields == {**CHUNK, **fields}


def test_outer_chunk_with_empty_tensors():
    encoded = [encode_tensor(torch.zeros(0)), encode_tensor(torch.zeros(0))]
    assert [t.numel() for t in decode_message(encode_message("outer_chunk", CHUNK, encoded)).tensors] == [0, 0]


def test_outer_kinds_are_filtered_by_expected_kinds():
    data = encode_message("outer_commit", COMMIT)
    assert reason_of(data, expected_kinds=("outer_chunk",)) == "malformed"


# ---------------------------------------------------------------- bad fields


BAD_PAIR = [
    {"session": SESSION[:-1]},
    {"session": SESSION + b"\0"},
    {"session": b""},
    {"session": SESSION.hex()},
    {"stage": -1},
    {"stage": MAX_STAGE + 1},
    {"stage": True},
    {"numel": -1},
    {"numel": 1 << 63},
    {"numel": 3.0},
    {"numel": None},
]


@pytest.mark.parametrize("bad", BAD_PAIR)
def test_pair_request_bad_fields(bad: dict):
    assert reason_of(frame("pair_request", {**PAIR, **bad})) == "malformed"
    with pytest.raises(ValueError):  # and we refuse to send it
        encode_message("pair_request", {**PAIR, **bad})


@pytest.mark.parametrize("missing", sorted(PAIR))
def test_pair_request_missing_field(missing: str):
    fields = {k: v for k, v in PAIR.items() if k != missing}
    assert reason_of(frame("pair_request", fields)) == "malformed"


def test_pair_request_extra_field_or_tensor():
    assert reason_of(frame("pair_request", {**PAIR, "extra": 1})) == "malformed"
    encoded, _ = chunk_tensors(n=2)
    metas, payloads = raw_metas(encoded[:1])
    assert reason_of(frame("pair_request", PAIR, metas, payloads)) == "malformed"


BAD_CHUNK = [
    {"session": SESSION[:15]},
    {"session": SESSION * 2},
    {"index": -1},
    {"index": MAX_OUTER_CHUNKS},
    {"index": MAX_OUTER_CHUNKS + 7},
    {"index": 1.0},
    {"count": 0},
    {"count": MAX_OUTER_CHUNKS + 1},
    {"numel": -5},
    {"extra": 0},
]


@pytest.mark.parametrize("bad", BAD_CHUNK)
def test_outer_chunk_bad_fields(bad: dict):
    encoded, _ = chunk_tensors(n=4)
    metas, payloads = raw_metas(encoded)
    assert reason_of(frame("outer_chunk", {**CHUNK, **bad}, metas, payloads)) == "malformed"
    with pytest.raises(ValueError):
        encode_message("outer_chunk", {**CHUNK, **bad}, encoded)


@pytest.mark.parametrize("n_tensors", [0, 1, 3])
def test_outer_chunk_wrong_tensor_count(n_tensors: int):
    encoded = [encode_tensor(torch.ones(4)) for _ in range(n_tensors)]
    metas, payloads = raw_metas(encoded)
    assert reason_of(frame("outer_chunk", CHUNK, metas, payloads)) == "malformed"
    with pytest.raises(ValueError):
        encode_message("outer_chunk", CHUNK, encoded)


@pytest.mark.parametrize(
    "bad", [{"verdict": "maybe"}, {"verdict": "ACCEPT"}, {"verdict": ""}, {"verdict": 1}, {"session": SESSION[1:]}]
)
def test_outer_commit_bad_fields(bad: dict):
    assert reason_of(frame("outer_commit", {**COMMIT, **bad})) == "malformed"
    with pytest.raises(ValueError):
        encode_message("outer_commit", {**COMMIT, **bad})


def test_outer_commit_carries_no_tensor():
    encoded, _ = chunk_tensors(n=2)
    metas, payloads = raw_metas(encoded[:1])
    assert reason_of(frame("outer_commit", COMMIT, metas, payloads)) == "malformed"


# ---------------------------------------------------------------- non-finite tensors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", [0, 1])
def test_outer_chunk_nonfinite_tensor(bad: float, which: int):
    values = np.linspace(-1, 1, 8, dtype=np.float32)
    values[5] = bad
    good = np.ones(8, dtype=np.float32)
    meta = {"dtype": "float32", "shape": [8], "codec": "none"}
    payloads = [good.tobytes(), good.tobytes()]
    payloads[which] = values.tobytes()
    assert reason_of(frame("outer_chunk", CHUNK, [meta, meta], payloads)) == "nonfinite"


def test_outer_chunk_nonfinite_int8_scale():
    """The quantized codec the averaging lane uses: a NaN block scale is caught as well."""
    encoded, _ = chunk_tensors(n=512, codec="int8")
    metas, payloads = raw_metas(encoded)
    payloads[1] = payloads[1][:-4] + np.array([np.nan], dtype="<f4").tobytes()  # the last block's scale
    assert reason_of(frame("outer_chunk", CHUNK, metas, payloads)) == "nonfinite"
