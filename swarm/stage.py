"""The compute of one pipeline stage on one peer: forward, backward, gradient accumulation, inner AdamW steps.

The pipeline is asynchronous: the inner optimizer steps while other microbatches are still in flight. Every
backward runs on the weights its forward saw (weight stashing, as PipeDream-2BW): before the weights change in
place (an inner step, an outer step), the version that microbatches in flight were forwarded on is kept. At
most ``weight_stashes`` older versions exist; an inner step that would need one more waits, its gradients
accumulating, until the oldest version's microbatches are back. A gradient is then applied one or more steps
after the weights it was taken at (its staleness, reported per microbatch), but never mixes versions.

A version's weights are an alias of the parameters' storage (new tensors with their own autograd version
counters); when the weights are about to change while microbatches forwarded on them are in flight, the
alias is kept as the stash and the live parameters move to a fresh copy, which the change then writes.

Between forward and backward a microbatch keeps one of two things:

- its autograd graph, for up to ``kept_graphs`` microbatches in flight: the forward runs with grad on the
  alias, so that the backward is one pass, at the cost of the microbatch's activations;
- beyond that, only its inputs: the forward runs without grad and the backward re-runs it with grad on its
  version's weights (as hivemind's expert backends do), one more forward and no activations held. A stage
  that many drivers feed (up to ``max_held_microbatches``) thus holds a bounded amount of activations.

Mixed precision (``precision="bf16"``, CUDA only): forwards and the forwards that backward re-runs go under
bf16 autocast; the weights, their gradients and AdamW's state stay fp32 (the master copy), and what leaves the
stage (activations, input gradients) is fp32, as the next stage's ``check_input`` and the codecs expect.

The daemon drives a ``StageWorker`` from one worker thread: there is no locking here, but every id coming
from the network is checked (unknown, duplicate and expired microbatches are clear errors, never crashes).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from swarmd.kernels import all_finite
from torch import nn
from torch.func import functional_call

from .model import InputSpec, StageModel, lm_loss


def check_input(spec: InputSpec, inputs: Any) -> None:
    """Raise ValueError with a clear text unless ``inputs`` is a valid input for a stage with ``spec``."""
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(f"expected a tensor, got {type(inputs).__name__}")
    want_ndim = 2 + len(spec.feature_shape)
    what = "tokens [batch, seq]" if spec.kind == "tokens" else f"hidden states [batch, seq, {spec.feature_shape[0]}]"
    if inputs.dtype != spec.dtype:
        raise ValueError(f"expected {what} of dtype {spec.dtype}, got dtype {inputs.dtype}")
    if inputs.dim() != want_ndim:
        raise ValueError(f"expected {what}, got shape {tuple(inputs.shape)}")
    batch, seq = inputs.shape[0], inputs.shape[1]
    if batch < 1 or not 1 <= seq <= spec.max_seq_len:
        raise ValueError(f"expected 1 <= batch and 1 <= seq <= {spec.max_seq_len}, got shape {tuple(inputs.shape)}")
    if tuple(inputs.shape[2:]) != spec.feature_shape:
        raise ValueError(f"expected {what}, got shape {tuple(inputs.shape)}")
    if spec.kind == "tokens":
        if int(inputs.min()) < 0 or int(inputs.max()) >= spec.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {spec.vocab_size}), got range [{int(inputs.min())}, {int(inputs.max())}]"
            )
    elif not all_finite(inputs):
        raise ValueError("hidden states contain NaN or Inf")


def check_magnitude(tensor: torch.Tensor, max_abs: float, what: str) -> None:
    """Raise ValueError unless every |x| of the float tensor ``tensor`` is at most ``max_abs``.

    A finite but absurd value (3e38) passes every finiteness check and only overflows to Inf a matmul later,
    on this stage or the next: refuse it at the door instead.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)  # no |x| copy of a large tensor
    largest = max(-float(low), float(high))
    if not largest <= max_abs:  # "not <=": NaN is refused too
        raise ValueError(f"{what} hold |x| = {largest:.3g}, over the bound of {max_abs:g}")


PRECISIONS = ("fp32", "bf16")


