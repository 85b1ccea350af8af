"""NoLoCo outer steps over the network: find one partner, swap payloads in chunks, apply the update.

The walk (shared/ARCHITECTURE.md, "An outer step's walk"), file by file:
1. At an outer boundary (swarmd.daemon.boundaries) the replica snapshots its weights on the compute lane,
   encodes its payload on its device (phi and theta - phi, chunked, through the averaging codec:
   swarmd.swarm.outer.encode_payload) and posts itself on the stage's ready board
   (swarmd.daemon.ready_board) until its pairing deadline.
2. Pairing (swarmd.swarm.pairing, here): the replica with the smaller peer id proposes to a random ready
   replica; a ready replica accepts the first proposal. No barrier, no global round, no world size.
3. The exchange (swarmd.daemon.outer_exchange): both push their payload at once, chunk by chunk; each chunk
   is checked and kept as it arrived (int8 blocks on our device); the proposer judges the partner's payload
   and sends its verdict, the partner judges the proposer's before it acknowledges.
4. Both apply the NoLoCo update from the same two payloads (swarmd.swarm.outer.outer_step_: the fused kernel
   of swarmd.kernels chunk by chunk, the move of phi clipped by max_move), and keep the error feedback of
   the payload the partner used. No partner before the deadline: a solo step, residuals untouched. How an
   exchange that went wrong ends is decided by swarmd.swarm.outer.PartnerBans: a bad payload is rejected,
   counted and its sender banned; a partner that sends nothing for stall_timeout_s is banned; one that
   vanishes mid-exchange only fails the step ("failed"), and is banned after max_failures failures in a
   row. Either way the step is solo, and one's own state is never touched by a partner's bad data.

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
from collections.abc import Awaitable

import torch
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time
from swarmd.daemon.compute import ComputeLane
from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.outer_exchange import (
    Exchange, Failed, Rejected, Stalled, send_payload, send_verdict, settle,
)
from swarmd.daemon.ready_board import BOARD_CHECK_S, BOARD_POLL_S, ReadyBoard
from swarmd.daemon.spec import AveragingConfig
from swarmd.daemon.transport import Transport
from swarmd.protocols import rpc
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import Limits
from swarmd.protocols.wire import Message, RemoteError, StreamEnded, encode_message
from swarmd.swarm.outer import (
    OuterState, PartnerBans, Replica, chunk_bounds, commit_residuals, encode_payload, outer_step_, squared_distance,
    sum_of_squares,
)
from swarmd.swarm.pairing import TAKEN, PairingState, Phase, choose_partner

logger = logging.getLogger(__name__)

PROPOSAL_TIMEOUT_S = 5.0
REFUSAL_MEMORY_S = 1.0  # a replica that refused us is asked again after this long
BOARD_UPDATE_S = 1e-3  # a "paired" entry expires just after the "ready" one it replaces (the DHT keeps the later)
NOT_ITS_FAULT = ("busy", "unauthorized")  # refusals of a partner's request that do not make it a bad partner


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
        self.config, self.codec, self.block_size = config, codec, block_size
        self.transport, self.dht, self.lane, self.replica = transport, dht, lane, replica
        self.metrics, self.limits, self.rng = metrics, limits, rng
        self.board = ReadyBoard(dht, run_id, stage, peer_id, board_subkey)
        self.pairing = PairingState(peer_id)
        self.partners = PartnerBans(config.ban_outer_steps, config.max_failures)  # its clock: our outer steps
        self.state: OuterState | None = None
        self.results: Counter[str] = Counter()  # outer steps taken, by result
        self._exchange: Exchange | None = None
        self._paired = asyncio.Event()
        self._pinned: torch.Tensor | None = None  # theta - theta_snap at the boundary this step overran (pin_boundary)
        self._tasks: set[asyncio.Task] = set()  # fire-and-forget board updates, kept until done
        # Set by a clean stop (Node.close): no solo steps from then on. Their only use is to keep the next
        # payload's progress to about H inner steps, and a solo step taken as it stops would leave this replica
        # with nothing to hand over at its last outer step (Node._last_outer_step).
        self.leaving = False

    @property
    def unpaired(self) -> bool:
        """An outer step is waiting for a partner, and nobody has paired with it or been proposed to: cancelling
        it leaves no partner half way through an exchange."""
        return self._exchange is not None and self.pairing.phase is Phase.READY

    async def start(self, adopt: OuterState | None = None) -> None:
        """Take phi from the current weights (or ``adopt`` a live replica's outer state, for a joiner that
        downloaded that replica's weights: ``OuterState.join``) and serve the outer-step RPCs."""
        theta = await self.lane.run(self.replica.read_flat)
        if adopt is None:
            self.state = OuterState.start(theta)
        else:
            self.state = await self.lane.run(OuterState.join, theta, adopt)
        device = self.state.phi.device  # a partner's chunks land there, as int8 blocks
        await self.transport.serve(rpc.PAIR, "pair", self._on_pair, ("pair_request",), channel="averaging")
        await self.transport.serve(rpc.OUTER_CHUNK, "outer_chunk", self._on_chunk, ("outer_chunk",),
                                   channel="averaging", on_reject=self._on_reject, device=device, keep_blocks=True)
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

    async def outer_step(self, pair_timeout_s: float | None = None) -> str:
        """One outer step: pair, exchange, update. Returns "paired", "solo", "rejected" or "failed"; once
        ``leaving`` is set, "missed" instead of any result but "paired" (weights and counts left alone).
        ``pair_timeout_s`` overrides the spec's wait for a partner."""
        assert self.state is not None, "call start() first"
        cfg = self.config
        ex = await self.lane.run(self._prepare)
        loop = asyncio.get_running_loop()
        ex.done, ex.failure = loop.create_future(), loop.create_future()
        self._exchange = ex
        self._paired.clear()
        self.board.forget()
        self.pairing.open()
        started = time.monotonic()
        partner: str | None = None
        try:
            wait = cfg.pair_timeout_s if pair_timeout_s is None else pair_timeout_s
            paired = await self._find_partner(started + wait)
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
        if not use_partner:
            self._pinned = None  # it pinned a boundary before the weights this step was taken from
            if self.leaving:
                logger.info("outer step without a partner's payload (%s): weights left as they are", result)
                return "missed"
        await self.lane.run(self._apply, ex, use_partner)
        self.metrics.outer_steps.labels(result).inc()
        self.results[result] += 1
        logger.info("outer step %d: %s%s", self.state.outer_step, result, f" with {partner[-8:]}" if partner else "")
        return result

    async def _swap(self, ex: Exchange, partner: str) -> tuple[str, bool]:
        """Exchange payloads with ``partner``. Returns (result, whether to use the partner's payload)."""
        started = time.monotonic()
        ex.last_arrival = started  # the stall clock starts at pairing
        stall = asyncio.ensure_future(ex.watch_stall(self.config.stall_timeout_s))
        try:
            if self.pairing.is_driver:
                ex.sender = asyncio.ensure_future(self._send_payload(ex, partner, self.pairing.session))
                await asyncio.wait_for(self._drive(ex, partner, stall), self.config.exchange_timeout_s)
            else:  # our payload is on its way since we accepted (see _on_pair): wait for the verdict
                await asyncio.wait_for(settle(ex, ex.done, ex.sender, stall), self.config.exchange_timeout_s)
            self.metrics.outer_exchange.observe(time.monotonic() - started)
            outcome, why = "paired", ""
        except Rejected as e:
            if not e.counted:
                self.metrics.rejected.labels(e.reason).inc()
            outcome, why = "rejected", f"rejected its payload ({e.reason}): {e}"
        except Stalled as e:
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
        if outcome == "paired" and (scale := ex.pull_scale(self.config)) < 1.0:
            self.metrics.pulls_clipped.inc()
            logger.info("outer step with %s, met for the first time: its phi is %.3g x our own drift away from "
                        "ours, its pull clipped to %g of them (gamma x %.3g)", partner[-8:], ex.drift_ratio,
                        self.config.max_distance_ratio, scale)
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

    async def partner_ready(self) -> bool:
        """Whether another replica of the stage that we have not banned waits on the ready board now (see
        run_at_boundaries: a replica whose last outer step found no partner then takes its next one early)."""
        if self.state is None:
            return False
        try:
            board = await asyncio.wait_for(self.board.read(self.state.numel), BOARD_CHECK_S)
        except asyncio.TimeoutError:
            return False
        return any(not self.partners.is_banned(p, self.state.outer_step) for p in board)

    def _prepare(self) -> Exchange:
        """On the lane: snapshot theta (or take the pinned one, moved onto our new phi) and encode our payload
        chunks, on the replica's device."""
        state = self.state
        pinned, self._pinned = self._pinned, None
        if pinned is not None and not self.leaving:  # the weights at the boundary the last step overran, in its
            # update's frame (a leaving replica hands over all its progress instead)
            theta = pinned.add_(state.phi)
        else:
            theta = self.replica.read_flat().float()
        bounds = chunk_bounds(state.numel, self.config.chunk_elements)
        chunks = encode_payload(state, theta, bounds, self.codec, self.block_size)
        progress_sq = squared_distance(theta, state.phi, bounds)
        return Exchange(
            numel=state.numel, bounds=bounds, own_chunks=chunks, own_phi=state.phi,
            own_phi_norm=math.sqrt(sum_of_squares(state.phi)), own_progress_norm=math.sqrt(progress_sq),
            own_move_norm=state.last_move_norm,
            theta_snap=theta, partner_phi=[None] * len(bounds), partner_progress=[None] * len(bounds),
        )

    def _apply(self, ex: Exchange, use_partner: bool) -> None:
        """On the lane: the NoLoCo update (paired or solo), then the new weights into the model.

        Paired, the update is taken from the snapshot the partner got, the error feedback of what it got is
        kept, and the inner progress made since the snapshot is carried over. Without a partner, the update
        is taken from the weights as they are now (nobody saw the snapshot), so that a long wait does not make
        our next payload's progress cover more inner steps than our partners' (see run_at_boundaries)."""
        cfg, state = self.config, self.state
        if not use_partner:
            ex.theta_snap = None  # not needed: let it go before the weights are read again
        theta_now = self.replica.read_flat().float()
        if use_partner:
            self.metrics.divergence.set(ex.divergence)
            commit_residuals(state, ex.theta_snap, ex.bounds, ex.own_chunks)
            theta_now.sub_(ex.theta_snap)  # the inner progress made during the exchange
            outer_step_(state, ex.theta_snap, list(zip(ex.partner_phi, ex.partner_progress)),
                        beta=cfg.beta, gamma=cfg.gamma * ex.pull_scale(cfg), mu=cfg.mu, max_move=cfg.max_move)
            theta_now.add_(state.phi)
        else:
            outer_step_(state, theta_now, beta=cfg.beta, gamma=cfg.gamma, mu=cfg.mu, max_move=cfg.max_move)
        self.replica.write_flat(theta_now)
        if state.move_scale < 1.0:
            logger.info("outer step %d: the move of phi was clipped to %g x ||phi|| (scaled by %.3g)",
                        state.outer_step, cfg.max_move, state.move_scale)

    # ---- pairing -------------------------------------------------------------------------------

    async def _find_partner(self, deadline: float) -> bool:
        """Post ourselves on the ready board and pair before ``deadline``. True if paired."""
        expiration = get_dht_time() + max(0.5, deadline - time.monotonic())
        # Post and look for partners at once: a DHT store can take a while (it first finds the key's nodes).
        posted = asyncio.ensure_future(self.board.post(self.state.outer_step, self.state.numel, expiration, False))
        try:
            paired = await self._pair_before(deadline)
        finally:
            # take ourselves off the board (a later entry for our subkey) so nobody wastes a proposal on us
            self._background(self._mark_paired(posted, expiration) if self.pairing.phase is Phase.PAIRED else posted)
        return paired

    async def _mark_paired(self, posted: asyncio.Future, expiration: float) -> None:
        await posted
        await self.board.post(self.state.outer_step, self.state.numel, expiration + BOARD_UPDATE_S, True)

    async def _pair_before(self, deadline: float) -> bool:
        refused: dict[str, float] = {}  # busy right now: asked again after REFUSAL_MEMORY_S
        taken: set[str] = set()  # paired with someone else: not asked again in this outer step
        while deadline - time.monotonic() > 0:
            if self.pairing.phase is Phase.PAIRED:
                return True
            read_at = time.monotonic()
            try:  # a slow DHT read must not hold us past the deadline
                board = await asyncio.wait_for(self.board.read(self.state.numel), deadline - read_at)
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
        if self.pairing.phase is Phase.READY and not await self.board.holds(sender, self.state.numel):
            raise ProtocolError("unknown_peer", "you are not ready on this stage's board for this outer step")
        if (why := self.pairing.on_proposal(sender, fields["session"])) is not None:
            raise ProtocolError("busy", why)
        self._paired.set()
        if self._exchange is not None:  # start pushing our payload now: the proposer is ready to receive it
            self._exchange.sender = asyncio.ensure_future(self._send_payload(self._exchange, sender, fields["session"]))
        return encode_message("ack", {})

    # ---- exchange ------------------------------------------------------------------------------

    async def _send_payload(self, ex: Exchange, partner: str, session: bytes) -> None:
        await send_payload(self.transport, ex, partner, session, self.config.exchange_timeout_s)

    async def _drive(self, ex: Exchange, partner: str, stall: asyncio.Future) -> None:
        """As the proposer: once our payload is acknowledged and the partner's has arrived (``stall``
        returns then), validate it and send the verdict."""
        session = self.pairing.session
        await settle(ex, ex.sender, stall)
        if (problem := ex.problem(self.config, self.partners.knows(partner))) is not None:
            await send_verdict(self.transport, partner, session, "reject")
            raise Rejected("norm", problem)
        try:
            await send_verdict(self.transport, partner, session, "accept", best_effort=False)
        except RemoteError as e:
            raise Failed(f"partner refused our payload: {e}") from None

    def _current(self, sender: str, session: bytes, *, payload: bool = False) -> Exchange:
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
            ex.done.set_exception(Failed("the partner rejected our payload"))
            return encode_message("ack", {})
        if (problem := ex.problem(self.config, self.partners.knows(sender))) is not None:
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
            ex.fail(Failed(f"its request did not get through: {error}"))
        else:
            ex.fail(Rejected(error.reason, str(error), counted=True))
