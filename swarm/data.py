"""Byte-level training data: tokens are the bytes 0..255 (vocab 256), so there is no tokenizer to ship.

* ``builtin_corpus`` - a default corpus every Python install has on disk (the pydoc topic help).
* ``load_corpus``    - the real path: .txt files and .jsonl files (one JSON object per line).
* ``split_corpus``   - train / validation split.
* ``CorpusSampler``  - a driver's own stream of training windows, epoch by epoch over the whole train bytes.
* ``validation_batches`` - fixed, deterministic evaluation batches.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

BYTE_VOCAB_SIZE = 256
DOC_SEPARATOR = b"\n\n"  # between documents; cheap, and lets the model see document boundaries


def builtin_corpus() -> bytes:
    """The English help text of ``pydoc_data.topics`` (~0.5-1 MB), joined in sorted key order (deterministic)."""
    from pydoc_data.topics import topics  # stdlib; imported lazily, it is a large module

    return DOC_SEPARATOR.join(topics[key].encode("utf-8") for key in sorted(topics))


def _read_jsonl(path: str, field: str) -> list[bytes]:
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON line: {exc}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if field not in record:
                raise ValueError(f"{path}:{lineno}: JSON object has no field {field!r}")
            text = record[field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, got {type(text).__name__}")
            docs.append(text.encode("utf-8"))
    return docs


def load_corpus(paths: list[str], jsonl_field: str = "text") -> bytes:
    """Read ``.txt`` files (raw bytes) and ``.jsonl`` files (field ``jsonl_field`` of each line) into one corpus.

    Documents are joined with a blank line. Raises FileNotFoundError for a missing file and ValueError
    for an unsupported file type, a bad JSON line (with file and line number), or an empty corpus.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # a single path is an easy mistake; accept it rather than iterate its characters
    docs: list[bytes] = []
    for path in map(str, paths):
        if not os.path.exists(path):
            raise FileNotFoundError(f"corpus file not found: {path}")
        if not os.path.isfile(path):
            raise ValueError(f"corpus path is not a regular file: {path}")
        if path.endswith(".jsonl"):
            docs.extend(_read_jsonl(path, jsonl_field))
        elif path.endswith(".txt"):
            with open(path, "rb") as f:
                docs.append(f.read())
        else:
            raise ValueError(f"unsupported corpus file type (expected .txt or .jsonl): {path}")
    corpus = DOC_SEPARATOR.join(doc for doc in docs if doc)
    if not corpus:
        raise ValueError(f"corpus is empty (files: {list(map(str, paths))})")
    return corpus


def split_corpus(data: bytes, val_fraction: float = 0.05) -> tuple[bytes, bytes]:
    """Split into (train, val): the last ``val_fraction`` of the bytes is validation (contiguous, no leakage)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(len(data) * val_fraction)
    return data[: len(data) - n_val], data[len(data) - n_val :]


def _bytes_tensor(data: bytes) -> torch.Tensor:
    # frombuffer shares memory with a writable buffer; a bytearray copy keeps the caller's bytes immutable.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 [B, seq_len] from windows of seq_len+1 bytes at ``starts``; targets shift by one."""
    idx = starts[:, None] + torch.arange(seq_len + 1)
    window = data[idx].long()
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def stream_seed(run_seed: int, stream: str) -> int:
    """A 63-bit generator seed for one driver's data stream, from the run seed and the driver's name (its peer id)."""
    digest = hashlib.sha256(f"swarmd-data:{run_seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class CorpusSampler:
    """Training windows drawn from the whole train corpus, in epochs.

    Each epoch tiles the corpus with windows of ``seq_len`` tokens at a random phase (a byte offset in
    [0, seq_len)) and visits them in a random order, so one sampler alone covers every byte once per
    epoch, whatever the number of drivers. The order comes from a private ``torch.Generator`` seeded
    by ``seed`` (``stream_seed(run seed, peer id)`` in the daemon): two drivers walk the same corpus in
    different orders and phases, never in lockstep, and the global RNG is never touched.
    """

    def __init__(self, data: bytes, seq_len: int, batch_size: int, seed: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(data) < 2 * seq_len + 1:
            raise ValueError(
                f"the training corpus has {len(data)} bytes, fewer than 2 * seq_len + 1 = {2 * seq_len + 1}: "
                "use a larger corpus or a shorter seq_len"
            )
        self.seq_len = seq_len
        self.batch_size = batch_size
        self._data = _bytes_tensor(data)
        self._generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.int64)  # window starts left in this epoch
        self.epoch = 0

    def _new_epoch(self) -> None:
        phase = int(torch.randint(0, self.seq_len, (1,), generator=self._generator))
        count = (len(self._data) - 1 - phase) // self.seq_len  # windows of seq_len + 1 bytes that fit
        starts = phase + torch.arange(count) * self.seq_len
        self._order = starts[torch.randperm(count, generator=self._generator)]
        self.epoch += 1

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 [batch_size, seq_len]; targets are inputs shifted left by one byte.
        A batch may straddle two epochs (its windows then come from both)."""
        parts = []
        needed = self.batch_size
        while needed:
            if not len(self._order):
                self._new_epoch()
            take, self._order = self._order[:needed], self._order[needed:]
            parts.append(take)
            needed -= len(take)
        return _windows(self._data, torch.cat(parts), self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        """The generator state and the rest of the epoch, to resume the same stream of batches."""
        return {"generator": self._generator.get_state(), "order": self._order.clone(), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from ``state_dict``."""
        self._generator.set_state(state["generator"])
        self._order = state["order"].clone()
        self.epoch = int(state["epoch"])


def validation_batches(
    val: bytes, seq_len: int, batch_size: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches: consecutive windows from the start of ``val`` (stride ``seq_len``).

    Returns at most ``max_batches`` batches of (inputs, targets) int64 [b, seq_len], the last one possibly
    smaller than ``batch_size``. Raises ValueError when ``val`` cannot hold a single window.
    """
    if seq_len < 1 or batch_size < 1 or max_batches < 1:
        raise ValueError(
            f"seq_len, batch_size and max_batches must be >= 1, got {seq_len}, {batch_size}, {max_batches}"
        )
    n_windows = (len(val) - 1) // seq_len if len(val) > 0 else 0
    if n_windows < 1:
        raise ValueError(f"validation data has {len(val)} bytes, fewer than seq_len + 1 = {seq_len + 1}")
    n_windows = min(n_windows, batch_size * max_batches)
    data = _bytes_tensor(val)
    starts = torch.arange(n_windows) * seq_len
    inputs, targets = _windows(data, starts, seq_len)
    return [(inputs[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, n_windows, batch_size)]
