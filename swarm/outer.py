"""A replica's outer state (phi, delta) over its flat parameter vector, and the NoLoCo step on it.

No communication here: the daemon (swarmd.daemon.outer) pairs replicas and moves payloads; these
functions cut the payloads into chunks, check a partner's payload, and apply the update.

Training goes on while a replica waits for a partner and exchanges payloads. The update is computed
from the snapshot ``theta_snap`` taken at the outer boundary (that is what the partner received), and
the inner progress made since the snapshot is carried over onto the new weights:
``theta <- phi_new + (theta_now - theta_snap)``. With no inner steps in between this is the reference
rule ``theta <- phi_new``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from swarmd.protocols.codecs import QUANT_CODECS, EncodedTensor, encode_tensor


def flatten_parameters(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """One flat float32 copy of ``params`` (in order), on their device."""
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def assign_flat_(params: Iterable[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy the flat vector ``flat`` back into ``params`` (in order), casting to each one's dtype."""
    params = list(params)
    total = sum(p.numel() for p in params)
    if total != flat.numel():  # checked first: a wrong size must not leave the model half written
        raise ValueError(f"flat vector has {flat.numel()} elements, the parameters {total}")
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


class ParameterReplica:
    """A model's trainable parameters seen as one flat vector (what NoLoCo averages).

    ``before_write`` runs before new weights are written in place (a StageWorker keeps the old ones
    for microbatches still in flight: ``StageWorker.before_weights_change``).
    """

    def __init__(self, model: torch.nn.Module, before_write: Callable[[], None] | None = None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._before_write = before_write

    def read_flat(self) -> torch.Tensor:
        return flatten_parameters(self.params)

    def write_flat(self, flat: torch.Tensor) -> None:
        if self._before_write is not None:
            self._before_write()
        assign_flat_(self.params, flat)


def chunk_bounds(numel: int, chunk_elements: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of a flat vector of ``numel`` elements."""
    if chunk_elements < 1:
        raise ValueError("chunk_elements must be >= 1")
    return [(start, min(start + chunk_elements, numel)) for start in range(0, numel, chunk_elements)]


@dataclass
class OuterState:
    """What one replica keeps between outer steps: outer weights phi, outer momentum delta, the count
    of outer steps, and the error-feedback residuals of the two payloads it sends."""

    phi: torch.Tensor
    delta: torch.Tensor
    outer_step: int = 0
    residual_phi: torch.Tensor | None = field(default=None, repr=False)
    residual_progress: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def start(cls, theta: torch.Tensor) -> OuterState:
        """Outer state at the start of training (or after a join): phi = theta, no momentum."""
        theta = theta.detach().float()
        return cls(phi=theta.clone(), delta=torch.zeros_like(theta))

    @classmethod
    def adopt(cls, theta: torch.Tensor, other: OuterState) -> OuterState:
        """A joiner's outer state: the phi, delta and outer step of the replica whose weights it downloaded,
        on ``theta``'s device (no error-feedback residuals: those belong to the sender's own payloads).
        Buffers already on that device in float32 are taken over, not copied: they are the joiner's own."""
        theta = theta.detach()
        if other.phi.shape != (theta.numel(),) or other.delta.shape != (theta.numel(),):
            raise ValueError(f"outer state of {other.phi.numel()} parameters for a replica of {theta.numel()}")
        return cls(phi=other.phi.to(theta.device, torch.float32),
                   delta=other.delta.to(theta.device, torch.float32), outer_step=other.outer_step)

    @property
    def numel(self) -> int:
        return self.phi.numel()


def encode_payload(
    state: OuterState, theta: torch.Tensor, bounds: Sequence[tuple[int, int]], codec: str, block_size: int
) -> list[tuple[EncodedTensor, EncodedTensor]]:
    """A replica's outer payload, (phi, theta - phi) per chunk of ``bounds``, through the averaging codec.

    Error-feedback codecs add the state's residuals and store the new ones (the residual buffers are
    created on first use). One chunk's progress at a time: no model-sized temporary.
    """
    if codec in QUANT_CODECS and QUANT_CODECS[codec][1] and state.residual_phi is None:
        state.residual_phi, state.residual_progress = torch.zeros_like(state.phi), torch.zeros_like(state.phi)
    chunks = []
    for start, end in bounds:
        pair = []
        progress = theta[start:end] - state.phi[start:end]
        for tensor, residual in ((state.phi[start:end], state.residual_phi), (progress, state.residual_progress)):
            part = residual[start:end] if residual is not None else None
            encoded = encode_tensor(tensor, codec, block_size=block_size, residual=part)
            if residual is not None:
                residual[start:end] = encoded.residual.view(-1)
            pair.append(encoded)
        chunks.append((pair[0], pair[1]))
    return chunks


_SUM_PIECE = 1 << 16  # elements per float64 piece: the converted copy stays in cache


def sum_of_squares(x: torch.Tensor) -> float:
    """Sum of squares of ``x`` accumulated in float64 (no float32 overflow or cancellation), converting
    one cache-sized piece at a time rather than the whole tensor (3x faster than one big copy at 1M)."""
    total = 0.0
    for piece in x.reshape(-1).split(_SUM_PIECE):
        piece = piece.double()
        total += float(torch.dot(piece, piece))
    return total


def squared_norms(phi: torch.Tensor, progress: torch.Tensor) -> tuple[float, float]:
    """Sums of squares of a (chunk of a) payload, in float64."""
    return sum_of_squares(phi), sum_of_squares(progress)


def payload_problem(
    own_phi_norm: float, partner_phi_sq: float, partner_progress_sq: float, max_norm_ratio: float
) -> str | None:
    """Why a partner's whole payload must be rejected (norms over ``max_norm_ratio`` x ours), or None.

    Finiteness and shapes are checked per chunk on arrival; this catches finite but absurd payloads.
    """
    bound = max_norm_ratio * max(own_phi_norm, 1e-12)
    phi_norm, progress_norm = math.sqrt(partner_phi_sq), math.sqrt(partner_progress_sq)
    if not phi_norm <= bound:
        return f"partner phi norm {phi_norm:.3g} exceeds {max_norm_ratio:g}x ours ({own_phi_norm:.3g})"
    if not progress_norm <= bound:
        return f"partner progress norm {progress_norm:.3g} exceeds {max_norm_ratio:g}x our phi norm ({own_phi_norm:.3g})"
    return None


PIECE = 1 << 18  # elements per piece of the outer step: every op of a piece runs while it is in cache

Chunks = torch.Tensor | Sequence[torch.Tensor]  # one flat tensor, or consecutive chunks of one


def _as_chunks(numel: int, chunks: Chunks, what: str) -> list[torch.Tensor]:
    """``chunks`` as a list of flat tensors covering exactly ``numel`` elements."""
    chunks = [chunks] if isinstance(chunks, torch.Tensor) else list(chunks)
    if sum(c.numel() for c in chunks) != numel:
        raise ValueError(f"{what} covers {sum(c.numel() for c in chunks)} elements, the replica {numel}")
    return [c.view(-1) for c in chunks]


def _spans(numel: int, *chunked: list[torch.Tensor] | None) -> Iterator[tuple[int, int, list[torch.Tensor | None]]]:
    """[start, end) pieces of at most PIECE elements that never straddle a chunk of the (equally chunked)
    lists in ``chunked``, with each list's piece (None for a None list)."""
    reference = next((c for c in chunked if c is not None), None)
    sizes = [c.numel() for c in reference] if reference is not None else [numel]
    if any(c is not None and [t.numel() for t in c] != sizes for c in chunked):
        raise ValueError("partner_phi and partner_progress must be chunked alike")
    offset = 0
    for index, size in enumerate(sizes):
        for lo in range(0, size, PIECE):
            hi = min(lo + PIECE, size)
            yield offset + lo, offset + hi, [None if c is None else c[index][lo:hi] for c in chunked]
        offset += size


def outer_step_(
    state: OuterState,
    theta_snap: torch.Tensor,
    theta_now: torch.Tensor,
    partner_phi: Chunks | None = None,
    partner_progress: Chunks | None = None,
    *,
    beta: float,
    gamma: float,
    mu: float,
) -> torch.Tensor:
    """Apply one NoLoCo outer step to ``state`` (paired, or solo without partner tensors), in place.

    The rule is ``swarmd.swarm.noloco.noloco_update``; here it runs on the buffers it is given, with no
    temporaries the size of the model (at 50M parameters a copy is 200 MB, and a replica holds several),
    one cache-sized piece at a time. The partner's tensors may be flat or a sequence of consecutive
    chunks (as they arrived). ``theta_snap``, ``theta_now`` and the partner tensors are consumed as
    scratch space. Returns the new flat weights ``phi_new + (theta_now - theta_snap)`` (in ``theta_now``'s
    buffer).
    """
    if (partner_phi is None) != (partner_progress is None):
        raise ValueError("give both partner_phi and partner_progress, or neither")
    phi, delta, numel = state.phi, state.delta, state.numel
    own = [theta_snap, theta_now, phi, delta]
    if len({t.data_ptr() for t in own}) != len(own) or any(t.numel() != numel for t in own):
        raise ValueError("outer_step_ works in place: every tensor must be its own buffer of the replica's size")
    partner = None
    if partner_phi is not None:
        partner = (_as_chunks(numel, partner_phi, "partner_phi"), _as_chunks(numel, partner_progress, "partner_progress"))
        taken = {t.data_ptr() for t in own}
        if any(c.data_ptr() in taken for chunks in partner for c in chunks):
            raise ValueError("outer_step_ works in place: the partner tensors must be their own buffers")
    snap, now = theta_snap.view(-1), theta_now.view(-1)
    for start, end, (p_phi, p_progress) in _spans(numel, *(partner or (None, None))):
        ph, de = phi[start:end], delta[start:end]
        drift = now[start:end].sub_(snap[start:end])  # inner progress made since the snapshot
        mean_progress = snap[start:end].sub_(ph)  # our theta - phi ...
        if p_progress is not None:
            mean_progress.add_(p_progress).mul_(0.5)  # ... averaged over the pair
        de.mul_(mu).add_(mean_progress, alpha=beta)
        if p_phi is not None:
            de.add_(p_phi.sub_(ph).mul_(0.5), alpha=gamma)  # gamma * (mean_pair(phi) - phi)
        ph.add_(de)
        drift.add_(ph)
    state.outer_step += 1
    return theta_now


def divergence(phi: torch.Tensor, partner_phi: Chunks) -> float:
    """Relative distance ||phi - phi_partner|| / ||phi|| of two replicas' outer weights (the partner's
    flat or in consecutive chunks), without a model-sized temporary."""
    chunks = _as_chunks(phi.numel(), partner_phi, "partner_phi")
    flat, diff_sq = phi.view(-1), 0.0
    for start, end, (piece,) in _spans(phi.numel(), chunks):
        diff_sq += sum_of_squares(flat[start:end] - piece)
    return math.sqrt(diff_sq) / max(math.sqrt(sum_of_squares(phi)), 1e-12)
