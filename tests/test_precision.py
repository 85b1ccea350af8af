"""optimizer.precision: bf16 autocast on CUDA with fp32 master weights; a CPU stage stays fp32, bit for bit."""

from __future__ import annotations

import pytest
import torch
from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec
from swarmd.swarm.model import ModelConfig, build_stage
from swarmd.swarm.stage import StageWorker, compute_precision

TINY = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, max_seq_len=32)


def _chain(precision: str, device: str = "cpu") -> list[StageWorker]:
    return [StageWorker(build_stage(TINY, s, 2, seed=0), lr=3e-3, weight_decay=0.1, device=device,
                        precision=precision) for s in range(2)]


def _train(chain: list[StageWorker], steps: int, device: str = "cpu") -> list[float]:
    """``steps`` inner steps of a 2-stage chain, one microbatch each, as the pipeline drives it."""
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        data = torch.randint(0, 256, (4, 17), generator=g).to(device)
        mb = f"mb{step}".encode()
        hidden = chain[0].forward(mb, data[:, :-1])
        assert hidden.dtype == torch.float32  # what the codec and the next stage's check_input expect
        loss, grad = chain[1].forward_backward_last(hidden, data[:, 1:])
        assert grad.dtype == torch.float32
        assert chain[0].backward(mb, grad) is None
        losses.append(loss)
    return losses


def test_spec_takes_fp32_or_bf16() -> None:
    spec = RunSpec.load(DEFAULT_SPEC_PATH)
    assert spec.optimizer.precision == "fp32"
    raw = spec.to_dict()
    raw["optimizer"]["precision"] = "bf16"
    assert RunSpec.from_dict(raw).optimizer.precision == "bf16"
    # the other values are refused in test_spec.py's table of bad specs


def test_a_cpu_stage_computes_in_fp32_whatever_the_spec_says() -> None:
    assert compute_precision("bf16", "cpu") == "fp32"
    assert compute_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        compute_precision("fp16", "cpu")
    asked_bf16, fp32 = _chain("bf16"), _chain("fp32")
    assert [w.precision for w in asked_bf16] == ["fp32", "fp32"]
    assert _train(asked_bf16, 3) == _train(fp32, 3)
    for a, b in zip(asked_bf16, fp32):
        for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
            assert torch.equal(p, q), name


@pytest.mark.cuda
def test_bf16_autocast_runs_on_cuda_with_fp32_master_weights() -> None:
    chain = _chain("bf16", "cuda")
    assert [w.precision for w in chain] == ["bf16", "bf16"]
    inside: list[torch.dtype] = []  # what the matmuls produce inside the stages, forward and re-run forward
    for worker in chain:
        for module in worker.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda _m, _i, out: inside.append(out.dtype))
    losses = _train(chain, 4, "cuda")
    assert inside and set(inside) == {torch.bfloat16}
    for worker in chain:
        assert worker.inner_step == 4
        for p in worker.model.parameters():
            assert p.dtype == torch.float32 and p.device.type == "cuda"
        for state in worker.optimizer.state.values():
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    # bf16 tracks fp32 closely on a tiny model: same start, a few steps in step with it
    reference = _train(_chain("fp32", "cuda"), 4, "cuda")
    assert all(abs(a - b) < 0.05 * b for a, b in zip(losses, reference)), (losses, reference)
