"""NoLoCo outer update: the one implementation (swarmd.kernels.noloco_outer_update_) against the float64
restatement of the rule (tests/noloco_reference.py)."""

from __future__ import annotations

import pytest
import torch
from noloco_reference import noloco_update64
from swarmd.kernels import (
    dequantize_int4, dequantize_int8, noloco_outer_update_, quantize_int4_ef, quantize_int8_ef,
)


def _state(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, generator=g)
    return {
        "phi": phi,
        "theta": phi + 0.1 * torch.randn(n, generator=g),
        "delta": 0.05 * torch.randn(n, generator=g),
        "partner_phi": phi + 0.02 * torch.randn(n, generator=g),
        "partner_progress": 0.1 * torch.randn(n, generator=g),
    }


def _fused(s, partner, **coeffs):
    phi, theta, delta = s["phi"].clone(), s["theta"].clone(), s["delta"].clone()
    noloco_outer_update_(phi, theta, delta, *partner, backend="torch", **coeffs)
    return phi, theta, delta


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("coeffs", [(0.7, 0.7, 0.5), (1.0, 0.3, 0.9), (0.5, 0.0, 0.0)])
def test_update_on_float_payloads_matches_float64(paired: bool, coeffs: tuple[float, float, float]) -> None:
    beta, gamma, mu = coeffs
    s = _state(1001, seed=int(paired) + int(10 * beta))
    partner = (s["partner_phi"], s["partner_progress"]) if paired else (None, None)
    phi, theta, delta = _fused(s, partner, beta=beta, gamma=gamma, mu=mu)
    ref_phi, ref_theta, ref_delta = noloco_update64(s["phi"], s["theta"], s["delta"], *partner,
                                                    beta=beta, gamma=gamma, mu=mu)
    torch.testing.assert_close(phi.double(), ref_phi, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(delta.double(), ref_delta, rtol=1e-6, atol=1e-6)
    assert torch.equal(theta, phi)


def test_reduces_to_pseudo_gradient_averaging() -> None:
    s = _state(500, seed=9)
    partner = (s["phi"].clone(), s["partner_progress"])  # equal outer copies: no consensus pull
    phi, _, delta = _fused(s, partner, beta=0.7, gamma=0.7, mu=0.0)
    mean_progress = (s["theta"] - s["phi"] + s["partner_progress"]) / 2
    torch.testing.assert_close(phi, s["phi"] + 0.7 * mean_progress)
    torch.testing.assert_close(delta, 0.7 * mean_progress)


def test_solo_step_is_local_momentum_step() -> None:
    s = _state(64, seed=2)
    _, _, delta = _fused(s, (None, None), mu=0.5, beta=0.7, gamma=0.7)
    torch.testing.assert_close(delta, 0.5 * s["delta"] + 0.7 * (s["theta"] - s["phi"]))


@pytest.mark.parametrize("n", [1, 63, 4097])
@pytest.mark.parametrize("paired", [True, False])
def test_fused_update_on_blocks_equals_reference_on_decoded_payload(n: int, paired: bool) -> None:
    s = _state(n, seed=n)
    qphi, _ = quantize_int8_ef(s["partner_phi"], block_size=128)
    qprog, _ = quantize_int8_ef(s["partner_progress"], block_size=64)  # block sizes may differ
    decoded = (dequantize_int8(qphi), dequantize_int8(qprog)) if paired else (None, None)
    want = noloco_update64(s["phi"], s["theta"], s["delta"], *decoded, beta=0.7, gamma=0.6, mu=0.5)
    got = _fused(s, (qphi, qprog) if paired else (None, None), beta=0.7, gamma=0.6, mu=0.5)
    for g, ref in zip(got, want):
        torch.testing.assert_close(g.double(), ref, rtol=1e-6, atol=1e-6)
    # float payloads (codecs other than int8) take the same rule: the same result as the blocks decoded
    if paired:
        for g, f in zip(got, _fused(s, decoded, beta=0.7, gamma=0.6, mu=0.5)):
            assert torch.equal(g, f)


def test_fused_update_takes_int4_blocks() -> None:
    s = _state(300, seed=4)
    qphi, _ = quantize_int4_ef(s["partner_phi"], block_size=64)
    qprog, _ = quantize_int4_ef(s["partner_progress"], block_size=64)
    want = noloco_update64(s["phi"], s["theta"], s["delta"], dequantize_int4(qphi), dequantize_int4(qprog),
                           beta=0.7, gamma=0.7, mu=0.5)
    for g, ref in zip(_fused(s, (qphi, qprog), beta=0.7, gamma=0.7, mu=0.5), want):
        torch.testing.assert_close(g.double(), ref, rtol=1e-6, atol=1e-6)


def test_fused_update_checks_arguments() -> None:
    s = _state(100, seed=1)
    q, _ = quantize_int8_ef(s["partner_phi"], block_size=64)
    with pytest.raises(ValueError, match="both"):
        noloco_outer_update_(s["phi"], s["theta"], s["delta"], q, None)
    with pytest.raises(ValueError, match="float32"):
        noloco_outer_update_(s["phi"].double(), s["theta"].double(), s["delta"].double())
    small, _ = quantize_int8_ef(torch.randn(99), block_size=64)
    with pytest.raises(ValueError, match="numel"):
        noloco_outer_update_(s["phi"], s["theta"], s["delta"], small, small)
    with pytest.raises(ValueError, match="float32"):
        noloco_outer_update_(s["phi"], s["theta"], s["delta"], s["partner_phi"].double(), s["partner_progress"])
