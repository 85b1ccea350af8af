"""Framing: round trips of every kind, and every kind of garbage answered with a ProtocolError (and nothing else)."""

from __future__ import annotations

import asyncio
import socket
import struct

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmd.protocols.codecs import CODECS, DTYPES, FLOAT_DTYPES, encode_tensor
from swarmd.protocols.errors import REJECT_REASONS, ProtocolError
from swarmd.protocols.limits import Limits
from swarmd.protocols.messages import MAX_ERROR_CHARS
from swarmd.protocols.wire import (
    PROTOCOL_VERSION,
    Message,
    RemoteError,
    decode_message,
    decode_reply,
    encode_message,
    error_message,
    raise_for_error,
    read_frame,
    write_frame,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- helpers


def frame(header: object, payloads: list[bytes] = (), header_len: int | None = None) -> bytes:
    """A message built by hand, bypassing encode_message's own validation."""
    packed = msgpack.packb(header, use_bin_type=True)
    n = len(packed) if header_len is None else header_len
    return struct.pack(">I", n) + packed + b"".join(payloads)


def header(kind: str, fields: dict, metas: list = (), sizes: list | None = None, v: object = PROTOCOL_VERSION) -> dict:
    metas = list(metas)
    return {"v": v, "kind": kind, "fields": fields, "tensors": metas, "sizes": sizes if sizes is not None else []}


def reason_of(data: bytes, limits: Limits = Limits(), expected_kinds=None) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_message(data, limits, expected_kinds)
    assert info.value.reason in REJECT_REASONS
    return info.value.reason


def decode_or_reject(data: bytes, limits: Limits = Limits()) -> Message | ProtocolError:
    """Either a Message or a ProtocolError: any other exception fails the test."""
    try:
        return decode_message(data, limits)
    except ProtocolError as e:
        return e


def raw_tensor(values, dtype: str = "float32") -> tuple[dict, bytes]:
    """A (meta, payload) pair built without encode_tensor (which refuses NaN)."""
    arr = np.asarray(values, dtype={"float32": np.float32, "float16": np.float16}[dtype])
    return {"dtype": dtype, "shape": list(arr.shape), "codec": "none"}, arr.tobytes()


MB = bytes(range(16))
T2 = [encode_tensor(torch.ones(2, 3)), encode_tensor(torch.arange(3))]


def valid_forward() -> bytes:
    return encode_message("forward", {"mb_id": MB, "stage": 1, "route": ["a", "b"], "deadline_s": 9.0}, T2)


# ---------------------------------------------------------------- strategies

text = st.text(max_size=24)
int64 = st.integers(min_value=0, max_value=(1 << 63) - 1)
stage = st.integers(min_value=0, max_value=1023)
finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def tensors(draw) -> tuple[torch.Tensor, str]:
    dtype_name = draw(st.sampled_from(sorted(DTYPES)))
    codec = draw(st.sampled_from(["none", "fp16"] if dtype_name in FLOAT_DTYPES else ["none"]))
    shape = draw(st.lists(st.integers(min_value=0, max_value=5), max_size=4))
    gen = torch.Generator().manual_seed(draw(st.integers(min_value=0, max_value=2**31)))
    dtype = DTYPES[dtype_name]
    if dtype_name in FLOAT_DTYPES:
        t = (torch.randn(shape, generator=gen) * 100).to(dtype)
    else:
        t = torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int64).to(dtype)
    return t, codec


def tensor_lists(n: int):
    return st.lists(tensors(), min_size=n, max_size=n)


