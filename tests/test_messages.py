"""Message schemas: validate_fields accepts what the schema allows and answers everything else with ProtocolError."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.protocols import rpc
from swarmd.protocols.errors import REJECT_REASONS, ProtocolError
from swarmd.protocols.limits import Limits
from swarmd.protocols.messages import KINDS, MAX_STATE_TENSORS, header_cap, kind_spec, tensor_cap, validate_fields

# One valid message of every kind: (fields, tensor count).
VALID: dict[str, tuple[dict, int]] = {
    "forward": ({"mb_id": bytes(16), "stage": 3, "route": ["peerA", "peerB"], "deadline_s": 12.5, "eval": 1}, 2),
    "backward": ({"mb_id": bytes(range(16)), "stage": 0, "loss": 2.25}, 1),
    "eval_result": ({"mb_id": bytes(16), "loss": 3.5}, 0),
    "ack": ({"queue_depth": 4}, 0),
    "error": ({"reason": "busy", "message": "too many in flight"}, 0),
    "info_request": ({}, 0),
    "info": ({"run_id": "run-1", "peer_id": "12D3KooW", "stage": None, "inner_step": 7, "protocol": 1}, 0),
    "spec_request": ({}, 0),
    "dialback_request": ({"maddrs": ["/ip4/203.0.113.7/tcp/31337/p2p/12D3KooW"]}, 0),
    "dialback": ({"results": ["ok"]}, 0),
    "spec": ({"record": b"\x00signed"}, 0),
    "state_manifest_request": ({"stage": 2}, 0),
    "state_manifest": ({"stage": 2, "session": bytes(16), "inner_step": 5, "outer_step": 1, "chunk_bytes": 1 << 24,
                        "names": ["w", "b"], "shapes": [[3, 4], [4]], "dtypes": ["float32", "bfloat16"],
                        "digests": [bytes(16)]}, 0),
    "state_chunk_request": ({"session": bytes(16), "index": 3}, 0),
    "state_chunk": ({"session": bytes(16), "index": 3}, 2),
    "pair_request": ({"session": bytes(16), "stage": 1, "numel": 1000}, 0),
    "outer_chunk": ({"session": bytes(16), "index": 0, "count": 2, "numel": 1000}, 2),
    "outer_commit": ({"session": bytes(16), "verdict": "accept"}, 0),
}


def _reason(kind, fields, n, limits=Limits()) -> str:
    with pytest.raises(ProtocolError) as info:
        validate_fields(kind, fields, n, limits)
    return info.value.reason


def test_every_kind_has_a_sample():
    assert set(VALID) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_samples_pass_and_are_copied(kind):
    fields, n = VALID[kind]
    before = repr(fields)
    out = validate_fields(kind, fields, n)
    assert out == fields
    assert out is not fields
    assert repr(fields) == before  # the input is never touched


@pytest.mark.parametrize("kind", sorted(VALID))
def test_unknown_field_is_malformed(kind):
    fields, n = VALID[kind]
    assert _reason(kind, {**fields, "extra": 1}, n) == "malformed"
    assert _reason(kind, {**fields, b"bytes-key": 1}, n) == "malformed"


@pytest.mark.parametrize("kind,name", [(k, f) for k in sorted(VALID) for f in VALID[k][0] if KINDS[k].fields[f].required])
def test_missing_required_field_is_malformed(kind, name):
    fields, n = VALID[kind]
    assert _reason(kind, {k: v for k, v in fields.items() if k != name}, n) == "malformed"


def test_optional_field_may_be_absent():
    assert validate_fields("ack", {}, 0) == {}


@pytest.mark.parametrize("kind", sorted(VALID))
def test_wrong_tensor_count_is_malformed(kind):
    fields, n = VALID[kind]
    if KINDS[kind].min_tensors != KINDS[kind].max_tensors:  # a state chunk: 1 up to the cap
        assert _reason(kind, fields, KINDS[kind].min_tensors - 1) == "malformed"
        return
    assert _reason(kind, fields, n + 1) == "malformed"
    if n:
        assert _reason(kind, fields, n - 1) == "malformed"


def test_tensor_cap_is_oversize():
    limits = Limits(max_tensors_per_message=1)
    assert _reason("forward", VALID["forward"][0], 2, limits) == "oversize"
    assert tensor_cap("forward", limits) == 1
    # a state manifest lists up to MAX_STATE_TENSORS entries; a state chunk carries at most the usual cap
    names = [f"p{i}" for i in range(MAX_STATE_TENSORS)]
    manifest = {**VALID["state_manifest"][0], "names": names, "shapes": [[1]] * len(names), "dtypes": ["float32"] * len(names)}
    assert len(validate_fields("state_manifest", manifest, 0, limits)["names"]) == len(names)
    assert _reason("state_manifest", {**manifest, "names": names + ["x"]}, 0, limits) == "malformed"
    assert _reason("state_chunk", VALID["state_chunk"][0], 65) == "oversize"


def test_header_caps():
    limits = Limits(max_header_bytes=1000)
    assert header_cap("forward", limits) == 1000
    assert header_cap("state_manifest", limits) > 1000


def test_unknown_kind_and_non_map_fields():
    assert _reason("nope", {}, 0) == "malformed"
    assert _reason(["forward"], {}, 0) == "malformed"  # unhashable kind must not raise TypeError
    assert _reason("ack", [], 0) == "malformed"
    assert _reason("ack", None, 0) == "malformed"
    with pytest.raises(ProtocolError):
        kind_spec(None)


@pytest.mark.parametrize(
    "kind,name,value",
    [
        ("forward", "mb_id", bytes(15)),
        ("forward", "mb_id", bytes(17)),
        ("forward", "mb_id", "x" * 16),
        ("forward", "stage", -1),
        ("forward", "stage", 1024),
        ("forward", "stage", True),
        ("forward", "stage", 1.0),
        ("forward", "stage", None),
        ("forward", "route", ["p"] * 65),
        ("forward", "route", ["p" * 129]),
        ("forward", "route", [1]),
        ("forward", "route", "peer"),
        ("forward", "deadline_s", 0.0),
        ("forward", "deadline_s", -1.0),
        ("forward", "deadline_s", 3600.5),
        ("forward", "deadline_s", math.nan),
        ("forward", "deadline_s", math.inf),
        ("forward", "deadline_s", False),
        ("forward", "deadline_s", "1"),
        ("forward", "deadline_s", 10**400),
        ("forward", "eval", 2),
        ("forward", "eval", True),
        ("eval_result", "loss", -0.5),
        ("eval_result", "loss", 1e5),
        ("eval_result", "loss", math.nan),
        ("eval_result", "mb_id", bytes(15)),
        ("backward", "loss", math.nan),
        ("backward", "loss", -math.inf),
        ("backward", "stage", None),
        ("ack", "queue_depth", -1),
        ("ack", "queue_depth", 1 << 64),
        ("error", "reason", "teapot"),
        ("error", "reason", 3),
        ("error", "message", "x" * 2001),
        ("info", "run_id", "r" * 129),
        ("info", "stage", 2000),
        ("info", "stage", "0"),
        ("info", "inner_step", -5),
        ("info", "protocol", None),
        ("spec", "record", b"x" * (64 * 1024 + 1)),
        ("spec", "record", "text"),
        ("state_manifest_request", "stage", -3),
        ("state_manifest", "names", ["n"] * 2 + [None]),
        ("state_manifest", "names", ["n" * 257, "m"]),
        ("state_manifest", "inner_step", 1.5),
        ("state_manifest", "dtypes", ["float32", "int64"]),  # state is float
        ("state_manifest", "digests", [bytes(15)]),
        ("state_manifest", "shapes", [[3, -4], [4]]),
        ("state_chunk_request", "index", -1),
        ("state_chunk", "session", bytes(8)),
    ],
)
def test_bad_values_are_malformed(kind, name, value):
    fields, n = VALID[kind]
    assert _reason(kind, {**fields, name: value}, n) == "malformed"


@pytest.mark.parametrize(
    "kind,name,value",
    [
        ("forward", "deadline_s", 3600.0),
        ("forward", "deadline_s", 1e-9),
        ("forward", "route", []),
        ("forward", "stage", 1023),
        ("info", "stage", 0),
        ("error", "message", "x" * 2000),
        ("spec", "record", b""),
    ],
)
def test_boundary_values_pass(kind, name, value):
    fields, n = VALID[kind]
    assert validate_fields(kind, {**fields, name: value}, n)[name] == value


def test_int_is_accepted_for_float_and_normalised():
    out = validate_fields("forward", {**VALID["forward"][0], "deadline_s": 5}, 2)
    assert out["deadline_s"] == 5.0 and isinstance(out["deadline_s"], float)


def test_every_reason_is_a_valid_error_reason():
    for reason in REJECT_REASONS:
        validate_fields("error", {"reason": reason, "message": ""}, 0)


# Values of every msgpack-able type; for each field, any value of the wrong type must be "malformed".
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
)


def _type_ok(spec, value) -> bool:
    if value is None:
        return spec.nullable
    if isinstance(value, bool):
        return False
    return {
        "int": isinstance(value, int),
        "float": isinstance(value, (int, float)),
        "str": isinstance(value, str),
        "bytes": isinstance(value, bytes),
        "list": isinstance(value, list),
    }[spec.type]


_FIELD_CASES = [(k, f) for k in sorted(VALID) for f in KINDS[k].fields]


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(_FIELD_CASES), value=_ANY)
def test_any_value_is_accepted_or_malformed(case, value):
    kind, name = case
    fields, n = VALID[kind]
    try:
        validate_fields(kind, {**fields, name: value}, n)
    except ProtocolError as e:
        assert e.reason == "malformed"
    else:
        assert _type_ok(KINDS[kind].fields[name], value)


def test_schemas_are_read_only():
    with pytest.raises(TypeError):
        KINDS["new"] = KINDS["ack"]  # type: ignore[index]
    with pytest.raises(TypeError):
        KINDS["ack"].fields["x"] = None  # type: ignore[index]


def test_rpc_names_and_labels():
    assert rpc.ALL_RPCS == (rpc.FORWARD, rpc.BACKWARD, rpc.EVAL_RESULT, rpc.INFO, rpc.SPEC, rpc.STATE_MANIFEST,
                            rpc.STATE_CHUNK, rpc.PAIR,
                            rpc.OUTER_CHUNK, rpc.OUTER_COMMIT, rpc.DIALBACK)
    assert len(set(rpc.ALL_RPCS)) == len(rpc.ALL_RPCS)
    assert all(name.startswith("swarmd.") for name in rpc.ALL_RPCS)
    assert [rpc.metric_label(n) for n in rpc.ALL_RPCS] == [
        "forward", "backward", "eval_result", "info", "spec", "state_manifest", "state_chunk", "pair", "outer_chunk", "outer_commit",
        "dialback"]
    assert dict(rpc.METRIC_LABELS) == {n: rpc.metric_label(n) for n in rpc.ALL_RPCS}
    for spec in rpc.RPCS.values():
        assert spec.request_kind in KINDS and spec.reply_kind in KINDS
