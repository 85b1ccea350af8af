"""Stage checkpoints on disk: the state a node restores when no live replica of its stage is further along.

A checkpoint is one file, ``<node dir>/checkpoint.pt``: the run id, the stage, the inner and outer steps,
the stage state's layout and tensors (see ``swarm.state_layout``), and a digest over all of it. It is written
atomically (a temp file, fsync, rename, fsync of the folder), so a crash mid-write leaves the previous one;
a truncated or corrupt file is refused whole, with one line naming the file, and never half-loaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from swarmd.protocols.codecs import DTYPE_NAMES, DTYPES
from swarmd.swarm.state_layout import (
    Entry, LayoutError, StateSnapshot, check_layout, prepare_target, write_chunk,
)
from swarmd.swarm.stage import StageWorker

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "swarmd-stage-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (missing parts, corrupt, another run's or stage's)."""


@dataclass
class CheckpointInfo:
    """What a checkpoint holds, read without loading its tensors."""

    path: Path
    run_id: str
    stage: int
    inner_step: int
    outer_step: int | None


def checkpoint_path(node_dir: Path) -> Path:
    return Path(node_dir) / CHECKPOINT_FILE


def _digest(header: dict, tensors: list[torch.Tensor]) -> bytes:
    digest = hashlib.blake2b(repr(sorted(header.items())).encode(), digest_size=16)
    for t in tensors:
        digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.digest()


def write_checkpoint(path: Path, run_id: str, stage: int, snapshot: StateSnapshot) -> Path:
    """Write ``snapshot`` to ``path`` atomically; the old file stays until the new one is complete on disk."""
    header = {
        "format": FORMAT, "run_id": run_id, "stage": stage, "inner_step": snapshot.inner_step,
        "outer_step": snapshot.outer_step, "names": [e.name for e in snapshot.entries],
        "shapes": [list(e.shape) for e in snapshot.entries], "dtypes": [DTYPE_NAMES[e.dtype] for e in snapshot.entries],
    }
    payload = {**header, "tensors": snapshot.tensors, "digest": _digest(header, snapshot.tensors)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def _load(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, bad pickle, not a torch file...
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a swarmd stage checkpoint")
    return payload


def read_checkpoint_info(path: Path) -> CheckpointInfo | None:
    """The run, stage and steps of the checkpoint at ``path`` (None if there is none). Raises CheckpointError
    for a file that is there but unreadable."""
    path = Path(path)
    if not path.exists():
        return None
    p = _load(path)
    try:
        return CheckpointInfo(path, str(p["run_id"]), int(p["stage"]), int(p["inner_step"]),
                              None if p["outer_step"] is None else int(p["outer_step"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} lacks its header ({e})") from None


def restore_checkpoint(path: Path, run_id: str, stage: int, worker: StageWorker, with_outer: bool
                       ) -> tuple[CheckpointInfo, tuple[torch.Tensor, torch.Tensor] | None]:
    """Check the checkpoint at ``path`` whole (digest, run, stage, layout), then load it into ``worker``.
    Returns its info and the outer buffers (phi, delta) when ``with_outer``. Raises CheckpointError, naming
    the file, before touching ``worker`` if anything is wrong."""
    path = Path(path)
    p = _load(path)
    try:
        header = {k: p[k] for k in ("format", "run_id", "stage", "inner_step", "outer_step", "names", "shapes", "dtypes")}
        tensors, digest = list(p["tensors"]), p["digest"]
        entries = [Entry(n, tuple(s), DTYPES[d]) for n, s, d in zip(header["names"], header["shapes"], header["dtypes"])]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is missing parts ({type(e).__name__}: {e})") from None
    if header["run_id"] != run_id or header["stage"] != stage:
        raise CheckpointError(f"checkpoint {path} is of run {header['run_id']!r} stage {header['stage']}, "
                              f"not run {run_id!r} stage {stage}")
    if len(tensors) != len(entries) or any(
            tuple(t.shape) != e.shape or t.dtype != e.dtype for t, e in zip(tensors, entries)):
        raise CheckpointError(f"checkpoint {path}: its tensors do not match its own layout")
    try:
        if _digest(header, tensors) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: its digest does not match its contents")
    except RuntimeError as e:  # a truncated mmap'd storage fails on read
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({e})") from None
    if (header["outer_step"] is not None) != with_outer:
        raise CheckpointError(f"checkpoint {path} {'has' if header['outer_step'] is not None else 'lacks'} "
                              "outer state, this run's spec says otherwise")
    try:
        with_optimizer = check_layout(entries, worker.model, worker.optimizer, with_outer)
    except LayoutError as e:
        raise CheckpointError(f"checkpoint {path} is of another model: {e}") from None
    targets, outer = prepare_target(worker, with_optimizer, with_outer)
    for index, tensor in enumerate(tensors):
        write_chunk(targets, [(index, 0, tensor.numel())], [tensor])
    worker.inner_step = header["inner_step"]
    info = CheckpointInfo(path, run_id, stage, header["inner_step"], header["outer_step"])
    return info, outer


def read_checkpoint_tensors(path: Path) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
    """The checkpoint at ``path``, checked whole, as its info and {entry name: tensor} (model entries under
    their state_dict names, then optim/..., outer/phi, outer/delta): for evaluation and tools."""
    path = Path(path)
    p = _load(path)
    try:
        names, tensors, digest = list(p["names"]), list(p["tensors"]), p["digest"]
        header = {k: p[k] for k in ("format", "run_id", "stage", "inner_step", "outer_step", "names", "shapes", "dtypes")}
        intact = _digest(header, tensors) == digest and len(names) == len(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or missing parts ({type(e).__name__}: {e})") from None
    if not intact:
        raise CheckpointError(f"checkpoint {path} is corrupt: its digest does not match its contents")
    info = CheckpointInfo(path, str(p["run_id"]), int(p["stage"]), int(p["inner_step"]), p["outer_step"])
    return info, dict(zip(names, tensors))


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state_dict out of ``read_checkpoint_tensors``'s entries ('/' never appears in its names)."""
    return {name: t for name, t in tensors.items() if "/" not in name}