@st.composite
def messages(draw) -> tuple[str, dict, list[tuple[torch.Tensor, str]]]:
    kind = draw(st.sampled_from(["forward", "backward", "ack", "error", "info_request", "info", "spec_request", "spec", "state_manifest_request", "state_chunk"]))
    if kind == "forward":
        fields = {
            "mb_id": draw(st.binary(min_size=16, max_size=16)),
            "stage": draw(stage),
            "route": draw(st.lists(st.text(max_size=128), max_size=64)),
            "deadline_s": draw(st.floats(min_value=0, max_value=3600, exclude_min=True)),
        }
        ts = draw(tensor_lists(2))
    elif kind == "backward":
        fields = {"mb_id": draw(st.binary(min_size=16, max_size=16)), "stage": draw(stage), "loss": draw(finite)}
        ts = draw(tensor_lists(1))
    elif kind == "ack":
        fields = draw(st.fixed_dictionaries({}, optional={"queue_depth": int64}))
        ts = []
    elif kind == "error":
        fields = {"reason": draw(st.sampled_from(REJECT_REASONS)), "message": draw(st.text(max_size=MAX_ERROR_CHARS))}
        ts = []
    elif kind == "info":
        fields = {
            "run_id": draw(st.text(max_size=128)),
            "peer_id": draw(st.text(max_size=128)),
            "stage": draw(st.none() | stage),
            "inner_step": draw(int64),
            "protocol": draw(int64),
        }
        ts = []
    elif kind == "spec":
        fields, ts = {"record": draw(st.binary(max_size=2048))}, []
    elif kind == "state_manifest_request":
        fields, ts = {"stage": draw(stage)}, []
    elif kind == "state_chunk":
        fields = {"session": draw(st.binary(min_size=16, max_size=16)), "index": draw(st.integers(0, (1 << 16) - 1))}
        ts = draw(tensor_lists(draw(st.integers(1, 6))))
    else:  # info_request, spec_request
        fields, ts = {}, []
    return kind, fields, ts


def encode(kind, fields, ts) -> bytes:
    return encode_message(kind, fields, [encode_tensor(t, codec) for t, codec in ts])


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=20,
)


# ---------------------------------------------------------------- round trips


@FAST
@given(messages())
def test_round_trip_every_kind(msg):
    kind, fields, ts = msg
    data = encode(kind, fields, ts)
    out = decode_message(data)
    assert out.kind == kind
    assert out.fields == fields
    assert len(out.tensors) == len(ts)
    for got, (want, codec) in zip(out.tensors, ts):
        assert got.dtype == want.dtype and got.shape == want.shape
        expected = want.to(torch.float16).to(want.dtype) if codec == "fp16" else want
        assert torch.equal(got, expected)
    assert decode_message(data, expected_kinds=[kind]).kind == kind


