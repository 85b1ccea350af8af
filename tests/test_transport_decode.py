"""Large frames are decoded off the event loop with the same result and the same rejections."""

from __future__ import annotations

import asyncio

import pytest
import torch
from swarmd.daemon.transport import OFF_LOOP_DECODE_BYTES, _decode
from swarmd.protocols.codecs import encode_tensor
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.protocols.wire import decode_message, encode_message

FIELDS = {"session": b"s" * 16, "index": 0, "count": 1, "numel": 1 << 19}


def _chunk_message(numel: int) -> bytes:
    tensors = [encode_tensor(torch.linspace(-1, 1, numel), "none") for _ in range(2)]
    return encode_message("outer_chunk", dict(FIELDS, numel=numel), tensors)


@pytest.mark.parametrize("numel", [1 << 10, 1 << 19])  # below and above the off-loop threshold
def test_decode_matches_the_plain_decoder(numel: int):
    data = _chunk_message(numel)
    assert (len(data) >= OFF_LOOP_DECODE_BYTES) == (numel == 1 << 19)
    got = asyncio.run(_decode(decode_message, data, DEFAULT_LIMITS, ("outer_chunk",)))
    want = decode_message(data, DEFAULT_LIMITS, expected_kinds=("outer_chunk",))
    assert got.kind == want.kind and got.fields == want.fields
    assert all(torch.equal(a, b) for a, b in zip(got.tensors, want.tensors))


def test_a_large_bad_frame_is_rejected_off_the_loop():
    data = bytearray(_chunk_message(1 << 19))
    assert len(data) >= OFF_LOOP_DECODE_BYTES
    at = data.rfind(b"\x00\x00\x80\x3f")  # the last 1.0 of a payload (linspace ends at 1.0) ...
    data[at : at + 4] = b"\x00\x00\xc0\x7f"  # ... becomes a NaN
    with pytest.raises(ProtocolError) as e:
        asyncio.run(_decode(decode_message, bytes(data), DEFAULT_LIMITS, ("outer_chunk",)))
    assert e.value.reason == "nonfinite"
    with pytest.raises(ProtocolError):
        asyncio.run(_decode(decode_message, b"\xc1" * OFF_LOOP_DECODE_BYTES, DEFAULT_LIMITS, ("outer_chunk",)))
