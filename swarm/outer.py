"""A replica's outer state (phi, delta) over its flat parameter vector, and the NoLoCo step on it.

No communication here: the daemon (swarmd.daemon.outer_service) pairs replicas and moves payloads; these
functions cut the payloads into chunks, check a partner's payload, decide which partners to ban, commit the
error feedback of a payload that was used, and apply the update chunk by chunk through the one
implementation of the rule, ``swarmd.kernels.noloco_outer_update_`` (Triton on CUDA, torch on the CPU),
on the partner's chunks as they arrived (int8 blocks on the replica's device).

Training goes on while a replica waits for a partner and exchanges payloads. The update is computed
from the snapshot ``theta_snap`` taken at the outer boundary (that is what the partner received), and
the daemon carries the inner progress made since the snapshot over onto the new weights:
``theta <- phi_new + (theta_now - theta_snap)``. With no inner steps in between this is the rule's
``theta <- phi_new``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from swarmd.kernels import Payload, QuantizedBlocks, dequantize_int4, dequantize_int8, noloco_outer_update_
from swarmd.protocols.codecs import QUANT_CODECS, EncodedTensor, decode_tensor, encode_tensor
from swarmd.protocols.limits import DEFAULT_LIMITS
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


class Replica(Protocol):
    """The weights an outer step reads and writes, as one flat float32 vector on the replica's device (called
    on the compute lane)."""

    def read_flat(self) -> torch.Tensor:
        """A new flat copy of the weights: the outer step keeps it and uses it as scratch space."""
        ...

    def write_flat(self, flat: torch.Tensor) -> None: ...


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
    # How far phi moved at our last outer step if that move was all our own learning (a solo step, or a
    # joiner's rebase), else 0: the yardstick payload_problem adds to our progress norm
    last_move_norm: float = 0.0
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

    @classmethod
    def join(cls, theta: torch.Tensor, other: OuterState) -> OuterState:
        """A NoLoCo joiner's outer state: the donor's delta and outer step, with the downloaded weights
        ``theta`` as phi, as if it had just stepped solo from the donor's phi. Its first payload then covers
        its own H inner steps, as its partners' do: with the donor's phi its progress would include all the
        donor learned since its own last outer step (often a long wait for a partner: this joiner), past
        the partners' progress bound. The rebase is its last move (with the donor's own, the larger): a
        partner still at the donor's phi lies that far from ours."""
        state = cls.adopt(theta, other)
        theta = theta.detach().to(state.phi.device, torch.float32)
        rebase = squared_distance(theta, state.phi, chunk_bounds(state.numel, 1 << 20))
        state.last_move_norm = max(math.sqrt(rebase), math.sqrt(sum_of_squares(state.delta)))
        state.phi.copy_(theta)
        return state

    @property
    def numel(self) -> int:
        return self.phi.numel()


def encode_payload(
    state: OuterState, theta: torch.Tensor, bounds: Sequence[tuple[int, int]], codec: str, block_size: int
) -> list[tuple[EncodedTensor, EncodedTensor]]:
    """A replica's outer payload, (phi, theta - phi) per chunk of ``bounds``, through the averaging codec, on
    the replica's device (only the encoded bytes leave it). One chunk's progress at a time: no model-sized
    temporary.

    Error-feedback codecs add the state's residuals, but the new residuals are not kept here: they are
    committed by ``commit_residuals`` once the partner used the payload (a solo or failed step leaves them
    as they were, so that what is carried forward is the error of what a partner actually received).
    """
    chunks = []
    for start, end in bounds:
        pair = []
        progress = theta[start:end] - state.phi[start:end]
        for tensor, residual in ((state.phi[start:end], state.residual_phi), (progress, state.residual_progress)):
            part = residual[start:end] if residual is not None else None
            encoded = encode_tensor(tensor, codec, block_size=block_size, residual=part)
            encoded.residual = None  # not kept with the payload: 2 fp32 model-sized copies per replica otherwise
            pair.append(encoded)
        chunks.append((pair[0], pair[1]))
    return chunks