@FAST
@given(messages())
def test_truncations_are_malformed(msg):
    data = encode(*msg)
    for cut in sorted({0, 1, 3, 4, 5, len(data) // 2, len(data) - 1}):
        if cut < len(data):
            assert reason_of(data[:cut]) == "malformed"
    assert reason_of(data + b"\x00") == "malformed"  # trailing bytes


@FAST
@given(messages(), st.data())
def test_single_byte_corruptions_never_crash(msg, data):
    raw = bytearray(encode(*msg))
    i = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    raw[i] ^= data.draw(st.integers(min_value=1, max_value=255))
    out = decode_or_reject(bytes(raw))
    assert isinstance(out, (Message, ProtocolError))


def test_every_single_byte_corruption_of_a_header_never_crashes():
    data = valid_forward()
    (hlen,) = struct.unpack_from(">I", data)
    for i in range(4 + hlen):
        for flip in (0x01, 0x80, 0xFF):
            raw = bytearray(data)
            raw[i] ^= flip
            assert isinstance(decode_or_reject(bytes(raw)), (Message, ProtocolError))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data):
    assert isinstance(decode_or_reject(data), (Message, ProtocolError))


@settings(max_examples=200, deadline=None)
@given(msgpack_values, st.binary(max_size=40))
def test_random_msgpack_headers_never_crash(value, body):
    assert isinstance(decode_or_reject(frame(value, [body])), (Message, ProtocolError))


@settings(max_examples=200, deadline=None)
@given(msgpack_values)
def test_random_fields_are_malformed_or_valid(value):
    out = decode_or_reject(frame(header("state_manifest_request", value)))
    assert isinstance(out, Message) or out.reason == "malformed"


@settings(max_examples=200, deadline=None)
@given(msgpack_values)
def test_random_tensor_metas_never_crash(meta):
    data = frame(header("backward", {"mb_id": MB, "stage": 0, "loss": 1.0}, [meta], [4]), [b"\0\0\0\0"])
    assert isinstance(decode_or_reject(data), (Message, ProtocolError))


@settings(max_examples=100, deadline=None)
@given(st.lists(msgpack_values, max_size=3), st.lists(st.integers(min_value=-5, max_value=50), max_size=3), st.binary(max_size=50))
def test_random_tensor_lists_and_sizes_never_crash(metas, sizes, body):
    data = frame(header("backward", {"mb_id": MB, "stage": 0, "loss": 1.0}, metas, sizes), [body])
    assert isinstance(decode_or_reject(data), (Message, ProtocolError))


# ---------------------------------------------------------------- header-level rejections with exact reasons


@pytest.mark.parametrize("v", [0, 2, -1, 1 << 40])
def test_wrong_version(v):
    assert reason_of(frame(header("ack", {}, v=v))) == "version"
    # a future version may change anything else: the version is checked first
    assert reason_of(frame({"v": v, "kind": "whatever", "new": 1})) == "version"


@pytest.mark.parametrize("v", [None, True, "1", 1.0, [1]])
def test_missing_or_mistyped_version_is_malformed(v):
    assert reason_of(frame(header("ack", {}, v=v))) == "malformed"
    h = header("ack", {})
    del h["v"]
    assert reason_of(frame(h)) == "malformed"


def test_header_shape_errors_are_malformed():
    assert reason_of(frame([1, "ack", {}, [], []])) == "malformed"
    assert reason_of(frame("ack")) == "malformed"
    assert reason_of(frame({**header("ack", {}), "extra": 1})) == "malformed"
    h = header("ack", {})
    del h["sizes"]
    assert reason_of(frame(h)) == "malformed"
    assert reason_of(frame({**header("ack", {}), "tensors": {}})) == "malformed"
    assert reason_of(frame({**header("ack", {}), "sizes": "0"})) == "malformed"


@pytest.mark.parametrize("kind", ["nope", "", 3, None, ["ack"], {"k": 1}, b"ack"])
def test_unknown_kind(kind):
    assert reason_of(frame(header(kind, {}))) == "malformed"


def test_unexpected_kind():
    data = encode_message("ack", {})
    assert reason_of(data, expected_kinds={"forward"}) == "malformed"
    assert decode_message(data, expected_kinds=("ack", "forward")).kind == "ack"
    with pytest.raises(ValueError):  # a caller bug, not the peer's
        decode_message(data, expected_kinds=["no-such-kind"])


def test_unknown_and_mistyped_fields():
    assert reason_of(frame(header("ack", {"queue_depth": 1, "x": 2}))) == "malformed"
    assert reason_of(frame(header("ack", {"queue_depth": "1"}))) == "malformed"
    assert reason_of(frame(header("ack", [1]))) == "malformed"
    assert reason_of(frame(header("state_manifest_request", {"stage": 1.5}))) == "malformed"
    assert reason_of(frame(header("state_manifest_request", {}))) == "malformed"
    good = {"mb_id": MB, "stage": 1, "route": [], "deadline_s": 1.0}
    metas, payloads = zip(*[(t.meta, t.payload) for t in T2])
    sizes = [len(p) for p in payloads]
    assert decode_message(frame(header("forward", good, metas, sizes), payloads)).kind == "forward"
    for bad in ({"mb_id": MB.hex()}, {"stage": "1"}, {"route": "a"}, {"deadline_s": None}, {"deadline_s": float("nan")}):
        assert reason_of(frame(header("forward", {**good, **bad}, metas, sizes), payloads)) == "malformed"


def test_msgpack_level_garbage_is_malformed():
    ok = msgpack.packb(header("ack", {}))
    # trailing bytes inside the announced header
    assert reason_of(struct.pack(">I", len(ok) + 1) + ok + b"\xc0") == "malformed"
    # an ext type (timestamp)
    assert reason_of(frame({**header("ack", {}), "fields": {"queue_depth": msgpack.Timestamp(1)}})) == "malformed"
    # invalid UTF-8 in a str
    bad_utf8 = ok.replace(b"\xa3ack", b"\xa3\xff\xfe\xfd")
    assert bad_utf8 != ok
    assert reason_of(struct.pack(">I", len(bad_utf8)) + bad_utf8) == "malformed"
    # non-string map keys
    assert reason_of(frame({1: 2, "v": 1})) == "malformed"
    # deep nesting
    deep = b"\x91" * 5000 + b"\xc0"
    assert reason_of(struct.pack(">I", len(deep)) + deep) == "malformed"
    # reserved byte 0xc1
    assert reason_of(struct.pack(">I", 1) + b"\xc1") == "malformed"
    # empty header
    assert reason_of(struct.pack(">I", 0)) == "malformed"


def test_container_length_bombs_are_rejected_without_allocating():
    # an array header announcing 2**32-1 items in a few bytes
    bomb = b"\xdd\xff\xff\xff\xff"
    assert reason_of(struct.pack(">I", len(bomb)) + bomb) == "malformed"
    bomb = b"\xdf\xff\xff\xff\xff"
    assert reason_of(struct.pack(">I", len(bomb)) + bomb) == "malformed"
    bomb = b"\xdb\xff\xff\xff\xff"
    assert reason_of(struct.pack(">I", len(bomb)) + bomb) == "malformed"


# ---------------------------------------------------------------- sizes and tensors


def test_size_mismatch_is_malformed():
    good = {"mb_id": MB, "stage": 0, "loss": 1.0}
    meta, payload = raw_tensor([1.0, 2.0])
    ok = frame(header("backward", good, [meta], [8]), [payload])
    assert decode_message(ok).tensors[0].tolist() == [1.0, 2.0]
    assert reason_of(frame(header("backward", good, [meta], [9]), [payload])) == "malformed"
    assert reason_of(frame(header("backward", good, [meta], [7]), [payload])) == "malformed"
    assert reason_of(frame(header("backward", good, [meta], []), [payload])) == "malformed"
    assert reason_of(frame(header("backward", good, [meta], [8, 0]), [payload])) == "malformed"
    assert reason_of(frame(header("backward", good, [meta], [-8]), [payload])) == "malformed"
    assert reason_of(frame(header("backward", good, [meta], [True]), [payload])) == "malformed"
    assert reason_of(frame(header("backward", good, [meta], ["8"]), [payload])) == "malformed"
    # sizes agree with the data but not with the shape: the codec says "shape"
    assert reason_of(frame(header("backward", good, [meta], [4]), [payload[:4]])) == "shape"


def test_header_length_past_the_data_is_malformed():
    data = encode_message("ack", {})
    (hlen,) = struct.unpack_from(">I", data)
    assert reason_of(struct.pack(">I", hlen + 10) + data[4:]) == "malformed"


def test_oversize_message():
    data = valid_forward()
    assert reason_of(data, Limits(max_message_bytes=len(data) - 1)) == "oversize"
    assert decode_message(data, Limits(max_message_bytes=len(data))).kind == "forward"


def test_oversize_header_is_rejected_before_parsing():
    # a header length over every cap, with nothing behind it: "oversize", not "malformed"
    assert reason_of(struct.pack(">I", 0xFFFFFFFF) + b"\x80") == "oversize"
    data = valid_forward()
    (hlen,) = struct.unpack_from(">I", data)
    assert reason_of(data, Limits(max_header_bytes=hlen - 1), expected_kinds=["forward"]) == "oversize"
    # without expected_kinds the per-kind cap still applies once the kind is known
    assert reason_of(data, Limits(max_header_bytes=hlen - 1)) == "oversize"
    assert decode_message(data, Limits(max_header_bytes=hlen)).kind == "forward"


def test_a_state_manifest_has_its_own_header_cap():
    n = 100
    fields = {"stage": 0, "session": bytes(16), "inner_step": 3, "chunk_bytes": 1 << 24,
              "names": [f"layer{i}.weight" for i in range(n)], "shapes": [[2]] * n, "dtypes": ["float32"] * n,
              "digests": [bytes(16)] * 4}
    data = encode_message("state_manifest", fields, [])
    (hlen,) = struct.unpack_from(">I", data)
    small = Limits(max_header_bytes=hlen // 2)
    assert decode_message(data, small).fields["names"] == fields["names"]
    # the same limits reject the same bulk in another kind
    assert reason_of(data, small, expected_kinds=["forward", "ack"]) == "oversize"


def test_too_many_tensors():
    meta, payload = raw_tensor([1.0])
    good = {"mb_id": MB, "stage": 0, "loss": 1.0}
    n = 65
    assert reason_of(frame(header("backward", good, [meta] * n, [4] * n), [payload] * n)) == "oversize"
    assert reason_of(frame(header("backward", good, [meta] * 2, [4] * 2), [payload] * 2)) == "malformed"
    assert reason_of(frame(header("backward", good, [], []))) == "malformed"


def test_oversize_tensor():
    data = encode_message("backward", {"mb_id": MB, "stage": 0, "loss": 0.0}, [encode_tensor(torch.zeros(11))])
    assert reason_of(data, Limits(max_tensor_elements=10)) == "oversize"
    assert decode_message(data, Limits(max_tensor_elements=11)).tensors[0].shape == (11,)
    # a huge announced shape with a tiny payload is refused before any allocation
    meta = {"dtype": "float32", "shape": [1 << 30, 1 << 30], "codec": "none"}
    assert reason_of(frame(header("backward", {"mb_id": MB, "stage": 0, "loss": 0.0}, [meta], [4]), [b"\0" * 4])) == "oversize"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_nonfinite_tensors(bad, dtype):
    meta, payload = raw_tensor([1.0, bad, 2.0], dtype)
    data = frame(header("backward", {"mb_id": MB, "stage": 0, "loss": 0.0}, [meta], [len(payload)]), [payload])
    assert reason_of(data) == "nonfinite"
    fp16 = {**meta, "dtype": "float32", "codec": "fp16"}
    p16 = np.asarray([1.0, bad, 2.0], dtype=np.float16).tobytes()
    data = frame(header("backward", {"mb_id": MB, "stage": 0, "loss": 0.0}, [fp16], [len(p16)]), [p16])
    assert reason_of(data) == "nonfinite"


@pytest.mark.parametrize(
    "meta,reason",
    [
        ({"dtype": "float64", "shape": [1], "codec": "none"}, "dtype"),
        ({"dtype": "float32", "shape": [1], "codec": "zip"}, "codec"),
        ({"dtype": "int32", "shape": [2], "codec": "fp16"}, "codec"),
        ({"dtype": "float32", "shape": [3], "codec": "none"}, "shape"),
        ({"dtype": "float32", "shape": [-1], "codec": "none"}, "shape"),
        ({"dtype": "float32", "shape": "1", "codec": "none"}, "shape"),
        ({"dtype": "float32", "shape": [1] * 9, "codec": "none"}, "shape"),
        ({"dtype": "float32", "shape": [1]}, "malformed"),
        ([1, 2], "malformed"),
    ],
)
def test_bad_tensor_meta_reasons(meta, reason):
    data = frame(header("backward", {"mb_id": MB, "stage": 0, "loss": 0.0}, [meta], [8]), [b"\0" * 8])
    assert reason_of(data) == reason


@pytest.mark.parametrize(
    "meta,size",
    [
        ({"dtype": ["float32"], "shape": [2], "codec": "none"}, 8),  # unhashable dtype
        ({"dtype": {"a": 1}, "shape": [2], "codec": "none"}, 8),
        ({"dtype": "float32", "shape": [0, 1 << 63], "codec": "none"}, 0),  # zero elements, a dim past int64
        ({"dtype": "float32", "shape": [0, (1 << 64) - 1], "codec": "none"}, 0),
        ({"dtype": "float32", "shape": [0, 1 << 62, 1 << 62], "codec": "none"}, 0),  # product past int64
        ({"dtype": "float32", "shape": [True, 2], "codec": "none"}, 8),
    ],
)
def test_hostile_tensor_meta_is_a_protocol_error(meta, size):
    data = frame(header("backward", {"mb_id": MB, "stage": 0, "loss": 0.0}, [meta], [size]), [b"\0" * size])
    assert isinstance(decode_or_reject(data), ProtocolError)


def test_quantized_codec_round_trip_when_available():
    if "int8" not in CODECS:
        pytest.skip("codec layer has no int8 codec yet")
    t = torch.randn(3, 70)
    enc = encode_tensor(t, "int8", block_size=64)
    data = encode_message("backward", {"mb_id": MB, "stage": 0, "loss": 0.5}, [enc])
    got = decode_message(data).tensors[0]
    assert got.shape == t.shape and got.dtype == t.dtype
    assert torch.allclose(got, t, atol=float(t.abs().max()) / 100)


# ---------------------------------------------------------------- errors and replies


@pytest.mark.parametrize("reason", REJECT_REASONS)
def test_error_message_round_trip(reason):
    msg = decode_message(error_message(ProtocolError(reason, "why")))
    assert msg == Message("error", {"reason": reason, "message": "why"}, [])
    with pytest.raises(RemoteError) as info:
        raise_for_error(msg)
    assert (info.value.reason, info.value.message) == (reason, "why")
    assert not isinstance(info.value, ProtocolError)


def test_error_message_truncates_long_text():
    msg = decode_message(error_message(ProtocolError("malformed", "x" * 10_000)))
    assert msg.fields["message"] == "x" * MAX_ERROR_CHARS


def test_error_with_unknown_reason_is_malformed():
    assert reason_of(frame(header("error", {"reason": "teapot", "message": "hi"}))) == "malformed"
    assert reason_of(frame(header("error", {"reason": "busy", "message": "x" * (MAX_ERROR_CHARS + 1)}))) == "malformed"


def test_decode_reply():
    ack = encode_message("ack", {"queue_depth": 2})
    assert decode_reply(ack, expected_kinds=["ack"]).fields == {"queue_depth": 2}
    assert raise_for_error(decode_message(ack)).kind == "ack"
    with pytest.raises(RemoteError) as info:
        decode_reply(error_message(ProtocolError("busy", "full")), expected_kinds=["ack"])
    assert info.value.reason == "busy"
    with pytest.raises(ProtocolError):  # garbage is still a ProtocolError, not a RemoteError
        decode_reply(b"\0\0\0\1\xc1", expected_kinds=["ack"])
    with pytest.raises(ProtocolError):
        decode_reply(encode_message("info_request", {}), expected_kinds=["ack"])


def test_encode_refuses_invalid_messages():
    with pytest.raises(ValueError):
        encode_message("forward", {"mb_id": b"short", "stage": 0, "route": [], "deadline_s": 1.0}, T2)
    with pytest.raises(ValueError):
        encode_message("ack", {}, T2)
    with pytest.raises(ValueError):
        encode_message("nope", {})


# ---------------------------------------------------------------- stream helpers


def _reader(*chunks: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for c in chunks:
        reader.feed_data(c)
    if eof:
        reader.feed_eof()
    return reader


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=4), st.integers(min_value=1, max_value=50))
def test_read_frames_in_arbitrary_chunks(frames, chunk):
    async def main():
        wire = b"".join(struct.pack(">Q", len(f)) + f for f in frames)
        reader = asyncio.StreamReader()
        for i in range(0, len(wire), chunk):
            reader.feed_data(wire[i : i + chunk])
        reader.feed_eof()
        got = [await read_frame(reader, 300) for _ in frames]
        assert got == frames
        with pytest.raises(ProtocolError) as info:  # clean EOF where a frame should start
            await read_frame(reader, 300)
        assert info.value.reason == "malformed"

    asyncio.run(main())


def test_read_frame_rejects_oversize_before_reading_the_body():
    async def main():
        # no EOF and no body: if read_frame tried to read the body it would hang
        body_start = b"next-bytes"
        reader = _reader(struct.pack(">Q", 1 << 40) + body_start, eof=False)
        with pytest.raises(ProtocolError) as info:
            await asyncio.wait_for(read_frame(reader, 1 << 20), timeout=2)
        assert info.value.reason == "oversize"
        assert await reader.readexactly(len(body_start)) == body_start  # nothing past the prefix was consumed

        reader = _reader(struct.pack(">Q", 11) + b"x" * 11)
        with pytest.raises(ProtocolError) as info:
            await read_frame(reader, 10)
        assert info.value.reason == "oversize"
        assert await read_frame(_reader(struct.pack(">Q", 10) + b"x" * 10), 10) == b"x" * 10

    asyncio.run(main())


@pytest.mark.parametrize("data", [b"", b"\0\0\0", struct.pack(">Q", 5) + b"abc", struct.pack(">Q", 1)])
def test_read_frame_early_eof_is_malformed(data):
    async def main():
        with pytest.raises(ProtocolError) as info:
            await read_frame(_reader(data), 100)
        assert info.value.reason == "malformed"

    asyncio.run(main())


def test_write_frame_then_read_frame_over_a_socket():
    async def main():
        a, b = socket.socketpair()
        reader, w_a = await asyncio.open_connection(sock=a)
        _, writer = await asyncio.open_connection(sock=b)
        msgs = [valid_forward(), encode_message("ack", {}), b""]
        for m in msgs:
            await write_frame(writer, m)
        writer.close()
        await writer.wait_closed()
        got = [await read_frame(reader, 1 << 20) for _ in msgs]
        assert got == msgs
        assert decode_message(got[0]).kind == "forward"
        with pytest.raises(ProtocolError):
            await read_frame(reader, 1 << 20)
        w_a.close()
        await w_a.wait_closed()

    asyncio.run(main())
