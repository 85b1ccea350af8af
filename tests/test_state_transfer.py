"""A joiner's state download: the stage's weights, inner step, inner AdamW state and the source's outer
state (phi, delta).

The split and checks are pure functions; the transfer itself runs between two real p2pd daemons on
127.0.0.1 (two hivemind P2P instances), through the daemon's own Transport and compute lanes.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from swarmd.daemon.compute import ComputeLane
from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.state import (
    OUTER_NAMES,
    download_stage_state,
    optimizer_state_from_reply,
    outer_from_reply,
    serve_state,
)
from swarmd.daemon.transport import Transport
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.protocols.wire import RemoteError
from swarmd.swarm.model import ModelConfig, build_stage, count_parameters
from swarmd.swarm.outer import OuterState, flatten_parameters
from swarmd.swarm.stage import StageWorker

TINY = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, max_seq_len=32)
NAMES = ["a.weight", "b.weight"]


def _model_tensors() -> list[torch.Tensor]:
    return [torch.randn(3, 4), torch.randn(5)]


def test_a_reply_without_outer_state_is_all_model():
    tensors = _model_tensors()
    names, got, outer = outer_from_reply(NAMES, tensors, None, 17)
    assert names == NAMES and got is tensors and outer is None


def test_the_outer_state_is_split_off_the_end():
    phi, delta = torch.randn(17), torch.randn(17)
    names, got, outer = outer_from_reply(NAMES + list(OUTER_NAMES), [*_model_tensors(), phi, delta], 4, 17)
    assert names == NAMES and len(got) == 2
    assert outer.outer_step == 4 and outer.phi is phi and outer.delta is delta


@pytest.mark.parametrize(
    "names, phi, reason",
    [
        (NAMES + ["outer/delta", "outer/phi"], torch.randn(17), "malformed"),  # wrong order
        (NAMES + ["x", "y"], torch.randn(17), "malformed"),
        (NAMES + list(OUTER_NAMES), torch.randn(16), "shape"),  # not this model's parameter count
        (NAMES + list(OUTER_NAMES), torch.randn(17, 1), "shape"),
        (NAMES + list(OUTER_NAMES), torch.randn(17).double(), "shape"),  # dtype
    ],
)
def test_a_bad_outer_state_is_refused(names, phi, reason):
    with pytest.raises(ProtocolError) as e:
        outer_from_reply(names, [*_model_tensors(), phi, torch.zeros(17)], 1, 17)
    assert e.value.reason == reason


def test_adopt_copies_onto_the_replica_and_checks_the_size():
    theta = torch.randn(9)
    source = OuterState(phi=torch.randn(9), delta=torch.randn(9), outer_step=5)
    own = OuterState.adopt(theta, source)
    assert own.outer_step == 5 and torch.equal(own.phi, source.phi) and torch.equal(own.delta, source.delta)
    own.phi.add_(1.0)  # a copy: the joiner's steps never touch what it downloaded
    assert not torch.equal(own.phi, source.phi)
    assert own.residual_phi is None and own.residual_progress is None
    with pytest.raises(ValueError, match="outer state of 9 parameters for a replica of 8"):
        OuterState.adopt(torch.randn(8), source)


PARAMS = [torch.zeros(3, 4), torch.zeros(5)]


def _adam_entries(index: int = 1, **override: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
    entry = {"exp_avg": torch.randn(5), "exp_avg_sq": torch.rand(5), "step": torch.tensor(4.0), **override}
    names = [f"optim/{index}/{key}" for key in sorted(entry)]
    return names, [entry[key] for key in sorted(entry)]


def test_the_optimizer_state_is_split_from_the_model_tensors():
    names, tensors = _adam_entries()
    model_names, model_tensors, state = optimizer_state_from_reply(NAMES + names, _model_tensors() + tensors, PARAMS)
    assert model_names == NAMES and len(model_tensors) == 2
    assert set(state) == {1} and set(state[1]) == {"exp_avg", "exp_avg_sq", "step"}
    assert float(state[1]["step"]) == 4.0


@pytest.mark.parametrize(
    "entries, reason",
    [
        (_adam_entries(index=2), "malformed"),  # no such parameter
        (([*_adam_entries()[0][:2], "optim/1/momentum_buffer"], _adam_entries()[1]), "malformed"),  # not AdamW
        (_adam_entries(exp_avg=torch.randn(4)), "shape"),
        (_adam_entries(step=torch.tensor([4.0])), "shape"),
        (_adam_entries(exp_avg=torch.zeros(5, dtype=torch.int32)), "shape"),
        (_adam_entries(exp_avg_sq=-torch.rand(5)), "malformed"),  # sqrt of it would be NaN
        ((_adam_entries()[0][:2], _adam_entries()[1][:2]), "malformed"),  # "step" missing
    ],
)
def test_a_bad_optimizer_state_is_refused(entries, reason):
    with pytest.raises(ProtocolError) as e:
        optimizer_state_from_reply(entries[0], entries[1], PARAMS)
    assert e.value.reason == reason


async def _node(initial: list[str]) -> tuple:
    from hivemind.p2p import P2P

    p2p = await P2P.create(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                           nat_port_map=False, auto_nat=False, use_relay=False)
    return p2p, Transport(p2p, NodeMetrics(), DEFAULT_LIMITS), ComputeLane()


def _worker(seed: int) -> StageWorker:
    return StageWorker(build_stage(TINY, 1, 2, seed), lr=1e-3)


def _train_one_step(worker: StageWorker, generator: torch.Generator) -> None:
    """One AdamW step on a fixed random objective (so the optimizer has moments to transfer)."""
    hidden = torch.randn(2, 8, TINY.dim, generator=generator)
    worker.model(hidden).square().mean().backward()
    worker.optimizer.step()
    worker.optimizer.zero_grad(set_to_none=True)


async def _transfer(with_outer: bool) -> tuple[StageWorker, StageWorker, OuterState | None, OuterState | None]:
    source_worker, joiner_worker = _worker(seed=1), _worker(seed=2)
    _train_one_step(source_worker, torch.Generator().manual_seed(0))
    source_worker.inner_step = 7
    numel = count_parameters(source_worker.model)
    source_outer = OuterState(phi=torch.randn(numel), delta=torch.randn(numel), outer_step=3) if with_outer else None
    p2p_a, transport_a, lane_a = await _node([])
    maddrs = [str(m) for m in await p2p_a.get_visible_maddrs()]
    p2p_b, transport_b, lane_b = await _node(maddrs)
    try:
        await serve_state(transport_a, 1, source_worker, lane_a, lambda: source_outer)
        got = await download_stage_state(transport_b, p2p_a.peer_id.to_base58(), 1, joiner_worker, lane_b)
        with pytest.raises(RemoteError, match=r"\(wrong_stage\): this node serves stage 1, not 0"):
            await download_stage_state(transport_b, p2p_a.peer_id.to_base58(), 0, _worker(seed=3), lane_b)
    finally:
        for p2p, lane in ((p2p_b, lane_b), (p2p_a, lane_a)):
            await p2p.shutdown()
            lane.close()
    return source_worker, joiner_worker, source_outer, got


@pytest.mark.parametrize("with_outer", [True, False], ids=["outer-state", "no-outer-state"])
def test_a_joiner_downloads_weights_step_and_outer_state_over_p2p(with_outer: bool):
    source, joiner, source_outer, got = asyncio.run(_transfer(with_outer))
    assert torch.equal(flatten_parameters(joiner.model.parameters()), flatten_parameters(source.model.parameters()))
    assert joiner.inner_step == 7
    # The AdamW moments came along: the same next step moves both copies identically.
    _train_one_step(source, torch.Generator().manual_seed(1))
    _train_one_step(joiner, torch.Generator().manual_seed(1))
    assert torch.equal(flatten_parameters(joiner.model.parameters()), flatten_parameters(source.model.parameters()))
    if not with_outer:
        assert got is None
        return
    assert got.outer_step == 3
    assert torch.equal(got.phi, source_outer.phi) and torch.equal(got.delta, source_outer.delta)
