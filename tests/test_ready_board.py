"""The stage's ready board in the DHT: its key, its entries, and parsing a board full of other peers' bytes.
Entries sit under their owner's marker (a public key); a reader gets the owner's peer id from it."""

from __future__ import annotations

from types import SimpleNamespace

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from records_keys import marker, peer
from swarmd.daemon.records import encode_ready, ready_key, ready_peers, stage_key

NUMEL = 1234


def board(entries: dict) -> SimpleNamespace:
    """A stand-in for hivemind's dictionary record: .value maps subkey -> item with .value and .expiration_time.
    A str subkey stands for that peer's owner marker; other subkeys are used as they are."""
    return SimpleNamespace(value={marker(k) if isinstance(k, str) else k: SimpleNamespace(value=v, expiration_time=1e12)
                                  for k, v in entries.items()})


def test_ready_key():
    assert ready_key("run-1", 2) == "swarmd/run-1/ready/2"
    assert ready_key("run-1", 2) != ready_key("run-1", 3) != ready_key("run-2", 3)
    assert ready_key("run-1", 2) != stage_key("run-1", 2)


def test_encode_ready_is_small_msgpack():
    value = encode_ready(7, NUMEL)
    assert msgpack.unpackb(value, raw=False) == {"outer": 7, "numel": NUMEL}
    assert len(encode_ready(2**40, 2**62)) <= 256


def test_ready_peers_lists_well_formed_entries():
    record = board({"peerA": encode_ready(0, NUMEL), "peerB": encode_ready(5, NUMEL)})
    assert sorted(ready_peers(record, NUMEL)) == sorted([peer("peerA"), peer("peerB")])


def test_ready_peers_skips_paired_replicas():
    record = board({"waiting": encode_ready(3, NUMEL), "taken": encode_ready(3, NUMEL, paired=True)})
    assert ready_peers(record, NUMEL) == [peer("waiting")]


def test_ready_peers_empty_boards():
    assert ready_peers(None, NUMEL) == []
    assert ready_peers(SimpleNamespace(value=b"not a dict"), NUMEL) == []
    assert ready_peers(SimpleNamespace(value=None), NUMEL) == []
    assert ready_peers(board({}), NUMEL) == []


def test_ready_peers_skips_other_parameter_counts():
    record = board({"same": encode_ready(1, NUMEL), "other": encode_ready(1, NUMEL + 1), "zero": encode_ready(1, 0)})
    assert ready_peers(record, NUMEL) == [peer("same")]


def test_ready_peers_skips_malformed_and_oversized_entries():
    good = encode_ready(1, NUMEL)
    entries = {
        "ok": good,
        "str-value": "numel",  # not bytes
        "int-value": NUMEL,
        "none": None,
        "garbage": b"\xc1\xc1\xc1",  # reserved msgpack byte
        "truncated": good[:-2],
        "trailing": good + b"\x00",
        "list": msgpack.packb([NUMEL]),
        "no-numel": msgpack.packb({"outer": 1}),
        "numel-str": msgpack.packb({"outer": 1, "numel": str(NUMEL)}),
        "big-map": msgpack.packb({f"k{i}": i for i in range(5)} | {"numel": NUMEL}),  # over max_map_len
        "long-str": msgpack.packb({"numel": NUMEL, "x": "y" * 65}),  # over max_str_len
        "oversized": msgpack.packb({"numel": NUMEL, "pad": b"\0" * 300}),  # over 256 bytes
        "int-key-map": msgpack.packb({1: 2, "numel": NUMEL}),
        "peer-id-as-subkey": good,  # replaced below by a bare peer id: unsigned, no owner
    }
    record = board(entries)
    record.value[peer("peer-id-as-subkey")] = record.value.pop(marker("peer-id-as-subkey"))
    record.value.update({
        7: record.value[marker("ok")],  # subkey not bytes
        b"[owner:ssh-rsa AAAA]": record.value[marker("ok")],  # a marker naming no key
        b"[owner:" + b"A" * 2000 + b"]": record.value[marker("ok")],  # too long
    })
    assert ready_peers(record, NUMEL) == [peer("ok")]


def test_ready_peers_ignores_the_outer_step():
    """Replicas at different outer steps may pair: only the parameter count must match."""
    record = board({"a": encode_ready(0, NUMEL), "b": encode_ready(99, NUMEL)})
    assert sorted(ready_peers(record, NUMEL)) == sorted([peer("a"), peer("b")])


@given(entries=st.dictionaries(st.integers() | st.binary(max_size=40),  # raw subkeys: none is an owner marker
                               st.binary(max_size=300) | st.none() | st.integers() | st.text(max_size=5),
                               max_size=8))
@settings(max_examples=60, deadline=None)
def test_ready_peers_never_raises_on_garbage(entries):
    entries["good"] = encode_ready(3, NUMEL)
    assert peer("good") in ready_peers(board(entries), NUMEL)


@given(value=st.binary(min_size=1, max_size=64))
@settings(max_examples=60, deadline=None)
def test_ready_peers_on_mutated_entries(value):
    good = encode_ready(3, NUMEL)
    spliced = good[: len(good) // 2] + value
    peers = ready_peers(board({"x": value, "y": spliced}), NUMEL)
    assert set(peers) <= {peer("x"), peer("y")}
