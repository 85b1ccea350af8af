"""A stage's whole training state as one ordered list of named tensors, cut into bounded chunks.

The state of one replica is its weights, its inner AdamW state and, when the run averages, its outer state
(phi and delta). State sync (donor manifests, joiner downloads) and checkpoints both see it through this
layout: the same names, shapes and dtypes in the same order, so one check covers a peer's manifest and a
file on disk alike, and one chunk plan cuts it the same way on both ends of a transfer.

Everything here is pure: no I/O, no peers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.protocols.messages import DIGEST_BYTES
from torch import nn

from .outer import OuterState
from .stage import StageWorker

OPTIM_PREFIX = "optim/"  # optim/<parameter index>/<key>: AdamW's per-parameter state, in param-group order
ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")
OUTER_NAMES = ("outer/phi", "outer/delta")
CHUNK_BYTES = 16 << 20  # one chunk request's payload: large enough to amortize a stream, small enough to stripe
MAX_CHUNK_PARTS = DEFAULT_LIMITS.max_tensors_per_message  # slices per chunk: tensors in one message


@dataclass(frozen=True)
class Entry:
    """One named tensor of the stage state."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


Slice = tuple[int, int, int]  # (entry index, first element, one past the last element), over the flat entry


class LayoutError(ValueError):
    """A manifest or checkpoint does not describe this stage's state."""


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in param-group order (the indices of optim/<index>/<key>)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def stage_layout(model: nn.Module, optimizer: torch.optim.Optimizer, with_optimizer: bool, with_outer: bool) -> list[Entry]:
    """The entries of a stage state: model state_dict (sorted by name), then AdamW moments and step per
    parameter (when ``with_optimizer``: a replica that has stepped), then phi and delta (when ``with_outer``)."""
    own = model.state_dict()
    entries = [Entry(name, tuple(own[name].shape), own[name].dtype) for name in sorted(own)]
    if with_optimizer:
        for index, param in enumerate(optimizer_params(optimizer)):
            for key in ADAM_KEYS:
                shape = () if key == "step" else tuple(param.shape)
                dtype = torch.float32 if key == "step" else param.dtype
                entries.append(Entry(f"{OPTIM_PREFIX}{index}/{key}", shape, dtype))
    if with_outer:
        numel = sum(p.numel() for p in model.parameters())
        entries += [Entry(name, (numel,), torch.float32) for name in OUTER_NAMES]
    return entries


def has_optimizer_state(optimizer: torch.optim.Optimizer) -> bool:
    """True once AdamW has state for every parameter (after its first step)."""
    return all(set(ADAM_KEYS) <= set(optimizer.state.get(p, {})) for p in optimizer_params(optimizer))


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer, outer: tuple[torch.Tensor, torch.Tensor] | None) -> list[torch.Tensor]:
    """The live tensors of the layout ``stage_layout(model, optimizer, has_optimizer_state(optimizer),
    outer is not None)``, in its order (no copies: snapshot or write into them, on the compute thread)."""
    own = model.state_dict(keep_vars=False)
    tensors = [own[name] for name in sorted(own)]
    if has_optimizer_state(optimizer):
        for param in optimizer_params(optimizer):
            state = optimizer.state[param]
            tensors += [torch.as_tensor(state[key]) for key in ADAM_KEYS]
    if outer is not None:
        tensors += list(outer)
    return tensors


