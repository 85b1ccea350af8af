"""Run spec: TOML parsing with clear errors, signing by the seed's libp2p key, verification by joiners."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from swarmd.daemon.identity import NodeIdentity
from swarmd.daemon.records import Heartbeat, decode_heartbeat
from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec, SpecError, sign_spec, verify_spec_record


def test_default_spec_loads_and_round_trips() -> None:
    spec = RunSpec.load(DEFAULT_SPEC_PATH)
    assert spec.run_id == "demo" and spec.pipeline.stages == 2
    assert RunSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "text, message",
    [
        ("[run]\nseed = 1\n", "needs an id"),
        ('[run]\nid = "x"\n[bogus]\n', "unknown section"),
        ('[run]\nid = "x"\n[pipeline]\nstagez = 2\n', "unknown key"),
        ('[run]\nid = "x"\n[pipeline]\nstages = 9\n', "pipeline.stages"),
        ('[run]\nid = "x"\n[pipeline]\nmicrobatch_size = "8"\n', "should be a int"),
        ('[run]\nid = "x"\n[compression]\nactivations = "zip"\n', "known codecs"),
        ('[run]\nid = "x"\n[optimizer]\nprecision = "fp8"\n', "optimizer.precision"),
        ('[run]\nid = "x"\n[model]\ndim = 130\nn_heads = 4\n', "[model]"),
        ('[run]\nid = "bad id!"\n', "run.id"),
        ('[run]\nid = "x"\n[data]\nsource = "files"\n', "data.paths"),
        ("[run\n", "run.toml"),
    ],
)
def test_bad_specs_get_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace(".", r"\.")):
        RunSpec.load(path)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        RunSpec.load(tmp_path / "nope.toml")


def test_signed_spec_verifies_only_for_the_trusted_seed(tmp_path: Path) -> None:
    seed = NodeIdentity.load_or_create(tmp_path / "seed")
    other = NodeIdentity.load_or_create(tmp_path / "other")
    spec = RunSpec.load(DEFAULT_SPEC_PATH)
    record = sign_spec(spec, seed)
    assert verify_spec_record(record, {seed.peer_id}) == (spec, seed.peer_id)
    with pytest.raises(SpecError, match="not the seed"):
        verify_spec_record(record, {other.peer_id})
    # a tampered body fails the signature check
    outer = msgpack.unpackb(record)
    body = msgpack.unpackb(outer["spec"])
    body["optimizer"]["lr"] = 1.0
    outer["spec"] = msgpack.packb(body)
    with pytest.raises(SpecError, match="signature is invalid"):
        verify_spec_record(msgpack.packb(outer), {seed.peer_id})
    # someone else's key with the seed's claimed identity does not pass either
    forged = sign_spec(spec, other)
    with pytest.raises(SpecError, match="not the seed"):
        verify_spec_record(forged, {seed.peer_id})
    for junk in (b"", b"\xc1", msgpack.packb({"spec": 1})):
        with pytest.raises(SpecError, match="malformed"):
            verify_spec_record(junk, None)


def test_identity_is_stable_across_loads(tmp_path: Path) -> None:
    assert NodeIdentity.load_or_create(tmp_path).peer_id == NodeIdentity.load_or_create(tmp_path).peer_id


def test_heartbeat_records_validate() -> None:
    beat = Heartbeat(throughput=12.5, queue_depth=1, inner_step=3, samples=24, maddrs=("/ip4/127.0.0.1/tcp/1",))
    assert decode_heartbeat(beat.encode()) == beat
    bad = [
        b"junk", b"\xc1", msgpack.packb({"tput": float("nan"), "queue": 0, "step": 0, "samples": 0, "maddrs": []}),
        msgpack.packb({"tput": 1.0, "queue": -1, "step": 0, "samples": 0, "maddrs": []}),
        msgpack.packb({"tput": 1.0, "queue": 0, "step": 0, "samples": 0, "maddrs": [1]}),
        b"\x00" * 20000, 12345, None,
    ]
    for value in bad:
        assert decode_heartbeat(value) is None