def commit_residuals(
    state: OuterState, theta: torch.Tensor, bounds: Sequence[tuple[int, int]],
    chunks: Sequence[tuple[EncodedTensor, EncodedTensor]],
) -> None:
    """Keep the error feedback of a payload the partner used: residual <- (x + residual) - decoded(sent), per
    chunk, where x is what ``encode_payload`` encoded from the same ``state`` and ``theta`` (call this before
    the outer step changes phi). The sent bytes are decoded on the replica's device as the partner decoded
    them, so the residual is the error of what it received. No-op for codecs without error feedback."""
    codec = chunks[0][0].meta["codec"] if chunks else "none"
    if not (codec in QUANT_CODECS and QUANT_CODECS[codec][1]):
        return
    if state.residual_phi is None:  # created on first use
        state.residual_phi, state.residual_progress = torch.zeros_like(state.phi), torch.zeros_like(state.phi)
    for (start, end), sent in zip(bounds, chunks):
        phi = state.phi[start:end]
        progress = theta[start:end] - phi
        for x, residual, encoded in ((phi, state.residual_phi, sent[0]), (progress, state.residual_progress, sent[1])):
            part = residual[start:end]
            part.add_(x)  # x + residual: the quantizer's input, computed as it did
            part.sub_(decode_tensor(encoded.meta, encoded.payload, DEFAULT_LIMITS, device=phi.device).view(-1))


_SUM_PIECE = 1 << 16  # elements per float64 piece: the converted copy stays in cache


def sum_of_squares(x: torch.Tensor) -> float:
    """Sum of squares of ``x`` accumulated in float64 (no float32 overflow or cancellation), on ``x``'s device,
    converting one cache-sized piece at a time rather than the whole tensor (3x faster than one big copy at
    1M); one scalar comes back to the host."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for piece in x.reshape(-1).split(_SUM_PIECE):
        piece = piece.double()
        total += torch.dot(piece, piece)
    return float(total)


def squared_distance(a: torch.Tensor, b: torch.Tensor, bounds: list[tuple[int, int]]) -> float:
    """||a - b||^2 of two flat tensors, one chunk of ``bounds`` at a time (a chunk-sized difference, never a
    model-sized one)."""
    return sum(sum_of_squares(a[start:end] - b[start:end]) for start, end in bounds)


def payload_values(payload: Payload) -> torch.Tensor:
    """A received chunk's values as a flat float32 tensor on its device (blocks decoded: a chunk-sized temporary)."""
    if isinstance(payload, QuantizedBlocks):
        return dequantize_int8(payload) if payload.bits == 8 else dequantize_int4(payload)
    return payload.reshape(-1)


def payload_sums(own_phi: torch.Tensor, phi: Payload, progress: Payload) -> tuple[float, float]:
    """(||progress||^2, ||phi - own_phi||^2) of (a chunk of) a partner's payload, in float64, on our device.
    ``own_phi`` is our phi over the same elements. Summed over the chunks, they are what ``payload_problem``
    judges."""
    return sum_of_squares(payload_values(progress)), sum_of_squares(payload_values(phi) - own_phi)


