"""The daemon's outer step, the fused kernel and a float64 restatement of the NoLoCo rule agree.

The daemon's step is NoLoCoService._prepare (snapshot, payload encoded) and _apply (the update from the
partner's chunks as they arrived through the wire's decoder: int8 blocks on our device, or float32 for codecs
that are not blockwise; the inner progress made during the exchange carried over). It is checked against
- the kernel (swarmd.kernels.noloco_outer_update_) called once on the whole vector, with the partner's blocks
  joined into one payload: bit for bit, as the daemon runs the same kernel chunk by chunk;
- tests/noloco_reference.py (float64) on the decoded payload: to float32 rounding.
Paired and solo, one chunk and several, sizes that fill neither a block nor a chunk.
"""

from __future__ import annotations

import pytest
import torch
from noloco_reference import noloco_update64
from outer_fixtures import offline_service
from swarmd.daemon.spec import AveragingConfig
from swarmd.kernels import QuantizedBlocks, noloco_outer_update_
from swarmd.protocols.codecs import decode_tensor
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.swarm.outer import OuterState, payload_values

COEFFS = {"beta": 0.7, "gamma": 0.6, "mu": 0.5}
BLOCK = 64


def _service(weights: torch.Tensor, codec: str, chunk: int):
    g = torch.Generator().manual_seed(weights.numel())
    state = OuterState(phi=weights - 0.1 * torch.randn(weights.numel(), generator=g),
                       delta=0.05 * torch.randn(weights.numel(), generator=g), outer_step=2)
    config = AveragingConfig(chunk_elements=chunk, max_move=float("inf"), **COEFFS)
    return offline_service(weights, state, config, codec, BLOCK)


def _received(sender_ex) -> list[tuple]:
    """The sender's chunks as our transport hands them to the service (decode_message with keep_blocks)."""
    return [tuple(decode_tensor(t.meta, t.payload, DEFAULT_LIMITS, keep_blocks=True) for t in pair)
            for pair in sender_ex.own_chunks]


def _joined(parts: list) -> QuantizedBlocks | torch.Tensor:
    """One payload for the whole vector from its chunks (chunks hold whole blocks, but the last)."""
    if not isinstance(parts[0], QuantizedBlocks):
        return torch.cat(parts)
    return QuantizedBlocks(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                           sum(p.numel for p in parts), parts[0].block_size, parts[0].bits)


@pytest.mark.parametrize("codec", ["int8-ef", "none"])
@pytest.mark.parametrize("numel,chunk", [(1, 1024), (1000, 1024), (5 * 1024 + 3, 1024), (3 * 2048, 2048)])
@pytest.mark.parametrize("paired", [True, False])
def test_daemon_step_kernel_and_float64_rule_agree(codec: str, numel: int, chunk: int, paired: bool):
    g = torch.Generator().manual_seed(numel + paired)
    ours = _service(torch.randn(numel, generator=g), codec, chunk)
    theirs = _service(torch.randn(numel, generator=g) * 0.5, codec, chunk)
    phi0, delta0 = ours.state.phi.clone(), ours.state.delta.clone()
    ex, their_ex = ours._prepare(), theirs._prepare()
    snap = ex.theta_snap.clone()
    received = _received(their_ex)
    for index, pair in enumerate(received):
        ex.store(index, *pair)
    drift = 0.01 * torch.randn(numel, generator=g)  # inner steps taken during the exchange
    ours.replica.flat += drift
    theta_now = ours.replica.flat.clone()

    ours._apply(ex, use_partner=paired)
    weights = ours.replica.flat
    # the partners are random vectors, many of our drifts apart: a paired step's pull is clipped (pull_scale)
    scale = ex.pull_scale(ours.config) if paired else 1.0
    assert scale < 1.0 or not paired
    coeffs = {**COEFFS, "gamma": COEFFS["gamma"] * scale}

    # the kernel on the whole vector, as the rule's one implementation
    phi, delta = phi0.clone(), delta0.clone()
    theta = snap.clone() if paired else theta_now.clone()
    partner = (_joined([p for p, _ in received]), _joined([q for _, q in received])) if paired else (None, None)
    noloco_outer_update_(phi, theta, delta, *partner, **coeffs)
    assert torch.equal(ours.state.phi, phi) and torch.equal(ours.state.delta, delta)
    assert torch.equal(weights, (theta_now - snap) + phi if paired else phi)

    # the float64 rule on what the partner's payload decodes to
    decoded = tuple(torch.cat([payload_values(pair[k]) for pair in received]) for k in (0, 1))
    want_phi, _, want_delta = noloco_update64(phi0, snap if paired else theta_now, delta0,
                                              *(decoded if paired else (None, None)), **coeffs)
    torch.testing.assert_close(ours.state.phi.double(), want_phi, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.state.delta.double(), want_delta, rtol=1e-6, atol=1e-6)
    want_weights = want_phi + (theta_now - snap).double() if paired else want_phi
    torch.testing.assert_close(weights.double(), want_weights, rtol=1e-6, atol=1e-6)
    assert ours.state.outer_step == 3


@pytest.mark.parametrize("paired", [True, False])
def test_the_daemon_keeps_error_feedback_only_for_a_payload_its_partner_used(paired: bool):
    ours = _service(torch.randn(3000), "int8-ef", 1024)
    theirs = _service(torch.randn(3000), "int8-ef", 1024)
    ex, their_ex = ours._prepare(), theirs._prepare()
    snap, phi0 = ex.theta_snap.clone(), ours.state.phi.clone()
    for index, pair in enumerate(_received(their_ex)):
        ex.store(index, *pair)
    ours._apply(ex, use_partner=paired)
    if not paired:  # a solo (or failed) step: the residuals stay as they were (none yet)
        assert ours.state.residual_phi is None and ours.state.residual_progress is None
        return
    sent = [tuple(payload_values(decode_tensor(t.meta, t.payload, DEFAULT_LIMITS)) for t in pair)
            for pair in ex.own_chunks]
    assert torch.equal(ours.state.residual_phi, phi0 - torch.cat([p for p, _ in sent]))
    assert torch.equal(ours.state.residual_progress, (snap - phi0) - torch.cat([q for _, q in sent]))
