"""A live node (real process, real p2pd) under hostile input: every bad message gets a clear error
reply with the right reason, is counted in swarmd_rejected_messages_total, and the node keeps serving.
Also: `swarmd status` against it, and its /metrics through promtool."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hostile_member import member
from swarm_harness import swarm, write_spec
from swarmd.protocols import rpc
from swarmd.protocols.codecs import encode_tensor
from swarmd.protocols.wire import decode_reply, encode_message, read_frame, write_frame

pytestmark = pytest.mark.slow

MB_ID = b"\x01" * 16


def raw_message(header: dict, payloads: list[bytes] = ()) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed + b"".join(payloads)


def forward_header(meta_acts: dict, meta_targets: dict, sizes: list[int], route: list[str], stage: int = 1) -> dict:
    return {"v": 1, "kind": "forward", "tensors": [meta_acts, meta_targets], "sizes": sizes,
            "fields": {"mb_id": MB_ID, "stage": stage, "route": route, "deadline_s": 10.0}}


async def exchange(p2p: P2P, peer: str, name: str, data: bytes, announce: int | None = None) -> str:
    """Send one request; return the error reason of the reply ('ok' for a non-error reply)."""
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), name)
    try:
        if announce is not None:  # a length prefix promising far more than the limit
            writer.write(struct.pack(">Q", announce))
            await writer.drain()
        else:
            await write_frame(writer, data)
        reply = await read_frame(reader, 1 << 30)
    finally:
        writer.close()
    try:
        decode_reply(reply)
    except Exception as e:  # RemoteError: what we want to see
        return getattr(e, "reason", repr(e))
    return "ok"


async def attack(maddr: str, peer: str, identity_dir: Path) -> dict[str, str]:
    async with member(maddr, "test", 2, 0, identity_dir) as p2p:  # a member: its requests get past the door
        return await _attack(p2p, peer)


async def _attack(p2p: P2P, peer: str) -> dict[str, str]:
    me = p2p.peer_id.to_base58()
    good = torch.randn(8, 32, 64)
    acts = encode_tensor(good, "none")
    targets = encode_tensor(torch.randint(0, 256, (8, 32)), "none")
    nan = good.clone()
    nan[0, 0, 0] = float("nan")
    nan_payload = nan.numpy().tobytes()
    results = {}
    # a plausible header length, then bytes msgpack never uses (0xc1)
    results["garbage"] = await exchange(p2p, peer, rpc.FORWARD, struct.pack(">I", 16) + b"\xc1" * 16)
    results["version"] = await exchange(p2p, peer, rpc.FORWARD, raw_message(
        {**forward_header(acts.meta, targets.meta, [len(acts.payload), len(targets.payload)], [me]), "v": 99},
        [acts.payload, targets.payload]))
    results["nonfinite"] = await exchange(p2p, peer, rpc.FORWARD, raw_message(
        forward_header(acts.meta, targets.meta, [len(nan_payload), len(targets.payload)], [me]),
        [nan_payload, targets.payload]))
    wrong_shape = encode_tensor(torch.randn(8, 32, 65), "none")
    results["shape"] = await exchange(p2p, peer, rpc.FORWARD, encode_message(
        "forward", {"mb_id": MB_ID, "stage": 1, "route": [me], "deadline_s": 10.0}, [wrong_shape, targets]))
    wrong_dtype = encode_tensor(torch.randn(8, 32, 64, dtype=torch.float16), "none")
    results["dtype"] = await exchange(p2p, peer, rpc.FORWARD, encode_message(
        "forward", {"mb_id": MB_ID, "stage": 1, "route": [me], "deadline_s": 10.0}, [wrong_dtype, targets]))
    results["wrong_stage"] = await exchange(p2p, peer, rpc.FORWARD, encode_message(
        "forward", {"mb_id": MB_ID, "stage": 0, "route": [me], "deadline_s": 10.0}, [acts, targets]))
    results["unknown_peer"] = await exchange(p2p, peer, rpc.FORWARD, encode_message(
        "forward", {"mb_id": MB_ID, "stage": 1, "route": ["someone-else"], "deadline_s": 10.0}, [acts, targets]))
    results["unknown_microbatch"] = await exchange(p2p, peer, rpc.BACKWARD, encode_message(
        "backward", {"mb_id": MB_ID, "stage": 1, "loss": 1.0}, [acts]))
    # an evaluation loss for a microbatch the node never sent (ids are secrets of their driver)
    results["eval_unknown"] = await exchange(p2p, peer, rpc.EVAL_RESULT, encode_message(
        "eval_result", {"mb_id": MB_ID, "loss": 1.0}))
    results["eval_nan"] = await exchange(p2p, peer, rpc.EVAL_RESULT, raw_message(
        {"v": 1, "kind": "eval_result", "tensors": [], "sizes": [], "fields": {"mb_id": MB_ID, "loss": float("nan")}}))
    results["oversize"] = await exchange(p2p, peer, rpc.FORWARD, b"", announce=1 << 40)
    results["codec"] = await exchange(p2p, peer, rpc.FORWARD, raw_message(
        forward_header({**acts.meta, "codec": "zip"}, targets.meta, [len(acts.payload), len(targets.payload)],
                       [me]), [acts.payload, targets.payload]))
    # after all that, a well-formed request is still served
    reply = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), rpc.INFO)
    _, reader, writer = reply
    await write_frame(writer, encode_message("info_request", {}))
    info = decode_reply(await read_frame(reader, 1 << 20), expected_kinds=("info",))
    writer.close()
    results["info_after"] = f"{info.fields['run_id']}:{info.fields['stage']}"
    return results


def test_bad_input_is_rejected_counted_and_survived(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    spec = write_spec(tmp_path / "run.toml")
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--stage", "1")  # a seed that serves stage 1: it accepts forward hops
        peer = s.ready["seed"]["peer_id"]
        results = asyncio.run(attack(s.seed_addr, peer, tmp_path / "attacker"))
        expected = {
            "garbage": "malformed", "version": "version", "nonfinite": "nonfinite", "shape": "shape",
            "dtype": "dtype", "wrong_stage": "wrong_stage", "unknown_peer": "unknown_peer",
            "unknown_microbatch": "unknown_microbatch", "oversize": "oversize", "codec": "codec",
            "eval_unknown": "unknown_microbatch", "eval_nan": "malformed",
            "info_after": "test:1",
        }
        assert results == expected
        metrics = s.metrics("seed")
        for reason in set(expected.values()) - {"test:1"}:
            assert metrics[f'swarmd_rejected_messages_total{{reason="{reason}"}}'] >= 1, reason
        assert s.child("seed").process.poll() is None, "the node must keep running"

        # an operator's view of the same swarm
        status = subprocess.run(
            [sys.executable, "-m", "swarmd.daemon.cli", "status", s.seed_addr], env=swarm_env,
            capture_output=True, text=True, timeout=120,
        )
        assert status.returncode == 0, status.stderr
        assert "run 'test': 2 stage(s)" in status.stdout
        assert "stage 1: 1 peer(s)" in status.stdout and peer in status.stdout

        promtool = shutil.which("promtool")
        if promtool is None:
            if os.environ.get("CI"):
                pytest.fail("promtool is required in CI (apt-get install prometheus)")
            pytest.skip("promtool not installed")
        check = subprocess.run([promtool, "check", "metrics"], input=s.metrics_text("seed"),
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
