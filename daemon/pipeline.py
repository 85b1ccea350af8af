"""One node's part in the SWARM pipeline: serve forward/backward hops, drive microbatches on stage 0.

The walk of a microbatch (see shared/ARCHITECTURE.md): a driver runs stage 0 and sends the
activations to a stage-1 peer drawn at random by throughput / (1 + queue); each peer acks on
admission, computes, and forwards on; the last stage computes the loss and sends the gradient back
along the recorded route. A hop that fails is retried on another peer and the failed peer banned
with backoff; a microbatch that outlives its deadline is dropped everywhere it is held.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace

import torch
from swarmd.daemon.compute import ComputeLane, ThroughputMeter
from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.peers import PeerTable
from swarmd.daemon.spec import RunSpec
from swarmd.daemon.transport import Transport
from swarmd.protocols import rpc
from swarmd.protocols.codecs import EncodedTensor, encode_tensor
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import Limits
from swarmd.protocols.wire import Message, RemoteError, encode_message
from swarmd.swarm.data import CorpusSampler
from swarmd.swarm.routing import BanList, PeerInfo, choose_peer
from swarmd.swarm.stage import StageWorker, check_magnitude

logger = logging.getLogger(__name__)

BUSY_RETRY_S = 0.02  # pause before retrying when every next-stage peer answered "busy"
# "unauthorized" from a live member: it has not read our heartbeat yet (it re-reads the records at most once a
# second), so retry after a pause, and never ban it for that
UNAUTHORIZED_RETRY_S = 0.5
NO_PEER_RETRY_S = 0.25  # pause while the next stage has no live peer
EVAL_RETRY_S = 2.0  # pause before retrying an evaluation pass that scored nothing


@dataclass
class HeldMicrobatch:
    """What this node keeps for a microbatch between its forward and its backward."""

    sender: str  # the upstream peer ("" on the driver); gradients go back to it
    route: list[str]  # peers the microbatch passed, this node last
    deadline: float  # time.monotonic() past which it is dropped
    output_shape: tuple[int, ...] = ()
    downstream: str | None = None  # the peer that took our forward; only it may send the backward
    done: asyncio.Future | None = None  # the driver's wait for the loss
    forward_s: float = 0.0  # compute time of our forward, added to the backward's for throughput
    evaluation: bool = False  # a held-out microbatch: forward only, its loss goes straight to the driver


@dataclass
class Outgoing:
    """What a hop sends, encoded on the lane by the same job that computed it.

    A separate encode job would queue behind the lane's next compute: a finished microbatch would wait for
    another one's whole forward or backward before leaving, and the in-flight microbatches would move through
    the stages as one convoy, each stage idle while the other works."""

    tensors: list[EncodedTensor]  # activations and targets, or a gradient
    shape: tuple[int, ...]  # the first tensor's, before encoding (a gradient coming back must match it)
    error: str | None = None  # it failed our own checks (a diverging stage): dropped, never sent


def encode_outgoing(tensor: torch.Tensor, codec: str, block_size: int, max_abs: float, what: str,
                    extra: tuple[EncodedTensor, ...] = ()) -> Outgoing:
    """Encode a tensor this node sends (followed by ``extra``), after the magnitude check every receiver applies.

    Ours failing it (a diverging stage) is no peer's fault: the result carries the error, and the caller drops the
    microbatch instead of sending what every receiver would refuse (and ban us for)."""
    try:
        check_magnitude(tensor, max_abs, what)
        encoded = encode_tensor(tensor, codec, block_size=block_size)
    except ValueError as e:
        return Outgoing([], tuple(tensor.shape), str(e))
    return Outgoing([encoded, *extra], tuple(tensor.shape))


@dataclass
class PipelineStats:
    """Counters the progress line and the heartbeat read."""

    completed: int = 0  # microbatches this driver saw through
    last_loss: float = float("nan")
    first_loss: float | None = None
    recent_losses: deque[float] = field(default_factory=lambda: deque(maxlen=10))  # bounded: nodes run for days
    eval_loss: float = float("nan")  # driver: its latest evaluation pass; last stage: its latest scored microbatches
    eval_scored: deque[float] = field(default_factory=deque)  # last stage: recent evaluation losses (bounded)

    def summary(self) -> str:
        if self.first_loss is None:
            return "no loss recorded"
        tail = self.recent_losses
        return f"loss first {self.first_loss:.4f} last {sum(tail) / len(tail):.4f} (mean of last {len(tail)})"


class PipelineService:
    """The pipeline role of a training node (stage ``stage`` of ``spec.pipeline.stages``)."""

    def __init__(
        self, *, spec: RunSpec, stage: int, peer_id: str, worker: StageWorker, lane: ComputeLane,
        transport: Transport, peers: PeerTable, metrics: NodeMetrics, limits: Limits,
        sampler: CorpusSampler | None, meter: ThroughputMeter, rng: random.Random,
        eval_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.spec, self.stage, self.peer_id = spec, stage, peer_id
        self.num_stages = spec.pipeline.stages
        self.worker, self.lane, self.transport = worker, lane, transport
        self.peers, self.metrics, self.limits = peers, metrics, limits
        self.sampler, self.meter, self.rng = sampler, meter, rng
        self.eval_batches = eval_batches or []
        self.bans = BanList()
        self.held: dict[bytes, HeldMicrobatch] = {}
        self.held_per_sender: Counter[str] = Counter()
        self.stats = PipelineStats(eval_scored=deque(maxlen=spec.evaluation.batches))
        self._tasks: set[asyncio.Task] = set()
        self._last_inner_step = worker.inner_step
        self._last_step_at: float | None = None  # monotonic time of our latest inner step in this stage
        self.accepting = True  # False once the node leaves the stage: new forwards are refused as busy

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    # ---- serving -------------------------------------------------------------------------------

    async def register(self) -> None:
        # received activations and gradients are decoded straight onto our stage's device
        device = self.worker.device
        await self.transport.serve(rpc.FORWARD, "forward", self.on_forward, ("forward",), channel="activations",
                                   device=device)
        await self.transport.serve(rpc.BACKWARD, "backward", self.on_backward, ("backward",), channel="gradients",
                                   device=device)
        await self.transport.serve(rpc.EVAL_RESULT, "eval_result", self.on_eval_result, ("eval_result",))

    async def on_forward(self, sender: str, message: Message) -> bytes:
        """Admit a forward hop: validate everything, hold it, ack; the compute runs after the reply."""
        fields = message.fields
        mb_id, route = fields["mb_id"], fields["route"]
        if fields["stage"] != self.stage or self.stage == 0:
            raise ProtocolError("wrong_stage", f"this node serves stage {self.stage}, not {fields['stage']}")
        if not route or route[-1] != sender:
            raise ProtocolError("unknown_peer", "the route must end with the sending peer")
        if mb_id in self.held:
            raise ProtocolError("malformed", "this microbatch id is already held here")
        if not self.accepting:
            raise ProtocolError("busy", "this node is leaving its stage; send to another replica")
        if self.held_per_sender[sender] >= self.limits.max_inflight_per_peer:
            raise ProtocolError("busy", f"{self.limits.max_inflight_per_peer} microbatches of yours are in flight here")
        if len(self.held) >= self.limits.max_held_microbatches:
            raise ProtocolError("busy", f"{self.limits.max_held_microbatches} microbatches are held here")
        activations, targets = message.tensors
        self._check_batch(activations)
        self._check_activations(activations, targets)
        deadline = time.monotonic() + min(fields["deadline_s"], self.spec.pipeline.microbatch_deadline_s)
        self._hold(mb_id, HeldMicrobatch(
            sender=sender, route=[*route, self.peer_id], deadline=deadline, evaluation=bool(fields.get("eval"))
        ))
        self._spawn(self._process_forward(mb_id, activations, targets))
        return encode_message("ack", {"queue_depth": self.lane.depth})

    async def on_backward(self, sender: str, message: Message) -> bytes:
        """Admit a gradient for a microbatch this node holds, from the peer it forwarded that microbatch to."""
        fields = message.fields
        mb_id = fields["mb_id"]
        if fields["stage"] != self.stage:
            raise ProtocolError("wrong_stage", f"this node serves stage {self.stage}, not {fields['stage']}")
        held = self.held.get(mb_id)
        if held is None or held.downstream is None:
            raise ProtocolError("unknown_microbatch", "no such microbatch is waiting for its gradient here")
        if held.downstream != sender:
            raise ProtocolError("unknown_peer", "this microbatch was not forwarded to you")
        (grad,) = message.tensors
        if tuple(grad.shape) != held.output_shape or not grad.is_floating_point():
            raise ProtocolError("shape", f"gradient shape {tuple(grad.shape)} != output shape {held.output_shape}")
        self._check_magnitude(grad, "gradients")
        held.downstream = None  # one gradient per microbatch: a replay is an unknown microbatch
        self._spawn(self._process_backward(mb_id, held, grad, float(fields["loss"])))
        return encode_message("ack", {"queue_depth": self.lane.depth})

    async def on_eval_result(self, sender: str, message: Message) -> bytes:
        """The loss of one of our evaluation microbatches, from the last stage (its id is our secret)."""
        held = self.held.get(message.fields["mb_id"])
        if held is None or not held.evaluation or held.done is None:
            raise ProtocolError("unknown_microbatch", "no evaluation microbatch of this id is waiting here")
        if not held.done.done():
            held.done.set_result(float(message.fields["loss"]))
        return encode_message("ack", {})

    def _check_batch(self, activations: torch.Tensor) -> None:
        """A forward carries at most the run's microbatch (with Limits.batch_margin) of at most seq_len tokens:
        checked before any compute, as one oversize batch costs a volunteer gigabytes and seconds."""
        p = self.spec.pipeline
        max_batch = self.limits.max_batch(p.microbatch_size)
        if activations.dim() >= 1 and activations.shape[0] > max_batch:
            raise ProtocolError("oversize", f"a batch of {activations.shape[0]}; this run's microbatches hold at "
                                            f"most {max_batch}")
        if activations.dim() >= 2 and activations.shape[1] > p.seq_len:
            raise ProtocolError("oversize", f"sequences of {activations.shape[1]} tokens; this run's hold {p.seq_len}")

    def _check_activations(self, activations: torch.Tensor, targets: torch.Tensor) -> None:
        try:
            self.worker.check_input(activations)
            self.worker.check_targets(activations, targets)
        except ValueError as e:
            reason = "dtype" if "dtype" in str(e) else "shape"
            raise ProtocolError(reason, str(e)) from None
        self._check_magnitude(activations, "activations")

    def _check_magnitude(self, tensor: torch.Tensor, what: str) -> None:
        try:
            check_magnitude(tensor, self.spec.pipeline.max_activation, what)
        except ValueError as e:
            raise ProtocolError("norm", str(e)) from None

    # ---- compute + forwarding ------------------------------------------------------------------

    async def _process_forward(self, mb_id: bytes, activations: torch.Tensor, targets: torch.Tensor) -> None:
        held = self.held.get(mb_id)
        if held is None:
            return
        if held.evaluation:
            await self._process_eval_forward(mb_id, held, activations, targets)
            return
        try:
            if self.is_last:
                (loss, gradient), seconds = await self.lane.run_timed(self._last_stage_on_lane, activations, targets)
                self.metrics.staleness.observe(0)  # forward and backward in one go
                self._account(activations.shape, seconds)
                self._record_loss(loss)
                self._release(mb_id)
                await self._send_backward(held.sender, mb_id, self.stage - 1, loss, gradient)
                return
            outgoing, seconds = await self.lane.run_timed(
                lambda: self._encode_activations(self.worker.forward(mb_id, activations), targets))
            held.output_shape = outgoing.shape
            held.forward_s = seconds
            if await self._send_forward(mb_id, outgoing, held) is None:
                self._drop(mb_id)
        except Exception:
            logger.exception("forward of a microbatch failed here")
            self._drop(mb_id)

    async def _process_eval_forward(
        self, mb_id: bytes, held: HeldMicrobatch, activations: torch.Tensor, targets: torch.Tensor
    ) -> None:
        """Evaluation: forward without storing anything; the last stage scores it and tells the driver."""
        try:
            if self.is_last:
                loss = await self.lane.run(self.worker.eval_loss, activations, targets)
                self.stats.eval_scored.append(loss)
                self._set_eval_loss(sum(self.stats.eval_scored) / len(self.stats.eval_scored))
                await self.transport.call(
                    held.route[0], rpc.EVAL_RESULT, "eval_result",
                    encode_message("eval_result", {"mb_id": mb_id, "loss": loss}),
                    timeout=self.spec.pipeline.hop_timeout_s,
                )
            else:
                outgoing = await self.lane.run(lambda: self._encode_activations(self.worker.infer(activations), targets))
                await self._send_forward(mb_id, outgoing, held)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # evaluation is best effort: the driver's pass scores what came back
            logger.info("evaluation microbatch not delivered: %s: %s", type(e).__name__, e)
        finally:
            self._release(mb_id)

    def _backward_on_lane(self, mb_id: bytes, grad: torch.Tensor) -> tuple[Outgoing | None, int]:
        """On the lane: the backward, its input gradient encoded (None on stage 0) and its staleness, read before
        another task runs."""
        grad_in = self.worker.backward(mb_id, grad)
        return (None if grad_in is None else self._encode_gradient(grad_in)), self.worker.last_staleness

    def _last_stage_on_lane(self, activations: torch.Tensor, targets: torch.Tensor) -> tuple[float, Outgoing | None]:
        """On the lane: the last stage's forward, loss and backward, its input gradient encoded (None if the
        only stage)."""
        loss, grad_in = self.worker.forward_backward_last(activations, targets)
        return loss, (None if grad_in is None else self._encode_gradient(grad_in))

    def _encode_activations(self, output: torch.Tensor, targets: torch.Tensor) -> Outgoing:
        """On the lane: our activations and the microbatch's targets, ready to send."""
        return self._encode_outgoing(output, "activations", (encode_tensor(targets, "none"),))

    def _encode_gradient(self, grad: torch.Tensor) -> Outgoing:
        """On the lane: our input gradient, ready to send back."""
        return self._encode_outgoing(grad, "gradients")

    def _encode_outgoing(self, tensor: torch.Tensor, channel: str, extra: tuple[EncodedTensor, ...] = ()) -> Outgoing:
        """On the lane: ``encode_outgoing`` with this run's codec for ``channel`` and its bounds, counted."""
        c = self.spec.compression
        what = "our activations" if channel == "activations" else "our input gradients"
        outgoing = encode_outgoing(tensor, getattr(c, channel), c.block_size, self.spec.pipeline.max_activation,
                                   what, extra)
        if outgoing.error is None:
            self._record_ratio(channel, tensor, outgoing.tensors[0].payload)
        return outgoing

    async def _process_backward(self, mb_id: bytes, held: HeldMicrobatch, grad: torch.Tensor, loss: float) -> None:
        try:
            (gradient, staleness), seconds = await self.lane.run_timed(self._backward_on_lane, mb_id, grad)
        except KeyError:  # expired on the lane meanwhile
            self._release(mb_id)
            return
        except Exception:
            logger.exception("backward of a microbatch failed here")
            self._drop(mb_id)
            return
        self.metrics.staleness.observe(staleness)
        self._account(grad.shape, seconds + held.forward_s)
        self._release(mb_id)
        if held.done is not None:  # the driver: the microbatch is complete
            if not held.done.done():
                held.done.set_result(loss)
        elif gradient is not None:
            await self._send_backward(held.sender, mb_id, self.stage - 1, loss, gradient)

    async def _send_forward(self, mb_id: bytes, outgoing: Outgoing, held: HeldMicrobatch) -> str | None:
        """Hand the microbatch to a next-stage peer, rerouting around failures. Returns who took it, or None
        (past the deadline; while draining, once every next-stage peer had one try: a stop waits no longer).

        ``held.downstream`` names the peer before the request leaves: a fast next stage can send the
        gradient back before our coroutine resumes from its ack, and that gradient must be accepted.
        """
        route, deadline = held.route, held.deadline
        if outgoing.error is not None:
            logger.warning("microbatch dropped before sending: %s", outgoing.error)
            return None
        next_stage = self.stage + 1
        tried: set[str] = set()
        unknown_to_them = False  # a peer of this round refused us as a non-member (our heartbeat is new to it)
        while (left := deadline - time.monotonic()) > 0:
            fields = {"mb_id": mb_id, "stage": next_stage, "route": route, "deadline_s": left}
            if held.evaluation:
                fields["eval"] = 1
            request = encode_message("forward", fields, outgoing.tensors)
            candidates = self._with_outstanding(self.peers.stage(next_stage))
            peer = choose_peer(candidates, self.bans, self.rng, time.time(), exclude=tried)
            if peer is None:
                if not self.accepting:
                    return None
                all_busy = bool(tried) and all(p.peer_id in tried for p in candidates)
                tried.clear()
                await asyncio.sleep(UNAUTHORIZED_RETRY_S if unknown_to_them else BUSY_RETRY_S if all_busy
                                    else NO_PEER_RETRY_S)
                unknown_to_them = False
                continue
            tried.add(peer.peer_id)
            held.downstream = peer.peer_id
            try:
                await self.transport.call(
                    peer.peer_id, rpc.FORWARD, "forward", request,
                    timeout=min(left, self.spec.pipeline.hop_timeout_s), channel="activations",
                )
                self.bans.record_success(peer.peer_id)
                return peer.peer_id
            except RemoteError as e:
                held.downstream = None
                if e.reason in ("busy", "unauthorized"):
                    unknown_to_them |= e.reason == "unauthorized"
                    continue
                self._hop_failed(peer.peer_id, f"rejected our forward: {e}")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                held.downstream = None
                self._hop_failed(peer.peer_id, f"forward failed: {type(e).__name__}: {e}")
        return None

    async def _send_backward(self, upstream: str, mb_id: bytes, stage: int, loss: float, gradient: Outgoing) -> None:
        """Send the input gradient back along the route. A broken route drops the microbatch (counted)."""
        if gradient.error is not None:
            logger.warning("microbatch dropped before sending its gradient back: %s", gradient.error)
            return
        request = encode_message("backward", {"mb_id": mb_id, "stage": stage, "loss": loss}, gradient.tensors)
        deadline = time.monotonic() + self.spec.pipeline.hop_timeout_s
        while True:
            try:
                await self.transport.call(
                    upstream, rpc.BACKWARD, "backward", request,
                    timeout=max(deadline - time.monotonic(), 0.0), channel="gradients",
                )
                return
            except asyncio.CancelledError:
                raise
            except RemoteError as e:
                # "busy": the upstream peer is loaded (its request or stream limits), not broken, and it is the
                # only one that holds this microbatch: try again until the hop's deadline
                pause = {"busy": BUSY_RETRY_S, "unauthorized": UNAUTHORIZED_RETRY_S}.get(e.reason)
                if pause is not None and time.monotonic() + pause < deadline:
                    await asyncio.sleep(pause)
                    continue
                self._hop_failed(upstream, f"backward failed: {e}")
                return
            except Exception as e:
                self._hop_failed(upstream, f"backward failed: {type(e).__name__}: {e}")
                return

    def _with_outstanding(self, peers: list[PeerInfo]) -> list[PeerInfo]:
        """Add to each peer's announced queue the microbatches we have outstanding there right now:
        heartbeats are seconds old, and without this every driver piles onto the same fast peer."""
        outstanding = Counter(h.downstream for h in self.held.values() if h.downstream)
        return [replace(p, queue_depth=p.queue_depth + outstanding[p.peer_id]) for p in peers]

    def _hop_failed(self, peer_id: str, why: str) -> None:
        self.metrics.route_failures.inc()
        self.bans.ban(peer_id, time.time())
        logger.warning("peer %s: %s; banned for a while", peer_id[-8:], why)

    # ---- driving (stage 0) ---------------------------------------------------------------------

    async def drive(self, stop: asyncio.Event) -> None:
        """Keep ``max_inflight`` microbatches moving through the pipeline until ``stop`` is set."""
        assert self.stage == 0 and self.sampler is not None
        lanes = [asyncio.create_task(self._drive_lane(stop)) for _ in range(self.spec.pipeline.max_inflight)]
        if self.eval_batches and self.spec.evaluation.every_steps:
            lanes.append(asyncio.create_task(self._evaluation_loop(stop)))
        try:
            await asyncio.gather(*lanes)
        finally:
            for task in lanes:
                task.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)

    async def _drive_lane(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.run_microbatch()

    async def _evaluation_loop(self, stop: asyncio.Event) -> None:
        """An evaluation pass at the start and then every ``evaluation.every_steps`` inner steps. A pass that
        scored nothing (at start the next stage is often not found yet) is tried again a moment later, so the
        first pass measures the model as it started, not ``every_steps`` later."""
        due = self.worker.inner_step
        while not stop.is_set():
            if self.worker.inner_step >= due:
                if await self.evaluate() is None:
                    await asyncio.sleep(EVAL_RETRY_S)
                    continue
                due = self.worker.inner_step + self.spec.evaluation.every_steps
            await asyncio.sleep(0.5)

    async def evaluate(self) -> float | None:
        """Send the evaluation batches through the pipeline, forward only (``max_inflight`` at a time).
        Returns the token-weighted mean loss of those that came back (None if none did)."""
        slots = asyncio.Semaphore(self.spec.pipeline.max_inflight)

        async def score(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float | None, int]:
            async with slots:
                return await self._eval_microbatch(inputs, targets), targets.numel()

        results = await asyncio.gather(*(score(x, y) for x, y in self.eval_batches))
        scored = [(loss, tokens) for loss, tokens in results if loss is not None]
        if len(scored) < len(results):
            logger.info("evaluation pass: %d of %d microbatches came back", len(scored), len(results))
        if not scored:
            return None
        mean = sum(loss * tokens for loss, tokens in scored) / sum(tokens for _, tokens in scored)
        self._set_eval_loss(mean)
        self.metrics.eval_passes.inc()
        return mean

    async def _eval_microbatch(self, inputs: torch.Tensor, targets: torch.Tensor) -> float | None:
        if self.num_stages == 1:
            return await self.lane.run(self.worker.eval_loss, inputs, targets)
        mb_id, held = self._start_driven(evaluation=True)
        try:
            outgoing = await self.lane.run(lambda: self._encode_activations(self.worker.infer(inputs), targets))
            if await self._send_forward(mb_id, outgoing, held) is None:
                return None
            return await asyncio.wait_for(held.done, max(0.0, held.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return None
        finally:
            self._release(mb_id)

    def _start_driven(self, evaluation: bool = False) -> tuple[bytes, HeldMicrobatch]:
        """A new microbatch this driver sends, held until its loss comes back or its deadline passes."""
        mb_id = os.urandom(16)
        deadline = time.monotonic() + self.spec.pipeline.microbatch_deadline_s
        done = asyncio.get_running_loop().create_future()
        held = HeldMicrobatch(sender="", route=[self.peer_id], deadline=deadline, done=done, evaluation=evaluation)
        self._hold(mb_id, held)
        return mb_id, held

    async def run_microbatch(self) -> float | None:
        """Drive one microbatch end to end; its loss, or None if it was dropped or expired."""
        if self.num_stages == 1:
            inputs, targets = await self.lane.run(self.sampler.next_batch)
            (loss, _), seconds = await self.lane.run_timed(self.worker.forward_backward_last, inputs, targets)
            self._account(inputs.shape, seconds)
            self._complete(loss)
            return loss
        mb_id, held = self._start_driven()
        deadline, done = held.deadline, held.done

        def sample_and_forward() -> Outgoing:
            inputs, targets = self.sampler.next_batch()
            return self._encode_activations(self.worker.forward(mb_id, inputs), targets)

        try:
            outgoing, held.forward_s = await self.lane.run_timed(sample_and_forward)
            held.output_shape = outgoing.shape
            if await self._send_forward(mb_id, outgoing, held) is None:
                self.metrics.microbatches.labels("dropped").inc()
                self._drop(mb_id)
                return None
            loss = await asyncio.wait_for(done, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.metrics.microbatches.labels("expired").inc()
            self._drop(mb_id)
            return None
        if loss is None:  # dropped by ``expire``: the peer holding it is gone
            self.metrics.microbatches.labels("dropped").inc()
            return None
        self._complete(loss)
        return loss

    def _complete(self, loss: float) -> None:
        self.metrics.microbatches.labels("completed").inc()
        self.stats.completed += 1
        self._record_loss(loss)

    # ---- bookkeeping ---------------------------------------------------------------------------

    def _account(self, shape: torch.Size | tuple[int, ...], seconds: float) -> None:
        """Count a microbatch this stage finished computing (forward + backward)."""
        batch, seq = int(shape[0]), int(shape[1])
        self.metrics.samples.inc(batch)
        self.metrics.tokens.inc(batch * seq)
        self.meter.update(batch, seconds)
        self.metrics.throughput.set(self.meter.value)
        self.metrics.weight_stashes.set(self.worker.stashed_versions)
        steps = self.worker.inner_step - self._last_inner_step
        if steps > 0:
            self.metrics.inner_steps.inc(steps)
            self._last_inner_step = self.worker.inner_step
            self._time_steps(steps)

    def _time_steps(self, steps: int) -> None:
        """Observe the wall time since our previous inner step (split evenly when several landed at once). The
        first step in a stage has no previous one here: a join's or a move's state download is not a step time."""
        now = time.monotonic()
        if self._last_step_at is not None:
            for _ in range(steps):
                self.metrics.inner_step_duration.observe((now - self._last_step_at) / steps)
        self._last_step_at = now
        self.metrics.last_inner_step.set(time.time())

    def _record_loss(self, loss: float) -> None:
        self.stats.last_loss = loss
        if self.stats.first_loss is None:
            self.stats.first_loss = loss
        self.stats.recent_losses.append(loss)
        self.metrics.loss.set(loss)

    def _set_eval_loss(self, loss: float) -> None:
        self.stats.eval_loss = loss
        self.metrics.eval_loss.set(loss)

    def _record_ratio(self, channel: str, tensor: torch.Tensor, payload: bytes) -> None:
        if payload:
            self.metrics.compression_ratio.labels(channel).set(tensor.numel() * 4 / len(payload))

    def _hold(self, mb_id: bytes, held: HeldMicrobatch) -> None:
        self.held[mb_id] = held
        self.held_per_sender[held.sender] += 1
        self.metrics.inflight.set(len(self.held))

    def _release(self, mb_id: bytes) -> None:
        held = self.held.pop(mb_id, None)
        if held is not None:
            self.held_per_sender[held.sender] -= 1
            if self.held_per_sender[held.sender] <= 0:
                del self.held_per_sender[held.sender]
        self.metrics.inflight.set(len(self.held))

    def _drop(self, mb_id: bytes) -> None:
        """Forget a microbatch here and on the lane (its stored inputs free their memory)."""
        self._release(mb_id)
        self._spawn(self.lane.run(self.worker.discard, mb_id))

    def expire(self) -> int:
        """Drop every held microbatch past its deadline, or handed to a next-stage peer that is gone from the
        swarm (its record expired or was withdrawn: it died or left, and no gradient will come back). A
        driver's own microbatch then ends at once (its wait gets None) instead of blocking one of its
        in-flight slots until the deadline. Returns how many were dropped."""
        now = time.monotonic()
        live = set() if self.is_last else {p.peer_id for p in self.peers.stage(self.stage + 1)}
        dropped = [mb_id for mb_id, held in self.held.items()
                   if held.deadline < now or (held.downstream is not None and held.downstream not in live)]
        for mb_id in dropped:
            done = self.held[mb_id].done
            if done is not None and not done.done():
                done.set_result(None)  # never an exception: the driver may still be rerouting, not awaiting it
            self._drop(mb_id)
        return len(dropped)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float) -> int:
        """Refuse new work and wait up to ``timeout`` s for the microbatches held here to finish.
        Returns how many were still held (they are dropped by ``close``; their drivers reroute them)."""
        self.accepting = False
        end = time.monotonic() + timeout
        while self.held and time.monotonic() < end:
            await asyncio.sleep(0.1)
        return len(self.held)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
