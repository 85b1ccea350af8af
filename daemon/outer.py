"""NoLoCo outer steps over the network: find one partner, swap payloads in chunks, apply the update.

The walk (shared/ARCHITECTURE.md, "An outer step's walk"):
1. At an outer boundary the replica snapshots its weights on the compute lane, encodes its payload
   (phi and theta - phi, chunked, through the averaging codec) and posts itself on the stage's ready
   board in the DHT until its pairing deadline.
2. Pairing (swarmd.swarm.pairing): the replica with the smaller peer id proposes to a random ready
   replica; a ready replica accepts the first proposal. No barrier, no global round, no world size.
3. Both members push their own payload to the other at once, one acknowledged RPC per chunk (the
   accepting replica starts as soon as it accepts), so both directions of the link carry data from
   the start. (Request-reply chunk swaps leave one direction idle half the time: over p2pd's yamux
   they moved 20 MiB each way in 3.5 s on the bench's 100 Mbit/s link, where one-way streams in
   both directions at once took 2.5 s.) Every chunk is checked (shape, dtype, finite) on arrival;
   once the proposer holds the partner's whole payload and its own was acknowledged, it checks the
   payload against its own phi and progress (swarmd.swarm.outer.payload_problem) and sends its verdict
   ("outer_commit"); the partner checks the proposer's payload the same way before it acknowledges.
4. Both apply the NoLoCo update from the same two payloads, the move of phi clipped (max_move). No
   partner before the deadline: a solo step. How an exchange that went wrong ends is decided by
   swarmd.swarm.outer.PartnerBans: a bad payload is rejected, counted and its sender banned; a partner
   that sends nothing for stall_timeout_s is banned; one that vanishes mid-exchange only fails the step
   ("failed"), and is banned after max_failures failures in a row. Either way the step is solo, and
   one's own state is never touched by a partner's bad data.

Training goes on during all of this; see swarmd.swarm.outer for how the progress is carried over.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time
from swarmd.daemon.compute import ComputeLane
from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.records import encode_ready, ready_key, ready_peers
from swarmd.daemon.spec import AveragingConfig
from swarmd.daemon.transport import Transport
from swarmd.protocols import rpc
from swarmd.protocols.codecs import EncodedTensor
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import Limits
from swarmd.protocols.wire import Message, RemoteError, StreamEnded, encode_message
from swarmd.swarm.outer import (
    OuterState, PartnerBans, chunk_bounds, encode_payload, outer_step_, payload_problem, payload_sums,
    sum_of_squares,
)
from swarmd.swarm.pairing import TAKEN, PairingState, Phase, choose_partner

logger = logging.getLogger(__name__)

CHUNKS_IN_FLIGHT = 4  # chunk RPCs each side keeps open at once (enough to fill the link: yamux windows are per stream)
BOARD_POLL_S = 0.25  # how often a waiting replica rereads the ready board
PROPOSAL_TIMEOUT_S = 5.0
BOARD_CHECK_S = 2.0  # the longest a proposal waits for a fresh read of the board (its sender was not on our last)
REFUSAL_MEMORY_S = 1.0  # a replica that refused us is asked again after this long
BOARD_UPDATE_S = 1e-3  # a "paired" entry expires just after the "ready" one it replaces (the DHT keeps the later)
NOT_ITS_FAULT = ("busy", "unauthorized")  # refusals of a partner's request that do not make it a bad partner


async def run_at_boundaries(
    outer_step: Callable[[], Awaitable[str]], current_step: Callable[[], int], inner_steps: int, stop: asyncio.Event,
    pin: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Call ``outer_step`` each time ``current_step()`` reaches the next boundary, every ``inner_steps`` (H)
    inner steps, until ``stop`` is set. Shared by the NoLoCo and DiLoCo services.

    Without ``pin`` the boundaries are the multiples of H, and those an outer step overran (a long wait for a
    partner) are skipped. With ``pin`` (NoLoCoService.pin_boundary), every payload covers about H inner steps
    instead, not H plus however long the step before took (a partner's progress is judged against ours: the
    two must cover as many steps): after a "paired" step, whose update came from the weights at its start,
    the next boundary is H steps after that start (pinned by ``pin()`` when the step overran it, and then
    taken at once); after any other step, whose update came from the weights at its end, H steps after that.
    """
    boundary = (current_step() // inner_steps + 1) * inner_steps
    pinned_at: int | None = None  # the inner step whose weights the next step's payload is pinned to
    while not stop.is_set():
        if current_step() >= boundary:
            step = asyncio.ensure_future(outer_step())
            following = (current_step() if pinned_at is None else pinned_at) + inner_steps
            result, pinned = None, False
            try:
                while not step.done():
                    if pin is not None and not pinned and current_step() >= following:
                        pinned = await pin()  # the weights at the next boundary, which this step overran
                    await asyncio.wait({step}, timeout=0.05)
                result = step.result()
            except asyncio.CancelledError:
                step.cancel()
                await asyncio.wait({step})
                raise
            except Exception:  # a bug in one step must not end outer steps for good
                logger.exception("outer step failed")
            if pin is None:
                boundary = (current_step() // inner_steps + 1) * inner_steps
            elif result == "paired":
                boundary, pinned_at = following, following if pinned else None
            else:
                boundary, pinned_at = current_step() + inner_steps, None
        await asyncio.sleep(0.05)


async def _settle(ex: _Exchange, *waits: Awaitable[object] | None) -> None:
    """Wait for every one of ``waits`` (None: nothing to wait for), or raise the exchange's failure as
    soon as one is reported (a rejected chunk, a refused payload, a reject verdict)."""
    pending = {asyncio.ensure_future(w) for w in waits if w is not None}
    try:
        while pending:
            done, _ = await asyncio.wait({*pending, ex.failure}, return_when=asyncio.FIRST_COMPLETED)
            if ex.failure in done:
                ex.failure.result()  # raises: the failure future only ever holds an exception
            for future in done:
                future.result()  # our own send failing raises here
            pending -= done
    finally:
        for future in pending:
            if future is not ex.sender:
                future.cancel()


class Replica(Protocol):
    """The weights an outer step reads and writes, as one flat float32 vector (called on the lane)."""

    def read_flat(self) -> torch.Tensor:
        """A new flat copy of the weights: the outer step keeps it and uses it as scratch space."""
        ...

    def write_flat(self, flat: torch.Tensor) -> None: ...


class _Rejected(Exception):
    """The partner's payload failed validation (its reason is a ProtocolError reason)."""

    def __init__(self, reason: str, why: str, counted: bool = False):
        super().__init__(why)
        self.reason = reason
        self.counted = counted  # already in swarmd_rejected_messages_total (the transport rejected it)


class _Failed(Exception):
    """The exchange broke off (partner gone, refused our payload, or gave up)."""


class _Stalled(Exception):
    """The partner sent no chunk of its payload for the stall timeout."""


@dataclass
class _Exchange:
    """One outer step's payloads: ours (encoded at the boundary) and the partner's (as it arrives)."""

    numel: int
    bounds: list[tuple[int, int]]
    own_chunks: list[tuple[EncodedTensor, EncodedTensor]]
    own_phi: torch.Tensor  # our phi itself (not a copy: nothing writes it before the step is applied)
    own_phi_norm: float
    own_progress_norm: float
    theta_snap: torch.Tensor
    partner_phi: list[torch.Tensor | None]  # the partner's chunks as they arrive (kept as decoded, no copy)
    partner_progress: list[torch.Tensor | None]
    received: set[int] = field(default_factory=set)
    progress_sq: float = 0.0  # the partner's ||theta - phi||^2 over the chunks received
    distance_sq: float = 0.0  # ||phi_partner - our phi||^2 over the chunks received
    last_arrival: float = 0.0  # time.monotonic() of the partner's last chunk (or of pairing)
    complete: asyncio.Event = field(default_factory=asyncio.Event)  # every chunk of the partner arrived
    sender: asyncio.Task | None = None  # pushes our chunks to the partner
    failure: asyncio.Future | None = None  # gets an exception when the partner's data or verdict ends the pair
    done: asyncio.Future | None = None  # the non-driver's wait for the driver's verdict

    def forget_partner(self) -> None:
        """Drop whatever a would-be partner sent, and a failure it caused (our proposal to it failed after
        all): the next partner starts from nothing."""
        self.partner_phi = [None] * len(self.bounds)
        self.partner_progress = [None] * len(self.bounds)
        self.received.clear()
        self.progress_sq = self.distance_sq = 0.0
        self.complete.clear()
        if self.failure is not None and self.failure.done():
            if not self.failure.cancelled():
                self.failure.exception()  # retrieved: it was about the would-be partner
            self.failure = asyncio.get_running_loop().create_future()

    def fail(self, error: Exception) -> None:
        """End the pair with ``error`` (the first failure wins)."""
        if self.failure is not None and not self.failure.done():
            self.failure.set_exception(error)

    def store(self, index: int, phi: torch.Tensor, progress: torch.Tensor) -> None:
        """Keep the partner's chunk ``index`` after checking its shape and dtype (finiteness: codec layer)."""
        start, end = self.bounds[index]
        for what, t in (("phi", phi), ("progress", progress)):
            if t.dtype != torch.float32:
                raise ProtocolError("dtype", f"{what} chunk must be float32, got {t.dtype}")
            if tuple(t.shape) != (end - start,):
                raise ProtocolError("shape", f"{what} chunk {index} has shape {tuple(t.shape)}, expected {(end - start,)}")
        if index in self.received:
            raise ProtocolError("malformed", f"chunk {index} arrived twice")
        self.partner_phi[index] = phi
        self.partner_progress[index] = progress
        progress_sq, distance_sq = payload_sums(self.own_phi[start:end], phi, progress)
        self.progress_sq += progress_sq
        self.distance_sq += distance_sq
        self.received.add(index)
        self.last_arrival = time.monotonic()
        if len(self.received) == len(self.bounds):
            self.complete.set()

    def problem(self, config: AveragingConfig) -> str | None:
        """Why the partner's payload must be rejected (``payload_problem`` under ``config``'s bounds), or None."""
        if len(self.received) != len(self.bounds):
            return f"only {len(self.received)} of {len(self.bounds)} chunks arrived"
        return payload_problem(self.own_phi_norm, self.own_progress_norm, self.progress_sq, self.distance_sq,
                               max_divergence=config.max_divergence, max_distance_ratio=config.max_distance_ratio,
                               max_progress_ratio=config.max_progress_ratio)

    @property
    def divergence(self) -> float:
        """||phi_partner - our phi|| / ||our phi|| (once the whole payload arrived)."""
        return math.sqrt(self.distance_sq) / max(self.own_phi_norm, 1e-12)

    async def watch_stall(self, timeout: float) -> None:
        """Return once the partner's whole payload arrived; raise _Stalled if ``timeout`` seconds pass
        without a chunk of it (counted from pairing, then from each chunk)."""
        while not self.complete.is_set():
            left = self.last_arrival + timeout - time.monotonic()
            if left <= 0:
                raise _Stalled(f"no chunk of its payload for {timeout:g} s ({len(self.received)} of "
                               f"{len(self.bounds)} arrived)")
            try:
                await asyncio.wait_for(self.complete.wait(), left)
            except asyncio.TimeoutError:
                pass


class NoLoCoService:
    """The NoLoCo role of one replica of ``stage``. ``await start()``, then ``outer_step()`` at each boundary
    (``run_at_boundaries`` calls it whenever the inner step crosses a multiple of H)."""

    def __init__(
        self, *, run_id: str, stage: int, peer_id: str, board_subkey: bytes, config: AveragingConfig, codec: str,
        block_size: int,
        transport: Transport, dht: DHTNode, lane: ComputeLane, replica: Replica, metrics: NodeMetrics,
        limits: Limits, rng: random.Random,
    ):
        self.run_id, self.stage, self.peer_id = run_id, stage, peer_id
        self.board_subkey = board_subkey  # our owner marker: the subkey our signed ready-board entries sit under
        self.config, self.codec, self.block_size = config, codec, block_size
        self.transport, self.dht, self.lane, self.replica = transport, dht, lane, replica
        self.metrics, self.limits, self.rng = metrics, limits, rng
        self.pairing = PairingState(peer_id)
        self.partners = PartnerBans(config.ban_outer_steps, config.max_failures)  # its clock: our outer steps
        self.state: OuterState | None = None
        self.results: Counter[str] = Counter()  # outer steps taken, by result
        self._exchange: _Exchange | None = None
        self._paired = asyncio.Event()
        self._board: set[str] = set()  # who was on our stage's ready board at the last read (this outer step)
        self._board_read_at = -math.inf  # time.monotonic() when that read started
        self._pinned: torch.Tensor | None = None  # theta - theta_snap at the boundary this step overran (pin_boundary)
        self._tasks: set[asyncio.Task] = set()  # fire-and-forget board updates, kept until done

    async def start(self, adopt: OuterState | None = None) -> None:
        """Take phi from the current weights (or ``adopt`` a live replica's outer state, for a joiner that
        downloaded that replica's weights) and serve the outer-step RPCs."""
        theta = await self.lane.run(self.replica.read_flat)
        self.state = OuterState.start(theta) if adopt is None else OuterState.adopt(theta, adopt)
        await self.transport.serve(rpc.PAIR, "pair", self._on_pair, ("pair_request",), channel="averaging")
        await self.transport.serve(rpc.OUTER_CHUNK, "outer_chunk", self._on_chunk, ("outer_chunk",),
                                   channel="averaging", on_reject=self._on_reject)
        await self.transport.serve(rpc.OUTER_COMMIT, "outer_commit", self._on_commit, ("outer_commit",),
                                   channel="averaging", on_reject=self._on_reject)

    async def close(self) -> None:
        """Cancel pending board updates; the handlers go with the node's P2P."""
        for task in list(self._tasks):
            task.cancel()

    def _background(self, coro: Awaitable[object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- one outer step ------------------------------------------------------------------------

    async def outer_step(self) -> str:
        """One outer step: pair, exchange, update. Returns "paired", "solo", "rejected" or "failed"."""
        assert self.state is not None, "call start() first"
        cfg = self.config
        ex = await self.lane.run(self._prepare)
        loop = asyncio.get_running_loop()
        ex.done, ex.failure = loop.create_future(), loop.create_future()
        self._exchange = ex
        self._paired.clear()
        self._board, self._board_read_at = set(), -math.inf  # last step's board says nothing about this one
        self.pairing.open()
        started = time.monotonic()
        partner: str | None = None
        try:
            paired = await self._find_partner(started + cfg.pair_timeout_s)
            self.metrics.partner_wait.observe(time.monotonic() - started)
            partner = self.pairing.partner if paired else None
            if partner is None:
                result, use_partner = "solo", False
            else:
                result, use_partner = await self._swap(ex, partner)
        finally:
            self.pairing.close()
            self._exchange = None
            for pending in (ex.done, ex.failure, ex.sender):
                if pending is not None and not pending.done():
                    pending.cancel()
                elif pending is not None and not pending.cancelled():
                    pending.exception()  # retrieved: a failure reported after the step settled is not an error
        await self.lane.run(self._apply, ex, use_partner)
        if not use_partner:
            self._pinned = None  # it pinned a boundary before the weights this step was taken from
        self.metrics.outer_steps.labels(result).inc()
        self.results[result] += 1
        logger.info("outer step %d: %s%s", self.state.outer_step, result, f" with {partner[-8:]}" if partner else "")
        return result

    async def _swap(self, ex: _Exchange, partner: str) -> tuple[str, bool]:
        """Exchange payloads with ``partner``. Returns (result, whether to use the partner's payload)."""
        started = time.monotonic()
        ex.last_arrival = started  # the stall clock starts at pairing
        stall = asyncio.ensure_future(ex.watch_stall(self.config.stall_timeout_s))
        try:
            if self.pairing.is_driver:
                ex.sender = asyncio.ensure_future(self._send_payload(ex, partner, self.pairing.session))
                await asyncio.wait_for(self._drive(ex, partner, stall), self.config.exchange_timeout_s)
            else:  # our payload is on its way since we accepted (see _on_pair): wait for the verdict
                await asyncio.wait_for(_settle(ex, ex.done, ex.sender, stall), self.config.exchange_timeout_s)
            self.metrics.outer_exchange.observe(time.monotonic() - started)
            outcome, why = "paired", ""
        except _Rejected as e:
            if not e.counted:
                self.metrics.rejected.labels(e.reason).inc()
            outcome, why = "rejected", f"rejected its payload ({e.reason}): {e}"
        except _Stalled as e:
            self.metrics.rejected.labels("stalled").inc()
            outcome, why = "stalled", f"it stalled: {e}"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            outcome, why = "failed", f"exchange failed: {type(e).__name__}: {e}"
        finally:
            if not stall.done():
                stall.cancel()
            elif not stall.cancelled():
                stall.exception()  # retrieved: a stall noticed as the exchange ended otherwise is not an error
        result, banned = self.partners.settle(partner, outcome, self.state.outer_step)
        if outcome != "paired":
            logger.warning("outer step with %s: %s; stepping solo%s", partner[-8:], why,
                           "; banned it" if banned else "")
        return result, outcome == "paired"

    async def pin_boundary(self) -> bool:
        """The next outer boundary came while this outer step is still under way: keep the progress made since
        this step's snapshot (on the lane, before this step's update consumes the snapshot), for the next step
        to send. True if pinned. See run_at_boundaries."""
        ex = self._exchange
        if ex is None or self._pinned is not None:
            return False  # this step is being applied: too late
        snap = ex.theta_snap
        self._pinned = await self.lane.run(lambda: self.replica.read_flat().float().sub_(snap))
        return True

    def _prepare(self) -> _Exchange:
        """On the lane: snapshot theta (or take the pinned one, moved onto our new phi), encode our payload
        chunks (error feedback per chunk)."""
        state = self.state
        if self._pinned is not None:  # the weights at the boundary the last step overran, in its update's frame
            theta, self._pinned = self._pinned.add_(state.phi), None
        else:
            theta = self.replica.read_flat().float()
        bounds = chunk_bounds(state.numel, self.config.chunk_elements)
        chunks = encode_payload(state, theta, bounds, self.codec, self.block_size)
        progress_sq = sum(sum_of_squares(theta[start:end] - state.phi[start:end]) for start, end in bounds)
        return _Exchange(
            numel=state.numel, bounds=bounds, own_chunks=chunks, own_phi=state.phi,
            own_phi_norm=math.sqrt(sum_of_squares(state.phi)), own_progress_norm=math.sqrt(progress_sq),
            theta_snap=theta, partner_phi=[None] * len(bounds), partner_progress=[None] * len(bounds),
        )

    def _apply(self, ex: _Exchange, use_partner: bool) -> None:
        """On the lane: the NoLoCo update (paired or solo), then the new weights into the model.

        Paired, the update is taken from the snapshot the partner got; without a partner, from the weights
        as they are now (nobody saw the snapshot), so that a long wait does not make our next payload's
        progress cover more inner steps than our partners' (see run_at_boundaries)."""
        cfg, state = self.config, self.state
        if use_partner:
            self.metrics.divergence.set(ex.divergence)
        theta_now = self.replica.read_flat().float()
        new_theta = outer_step_(
            state, ex.theta_snap if use_partner else theta_now.clone(), theta_now,
            ex.partner_phi if use_partner else None, ex.partner_progress if use_partner else None,
            beta=cfg.beta, gamma=cfg.gamma, mu=cfg.mu, max_move=cfg.max_move,
        )
        self.replica.write_flat(new_theta)
        if state.move_scale < 1.0:
            logger.info("outer step %d: the move of phi was clipped to %g x ||phi|| (scaled by %.3g)",
                        state.outer_step, cfg.max_move, state.move_scale)

    # ---- pairing -------------------------------------------------------------------------------

    async def _find_partner(self, deadline: float) -> bool:
        """Post ourselves on the ready board and pair before ``deadline``. True if paired."""
        expiration = get_dht_time() + max(0.5, deadline - time.monotonic())
        # Post and look for partners at once: a DHT store can take a while (it first finds the key's nodes).
        posted = asyncio.ensure_future(self._post_ready(expiration, paired=False))
        try:
            paired = await self._pair_before(deadline)
        finally:
            # take ourselves off the board (a later entry for our subkey) so nobody wastes a proposal on us
            self._background(self._mark_paired(posted, expiration) if self.pairing.phase is Phase.PAIRED else posted)
        return paired

    async def _mark_paired(self, posted: asyncio.Future, expiration: float) -> None:
        await posted
        await self._post_ready(expiration + BOARD_UPDATE_S, paired=True)

    async def _post_ready(self, expiration: float, paired: bool) -> bool:
        try:
            return bool(await self.dht.store(
                ready_key(self.run_id, self.stage), encode_ready(self.state.outer_step, self.state.numel, paired),
                expiration, subkey=self.board_subkey,
            ))
        except Exception as e:
            logger.debug("posting on the ready board failed: %s", e)
            return False

    async def _pair_before(self, deadline: float) -> bool:
        refused: dict[str, float] = {}  # busy right now: asked again after REFUSAL_MEMORY_S
        taken: set[str] = set()  # paired with someone else: not asked again in this outer step
        while deadline - time.monotonic() > 0:
            if self.pairing.phase is Phase.PAIRED:
                return True
            read_at = time.monotonic()
            try:  # a slow DHT read must not hold us past the deadline
                board = await asyncio.wait_for(self._read_board(), deadline - read_at)
            except asyncio.TimeoutError:
                break
            ready = [p for p in board if not self.partners.is_banned(p, self.state.outer_step)]
            logger.debug("ready board: %d others (read in %.2f s)", len(ready), time.monotonic() - read_at)
            # Work through this read before the next one: a board read can take seconds on a busy DHT.
            while self.pairing.phase is Phase.READY and (left := deadline - time.monotonic()) > 0:
                now = time.monotonic()
                skip = taken | {p for p, at in refused.items() if now - at < REFUSAL_MEMORY_S}
                candidate = choose_partner(self.peer_id, ready, skip, self.rng)
                if candidate is None:
                    break
                answer = await self._propose(candidate, min(left, PROPOSAL_TIMEOUT_S))
                if answer is None:
                    return True
                if answer == TAKEN:
                    taken.add(candidate)
                else:
                    refused[candidate] = time.monotonic()
            if self.pairing.phase is Phase.PAIRED:
                return True
            try:
                await asyncio.wait_for(self._paired.wait(), max(0.0, min(deadline - time.monotonic(), BOARD_POLL_S)))
            except asyncio.TimeoutError:
                pass
        return self.pairing.phase is Phase.PAIRED

    async def _read_board(self) -> list[str]:
        """The others ready on our stage's board now (also kept for ``_on_board``)."""
        self._board_read_at = time.monotonic()
        try:
            record = await self.dht.get(ready_key(self.run_id, self.stage), latest=True)
        except Exception as e:
            logger.debug("reading the ready board failed: %s", e)
            return []
        self._board = set(ready_peers(record, self.state.numel))
        return [p for p in self._board if p != self.peer_id]

    async def _on_board(self, peer: str) -> bool:
        """Whether ``peer`` is ready on our stage's board for this outer step (live, unpaired, of our parameter
        count): the last read, or a fresh one if that is over BOARD_POLL_S old (a proposer's entry may be
        newer than our read; requests from peers not on it cannot make us read more often than that)."""
        if peer not in self._board and time.monotonic() - self._board_read_at >= BOARD_POLL_S:
            try:
                await asyncio.wait_for(self._read_board(), BOARD_CHECK_S)
            except asyncio.TimeoutError:
                pass
        return peer in self._board

    async def _propose(self, candidate: str, timeout: float) -> str | None:
        """Propose to ``candidate``. None if it accepted, else why not (``TAKEN``: paired with another)."""
        session = os.urandom(16)
        self.pairing.propose(candidate, session)
        request = encode_message("pair_request", {"session": session, "stage": self.stage, "numel": self.state.numel})
        try:
            await self.transport.call(candidate, rpc.PAIR, "pair", request, timeout=timeout, channel="averaging")
            refusal = None
        except asyncio.CancelledError:
            raise
        except RemoteError as e:
            logger.debug("proposal to %s refused: %s", candidate[-8:], e)
            refusal = e.message
        except Exception as e:
            logger.debug("proposal to %s failed: %s: %s", candidate[-8:], type(e).__name__, e)
            refusal = f"{type(e).__name__}: {e}"
        self.pairing.answered(refusal is None)
        if refusal is not None and self._exchange is not None:
            self._exchange.forget_partner()  # it may have accepted and started sending before we gave up
        return refusal

    async def _on_pair(self, sender: str, message: Message) -> bytes:
        fields = message.fields
        if fields["stage"] != self.stage:
            raise ProtocolError("wrong_stage", f"this replica serves stage {self.stage}, not {fields['stage']}")
        if self.state is None or fields["numel"] != self.state.numel:
            raise ProtocolError("shape", "parameter count differs from ours")
        if self.partners.is_banned(sender, self.state.outer_step):
            raise ProtocolError("unknown_peer", "you are banned here for a while")
        if self.pairing.phase is Phase.READY and not await self._on_board(sender):
            raise ProtocolError("unknown_peer", "you are not ready on this stage's board for this outer step")
        if (why := self.pairing.on_proposal(sender, fields["session"])) is not None:
            raise ProtocolError("busy", why)
        self._paired.set()
        if self._exchange is not None:  # start pushing our payload now: the proposer is ready to receive it
            self._exchange.sender = asyncio.ensure_future(self._send_payload(self._exchange, sender, fields["session"]))
        return encode_message("ack", {})

    # ---- exchange ------------------------------------------------------------------------------

    async def _send_payload(self, ex: _Exchange, partner: str, session: bytes) -> None:
        """Push every chunk of our payload to ``partner`` (a few RPCs in flight), each acknowledged."""
        window = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

        async def send_chunk(index: int) -> None:
            async with window:
                fields = {"session": session, "index": index, "count": len(ex.bounds), "numel": ex.numel}
                request = encode_message("outer_chunk", fields, list(ex.own_chunks[index]))
                try:
                    await self.transport.call(partner, rpc.OUTER_CHUNK, "outer_chunk", request,
                                              timeout=self.config.exchange_timeout_s, channel="averaging")
                except RemoteError as e:
                    raise _Failed(f"partner refused chunk {index}: {e}") from None

        tasks = [asyncio.create_task(send_chunk(i)) for i in range(len(ex.bounds))]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001  (reported through the exchange: whoever waits on it raises)
            ex.fail(e if isinstance(e, _Failed) else _Failed(f"sending our payload failed: {type(e).__name__}: {e}"))
        finally:  # one failed chunk ends the exchange: stop the others
            for task in tasks:
                task.cancel()

    async def _drive(self, ex: _Exchange, partner: str, stall: asyncio.Future) -> None:
        """As the proposer: once our payload is acknowledged and the partner's has arrived (``stall``
        returns then), validate it and send the verdict."""
        session = self.pairing.session
        await _settle(ex, ex.sender, stall)
        if (problem := ex.problem(self.config)) is not None:
            await self._send_verdict(partner, session, "reject")
            raise _Rejected("norm", problem)
        try:
            await self._send_verdict(partner, session, "accept", best_effort=False)
        except RemoteError as e:
            raise _Failed(f"partner refused our payload: {e}") from None

    async def _send_verdict(self, partner: str, session: bytes, verdict: str, best_effort: bool = True) -> None:
        request = encode_message("outer_commit", {"session": session, "verdict": verdict})
        try:
            await self.transport.call(partner, rpc.OUTER_COMMIT, "outer_commit", request,
                                      timeout=PROPOSAL_TIMEOUT_S, channel="averaging")
        except Exception:
            if not best_effort:
                raise

    def _current(self, sender: str, session: bytes, *, payload: bool = False) -> _Exchange:
        """The exchange ``sender`` may talk to us about (send its ``payload`` to), or a rejection."""
        ex = self._exchange
        allowed = self.pairing.may_send_payload if payload else self.pairing.is_partner
        if ex is None or not allowed(sender, session):
            raise ProtocolError("unknown_peer", "no outer exchange with you is under way here")
        return ex

    async def _on_chunk(self, sender: str, message: Message) -> bytes:
        fields = message.fields
        ex = self._current(sender, fields["session"], payload=True)
        if fields["numel"] != ex.numel or fields["count"] != len(ex.bounds) or fields["index"] >= len(ex.bounds):
            raise ProtocolError("shape", "chunking does not match our parameter vector")
        ex.store(fields["index"], *message.tensors)  # ProtocolError -> _on_reject
        return encode_message("ack", {})

    async def _on_commit(self, sender: str, message: Message) -> bytes:
        ex = self._current(sender, message.fields["session"])
        if ex.done is None or ex.done.done():
            raise ProtocolError("malformed", "no verdict is expected now")
        if message.fields["verdict"] == "reject":
            ex.done.set_exception(_Failed("the partner rejected our payload"))
            return encode_message("ack", {})
        if (problem := ex.problem(self.config)) is not None:
            raise ProtocolError("norm", problem)  # -> _on_reject fails the exchange
        ex.done.set_result(None)
        return encode_message("ack", {})

    def _on_reject(self, sender: str, error: ProtocolError) -> None:
        """A request of our partner was rejected (by us or the codec layer), or its stream ended mid-request:
        the pair is off. Only bad data is held against the partner (rejected: banned); a request that broke
        off (StreamEnded: it went away) or that we turned down for our own reasons (our load, a membership
        record we could not confirm) fails the step without a ban."""
        ex = self._exchange
        if ex is None or sender != self.pairing.partner or error.reason == "unknown_peer":
            return
        if isinstance(error, StreamEnded) or error.reason in NOT_ITS_FAULT:
            ex.fail(_Failed(f"its request did not get through: {error}"))
        else:
            ex.fail(_Rejected(error.reason, str(error), counted=True))
