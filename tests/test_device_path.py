"""No pipeline or outer-step tensor leaves its stage's device before it is compressed.

This machine has no GPU, and CPU and CUDA run the same calls (shared/ARCHITECTURE.md: one code path), so the
test watches the calls that would move a tensor to host memory on a GPU: ``Tensor.cpu()``, ``.numpy()`` and
``.tolist()``. The only caller allowed is the codec's byte extraction (swarmd.protocols.codecs.to_host), and
what reaches it must be compressed: int8 codes and per-block scales, never the fp32 activations, gradients or
weights themselves. Received payloads must be decoded onto the stage's device (codecs.to_device is told the
device). The walk: a microbatch forward through three stages and its gradient back, each hop through the
wire's encoder and decoder with the int8 codec; then an outer step between two replicas (payload encoded,
chunks received as int8 blocks, checked, applied, error feedback committed).

A static check backs this up for the code paths the walk does not reach.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
import swarmd.protocols.codecs as codecs
from outer_fixtures import offline_service
from swarmd.daemon.spec import AveragingConfig
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.protocols.wire import decode_message, encode_message
from swarmd.swarm.model import ModelConfig, build_stage
from swarmd.swarm.outer import OuterState
from swarmd.swarm.stage import StageWorker

TINY = ModelConfig(vocab_size=256, dim=32, n_layers=3, n_heads=2, max_seq_len=32)
ROOT = Path(__file__).resolve().parents[1]
HOST_CALLS = ("cpu", "numpy", "tolist")


class Watch:
    """Records every host-bound call (who made it), what the codec ships, and where received bytes go."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, device: torch.device):
        self.device = device
        self.outside: list[str] = []  # host-bound calls outside codecs.to_host
        self.shipped: list[tuple[torch.dtype, int]] = []  # tensors handed to codecs.to_host
        self.landed: list[torch.device] = []  # devices codecs.to_device was asked for
        for name in HOST_CALLS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        to_host, to_device = codecs.to_host, codecs.to_device

        def watched_to_host(tensors):
            for t in tensors:
                assert t.device == self.device, f"{tuple(t.shape)} reached the wire from {t.device}"
                self.shipped.append((t.dtype, t.numel()))
            return to_host(tensors)

        def watched_to_device(array, device):
            self.landed.append(torch.device(device))
            return to_device(array, device)

        monkeypatch.setattr(codecs, "to_host", watched_to_host)
        monkeypatch.setattr(codecs, "to_device", watched_to_device)

    def _wrap(self, name, method):
        outside = self.outside

        def wrapper(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if not (caller.co_filename == codecs.__file__ and caller.co_qualname.startswith("to_host")):
                outside.append(f"Tensor.{name}() of {tuple(tensor.shape)} in {caller.co_qualname} "
                               f"({Path(caller.co_filename).name}:{sys._getframe(1).f_lineno})")
            return method(tensor, *args, **kwargs)

        return wrapper

    def check(self, model_sized: int) -> None:
        assert not self.outside, "tensors left the device outside the codec:\n" + "\n".join(self.outside)
        assert self.shipped, "nothing went through the codec"
        for dtype, numel in self.shipped:
            # compressed: int8 codes (or int64 token targets), and float32 scales (one per block)
            assert dtype in (torch.int8, torch.int64) or (dtype == torch.float32 and numel < model_sized // 32), \
                (dtype, numel)
        assert self.landed and all(d == self.device for d in self.landed), self.landed


def _hop(kind: str, fields: dict, tensors: list, device: torch.device) -> list:
    """Through the wire as the transport does it: encode on the sender, decode onto the receiver's device."""
    data = encode_message(kind, fields, [codecs.encode_tensor(t, codec, block_size=64) for t, codec in tensors])
    return decode_message(data, DEFAULT_LIMITS, (kind,), device=device).tensors


def test_pipeline_hops_keep_tensors_on_the_device(monkeypatch: pytest.MonkeyPatch):
    chain = [StageWorker(build_stage(TINY, s, 3, seed=0), lr=1e-3) for s in range(3)]
    device = chain[0].device
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (2, 13), generator=g)
    tokens, targets = data[:, :-1], data[:, 1:]
    watch = Watch(monkeypatch, device)
    route = {"mb_id": b"m" * 16, "route": ["a"], "deadline_s": 10.0}
    h = chain[0].forward(b"m", tokens)
    h, y = _hop("forward", {**route, "stage": 1}, [(h, "int8"), (targets, "none")], device)
    h = chain[1].forward(b"m", h)
    h, y = _hop("forward", {**route, "stage": 2}, [(h, "int8"), (y, "none")], device)
    loss, grad = chain[2].forward_backward_last(h, y)
    (grad,) = _hop("backward", {"mb_id": b"m" * 16, "stage": 1, "loss": loss}, [(grad, "int8")], device)
    grad = chain[1].backward(b"m", grad)
    (grad,) = _hop("backward", {"mb_id": b"m" * 16, "stage": 0, "loss": loss}, [(grad, "int8")], device)
    assert chain[0].backward(b"m", grad) is None
    watch.check(model_sized=h.numel())


def test_an_outer_step_keeps_tensors_on_the_device(monkeypatch: pytest.MonkeyPatch):
    numel = 10_000
    services, base = [], torch.randn(numel, generator=torch.Generator().manual_seed(0))
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        phi = base + 0.01 * torch.randn(numel, generator=g)
        services.append(offline_service(phi + 0.01 * torch.randn(numel, generator=g), OuterState.start(phi),
                                        AveragingConfig(chunk_elements=4096), "int8-ef", 64, seed))
    watch = Watch(monkeypatch, services[0].state.phi.device)
    exchanges = [s._prepare() for s in services]
    for me, other in ((0, 1), (1, 0)):
        for index, pair in enumerate(exchanges[other].own_chunks):
            fields = {"session": b"s" * 16, "index": index, "count": len(exchanges[other].bounds), "numel": numel}
            data = encode_message("outer_chunk", fields, list(pair))
            message = decode_message(data, DEFAULT_LIMITS, ("outer_chunk",), device=watch.device, keep_blocks=True)
            exchanges[me].store(index, *message.tensors)
        assert exchanges[me].problem(services[me].config, known=False) is None
    for service, ex in zip(services, exchanges):
        service._apply(ex, use_partner=True)
    watch.check(model_sized=numel)
    assert services[0].state.residual_phi is not None  # error feedback kept: the partner used the payload


SCANNED = ["swarm/stage.py", "swarm/outer.py", "daemon/pipeline.py", "daemon/outer_service.py",
           "daemon/outer_exchange.py", "protocols/codecs.py", "protocols/wire.py"]


@pytest.mark.parametrize("path", SCANNED)
def test_no_host_copies_in_the_tensor_path_source(path: str):
    """The modules a pipeline or outer-step tensor passes through call no .cpu()/.numpy()/.tolist() and name
    no "cpu" device (a parameter's default aside), but in the codec's two transfer functions."""
    tree = ast.parse((ROOT / path).read_text())
    functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)]
    allowed = {id(node) for f in functions if f.name in ("to_host", "to_device") for node in ast.walk(f)}
    allowed |= {id(d) for f in functions for d in [*f.args.defaults, *f.args.kw_defaults] if d is not None}
    found = []
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in HOST_CALLS:
            found.append(f"line {node.lineno}: .{node.func.attr}()")
        if isinstance(node, ast.Constant) and node.value == "cpu":
            found.append(f"line {node.lineno}: 'cpu'")
    assert not found, f"{path}: " + ", ".join(found)
