"""DiLoCo baseline mode (``outer = "diloco"``): the replicas of a stage all-reduce their pseudo-gradients
with hivemind's DecentralizedAverager every H inner steps and apply outer Nesterov SGD.

It exists to compare NoLoCo against on the same swarm. hivemind's averager needs hivemind's
process-based ``DHT`` (it forks a DHT process and an averager process, the latter replicating the DHT
process's p2pd), so in this mode a node runs a second DHT peer next to its own in-loop one; it
bootstraps from the node itself, so both share one Kademlia network. Payloads travel uncompressed
(hivemind's NoCompression) and their bytes are not in swarmd's per-channel byte counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import torch
from swarmd.daemon.compute import ComputeLane
from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.p2p_host import remove_dead_hivemind_sockets
from swarmd.daemon.spec import AveragingConfig
from swarmd.kernels import all_finite
from swarmd.swarm.diloco import diloco_update
from swarmd.swarm.outer import OuterState, Replica

logger = logging.getLogger(__name__)


class DiLoCoService:
    """The DiLoCo role of one replica of ``stage``: ``await start()``, then ``outer_step()`` at each boundary."""

    def __init__(
        self, *, run_id: str, stage: int, config: AveragingConfig, initial_peers: list[str], host: str,
        lane: ComputeLane, replica: Replica, metrics: NodeMetrics,
    ):
        self.run_id, self.stage, self.config = run_id, stage, config
        self.initial_peers, self.host = initial_peers, host
        self.lane, self.replica, self.metrics = lane, replica, metrics
        self.state: OuterState | None = None
        self.results: Counter[str] = Counter()  # outer steps taken, by result
        self._dht = None
        self._averager = None
        self._buffer: torch.Tensor | None = None
        self._started_at: float | None = None

    async def start(self, adopt: OuterState | None = None) -> None:
        """Take phi from the current weights (or ``adopt`` a live replica's, for a joiner: the stage's
        shared phi and momentum), then start hivemind's DHT process and averager."""
        theta = await self.lane.run(self.replica.read_flat)
        self.state = OuterState.start(theta) if adopt is None else OuterState.adopt(theta, adopt)
        self._buffer = torch.zeros_like(self.state.phi).cpu()
        from hivemind import DHT

        self._started_at = time.time()

        # The processes are forked from the loop's thread (hivemind sets signal handlers, which only the
        # main thread may); the DHT bootstraps from this very node, so the loop must keep running meanwhile.
        loopback = self.host.startswith("127.")
        self._dht = DHT(
            initial_peers=self.initial_peers, start=True, await_ready=False, host_maddrs=[f"/ip4/{self.host}/tcp/0"],
            nat_port_map=not loopback, auto_nat=not loopback, use_relay=not loopback,
        )
        await asyncio.to_thread(self._dht.wait_until_ready, 60)
        self._start_averager()

    def _start_averager(self) -> None:
        from hivemind.averaging import DecentralizedAverager

        self._averager = DecentralizedAverager(
            [self._buffer], self._dht, start=True, prefix=f"swarmd_{self.run_id}_stage{self.stage}_diloco",
            target_group_size=256, min_group_size=2, min_matchmaking_time=self.config.pair_timeout_s,
            request_timeout=max(1.0, self.config.pair_timeout_s / 2), allreduce_timeout=self.config.exchange_timeout_s,
        )

    async def outer_step(self) -> str:
        """All-reduce theta - phi with whoever of the stage is averaging now; "paired" if a group formed,
        else "solo" (the replica's own progress is the mean)."""
        theta_snap = await self.lane.run(self._snapshot)
        timeout = self.config.pair_timeout_s + self.config.exchange_timeout_s
        try:
            group = await asyncio.to_thread(self._averager.step, timeout=timeout)
        except Exception as e:
            logger.warning("DiLoCo all-reduce failed: %s: %s", type(e).__name__, e)
            group = None
        result = "paired" if group else "solo"
        with self._averager.get_tensors() as tensors:
            mean_progress = tensors[0].clone()
        if result == "solo" or not all_finite(mean_progress):
            mean_progress = (theta_snap - self.state.phi).cpu()
            result = "solo" if group is None else "failed"
        await self.lane.run(self._apply, theta_snap, mean_progress)
        self.metrics.outer_steps.labels(result).inc()
        self.results[result] += 1
        logger.info("DiLoCo outer step %d: %s (group of %d)", self.state.outer_step, result, len(group or {}) or 1)
        return result

    def _snapshot(self) -> torch.Tensor:
        theta = self.replica.read_flat().float()
        with self._averager.get_tensors() as tensors:
            tensors[0].copy_(theta - self.state.phi)
        return theta

    def _apply(self, theta_snap: torch.Tensor, mean_progress: torch.Tensor) -> None:
        state, cfg = self.state, self.config
        phi, momentum = diloco_update(
            state.phi, mean_progress.to(state.phi.device), state.delta, lr=cfg.diloco_lr, momentum_coef=cfg.diloco_momentum
        )
        theta_now = self.replica.read_flat().float()
        state.phi, state.delta = phi, momentum
        state.outer_step += 1
        self.replica.write_flat(phi + (theta_now - theta_snap))  # inner progress since the snapshot carries over

    async def close(self) -> None:
        """Stop the averager and the DHT process."""
        def shutdown() -> None:
            if self._averager is not None:
                self._averager.shutdown()
            if self._dht is not None:
                self._dht.shutdown()

        await asyncio.to_thread(shutdown)
        self._averager = self._dht = None
        if self._started_at is not None:  # hivemind's processes leave client sockets in /tmp
            remove_dead_hivemind_sockets(self._started_at - 1.0)