def compute_precision(requested: str, device: str | torch.device) -> str:
    """The precision a stage on ``device`` computes in when the run asks for ``requested``: bf16 only on a CUDA
    device that supports it; fp32 anywhere else (CPU autocast would change the numerics the tests pin down, and
    gains little)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    device = torch.device(device)
    if requested == "bf16" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices and embeddings (dim >= 2), not norm scales (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


@dataclass
class _Pending:
    """A microbatch between forward and backward: its inputs, and its outputs with their graph if it kept one."""

    inputs: torch.Tensor
    inner_step: int  # the inner step its forward saw: the gradient's staleness is counted from it
    version: int  # the weights its forward saw (see StageWorker.before_weights_change)
    outputs: torch.Tensor | None = None


class StageWorker:
    """Forward/backward of one ``StageModel`` with gradient accumulation and a local AdamW.

    Every ``microbatches_per_step`` completed backward passes, the accumulated gradients are averaged,
    clipped to ``grad_clip`` (per stage: each stage only sees its own parameters) and applied, once a
    weight stash is free for the microbatches still in flight (see the module's docstring).
    Tensors returned to the caller are detached and stay on the stage's device: the codec compresses them there
    (swarmd.protocols.codecs), and only the compressed bytes reach host memory.
    """

    def __init__(
        self,
        model: StageModel,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        grad_clip: float | None = 1.0,
        microbatches_per_step: int = 1,
        device: str | torch.device = "cpu",
        eps: float = 1e-8,
        weight_stashes: int = 1,
        precision: str = "fp32",
        kept_graphs: int = 4,
    ):
        if microbatches_per_step < 1:
            raise ValueError(f"microbatches_per_step must be >= 1, got {microbatches_per_step}")
        if weight_stashes < 1:
            raise ValueError(f"weight_stashes must be >= 1, got {weight_stashes}")
        if kept_graphs < 0:
            raise ValueError(f"kept_graphs must be >= 0, got {kept_graphs}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        self.device = torch.device(device)
        self.precision = compute_precision(precision, self.device)  # "bf16" was asked on a CPU: fp32
        self.model = model.to(self.device)
        self.grad_clip = grad_clip
        self.microbatches_per_step = microbatches_per_step
        self.optimizer = torch.optim.AdamW(
            optimizer_param_groups(self.model, weight_decay), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
        )
        self.weight_stashes = weight_stashes
        self.kept_graphs = kept_graphs
        self._graphs = 0  # microbatches in flight that kept their graph
        self._params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self._pending: dict[bytes, _Pending] = {}
        self._pending_per_version: Counter[int] = Counter()
        self._stashes: dict[int, dict[str, torch.Tensor]] = {}  # older weights, by version, while in flight
        self._current: dict[str, torch.Tensor] | None = None  # the current weights' alias, once needed
        self.version = 0  # bumped by every in-place change of the weights
        self.last_staleness = 0  # inner steps between the latest backward's forward and that backward
        self._accumulated = 0  # microbatches whose gradients sit in .grad, not yet applied
        self.inner_step = 0
        self.skipped_steps = 0  # steps dropped because the gradient norm was not finite
        self.samples_processed = 0
        self.tokens_processed = 0
        self.last_grad_norm: float | None = None

    # ----------------------------------------------------------------------------------- properties

    @property
    def input_spec(self) -> InputSpec:
        """What this stage accepts (see ``check_input``)."""
        return self.model.input_spec

    @property
    def is_first(self) -> bool:
        """True if this stage takes tokens."""
        return self.model.is_first

    @property
    def is_last(self) -> bool:
        """True if this stage produces logits."""
        return self.model.is_last

    @property
    def inflight(self) -> int:
        """Microbatches forwarded and awaiting backward."""
        return len(self._pending)

    @property
    def accumulated(self) -> int:
        """Microbatches accumulated toward the next inner step."""
        return self._accumulated

    def check_input(self, inputs: Any) -> None:
        """Raise ValueError unless ``inputs`` fits this stage's input (dtype, shape, token range, finiteness)."""
        check_input(self.input_spec, inputs)

    def check_targets(self, inputs: torch.Tensor, targets: Any) -> None:
        """Raise ValueError unless ``targets`` are int64 token ids shaped like the [batch, seq] of ``inputs``."""
        if not isinstance(targets, torch.Tensor):
            raise ValueError(f"expected targets as a tensor, got {type(targets).__name__}")
        want = tuple(inputs.shape[:2])
        if targets.dtype != torch.int64 or tuple(targets.shape) != want:
            raise ValueError(f"expected int64 targets of shape {want}, got {targets.dtype} {tuple(targets.shape)}")
        vocab = self.model.config.vocab_size
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
            raise ValueError(f"target ids must be in [0, {vocab})")

    # ----------------------------------------------------------------------------------- compute

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every forward of this stage runs in: bf16 autocast, or nothing (fp32).

        Only forwards go under it; backward runs outside it, in the dtypes autocast chose for each op."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, mb_id: bytes, inputs: torch.Tensor) -> torch.Tensor:
        """Forward; keeps its graph (beyond ``kept_graphs`` in flight, only ``inputs``) under ``mb_id`` until
        ``backward`` or ``discard`` (the pipeline discards a microbatch past its deadline or when its route
        breaks).

        Raises ValueError for bad inputs or an ``mb_id`` already in flight (a duplicate must not overwrite
        the inputs another backward will need).
        """
        if mb_id in self._pending:
            raise ValueError(f"microbatch {_show(mb_id)} is already in flight")
        self.check_input(inputs)
        inputs = inputs.detach().to(self.device, copy=True)  # our own copy: the caller may reuse its buffer
        if self._graphs < self.kept_graphs:
            if not self.is_first:
                inputs.requires_grad_(True)
            with torch.enable_grad(), self.autocast():
                outputs = functional_call(self.model, self._weights(self.version), (inputs,))
            pending = _Pending(inputs, self.inner_step, self.version, outputs)
            self._graphs += 1
        else:
            with torch.no_grad(), self.autocast():
                outputs = self.model(inputs)
            pending = _Pending(inputs, self.inner_step, self.version)
        self._pending[mb_id] = pending
        self._pending_per_version[self.version] += 1
        return outputs.detach().float()  # fp32 on the wire, whatever autocast produced (a no-op in fp32)

    @torch.no_grad()
    def infer(self, inputs: torch.Tensor) -> torch.Tensor:
        """Forward without keeping anything (evaluation)."""
        self.check_input(inputs)
        with self.autocast():
            return self.model(inputs.to(self.device)).float()

    def backward(self, mb_id: bytes, grad_output: torch.Tensor) -> torch.Tensor | None:
        """Backprop ``grad_output`` through the stored microbatch ``mb_id``; returns the input gradient
        (None on stage 0, whose inputs are tokens). Frees the entry and steps when enough have accumulated.

        Raises KeyError for an unknown, already used or expired ``mb_id``; ValueError for a bad gradient.
        """
        pending = self._pending.get(mb_id)
        if pending is None:
            raise KeyError(
                f"unknown microbatch {_show(mb_id)}: never forwarded here, already backpropagated, or expired"
            )
        batch, seq = pending.inputs.shape[:2]
        want = self.model.output_shape(batch, seq)
        if not isinstance(grad_output, torch.Tensor) or not grad_output.is_floating_point():
            raise ValueError(f"expected a floating-point gradient tensor of shape {want}")
        if tuple(grad_output.shape) != want:
            raise ValueError(f"gradient shape {tuple(grad_output.shape)} does not match this stage's output {want}")
        if not all_finite(grad_output):
            raise ValueError("gradient contains NaN or Inf")
        self._forget(mb_id)

        inputs, outputs = pending.inputs, pending.outputs
        weights = self._weights(pending.version)
        try:
            with torch.enable_grad():
                if outputs is None:
                    if not self.is_first:
                        inputs = inputs.requires_grad_(True)
                    with self.autocast():
                        outputs = functional_call(self.model, weights, (inputs,))
                leaves = [*weights.values()] if self.is_first else [inputs, *weights.values()]
                grads = torch.autograd.grad(outputs, leaves, grad_output.to(device=self.device, dtype=outputs.dtype))
        finally:
            self._drop_unused_stash(pending.version)
        grad_input = None if self.is_first else grads[0].detach()
        for param, grad in zip(self._params.values(), grads[len(leaves) - len(weights):]):
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)
        self.last_staleness = self.inner_step - pending.inner_step
        self._finish_microbatch(batch, seq)
        return grad_input

    def forward_backward_last(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        """Last stage: forward, mean cross-entropy against ``targets``, backward. Returns (loss, input gradient);
        the gradient is None with a single stage (the inputs are tokens). Counts toward the inner step.

        Raises FloatingPointError (touching no gradients) when the loss is not finite.
        """
        if not self.is_last:
            raise RuntimeError(f"forward_backward_last called on stage {self.model.stage}, not the last stage")
        self.check_input(inputs)
        self.check_targets(inputs, targets)
        inputs = inputs.detach().to(self.device, copy=True)
        if not self.is_first:
            inputs.requires_grad_(True)
        with torch.enable_grad():
            with self.autocast():
                loss = lm_loss(self.model(inputs), targets.to(self.device))  # cross-entropy autocasts to fp32
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()}: microbatch dropped")
            loss.backward()
        grad_input = None if self.is_first else inputs.grad.detach()
        self.last_staleness = 0
        self._finish_microbatch(*inputs.shape[:2])
        return float(loss.item()), grad_input

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Last stage: the loss of one batch, no gradients, nothing stored."""
        if not self.is_last:
            raise RuntimeError(f"eval_loss called on stage {self.model.stage}, not the last stage")
        self.check_input(inputs)
        self.check_targets(inputs, targets)
        with self.autocast():
            return float(lm_loss(self.model(inputs.to(self.device)), targets.to(self.device)).item())

    def _finish_microbatch(self, batch: int, seq: int) -> None:
        self.samples_processed += batch
        self.tokens_processed += batch * seq
        self._accumulated += 1
        self._step_if_due()

    def _step_if_due(self) -> None:
        """Step once enough gradients accumulated and the current weights can be stashed if still needed."""
        if self._accumulated < self.microbatches_per_step:
            return
        if self._pending_per_version[self.version] and len(self._stashes) >= self.weight_stashes:
            return  # waits for the oldest stash's microbatches; their gradients join this step
        self._step()

    def before_weights_change(self) -> None:
        """Call before changing the weights in place (the optimizer, an outer step): while microbatches
        forwarded on the current weights are in flight, their alias becomes a stash and the parameters move to
        a copy (the graphs' saved tensors must not change under them). Starts a new version."""
        if self._pending_per_version[self.version]:
            self._stashes[self.version] = self._weights(self.version)
            for p in self._params.values():
                p.data = p.data.clone()
        self._current = None
        self.version += 1

    def _weights(self, version: int) -> dict[str, torch.Tensor]:
        """The weights microbatches of ``version`` were forwarded on, as leaves to differentiate: its stash,
        or an alias of the current weights."""
        if version in self._stashes:
            return self._stashes[version]
        if self._current is None:  # tensors on the parameters' storage with their own autograd version counters
            self._current = {name: p.data.requires_grad_(True) for name, p in self._params.items()}
        return self._current

    @property
    def stashed_versions(self) -> int:
        """Older weight versions (one copy of the weights each) kept for microbatches in flight."""
        return len(self._stashes)

    def _forget(self, mb_id: bytes) -> _Pending | None:
        pending = self._pending.pop(mb_id, None)
        if pending is not None:
            if pending.outputs is not None:
                self._graphs -= 1
            self._pending_per_version[pending.version] -= 1
            if not self._pending_per_version[pending.version]:
                del self._pending_per_version[pending.version]
        return pending

    def _drop_unused_stash(self, version: int) -> None:
        if version not in self._pending_per_version:
            self._stashes.pop(version, None)

    def _step(self) -> None:
        """Average the accumulated gradients, clip, apply AdamW, clear."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        for p in params:
            p.grad.div_(self._accumulated)  # each microbatch's loss is a mean: average, don't sum
        max_norm = self.grad_clip if self.grad_clip is not None else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        self.last_grad_norm = norm
        if math.isfinite(norm):
            self.before_weights_change()
            self.optimizer.step()
            self.inner_step += 1
        else:
            self.skipped_steps += 1  # one bad microbatch must not poison the weights
        self.optimizer.zero_grad(set_to_none=True)
        self._accumulated = 0

    def discard(self, mb_id: bytes) -> bool:
        """Forget a stored microbatch (the pipeline gave up on it); True if it was here."""
        pending = self._forget(mb_id)
        if pending is None:
            return False
        self._drop_unused_stash(pending.version)
        self._step_if_due()  # a step may have waited for this microbatch's stash
        return True


def _show(mb_id: Any) -> str:
    return mb_id.hex() if isinstance(mb_id, (bytes, bytearray)) else repr(mb_id)
