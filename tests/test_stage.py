"""StageWorker: a chain of workers trains exactly like the full model; ids and inputs are checked."""

from __future__ import annotations

import pytest
import torch

from swarmd.swarm.model import ModelConfig, build_stage, lm_loss
from swarmd.swarm.stage import StageWorker, optimizer_param_groups

TINY = ModelConfig(vocab_size=256, dim=32, n_layers=4, n_heads=2, max_seq_len=32)
OPT = {"lr": 3e-3, "weight_decay": 0.1, "betas": (0.9, 0.95)}


def workers(num_stages: int, seed: int = 0, **kwargs) -> list[StageWorker]:
    options = {**OPT, "grad_clip": None, **kwargs}
    return [StageWorker(build_stage(TINY, s, num_stages, seed), **options) for s in range(num_stages)]


def batch(seed: int, size: int = 2, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (size, seq + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def run_pipeline_step(chain: list[StageWorker], microbatches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """All forwards of the step first (as an asynchronous pipeline does), then last stage, then backwards."""
    losses = []
    pending = []
    for i, (inputs, targets) in enumerate(microbatches):
        mb_id = f"mb{i}".encode()
        x = inputs
        for worker in chain[:-1]:
            x = worker.forward(mb_id, x)
        pending.append((mb_id, x, targets))
    for mb_id, x, targets in pending:
        loss, grad = chain[-1].forward_backward_last(x, targets)
        losses.append(loss)
        for worker in reversed(chain[:-1]):
            grad = worker.backward(mb_id, grad)
        assert grad is None  # stage 0 takes tokens
    return losses


def reference_step(model, optimizer, microbatches, grad_clip=None) -> float:
    """One AdamW step of the full model on the mean loss over the microbatches."""
    optimizer.zero_grad()
    loss = sum(lm_loss(model(x), y) for x, y in microbatches) / len(microbatches)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("num_stages", [2, 3])
def test_chain_matches_full_model_adamw(num_stages):
    chain = workers(num_stages, microbatches_per_step=2)
    full = build_stage(TINY, 0, 1, seed=0)
    optimizer = torch.optim.AdamW(optimizer_param_groups(full, OPT["weight_decay"]), lr=OPT["lr"], betas=OPT["betas"])
    for step in range(2):
        microbatches = [batch(10 * step), batch(10 * step + 1)]
        losses = run_pipeline_step(chain, microbatches)
        ref_loss = reference_step(full, optimizer, microbatches)
        assert sum(losses) / 2 == pytest.approx(ref_loss, rel=1e-5)
        assert all(w.inner_step == step + 1 and w.accumulated == 0 and w.inflight == 0 for w in chain)
    full_params = dict(full.named_parameters())
    for worker in chain:
        for name, param in worker.model.named_parameters():
            torch.testing.assert_close(param, full_params[name], rtol=1e-4, atol=2e-6, msg=name)
    assert chain[0].samples_processed == 8 and chain[0].tokens_processed == 8 * 12


def test_single_stage_with_clipping_matches_full_model():
    worker = StageWorker(build_stage(TINY, 0, 1, seed=1), **OPT, grad_clip=0.05, microbatches_per_step=2)
    full = build_stage(TINY, 0, 1, seed=1)
    optimizer = torch.optim.AdamW(optimizer_param_groups(full, OPT["weight_decay"]), lr=OPT["lr"], betas=OPT["betas"])
    microbatches = [batch(1), batch(2)]
    for x, y in microbatches:
        _, grad = worker.forward_backward_last(x, y)
        assert grad is None
    reference_step(full, optimizer, microbatches, grad_clip=0.05)
    assert worker.inner_step == 1 and worker.last_grad_norm > 0.05  # clipping was active
    for (name, param), ref in zip(worker.model.named_parameters(), full.parameters()):
        torch.testing.assert_close(param, ref, rtol=1e-4, atol=2e-6, msg=name)


def test_backward_after_inner_step_uses_current_weights():
    # A microbatch forwarded before an inner step is backpropagated after it without autograd errors.
    first, last = workers(2, microbatches_per_step=1)
    x_old, y_old = batch(1)
    h_old = first.forward(b"old", x_old)
    x, y = batch(2)
    h = first.forward(b"new", x)
    _, grad = last.forward_backward_last(h, y)
    first.backward(b"new", grad)  # inner step: weights change in place
    assert first.inner_step == 1
    _, grad_old = last.forward_backward_last(h_old, y_old)
    assert first.backward(b"old", grad_old) is None
    assert first.inner_step == 2 and first.inflight == 0


def test_unknown_duplicate_and_reused_ids():
    first, middle, _ = workers(3)
    x, _ = batch(0)
    with pytest.raises(KeyError, match="unknown microbatch 6e6f7065"):
        middle.backward(b"nope", torch.zeros(2, 12, 32))
    h = first.forward(b"a", x)
    with pytest.raises(ValueError, match="already in flight"):
        first.forward(b"a", x)
    out = middle.forward(b"a", h)
    grad = middle.backward(b"a", torch.ones_like(out))
    assert grad.shape == h.shape and grad.dtype == torch.float32
    with pytest.raises(KeyError):
        middle.backward(b"a", torch.ones_like(out))  # an id is used once
    assert middle.inflight == 0


def test_bad_gradient_is_rejected_and_entry_kept():
    first, middle, _ = workers(3)
    h = first.forward(b"a", batch(0)[0])
    middle.forward(b"a", h)
    with pytest.raises(ValueError, match="does not match"):
        middle.backward(b"a", torch.zeros(2, 11, 32))
    with pytest.raises(ValueError, match="NaN"):
        middle.backward(b"a", torch.full((2, 12, 32), float("nan")))
    with pytest.raises(ValueError, match="floating-point"):
        middle.backward(b"a", torch.zeros(2, 12, 32, dtype=torch.int64))
    assert middle.inflight == 1
    middle.backward(b"a", torch.zeros(2, 12, 32))
    assert middle.inflight == 0


def test_discard():
    """The pipeline gives up on a microbatch (its deadline passed, its route broke): it is forgotten here."""
    first, _ = workers(2)
    x, _ = batch(0)
    first.forward(b"a", x)
    first.forward(b"b", x)
    assert first.inflight == 2
    assert first.discard(b"a") and not first.discard(b"a") and first.inflight == 1
    with pytest.raises(KeyError, match="expired"):
        first.backward(b"a", torch.zeros(2, 12, 32))
    assert first.discard(b"b") and first.inflight == 0


def test_check_input():
    first, middle, last = workers(3)
    first.check_input(torch.zeros(2, 5, dtype=torch.int64))
    middle.check_input(torch.zeros(2, 5, 32))
    cases = [
        (first, torch.zeros(2, 5, dtype=torch.int32), "dtype"),
        (first, torch.zeros(2, 5, 1, dtype=torch.int64), "shape"),
        (first, torch.full((2, 5), 256, dtype=torch.int64), r"token ids must be in \[0, 256\)"),
        (first, torch.zeros(2, 33, dtype=torch.int64), "seq <= 32"),
        (first, torch.zeros(0, 5, dtype=torch.int64), "batch"),
        (middle, torch.zeros(2, 5, 31), "shape"),
        (middle, torch.zeros(2, 5, 32, dtype=torch.float64), "dtype"),
        (middle, torch.full((2, 5, 32), float("inf")), "NaN or Inf"),
        (middle, [1, 2], "expected a tensor"),
    ]
    for worker, inputs, match in cases:
        with pytest.raises(ValueError, match=match):
            worker.check_input(inputs)
        if isinstance(inputs, torch.Tensor):
            with pytest.raises(ValueError):
                worker.forward(b"x", inputs)
    assert first.inflight == 0 and middle.inflight == 0
    h = torch.zeros(2, 5, 32)
    with pytest.raises(ValueError, match="targets"):
        last.forward_backward_last(h, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="not the last stage"):
        middle.forward_backward_last(h, torch.zeros(2, 5, dtype=torch.int64))


def test_nonfinite_gradients_skip_the_step():
    first, middle, _ = workers(3)
    h = first.forward(b"a", batch(0)[0])
    middle.forward(b"a", h)
    before = {k: v.clone() for k, v in middle.model.state_dict().items()}
    middle.backward(b"a", torch.full((2, 12, 32), 3e38))  # finite, but the parameter grads overflow
    assert middle.skipped_steps == 1 and middle.inner_step == 0
    assert all(torch.equal(before[k], v) for k, v in middle.model.state_dict().items())


def test_eval_and_infer_store_nothing():
    first, last = workers(2)
    x, y = batch(0)
    h = first.infer(x)
    loss = last.eval_loss(h, y)
    assert abs(loss - 5.545) < 0.3  # ≈ ln 256 at init
    assert first.inflight == 0 and first.samples_processed == 0 and last.inner_step == 0
