"""Weight stashing: a stage's backward always runs on the weights its forward saw, even with optimizer
steps in between, and it never keeps more than ``weight_stashes`` older versions; whether a microbatch kept
its graph, re-runs its forward at backward time, or some of each."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from swarmd.swarm.model import ModelConfig, build_stage
from swarmd.swarm.stage import StageWorker

TINY = ModelConfig(vocab_size=256, dim=32, n_layers=3, n_heads=2, max_seq_len=32)


@pytest.fixture(params=[64, 2, 0], ids=["graphs", "graphs-for-2", "recompute"])
def kept_graphs(request) -> int:
    return request.param


def middle_worker(kept_graphs: int, **kwargs) -> StageWorker:
    options = {"lr": 1e-2, "grad_clip": None, "microbatches_per_step": 1, **kwargs}
    return StageWorker(build_stage(TINY, 1, 3, seed=0), kept_graphs=kept_graphs, **options)


def hidden(seed: int) -> torch.Tensor:
    return torch.randn(2, 8, TINY.dim, generator=torch.Generator().manual_seed(seed))


def reference_grads(model: torch.nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor):
    """Input and parameter gradients of ``model`` (a frozen copy of the forward's weights)."""
    model = copy.deepcopy(model)
    inputs = inputs.clone().requires_grad_(True)
    model(inputs).backward(grad_output)
    return inputs.grad, [p.grad.clone() for p in model.parameters()]


def record_steps(worker: StageWorker) -> list[list[torch.Tensor]]:
    """Capture the (averaged) gradients every inner step applies."""
    applied: list[list[torch.Tensor]] = []
    step = worker.optimizer.step

    def recording_step(*args, **kwargs):
        applied.append([p.grad.clone() for p in worker.model.parameters()])
        return step(*args, **kwargs)

    worker.optimizer.step = recording_step
    return applied


def test_backward_uses_the_weights_of_its_forward_across_a_step(kept_graphs):
    worker = middle_worker(kept_graphs)
    applied = record_steps(worker)
    a, b = hidden(1), hidden(2)
    weights_at_forward = copy.deepcopy(worker.model)
    worker.forward(b"a" * 16, a)
    worker.forward(b"b" * 16, b)
    grad_out_a, grad_out_b = hidden(3), hidden(4)

    worker.backward(b"a" * 16, grad_out_a)  # steps: the weights change while b is still in flight
    assert worker.inner_step == 1 and worker.stashed_versions == 1
    assert any(not torch.equal(p, q) for p, q in zip(worker.model.parameters(), weights_at_forward.parameters()))

    grad_in_b = worker.backward(b"b" * 16, grad_out_b)  # must use the weights b's forward saw
    want_in, want_params = reference_grads(weights_at_forward, b, grad_out_b)
    torch.testing.assert_close(grad_in_b, want_in, rtol=1e-5, atol=1e-6)
    assert worker.inner_step == 2 and len(applied) == 2
    for got, want in zip(applied[1], want_params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert worker.last_staleness == 1
    assert worker.stashed_versions == 0  # nothing in flight: the copy is gone


def test_the_gradient_at_current_weights_is_unchanged(kept_graphs):
    worker = middle_worker(kept_graphs)
    applied = record_steps(worker)
    x, grad_out = hidden(5), hidden(6)
    _, want_params = reference_grads(worker.model, x, grad_out)
    worker.forward(b"x" * 16, x)
    worker.backward(b"x" * 16, grad_out)
    for got, want in zip(applied[0], want_params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert worker.last_staleness == 0


@pytest.mark.parametrize("stashes", [1, 2, 3])
def test_random_interleavings_stay_within_the_stash_budget(stashes, kept_graphs):
    """Forwards and backwards in random order: the copies never exceed the budget, every step's gradients
    are those of its forwards' weights (checked via the input gradients), and nothing is left behind."""
    rng = random.Random(stashes)
    worker = middle_worker(kept_graphs, weight_stashes=stashes)
    in_flight: dict[bytes, tuple[torch.Tensor, torch.nn.Module]] = {}
    for i in range(60):
        if in_flight and (len(in_flight) >= 6 or rng.random() < 0.5):
            mb_id = rng.choice(sorted(in_flight))
            x, weights = in_flight.pop(mb_id)
            grad_out = hidden(1000 + i)
            want_in, _ = reference_grads(weights, x, grad_out)
            torch.testing.assert_close(worker.backward(mb_id, grad_out), want_in, rtol=1e-5, atol=1e-6)
        else:
            mb_id = i.to_bytes(16, "big")
            x = hidden(i)
            in_flight[mb_id] = (x, copy.deepcopy(worker.model))
            worker.forward(mb_id, x)
        assert worker.stashed_versions <= stashes
    for mb_id in sorted(in_flight):
        worker.discard(mb_id)
    assert worker.stashed_versions == 0 and worker.inflight == 0
    assert worker.inner_step > 10


def test_outer_weight_change_keeps_inflight_consistent(kept_graphs):
    """An outer step writes new weights in place: microbatches forwarded before it still backprop on theirs."""
    worker = middle_worker(kept_graphs, microbatches_per_step=4)
    x, grad_out = hidden(7), hidden(8)
    before = copy.deepcopy(worker.model)
    worker.forward(b"o" * 16, x)
    worker.before_weights_change()
    with torch.no_grad():
        for p in worker.model.parameters():
            p.mul_(0.5)
    want_in, _ = reference_grads(before, x, grad_out)
    torch.testing.assert_close(worker.backward(b"o" * 16, grad_out), want_in, rtol=1e-5, atol=1e-6)


def test_weight_stashes_must_be_positive():
    with pytest.raises(ValueError, match="weight_stashes"):
        middle_worker(4, weight_stashes=0)
    with pytest.raises(ValueError, match="kept_graphs"):
        middle_worker(-1)


def test_only_microbatches_beyond_kept_graphs_run_their_forward_twice():
    """A kept graph spares the backward its forward: 3 microbatches in flight with 2 graphs kept cost 4
    forwards, and once the graphs are back a new microbatch keeps one again."""
    worker = middle_worker(2)
    calls = []
    worker.model.register_forward_hook(lambda *_: calls.append(1))
    ids = [bytes([i]) * 16 for i in range(4)]
    for i in range(3):
        worker.forward(ids[i], hidden(20 + i))
    for i in range(3):
        worker.backward(ids[i], hidden(30 + i))
    assert len(calls) == 4
    worker.forward(ids[3], hidden(23))
    worker.backward(ids[3], hidden(33))
    assert len(calls) == 5
