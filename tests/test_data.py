"""Byte-level corpus loading, splitting, sharded sampling and validation batches."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from swarmd.swarm.data import (
    ShardSampler,
    builtin_corpus,
    load_corpus,
    shard_region,
    split_corpus,
    validation_batches,
)


def test_builtin_corpus():
    corpus = builtin_corpus()
    assert isinstance(corpus, bytes) and len(corpus) > 100_000
    assert corpus == builtin_corpus()  # deterministic
    assert b"the" in corpus


def test_load_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello world")
    lines = [json.dumps({"text": "first doc"}), "", json.dumps({"text": "zweites Dokument \u00e4", "id": 2})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = load_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    assert corpus == b"hello world\n\nfirst doc\n\nzweites Dokument \xc3\xa4"
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert load_corpus([str(tmp_path / "c.jsonl")], jsonl_field="body") == b"x"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus([str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        load_corpus([str(bad)])
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"nofield.jsonl:2: .*no field 'text'"):
        load_corpus([str(nofield)])
    notobj = tmp_path / "list.jsonl"
    notobj.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"list.jsonl:1: expected a JSON object"):
        load_corpus([str(notobj)])
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_corpus([str(empty)])
    other = tmp_path / "x.bin"
    other.write_bytes(b"abc")
    with pytest.raises(ValueError, match="unsupported"):
        load_corpus([str(other)])


def test_split_corpus():
    data = bytes(range(256)) * 4
    train, val = split_corpus(data, 0.25)
    assert train + val == data and len(val) == 256
    assert split_corpus(data, 0.0) == (data, b"")
    with pytest.raises(ValueError):
        split_corpus(data, 1.0)


def test_shard_regions_disjoint_and_covering():
    for length in (100, 101, 997):
        for num_shards in (1, 2, 3, 7):
            regions = [shard_region(length, i, num_shards) for i in range(num_shards)]
            assert regions[0][0] == 0 and regions[-1][1] == length
            assert all(a[1] == b[0] for a, b in itertools.pairwise(regions))


def test_sampler_shards_are_disjoint_and_targets_shift():
    # Each shard's region holds one distinct byte value, so a window shows which region it came from.
    num_shards, shard_len = 4, 500
    data = b"".join(bytes([10 * (i + 1)]) * shard_len for i in range(num_shards))
    for i in range(num_shards):
        sampler = ShardSampler(data, seq_len=16, batch_size=8, shard_index=i, num_shards=num_shards, seed=0)
        assert sampler.region == (i * shard_len, (i + 1) * shard_len)
        for _ in range(20):
            inputs, targets = sampler.next_batch()
            assert inputs.dtype == targets.dtype == torch.int64
            assert inputs.shape == targets.shape == (8, 16)
            assert torch.all(inputs == 10 * (i + 1)) and torch.all(targets == 10 * (i + 1))


def test_sampler_windows_are_real_and_shifted():
    data = bytes(range(256)) * 8  # position p holds p % 256: a window is consecutive values mod 256
    sampler = ShardSampler(data, seq_len=32, batch_size=16, shard_index=1, num_shards=2, seed=3)
    for _ in range(10):
        inputs, targets = sampler.next_batch()
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        assert torch.equal(targets[:, -1], (inputs[:, -1] + 1) % 256)
        assert torch.equal((inputs[:, 1:] - inputs[:, :-1]) % 256, torch.ones(16, 31, dtype=torch.int64))


def test_sampler_window_never_leaves_region():
    # Three shards of 10 bytes; with seq_len=9 the only window of shard 1 is the whole shard.
    data = b"a" * 10 + bytes(range(10)) + b"b" * 10
    sampler = ShardSampler(data, seq_len=9, batch_size=4, shard_index=1, num_shards=3, seed=0)
    assert sampler.region == (10, 20)
    inputs, targets = sampler.next_batch()
    for row_in, row_t in zip(inputs.tolist(), targets.tolist()):
        assert bytes(row_in + row_t[-1:]) == bytes(range(10))


def test_sampler_deterministic_and_resumable():
    data = builtin_corpus()[:50_000]
    a = ShardSampler(data, 64, 4, 0, 2, seed=1)
    b = ShardSampler(data, 64, 4, 0, 2, seed=1)
    c = ShardSampler(data, 64, 4, 0, 2, seed=2)
    first = a.next_batch()
    assert torch.equal(first[0], b.next_batch()[0])
    assert not torch.equal(first[0], c.next_batch()[0])
    state = a.state_dict()
    expected = a.next_batch()
    a.load_state_dict(state)
    assert torch.equal(a.next_batch()[0], expected[0])


def test_sampler_too_small_shard():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        ShardSampler(b"x" * 100, seq_len=64, batch_size=2, shard_index=0, num_shards=2, seed=0)


def test_validation_batches():
    val = bytes(range(256)) * 2  # 512 bytes: (512 - 1) // 50 = 10 windows
    batches = validation_batches(val, seq_len=50, batch_size=4, max_batches=10)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    for inputs, targets in batches:
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert batches[0][0][1, 0].item() == 50  # windows are consecutive with stride seq_len
    assert len(validation_batches(val, 50, 4, max_batches=2)) == 2
    with pytest.raises(ValueError, match="fewer than"):
        validation_batches(b"abc", seq_len=8, batch_size=1, max_batches=1)