def payload_problem(
    own_phi_norm: float, own_progress_norm: float, own_move_norm: float, partner_progress_sq: float,
    distance_sq: float, *, max_divergence: float, max_distance_ratio: float, max_progress_ratio: float,
    known: bool,
) -> str | None:
    """Why a partner's whole payload must be rejected, or None to accept it (``pull_scale`` then bounds the pull
    of its phi on ours). ``known``: we paired with this partner before (``PartnerBans.knows``).

    Our own drift is the larger of our progress norm ||theta - phi|| and our last outer move if it was all our
    own (``OuterState.last_move_norm``): replicas drift apart by what each learns on its own between pairings,
    so that is the scale of honest distances whatever H, the learning rate or the point in training.

    - A partner we paired with before must lie within ``max_distance_ratio`` x our own drift: it was within
      reach then, and one whose phi drifts a little further each outer step would drag its partners along
      (a bound in ||phi|| alone lets it).
    - Its phi must lie within ``max_divergence`` x ||our phi|| of ours (a norm bound alone lets phi' = -9 phi
      through), or x our own drift where that is larger (early in training one outer step moves phi by more
      than its norm). A partner we meet for the first time may lie farther, up to ``max_distance_ratio`` x our
      own drift, or beyond that within the ||phi|| bound with its pull clipped (``pull_scale``); it then
      becomes known. First meetings are joiners, catch-ups and replicas that started late or waited long for
      partners: a joiner's phi is its donor's weights, as far from the donor's phi as the donor's progress
      was then, which can exceed the donor's drift now; two replicas that refused each other would never pair.
    - Its progress theta - phi must be at most ``max_progress_ratio`` x ours.

    Finiteness and shapes are checked per chunk on arrival; this catches finite but hostile payloads.
    """
    distance = math.sqrt(distance_sq)
    drift = max(own_progress_norm, own_move_norm)
    in_reach = distance <= max_distance_ratio * drift  # "<=" is False for a NaN: a rejection
    divergence = distance / max(own_phi_norm, drift, 1e-30)
    if not (divergence <= max_divergence or (in_reach and not known)):
        return (f"partner phi is {divergence:.3g} x our phi's norm away from ours (limit {max_divergence:g}; in our "
                "own drift where that is larger)")
    if known and not in_reach:
        return (f"partner phi is {distance / max(drift, 1e-30):.3g} x our own drift (progress or last move) away "
                f"from ours (limit {max_distance_ratio:g})")
    progress_norm = math.sqrt(partner_progress_sq)
    if not progress_norm <= max_progress_ratio * own_progress_norm:
        return (f"partner progress norm {progress_norm:.3g} exceeds {max_progress_ratio:g}x ours "
                f"({own_progress_norm:.3g})")
    return None


def pull_scale(distance_sq: float, own_progress_norm: float, own_move_norm: float, max_distance_ratio: float) -> float:
    """The factor on gamma that bounds an accepted partner's pull on our phi by the pull of a partner
    ``max_distance_ratio`` x our own drift away (see ``payload_problem``): 1 within that distance, less beyond."""
    bound = max_distance_ratio * max(own_progress_norm, own_move_norm)  # NaN for inf x 0: no bound
    distance = math.sqrt(distance_sq)
    return bound / distance if distance > bound else 1.0


FAILURE_TABLE_SIZE = 64  # partners whose failed exchanges are remembered (the least recent is forgotten)
KNOWN_TABLE_SIZE = 1024  # partners we paired with that are remembered as known (the least recent is forgotten)
BAN_MAX_FACTOR = 16  # a repeat offender's ban doubles up to this many times its first one


