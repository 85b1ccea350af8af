"""Bounded resources as pure rules: request size caps per RPC, read deadlines, per-peer rate limits, tables
that forget, the activation magnitude bound and the spec field behind it."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
import torch
from swarmd.daemon.rate_limit import PeerRateLimiter
from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec, SpecError
from swarmd.protocols import rpc
from swarmd.protocols.codecs import encode_tensor
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import DEFAULT_LIMITS, Limits, RunShape, request_frame_caps
from swarmd.protocols.messages import (
    INT64_MAX, KINDS, MAX_DIALBACK_MADDRS, MAX_MADDR_CHARS, MAX_OUTER_CHUNKS, MAX_STAGE, MAX_STATE_CHUNKS,
)
from swarmd.protocols.wire import encode_message, read_frame
from swarmd.swarm.routing import BanList
from swarmd.swarm.stage import check_magnitude

SHAPE = RunShape(microbatch_size=8, seq_len=32, dim=64, chunk_elements=4096)
MB = b"m" * 16
SESSION = b"s" * 16


# ---------------------------------------------------------------- request size caps


def test_requests_without_tensors_get_the_small_cap_and_the_largest_valid_one_fits():
    caps = request_frame_caps(DEFAULT_LIMITS, SHAPE)
    assert set(caps) == set(rpc.ALL_RPCS)
    for name, spec in rpc.RPCS.items():
        carries_tensors = KINDS[spec.request_kind].max_tensors > 0
        assert (caps[name] == DEFAULT_LIMITS.max_small_request_bytes) != carries_tensors, name
    largest = {  # every field at its widest
        rpc.EVAL_RESULT: encode_message("eval_result", {"mb_id": MB, "loss": 1e4 - 0.5}),
        rpc.INFO: encode_message("info_request", {}),
        rpc.SPEC: encode_message("spec_request", {}),
        rpc.STATE_MANIFEST: encode_message("state_manifest_request", {"stage": MAX_STAGE}),
        rpc.STATE_CHUNK: encode_message("state_chunk_request", {"session": SESSION, "index": MAX_STATE_CHUNKS - 1}),
        rpc.PAIR: encode_message("pair_request", {"session": SESSION, "stage": MAX_STAGE, "numel": INT64_MAX}),
        rpc.OUTER_COMMIT: encode_message("outer_commit", {"session": SESSION, "verdict": "reject"}),
        rpc.DIALBACK: encode_message("dialback_request", {"maddrs": ["m" * MAX_MADDR_CHARS] * MAX_DIALBACK_MADDRS}),
    }
    for name, message in largest.items():
        assert len(message) <= caps[name], name


def test_tensor_requests_fit_the_run_shape_and_no_more():
    limits = DEFAULT_LIMITS
    caps = request_frame_caps(limits, SHAPE)
    batch = limits.max_batch(SHAPE.microbatch_size)
    route = ["x" * 52] * 64  # the longest route the schema allows

    def forward(n: int) -> bytes:
        acts = encode_tensor(torch.randn(n, SHAPE.seq_len, SHAPE.dim), "none")  # float32: the widest codec output
        targets = encode_tensor(torch.zeros(n, SHAPE.seq_len, dtype=torch.int64), "none")
        return encode_message("forward", {"mb_id": MB, "stage": 1, "route": route, "deadline_s": 1.0}, [acts, targets])

    def backward(n: int) -> bytes:
        grad = encode_tensor(torch.randn(n, SHAPE.seq_len, SHAPE.dim), "none")
        return encode_message("backward", {"mb_id": MB, "stage": 1, "loss": 1.0}, [grad])

    def chunk(n: int) -> bytes:
        tensors = [encode_tensor(torch.randn(n), "none") for _ in range(2)]
        return encode_message("outer_chunk", {"session": SESSION, "index": 0, "count": MAX_OUTER_CHUNKS,
                                              "numel": INT64_MAX}, tensors)

    for name, build, n in ((rpc.FORWARD, forward, batch), (rpc.BACKWARD, backward, batch),
                           (rpc.OUTER_CHUNK, chunk, SHAPE.chunk_elements)):
        legit = len(build(n))
        assert legit <= caps[name] <= legit + 4 + limits.max_header_bytes, name  # slack: the header allowance
    # before the run is known, only the message cap bounds them
    assert request_frame_caps(limits)[rpc.FORWARD] == limits.max_message_bytes
    huge = RunShape(microbatch_size=4096, seq_len=8192, dim=8192, chunk_elements=1 << 24)
    assert max(request_frame_caps(limits, huge).values()) == limits.max_message_bytes


def test_batch_margin_and_frame_deadlines():
    limits = Limits(batch_margin=0.25, min_frame_s=10.0, min_bytes_per_s=1000.0)
    assert [limits.max_batch(n) for n in (1, 4, 8, 100)] == [1, 5, 10, 125]
    assert limits.frame_deadline_s(0) == limits.frame_deadline_s(10_000) == 10.0  # the floor
    assert limits.frame_deadline_s(50_000) == 50.0  # then by size


# ---------------------------------------------------------------- read deadlines

QUICK = Limits(idle_stream_s=0.2, min_frame_s=0.3, min_bytes_per_s=1e9)


def _stalled_after(feed) -> float:
    """Seconds until read_frame under QUICK gives up on a stream that ``feed(reader)`` writes to."""

    async def main() -> float:
        reader = asyncio.StreamReader()
        feeder = asyncio.ensure_future(feed(reader))
        start = time.monotonic()
        try:
            with pytest.raises(ProtocolError) as info:
                await read_frame(reader, 1 << 20, QUICK)
        finally:
            feeder.cancel()
        assert info.value.reason == "stalled"
        return time.monotonic() - start

    return asyncio.run(main())


async def _nothing(reader: asyncio.StreamReader) -> None:
    await asyncio.sleep(60)


async def _trickled_prefix(reader: asyncio.StreamReader) -> None:
    for byte in struct.pack(">Q", 100):
        reader.feed_data(bytes([byte]))
        await asyncio.sleep(0.05)  # 8 bytes in 0.4 s: later than the 0.2 s idle deadline


async def _trickled_body(reader: asyncio.StreamReader) -> None:
    reader.feed_data(struct.pack(">Q", 100))
    while True:
        reader.feed_data(b"x")
        await asyncio.sleep(0.02)  # 100 bytes in 2 s: later than the 0.3 s frame deadline


@pytest.mark.parametrize("feed, deadline", [(_nothing, 0.2), (_trickled_prefix, 0.2), (_trickled_body, 0.3)])
def test_idle_and_trickling_streams_are_cut_off_at_their_deadline(feed, deadline):
    assert deadline - 0.05 <= _stalled_after(feed) < deadline + 0.5


def test_a_frame_within_its_deadlines_is_read():
    async def main() -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack(">Q", 3) + b"abc")
        return await read_frame(reader, 10, QUICK)

    assert asyncio.run(main()) == b"abc"


# ---------------------------------------------------------------- per-peer rate limits


def test_a_peer_gets_its_burst_then_its_rate():
    limiter = PeerRateLimiter(rate=10.0, burst=5, max_peers=100)
    assert [limiter.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("b", 0.0)  # buckets are per peer
    assert not limiter.allow("a", 0.05)  # half a token back
    assert limiter.allow("a", 0.1) and not limiter.allow("a", 0.1)  # one whole token
    assert sum(limiter.allow("a", 10.0) for _ in range(10)) == 5  # refills up to the burst, no further


def test_the_rate_table_forgets_idle_peers_and_stays_bounded():
    limiter = PeerRateLimiter(rate=10.0, burst=5, max_peers=3)
    for i in range(10):  # a crowd of fresh ids: only the 3 most recent are kept
        limiter.allow(f"sybil{i}", 0.0)
    assert len(limiter) == 3
    for _ in range(5):
        limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.0)
    assert len(limiter) == 3
    limiter.allow("b", 0.6)  # 0.6 s >= burst / rate: every other bucket is full again, and forgotten
    assert len(limiter) == 1
    assert limiter.allow("a", 0.6)


# ---------------------------------------------------------------- bans are forgotten


def test_ban_list_forgets_peers_long_after_their_ban():
    bans = BanList(base_s=1.0, max_s=60.0, forget_s=100.0)
    for i in range(50):
        bans.ban(f"p{i}", now=0.0)
    bans.ban("x", now=0.0)
    assert bans.ban("x", now=2.0) == 2.0  # backoff still doubles within the window
    assert len(bans) == 51
    bans.ban("y", now=200.0)  # a later ban sweeps out everyone whose ban ended over forget_s ago
    assert len(bans) == 1 and bans.failures("x") == 0
    assert bans.ban("x", now=201.0) == 1.0  # a forgotten peer starts from the base again


# ---------------------------------------------------------------- activation magnitude


def test_check_magnitude_refuses_absurd_values_only():
    ok = torch.randn(4, 8, 16) * 100
    check_magnitude(ok, 1e4, "activations")
    check_magnitude(torch.empty(0, 8), 1e4, "activations")
    check_magnitude(torch.full((3,), 10**9, dtype=torch.int64), 1e4, "token ids")  # not floats: not bounded here
    for bad in (3e38, -3e38, 1e5, float("nan")):
        x = ok.clone()
        x[1, 2, 3] = bad
        with pytest.raises(ValueError, match="over the bound"):
            check_magnitude(x, 1e4, "activations")


def test_max_activation_is_a_pipeline_field_with_a_sane_default():
    spec = RunSpec.load(DEFAULT_SPEC_PATH)
    assert spec.pipeline.max_activation == 1e6  # far above a trained LLM's residual stream, far below fp32 trouble
    raw = spec.to_dict()
    raw["pipeline"]["max_activation"] = 0.5
    with pytest.raises(SpecError, match="max_activation"):
        RunSpec.from_dict(raw)
    raw["pipeline"]["max_activation"] = 1e4
    assert RunSpec.from_dict(raw).pipeline.max_activation == 1e4
