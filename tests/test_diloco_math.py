"""DiLoCo outer update: it is torch.optim.SGD(nesterov=True) on phi with gradient -mean_progress."""

from __future__ import annotations

import pytest
import torch
from swarmd.swarm.diloco import DiLoCoConfig, average_progress, diloco_update


def _rounds(n: int, replicas: int, rounds: int, seed: int) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Initial phi [n] and, per round, each replica's local progress (theta - phi) as if from inner steps."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, generator=g)
    progress = [[0.05 * torch.randn(n, generator=g) for _ in range(replicas)] for _ in range(rounds)]
    return phi, progress


def _reference64(phi, progress, lr, m, nesterov):
    """The rule written out in float64, momentum buffer starting at zero."""
    phi, buf = phi.double(), torch.zeros_like(phi, dtype=torch.float64)
    out = []
    for round_progress in progress:
        grad = -torch.stack([p.double() for p in round_progress]).mean(0)
        buf = m * buf + grad
        phi = phi - lr * (grad + m * buf if nesterov else buf)
        out.append(phi)
    return out


@pytest.mark.parametrize("n", [1, 257, 1001, 4099])
@pytest.mark.parametrize("coeffs", [(0.7, 0.9), (1.0, 0.5), (0.3, 0.0)])
@pytest.mark.parametrize("first_momentum", ["zeros", "none"])
def test_matches_torch_sgd_nesterov(n: int, coeffs: tuple[float, float], first_momentum: str) -> None:
    lr, m = coeffs
    phi0, progress = _rounds(n, replicas=5, rounds=6, seed=n + int(10 * lr))
    # torch: phi as a parameter, gradient -mean_progress, the optimizer's own buffer.
    param = torch.nn.Parameter(phi0.clone())
    sgd = torch.optim.SGD([param], lr=lr, momentum=m, nesterov=m > 0)
    phi = phi0.clone()
    buf = torch.zeros_like(phi) if first_momentum == "zeros" else None
    for round_progress in progress:
        thetas = [phi + p for p in round_progress]  # the replicas' inner-optimized weights
        mean = average_progress(phi, thetas)
        phi, buf = diloco_update(phi, mean, buf, lr=lr, momentum_coef=m, nesterov=m > 0)

        param.grad = -average_progress(param.detach(), [param.detach() + p for p in round_progress])
        sgd.step()
        torch.testing.assert_close(phi, param.detach(), rtol=1e-6, atol=1e-6)
        if m > 0:
            torch.testing.assert_close(buf, sgd.state[param]["momentum_buffer"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_float64_reference(nesterov: bool) -> None:
    phi, progress = _rounds(1001, replicas=8, rounds=8, seed=3)
    expected = _reference64(phi, progress, 0.7, 0.9, nesterov)
    buf = torch.zeros_like(phi)
    for round_progress, want in zip(progress, expected):
        mean = average_progress(phi, [phi + p for p in round_progress])
        phi, buf = diloco_update(phi, mean, buf, lr=0.7, momentum_coef=0.9, nesterov=nesterov)
        torch.testing.assert_close(phi.double(), want, rtol=1e-5, atol=1e-5)


def test_pure_and_first_step_conventions_agree() -> None:
    phi, progress = _rounds(333, replicas=3, rounds=1, seed=7)
    mean = average_progress(phi, [phi + p for p in progress[0]])
    before = (phi.clone(), mean.clone())
    zeros = torch.zeros_like(phi)
    phi_a, buf_a = diloco_update(phi, mean, zeros)
    phi_b, buf_b = diloco_update(phi, mean, None)
    assert torch.equal(phi_a, phi_b) and torch.equal(buf_a, buf_b)
    assert torch.equal(buf_a, -mean)  # first step: b = g
    assert torch.equal(phi, before[0]) and torch.equal(mean, before[1]) and torch.equal(zeros, torch.zeros_like(phi))
    assert phi_a.data_ptr() != phi.data_ptr()


def test_one_replica_no_momentum_is_a_step_toward_theta() -> None:
    phi, progress = _rounds(100, replicas=1, rounds=1, seed=1)
    theta = phi + progress[0][0]
    new_phi, _ = diloco_update(phi, average_progress(phi, [theta]), None, lr=1.0, momentum_coef=0.0)
    torch.testing.assert_close(new_phi, theta)  # lr 1, no momentum: plain averaging (here: of one)


def test_defaults_and_bad_arguments() -> None:
    cfg = DiLoCoConfig()
    assert (cfg.inner_steps, cfg.lr, cfg.momentum) == (50, 0.7, 0.9)
    phi = torch.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        diloco_update(phi, torch.zeros(5), None)
    with pytest.raises(ValueError, match="shape"):
        diloco_update(phi, torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match="lr"):
        diloco_update(phi, torch.zeros(4), None, lr=0.0)
    with pytest.raises(ValueError, match="momentum_coef"):
        diloco_update(phi, torch.zeros(4), None, momentum_coef=1.0)
    with pytest.raises(ValueError, match="at least one"):
        average_progress(phi, [])