class PartnerBans:
    """The partners a replica will not pair with for a while, and the rule that puts them there.

    Its clock is the replica's own outer step count: a ban takes ``ban_steps`` of our outer steps (that many
    chances to pair), doubling for each repeat up to ``BAN_MAX_FACTOR`` x. Each exchange ends in one of
    ``OUTCOMES``; ``settle`` applies the rule. The daemon (swarmd.daemon.outer_service) and bench/poisoning.py
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
        self._known: OrderedDict[str, None] = OrderedDict()  # partners we paired with, most recent last

    def is_banned(self, peer: str, now: int) -> bool:
        return self.bans.is_banned(peer, now)

    def knows(self, peer: str) -> bool:
        """Whether we paired with ``peer`` before (see ``payload_problem``)."""
        return peer in self._known

    def settle(self, peer: str, outcome: str, now: int) -> tuple[str, bool]:
        """Record how an exchange with ``peer`` ended at our outer step ``now``. Returns the outer step's
        result ("paired", "rejected" or "failed") and whether ``peer`` is now banned.

        - "paired": nothing held against it any more, but a past ban's backoff stays (no laundering
          bans with one good step in between); from now on it is known (``knows``);
        - "rejected" (its payload failed ``payload_problem`` or the per-chunk checks) and "stalled"
          (it paired, then sent nothing for the stall timeout): banned at once; a stall's step "failed";
        - "failed" (it went away, refused our payload, timed out): banned at the ``max_failures``-th
          failure in a row. One failure alone is not held against it: a peer that died is not hostile.
        """
        if outcome not in self.OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        failures = self._failures.pop(peer, 0)
        if outcome == "paired":
            self._known[peer] = None
            self._known.move_to_end(peer)
            if len(self._known) > KNOWN_TABLE_SIZE:
                self._known.popitem(last=False)
            return "paired", False
        ban = outcome in ("rejected", "stalled") or failures + 1 >= self.max_failures
        if ban:
            self.bans.ban(peer, now)
        else:
            self._failures[peer] = failures + 1
            if len(self._failures) > FAILURE_TABLE_SIZE:
                self._failures.popitem(last=False)
        return ("rejected" if outcome == "rejected" else "failed"), ban


PIECE = 1 << 20  # elements per call of the update on a solo step (its torch path's temporaries stay this size)


def _numel(payload: Payload) -> int:
    return payload.numel if isinstance(payload, QuantizedBlocks) else payload.numel()


def outer_step_(
    state: OuterState,
    theta: torch.Tensor,
    partner: Sequence[tuple[Payload, Payload]] | None = None,
    *,
    beta: float,
    gamma: float,
    mu: float,
    max_move: float = math.inf,
) -> None:
    """Apply one NoLoCo outer step to ``state`` and the flat weights ``theta`` (the snapshot the payload was
    taken from), in place: paired with ``partner``'s (phi, progress) chunks, consecutive, as they arrived
    (int8 blocks or float32, on the replica's device), or solo without. ``theta`` ends as the new phi.

    The rule is ``swarmd.kernels.noloco_outer_update_``, run chunk by chunk: no temporary the size of the
    model (at 125M parameters a copy is 500 MB, and a replica holds several).

    The move of phi (the new delta) is then clipped to ``max_move`` x ||phi||: whatever a partner's payload
    got past ``payload_problem``, one outer step cannot carry phi far. The factor applied is kept in
    ``state.move_scale`` (1: not clipped); the clipped delta is the momentum carried on.
    """
    phi, delta, numel = state.phi, state.delta, state.numel
    if theta.numel() != numel or not theta.is_contiguous() or theta.data_ptr() in (phi.data_ptr(), delta.data_ptr()):
        raise ValueError("outer_step_ works in place: theta must be its own contiguous buffer of the replica's size")
    theta = theta.view(-1)
    if partner is None:
        pieces = [(start, end, None, None) for start, end in chunk_bounds(numel, PIECE)]
    else:
        pieces, start = [], 0
        for p_phi, p_progress in partner:
            if _numel(p_phi) != _numel(p_progress):
                raise ValueError("the partner's phi and progress chunks must be cut alike")
            pieces.append((start, start + _numel(p_phi), p_phi, p_progress))
            start += _numel(p_phi)
        if start != numel:
            raise ValueError(f"the partner's chunks cover {start} elements, the replica {numel}")
    phi_norm = math.sqrt(sum_of_squares(phi)) if math.isfinite(max_move) else math.inf
    for start, end, p_phi, p_progress in pieces:
        noloco_outer_update_(phi[start:end], theta[start:end], delta[start:end], p_phi, p_progress,
                             beta=beta, gamma=gamma, mu=mu)
    move = math.sqrt(sum_of_squares(delta)) if math.isfinite(max_move) else 0.0
    bound = max_move * phi_norm
    scale = bound / move if move > bound else 1.0
    if scale != 1.0:  # phi_old + delta -> phi_old + scale * delta (rare: only a hostile or broken partner)
        phi.sub_(delta, alpha=1.0 - scale)
        delta.mul_(scale)
        theta.copy_(phi)
    state.outer_step += 1
    state.move_scale = scale
    # a paired move carries the partner's pull, which a poisoner would use to widen our bound for its next victim
    if partner is not None:
        state.last_move_norm = 0.0
    else:
        state.last_move_norm = move * scale if math.isfinite(max_move) else math.sqrt(sum_of_squares(delta))
