"""A replica's outer state (phi, delta) over its flat parameter vector, and the NoLoCo step on it.

No communication here: the daemon (swarmd.daemon.outer) pairs replicas and moves payloads; these
functions cut the payloads into chunks, check a partner's payload, decide which partners to ban, and
apply the update.

Training goes on while a replica waits for a partner and exchanges payloads. The update is computed
from the snapshot ``theta_snap`` taken at the outer boundary (that is what the partner received), and
the inner progress made since the snapshot is carried over onto the new weights:
``theta <- phi_new + (theta_now - theta_snap)``. With no inner steps in between this is the reference
rule ``theta <- phi_new``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from swarmd.protocols.codecs import QUANT_CODECS, EncodedTensor, encode_tensor
from swarmd.swarm.routing import BanList


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
    move_scale: float = 1.0  # the factor the last outer step's move was scaled by (< 1: clipped by max_move)
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


def payload_sums(own_phi: torch.Tensor, phi: torch.Tensor, progress: torch.Tensor) -> tuple[float, float]:
    """(||progress||^2, ||phi - own_phi||^2) of (a chunk of) a partner's payload, in float64. ``own_phi``
    is our phi over the same elements. Summed over the chunks, they are what ``payload_problem`` judges."""
    return sum_of_squares(progress), sum_of_squares(phi - own_phi)


def payload_problem(
    own_phi_norm: float, own_progress_norm: float, partner_progress_sq: float, distance_sq: float, *,
    max_divergence: float, max_distance_ratio: float, max_progress_ratio: float,
) -> str | None:
    """Why a partner's whole payload must be rejected, or None to accept it.

    - Its phi must lie within ``max_divergence`` x ||our phi|| of ours (a norm bound alone lets phi' = -9 phi
      through), and within ``max_distance_ratio`` x our own progress norm ||theta - phi||. Replicas drift apart
      by what each learns on its own between pairings, so that is the scale of honest distances whatever H,
      the learning rate or the point in training; a bound in ||phi|| alone must allow early training's large
      steps, and later lets a partner whose phi drifts a little further each outer step drag its partners
      along.
    - Its progress theta - phi must be at most ``max_progress_ratio`` x ours.

    Finiteness and shapes are checked per chunk on arrival; this catches finite but hostile payloads.
    """
    distance = math.sqrt(distance_sq)
    divergence = distance / max(own_phi_norm, 1e-30)
    if not divergence <= max_divergence:  # "not <=": a NaN is a rejection too
        return f"partner phi is {divergence:.3g} x our phi's norm away from ours (limit {max_divergence:g})"
    if not distance <= max_distance_ratio * own_progress_norm:
        return (f"partner phi is {distance / max(own_progress_norm, 1e-30):.3g} x our progress norm away from "
                f"ours (limit {max_distance_ratio:g})")
    progress_norm = math.sqrt(partner_progress_sq)
    if not progress_norm <= max_progress_ratio * own_progress_norm:
        return (f"partner progress norm {progress_norm:.3g} exceeds {max_progress_ratio:g}x ours "
                f"({own_progress_norm:.3g})")
    return None


FAILURE_TABLE_SIZE = 64  # partners whose failed exchanges are remembered (the least recent is forgotten)
BAN_MAX_FACTOR = 16  # a repeat offender's ban doubles up to this many times its first one


class PartnerBans:
    """The partners a replica will not pair with for a while, and the rule that puts them there.

    Its clock is the replica's own outer step count: a ban takes ``ban_steps`` of our outer steps (that many
    chances to pair), doubling for each repeat up to ``BAN_MAX_FACTOR`` x. Each exchange ends in one of
    ``OUTCOMES``; ``settle`` applies the rule. The daemon (swarmd.daemon.outer) and bench/poisoning.py
    both go through it.
    """

    OUTCOMES = ("paired", "rejected", "stalled", "failed")

    def __init__(self, ban_steps: int, max_failures: int):
        if ban_steps < 1 or max_failures < 1:
            raise ValueError("ban_steps and max_failures must be >= 1")
        longest = ban_steps * BAN_MAX_FACTOR  # a peer is forgotten this long after its last ban ended
        self.bans = BanList(base_s=ban_steps, max_s=longest, forget_s=longest)
        self.max_failures = max_failures
        self._failures: OrderedDict[str, int] = OrderedDict()  # consecutive failed exchanges, most recent last

    def is_banned(self, peer: str, now: int) -> bool:
        return self.bans.is_banned(peer, now)

    def settle(self, peer: str, outcome: str, now: int) -> tuple[str, bool]:
        """Record how an exchange with ``peer`` ended at our outer step ``now``. Returns the outer step's
        result ("paired", "rejected" or "failed") and whether ``peer`` is now banned.

        - "paired": nothing held against it any more, but a past ban's backoff stays (no laundering
          bans with one good step in between);
        - "rejected" (its payload failed ``payload_problem`` or the per-chunk checks) and "stalled"
          (it paired, then sent nothing for the stall timeout): banned at once; a stall's step "failed";
        - "failed" (it went away, refused our payload, timed out): banned at the ``max_failures``-th
          failure in a row. One failure alone is not held against it: a peer that died is not hostile.
        """
        if outcome not in self.OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        failures = self._failures.pop(peer, 0)
        if outcome == "paired":
            return "paired", False
        ban = outcome in ("rejected", "stalled") or failures + 1 >= self.max_failures
        if ban:
            self.bans.ban(peer, now)
        else:
            self._failures[peer] = failures + 1
            if len(self._failures) > FAILURE_TABLE_SIZE:
                self._failures.popitem(last=False)
        return ("rejected" if outcome == "rejected" else "failed"), ban


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
    max_move: float = math.inf,
) -> torch.Tensor:
    """Apply one NoLoCo outer step to ``state`` (paired, or solo without partner tensors), in place.

    The rule is ``swarmd.swarm.noloco.noloco_update``; here it runs on the buffers it is given, with no
    temporaries the size of the model (at 50M parameters a copy is 200 MB, and a replica holds several),
    one cache-sized piece at a time. The partner's tensors may be flat or a sequence of consecutive
    chunks (as they arrived). ``theta_snap``, ``theta_now`` and the partner tensors are consumed as
    scratch space. Returns the new flat weights ``phi_new + (theta_now - theta_snap)`` (in ``theta_now``'s
    buffer).

    The move of phi (the new delta) is clipped to ``max_move`` x ||phi||: whatever a partner's payload
    got past ``payload_problem``, one outer step cannot carry phi far. The factor applied is kept in
    ``state.move_scale`` (1: not clipped); the clipped delta is the momentum carried on.
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
    # Pass 1: the new delta, and the norms that decide the clip (the whole move must be known first).
    phi_sq = move_sq = 0.0
    for start, end, (p_phi, p_progress) in _spans(numel, *(partner or (None, None))):
        ph, de = phi[start:end], delta[start:end]
        now[start:end].sub_(snap[start:end])  # inner progress made since the snapshot (the drift)
        mean_progress = snap[start:end].sub_(ph)  # our theta - phi ...
        if p_progress is not None:
            mean_progress.add_(p_progress).mul_(0.5)  # ... averaged over the pair
        de.mul_(mu).add_(mean_progress, alpha=beta)
        if p_phi is not None:
            de.add_(p_phi.sub_(ph).mul_(0.5), alpha=gamma)  # gamma * (mean_pair(phi) - phi)
        phi_sq += sum_of_squares(ph)
        move_sq += sum_of_squares(de)
    move = math.sqrt(move_sq)
    bound = max_move * math.sqrt(phi_sq) if math.isfinite(max_move) else math.inf
    scale = bound / move if move > bound else 1.0
    # Pass 2: phi <- phi + scale * delta, and the weights phi_new + drift.
    for start in range(0, numel, PIECE):
        ph, de = phi[start : start + PIECE], delta[start : start + PIECE]
        if scale != 1.0:
            de.mul_(scale)
        ph.add_(de)
        now[start : start + PIECE].add_(ph)
    state.outer_step += 1
    state.move_scale = scale
    return theta_now
