"""Byte-level corpus loading, splitting, whole-corpus sampling per driver and validation batches."""

from __future__ import annotations

import json

import pytest
import torch

from swarmd.swarm.data import (
    CorpusSampler,
    builtin_corpus,
    load_corpus,
    split_corpus,
    stream_seed,
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


def _locator(data: bytes, seq_len: int) -> dict[bytes, int]:
    """Where each window of ``seq_len + 1`` bytes starts in ``data``."""
    return {data[i : i + seq_len + 1]: i for i in range(len(data) - seq_len)}


def test_two_drivers_cover_the_corpus_and_their_streams_differ():
    # random bytes: every window occurs once, so each one can be located
    data = bytes(torch.randint(0, 256, (40_000,), generator=torch.Generator().manual_seed(0)).tolist())
    seq_len = 64
    a = CorpusSampler(data, seq_len, 8, seed=stream_seed(0, "peer-a"))
    b = CorpusSampler(data, seq_len, 8, seed=stream_seed(0, "peer-b"))
    windows_per_epoch = len(data) // seq_len
    batches_a = [a.next_batch() for _ in range(windows_per_epoch // 16 + 1)]
    batches_b = [b.next_batch() for _ in range(windows_per_epoch // 16 + 1)]
    # Together, half an epoch each: the drivers' windows cover most of the corpus (random halves overlap,
    # so about 3/4), and one epoch each covers all of it.
    locate = _locator(data, seq_len)
    def covered(batches) -> torch.Tensor:
        seen = torch.zeros(len(data), dtype=torch.bool)
        for inputs, targets in batches:
            for row, target in zip(inputs.tolist(), targets[:, -1].tolist()):
                start = locate.get(bytes(row) + bytes([target]))
                assert start is not None  # every window is real corpus text
                seen[start : start + seq_len + 1] = True
        return seen
    together = covered(batches_a) | covered(batches_b)
    assert together.float().mean() > 0.6
    full_a = covered(batches_a + [a.next_batch() for _ in range(windows_per_epoch // 8 + 1)])
    full_b = covered(batches_b + [b.next_batch() for _ in range(windows_per_epoch // 8 + 1)])
    assert (full_a | full_b).float().mean() > 0.99
    assert full_a.float().mean() > 0.99  # a lone driver covers everything too
    # different streams: not the same batches, not even mostly the same windows early on
    first_a = {tuple(row) for inputs, _ in batches_a[:20] for row in inputs.tolist()}
    first_b = {tuple(row) for inputs, _ in batches_b[:20] for row in inputs.tolist()}
    assert len(first_a & first_b) < 0.1 * len(first_a)


def test_sampler_windows_are_real_and_shifted():
    data = bytes(range(256)) * 8  # position p holds p % 256: a window is consecutive values mod 256
    sampler = CorpusSampler(data, seq_len=32, batch_size=16, seed=3)
    for _ in range(10):
        inputs, targets = sampler.next_batch()
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        assert torch.equal(targets[:, -1], (inputs[:, -1] + 1) % 256)
        assert torch.equal((inputs[:, 1:] - inputs[:, :-1]) % 256, torch.ones(16, 31, dtype=torch.int64))


def test_validation_windows_never_enter_training():
    corpus = bytes(torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(1)).tolist())
    train, val = split_corpus(corpus, 0.05)
    sampler = CorpusSampler(train, 16, 8, seed=0)
    top = len(train)
    locate = _locator(train, 16)
    for _ in range(200):
        inputs, targets = sampler.next_batch()
        for row, target in zip(inputs.tolist(), targets[:, -1].tolist()):
            start = locate[bytes(row) + bytes([target])]
            assert start + 17 <= top


def test_sampler_deterministic_and_resumable():
    data = builtin_corpus()[:50_000]
    a = CorpusSampler(data, 64, 4, seed=1)
    b = CorpusSampler(data, 64, 4, seed=1)
    c = CorpusSampler(data, 64, 4, seed=2)
    first = a.next_batch()
    assert torch.equal(first[0], b.next_batch()[0])
    assert not torch.equal(first[0], c.next_batch()[0])
    for _ in range(200):  # across an epoch boundary
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(30)]
    a.load_state_dict(state)
    assert all(torch.equal(a.next_batch()[0], want) for want in expected)


def test_stream_seeds_differ_by_run_and_peer():
    assert stream_seed(0, "a") != stream_seed(0, "b") != stream_seed(1, "a")
    assert stream_seed(3, "x") == stream_seed(3, "x")


def test_sampler_too_small_corpus():
    with pytest.raises(ValueError, match="fewer than 2 \\* seq_len"):
        CorpusSampler(b"x" * 100, seq_len=64, batch_size=2, seed=0)


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
