"""NoLoCo outer update: the reference rule and the fused kernel's torch fallback."""

from __future__ import annotations

import pytest
import torch
from swarmd.kernels import dequantize_int8, noloco_outer_update_, quantize_int8_ef
from swarmd.swarm.noloco import NoLoCoConfig, noloco_update


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


def _reference64(s, beta, gamma, mu, paired):
    phi, theta, delta = (s[k].double() for k in ("phi", "theta", "delta"))
    progress = theta - phi
    if paired:
        mean_progress = (progress + s["partner_progress"].double()) / 2
        consensus = (phi + s["partner_phi"].double()) / 2 - phi
    else:
        mean_progress, consensus = progress, torch.zeros_like(phi)
    new_delta = mu * delta + beta * mean_progress + gamma * consensus
    return phi + new_delta, new_delta


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("coeffs", [(0.7, 0.7, 0.5), (1.0, 0.3, 0.9), (0.5, 0.0, 0.0)])
def test_noloco_update_matches_float64(paired: bool, coeffs: tuple[float, float, float]) -> None:
    beta, gamma, mu = coeffs
    s = _state(1001, seed=int(paired) + int(10 * beta))
    before = {k: v.clone() for k, v in s.items()}
    partner = (s["partner_phi"], s["partner_progress"]) if paired else (None, None)
    phi, theta, delta = noloco_update(s["phi"], s["theta"], s["delta"], *partner, beta=beta, gamma=gamma, mu=mu)
    ref_phi, ref_delta = _reference64(s, beta, gamma, mu, paired)
    torch.testing.assert_close(phi.double(), ref_phi, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(delta.double(), ref_delta, rtol=1e-6, atol=1e-6)
    assert torch.equal(theta, phi) and theta.data_ptr() != phi.data_ptr()
    for k, v in s.items():  # pure: inputs untouched
        assert torch.equal(v, before[k])


def test_reduces_to_pseudo_gradient_averaging() -> None:
    s = _state(500, seed=9)
    partner_phi = s["phi"].clone()  # equal outer copies: no consensus pull
    phi, _, delta = noloco_update(
        s["phi"], s["theta"], s["delta"], partner_phi, s["partner_progress"], beta=0.7, gamma=0.7, mu=0.0
    )
    mean_progress = (s["theta"] - s["phi"] + s["partner_progress"]) / 2
    torch.testing.assert_close(phi, s["phi"] + 0.7 * mean_progress)
    torch.testing.assert_close(delta, 0.7 * mean_progress)


def test_solo_step_is_local_momentum_step() -> None:
    s = _state(64, seed=2)
    _, _, delta = noloco_update(s["phi"], s["theta"], s["delta"], mu=0.5, beta=0.7)
    torch.testing.assert_close(delta, 0.5 * s["delta"] + 0.7 * (s["theta"] - s["phi"]))
    with pytest.raises(ValueError, match="both"):
        noloco_update(s["phi"], s["theta"], s["delta"], s["partner_phi"], None)


def test_config_defaults() -> None:
    cfg = NoLoCoConfig()
    assert (cfg.inner_steps, cfg.beta, cfg.gamma, cfg.mu) == (50, 0.7, 0.7, 0.5)


@pytest.mark.parametrize("n", [1, 63, 4097])
@pytest.mark.parametrize("paired", [True, False])
def test_fused_update_equals_reference_on_decoded_payload(n: int, paired: bool) -> None:
    s = _state(n, seed=n)
    qphi, _ = quantize_int8_ef(s["partner_phi"], block_size=128)
    qprog, _ = quantize_int8_ef(s["partner_progress"], block_size=64)  # block sizes may differ
    partner = (dequantize_int8(qphi), dequantize_int8(qprog)) if paired else (None, None)
    want = noloco_update(s["phi"], s["theta"], s["delta"], *partner, beta=0.7, gamma=0.6, mu=0.5)
    phi, theta, delta = s["phi"].clone(), s["theta"].clone(), s["delta"].clone()
    payload = (qphi, qprog) if paired else (None, None)
    noloco_outer_update_(phi, theta, delta, *payload, beta=0.7, gamma=0.6, mu=0.5, backend="torch")
    for got, ref in zip((phi, theta, delta), want):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


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