def allocate_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give AdamW empty moments and a zero step for every parameter, to be written by a download."""
    for param in optimizer_params(optimizer):
        optimizer.state[param] = {
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            "step": torch.zeros((), dtype=torch.float32),
        }


def check_layout(got: Sequence[Entry], model: nn.Module, optimizer: torch.optim.Optimizer, with_outer: bool) -> bool:
    """Check that ``got`` (a peer's manifest, a checkpoint) is this stage's layout, with or without the
    optimizer state. Returns whether it carries the optimizer state; raises LayoutError with the first
    difference otherwise."""
    for with_optimizer in (True, False):
        want = stage_layout(model, optimizer, with_optimizer, with_outer)
        if len(got) == len(want):
            for ours, theirs in zip(want, got):
                if ours != theirs:
                    raise LayoutError(f"entry {theirs.name!r} {theirs.shape} {theirs.dtype} where this stage has "
                                      f"{ours.name!r} {ours.shape} {ours.dtype}")
            return with_optimizer
    counts = sorted({len(stage_layout(model, optimizer, w, with_outer)) for w in (True, False)})
    raise LayoutError(f"{len(got)} state entries, this stage has {' or '.join(map(str, counts))}")


def plan_chunks(entries: Sequence[Entry], chunk_bytes: int = CHUNK_BYTES, max_parts: int = MAX_CHUNK_PARTS) -> list[list[Slice]]:
    """Cut the flat entries, in order, into chunks of at most ``chunk_bytes`` bytes and ``max_parts`` slices
    (a large entry spans several chunks; small ones share one). Both ends of a transfer compute the same plan."""
    if chunk_bytes < 1 or max_parts < 1:
        raise ValueError("chunk_bytes and max_parts must be >= 1")
    chunks: list[list[Slice]] = []
    current: list[Slice] = []
    room = chunk_bytes
    for index, entry in enumerate(entries):
        size = torch.empty((), dtype=entry.dtype).element_size()
        start, numel = 0, entry.numel  # an empty entry gets no slice: there is nothing to send
        while start < numel:
            if current and (room < size or len(current) == max_parts):
                chunks.append(current)
                current, room = [], chunk_bytes
            take = min(numel - start, max(room // size, 1))
            current.append((index, start, start + take))
            room -= take * size
            start += take
    if current:
        chunks.append(current)
    return chunks


def flat_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as a flat view of its elements (a 0-dim step counter included)."""
    return tensor.reshape(-1)


def read_chunk(tensors: Sequence[torch.Tensor], chunk: Sequence[Slice]) -> list[torch.Tensor]:
    """The slices of ``chunk`` out of ``tensors`` (views)."""
    return [flat_view(tensors[index])[start:stop] for index, start, stop in chunk]


def write_chunk(tensors: Sequence[torch.Tensor], chunk: Sequence[Slice], parts: Sequence[torch.Tensor]) -> None:
    """Copy received ``parts`` into their slices of ``tensors`` (the caller checked them with ``check_parts``)."""
    with torch.no_grad():
        for (index, start, stop), part in zip(chunk, parts):
            flat_view(tensors[index])[start:stop].copy_(part.reshape(-1))


def check_parts(entries: Sequence[Entry], chunk: Sequence[Slice], parts: Sequence[torch.Tensor]) -> None:
    """Raise LayoutError unless ``parts`` are the slices of ``chunk``: one flat tensor of the entry's dtype
    and the slice's length each."""
    if len(parts) != len(chunk):
        raise LayoutError(f"{len(parts)} tensors for a chunk of {len(chunk)} slices")
    for (index, start, stop), part in zip(chunk, parts):
        entry = entries[index]
        if part.dtype != entry.dtype or tuple(part.shape) != (stop - start,):
            raise LayoutError(f"{entry.name}[{start}:{stop}]: got {tuple(part.shape)} {part.dtype}, "
                              f"expected ({stop - start},) {entry.dtype}")


def chunk_digest(parts: Sequence[torch.Tensor]) -> bytes:
    """BLAKE2b digest of the slices' bytes, in order (host tensors)."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for part in parts:
        digest.update(part.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.digest()


def state_bytes(entries: Sequence[Entry]) -> int:
    """Bytes of the whole state."""
    return sum(e.nbytes for e in entries)


@dataclass
class StateSnapshot:
    """A consistent host copy of a stage state (taken between inner steps) and the steps it was taken at."""

    entries: list[Entry]
    tensors: list[torch.Tensor]
    inner_step: int
    outer_step: int | None  # None: no outer state in the snapshot


def take_snapshot(worker: StageWorker, outer: OuterState | None) -> StateSnapshot:
    """Copy ``worker``'s state (and ``outer``'s phi and delta) to host memory. Run it on the compute thread,
    between inner steps, so weights, moments and steps are one moment."""
    with_optimizer = has_optimizer_state(worker.optimizer)
    entries = stage_layout(worker.model, worker.optimizer, with_optimizer, outer is not None)
    live = gather_state(worker.model, worker.optimizer, None if outer is None else (outer.phi, outer.delta))
    tensors = [t.detach().to("cpu", copy=True) for t in live]
    return StateSnapshot(entries, tensors, worker.inner_step, None if outer is None else outer.outer_step)


def prepare_target(worker: StageWorker, with_optimizer: bool, with_outer: bool
                   ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """The tensors a download or a checkpoint writes into, in layout order: ``worker``'s own weights, AdamW
    state allocated for it (or cleared), and fresh phi and delta buffers on the stage's device (returned)."""
    if with_optimizer:
        allocate_optimizer_state(worker.optimizer)
    else:
        worker.optimizer.state.clear()
    outer = None
    if with_outer:
        numel = sum(p.numel() for p in worker.model.parameters())
        outer = (torch.zeros(numel, device=worker.device), torch.zeros(numel, device=worker.device))
    return gather_state(worker.model, worker.optimizer, outer), outer
