"""A NoLoCo replica without a network, for tests that drive NoLoCoService's lane-side steps (_prepare, store,
_apply) by hand: one flat fp32 vector stands in for a model's weights."""

from __future__ import annotations

import random

import torch
from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.outer_service import NoLoCoService
from swarmd.daemon.spec import AveragingConfig
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.swarm.outer import OuterState


class FlatReplica:
    """Reads copy, as reading a real model's parameters into one vector does (the service owns what it reads)."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat

    def read_flat(self) -> torch.Tensor:
        return self.flat.clone()

    def write_flat(self, flat: torch.Tensor) -> None:
        self.flat = flat.clone()


def offline_service(weights: torch.Tensor, state: OuterState, config: AveragingConfig, codec: str,
                    block_size: int, seed: int = 0) -> NoLoCoService:
    """A service with no transport, DHT or lane, holding ``state``; call its lane-side methods directly."""
    service = NoLoCoService(
        run_id="t", stage=0, peer_id=str(seed), board_subkey=b"", config=config, codec=codec, block_size=block_size,
        transport=None, dht=None, lane=None, replica=FlatReplica(weights), metrics=NodeMetrics(),
        limits=DEFAULT_LIMITS, rng=random.Random(seed),
    )
    service.state = state
    return service
