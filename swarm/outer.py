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
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


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
    """A model's trainable parameters seen as one flat vector (what NoLoCo averages)."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def read_flat(self) -> torch.Tensor:
        return flatten_parameters(self.params)

    def write_flat(self, flat: torch.Tensor) -> None:
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
        on ``theta``'s device (no error-feedback residuals: those belong to the sender's own payloads)."""
        theta = theta.detach()
        if other.phi.shape != (theta.numel(),) or other.delta.shape != (theta.numel(),):
            raise ValueError(f"outer state of {other.phi.numel()} parameters for a replica of {theta.numel()}")
        return cls(phi=other.phi.to(theta.device, torch.float32, copy=True),
                   delta=other.delta.to(theta.device, torch.float32, copy=True), outer_step=other.outer_step)

    @property
    def numel(self) -> int:
        return self.phi.numel()


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


def outer_step_(
    state: OuterState,
    theta_snap: torch.Tensor,
    theta_now: torch.Tensor,
    partner_phi: torch.Tensor | None = None,
    partner_progress: torch.Tensor | None = None,
    *,
    beta: float,
    gamma: float,
    mu: float,
) -> torch.Tensor:
    """Apply one NoLoCo outer step to ``state`` (paired, or solo without partner tensors), in place.

    The rule is ``swarmd.swarm.noloco.noloco_update``; here it runs on the buffers it is given, with no
    temporaries the size of the model (at 50M parameters a copy is 200 MB, and a replica holds several).
    ``theta_snap``, ``theta_now`` and the partner tensors are consumed as scratch space. Returns the new
    flat weights ``phi_new + (theta_now - theta_snap)`` (in ``theta_now``'s buffer).
    """
    if (partner_phi is None) != (partner_progress is None):
        raise ValueError("give both partner_phi and partner_progress, or neither")
    phi, delta = state.phi, state.delta
    buffers = [t for t in (theta_snap, theta_now, partner_phi, partner_progress, phi, delta) if t is not None]
    if len({t.data_ptr() for t in buffers}) != len(buffers):
        raise ValueError("outer_step_ works in place: every tensor must be its own buffer")
    drift = theta_now.sub_(theta_snap)  # inner progress made since the snapshot
    mean_progress = theta_snap.sub_(phi)  # our theta - phi ...
    if partner_progress is not None:
        mean_progress.add_(partner_progress).mul_(0.5)  # ... averaged over the pair
    delta.mul_(mu).add_(mean_progress, alpha=beta)
    if partner_phi is not None:
        consensus = partner_phi.sub_(phi).mul_(0.5)  # mean_pair(phi) - phi
        delta.add_(consensus, alpha=gamma)
    phi.add_(delta)
    state.outer_step += 1
    return drift.add_(phi)


def divergence(phi: torch.Tensor, partner_phi: torch.Tensor) -> float:
    """Relative distance ||phi - phi_partner|| / ||phi|| of two replicas' outer weights."""
    return math.sqrt(sum_of_squares(phi - partner_phi)) / max(math.sqrt(sum_of_squares(phi)), 1e-12)
