"""The whole swarm in a few numbers per stage, computed from the run's DHT records.

Pure functions over plain data. Every node that reads the same records computes the same view. The seed
(or a node started with ``--swarm-metrics``) exports it as swarm-wide gauges and on its status page, so an
operator who can reach only the seed sees every volunteer, NATed ones included. The numbers are what the
peers announce in their signed heartbeats (decode_heartbeat bounds each one); nobody checks that they are
true.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from swarmd.daemon.metrics import OUTER_RESULTS
from swarmd.daemon.records import StageEntry


@dataclass(frozen=True)
class StageView:
    """One stage's serving peers, summed up. Steps and loss are None where no peer has one."""

    stage: int
    peers: int
    throughput: float  # samples/s, summed over the stage's peers
    inner_step_min: int | None
    inner_step_max: int | None
    loss: float | None  # mean of the latest training losses the peers announce (the last stage: the model's)
    outer_steps: tuple[int, ...]  # summed over the peers, by result, in the order of OUTER_RESULTS

    def outer_by_result(self) -> dict[str, int]:
        return dict(zip(OUTER_RESULTS, self.outer_steps))


@dataclass(frozen=True)
class SwarmView:
    stages: tuple[StageView, ...]
    peer_ids: frozenset[str]  # every serving peer, whatever its stage

    @property
    def nodes(self) -> int:
        return len(self.peer_ids)


def stage_view(stage: int, entries: Sequence[StageEntry]) -> StageView:
    """``entries``: the stage's live serving entries (one per peer: a record holds one entry per owner)."""
    beats = [e.beat for e in entries]
    steps = [b.inner_step for b in beats]
    losses = [b.loss for b in beats if b.loss is not None]
    # sorted before summing: float addition depends on order, and every reader should print the same numbers
    # (plain sum: math.fsum raises where hostile claims overflow, sum gives inf)
    return StageView(
        stage=stage, peers=len(beats),
        throughput=sum(sorted(b.throughput for b in beats)),
        inner_step_min=min(steps, default=None), inner_step_max=max(steps, default=None),
        loss=sum(sorted(losses)) / len(losses) if losses else None,
        outer_steps=tuple(sum(b.outer_steps[i] for b in beats) for i in range(len(OUTER_RESULTS))),
    )


def swarm_view(serving: Sequence[Sequence[StageEntry]]) -> SwarmView:
    """``serving[s]``: the live serving entries of stage ``s`` (``PeerTable.serving``)."""
    return SwarmView(
        stages=tuple(stage_view(s, entries) for s, entries in enumerate(serving)),
        peer_ids=frozenset(e.peer_id for entries in serving for e in entries),
    )

