"""The daemon's CUDA path, run for real on a GPU: the Triton kernels against their torch fallbacks on the same
device, an outer step between two GPU replicas, and swarms of real `swarmd` processes on `--device cuda`.

Every test here is marked `cuda`: without a GPU they skip (tests/conftest.py), and with one they refuse
TRITON_INTERPRET=1 (tests/test_kernels_triton.py covers the interpreter on the CPU). bench/run_gpu_checks.sh
runs them with bench/gpu_step.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from outer_fixtures import offline_service
from swarm_harness import SUMMARY_RE, swarm, wait_for, write_spec
from swarmd.daemon.demo import stop_children, wait_all_steps
from swarmd.daemon.spec import AveragingConfig
from swarmd.kernels import (
    dequantize_int4, dequantize_int8, dequantize_int8_accumulate, dequantize_int8_pair_average,
    noloco_outer_update_, quantize_int4_ef, quantize_int8_ef,
)
from swarmd.kernels.triton_support import interpreter_enabled, resolve_backend, triton_installed
from swarmd.protocols.codecs import decode_tensor, encode_tensor
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.protocols.wire import decode_message, encode_message
from swarmd.swarm.outer import OuterState

pytestmark = pytest.mark.cuda

GPU = torch.device("cuda")
# Sizes that fill neither a block nor a chunk, none divisible by 16: Triton specializes on that, and each variant
# it compiles costs time on a fresh GPU machine (no kernel cache).
SIZES = [63, 4097, (1 << 20) + 5]
# The GPU contracts a * b + c into one fused multiply-add (one rounding, where torch's separate ops round
# twice), so values computed from sums may differ in their last bits; codes and scales may not.
FMA = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True)
def triton_launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts launches of the Triton entry points, so that a test can tell the GPU kernels really ran."""
    assert triton_installed(), "the cuda tests run the Triton kernels: pip install triton (see pyproject.toml)"
    assert not interpreter_enabled()
    # imported here, not at the top: they import triton, which a machine without a GPU may lack
    from swarmd.kernels import noloco_triton, quant_triton
    counts = {"quantize": 0, "decode": 0, "noloco": 0}

    def counted(module, name, key):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(quant_triton, "quantize_triton", "quantize")
    counted(quant_triton, "decode_triton", "decode")
    counted(noloco_triton, "noloco_outer_update_triton_", "noloco")
    return counts


def _randn(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).mul_(scale).to(GPU)


def _equal_blocks(a, b) -> None:
    assert a.codes.device.type == b.codes.device.type == GPU.type
    assert torch.equal(a.codes, b.codes), "codes differ"
    assert torch.equal(a.scales, b.scales), "scales differ"
    assert (a.numel, a.block_size, a.bits) == (b.numel, b.block_size, b.bits)


def test_auto_picks_triton_for_cuda_tensors() -> None:
    assert resolve_backend("auto", torch.zeros(1, device=GPU)) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantizers_match_the_torch_fallback(dtype: torch.dtype, triton_launches: dict[str, int]) -> None:
    for n in SIZES:
        x = _randn(n, n, 4.0).to(dtype)
        residual = _randn(n, n + 1, 0.05)
        for block_size in (64, 100, 4096):
            for r in (None, residual):
                a, ra = quantize_int8_ef(x, r, block_size=block_size, backend="torch")
                b, rb = quantize_int8_ef(x, r, block_size=block_size)  # auto: Triton
                _equal_blocks(a, b)
                torch.testing.assert_close(ra, rb, **FMA)
                if block_size % 2:
                    continue
                for stochastic in (False, True):
                    kw = {"block_size": block_size, "stochastic": stochastic, "seed": 1234 + n}
                    a, ra = quantize_int4_ef(x, r, backend="torch", **kw)
                    b, rb = quantize_int4_ef(x, r, **kw)
                    _equal_blocks(a, b)
                    torch.testing.assert_close(ra, rb, **FMA)
    assert triton_launches["quantize"] > 0


def test_quantizers_refuse_nonfinite_on_the_gpu() -> None:
    for bad in (float("nan"), float("inf")):
        y = _randn(300, 0)
        y[299] = bad
        for quantize in (quantize_int8_ef, quantize_int4_ef):
            with pytest.raises(ValueError):
                quantize(y, block_size=64)


def test_decoders_match_the_torch_fallback(triton_launches: dict[str, int]) -> None:
    for n in SIZES:
        x = _randn(n, n)
        q8, _ = quantize_int8_ef(x, block_size=100)
        q4, _ = quantize_int4_ef(x, block_size=64)
        assert torch.equal(dequantize_int8(q8, backend="torch"), dequantize_int8(q8))
        assert torch.equal(dequantize_int4(q4, backend="torch"), dequantize_int4(q4))
        out16 = torch.empty(n, dtype=torch.bfloat16, device=GPU)
        assert torch.equal(dequantize_int8(q8, out16), dequantize_int8(q8).to(torch.bfloat16))
        acc = _randn(n, n + 2)
        acc_t = acc.clone()
        dequantize_int8_accumulate(q8, acc, backend="torch")
        dequantize_int8_accumulate(q8, acc_t)
        torch.testing.assert_close(acc, acc_t, **FMA)
        own = _randn(n, n + 3)
        torch.testing.assert_close(dequantize_int8_pair_average(q8, own, backend="torch"),
                                   dequantize_int8_pair_average(q8, own), **FMA)
    assert triton_launches["decode"] > 0


def test_fused_noloco_update_matches_the_torch_fallback(triton_launches: dict[str, int]) -> None:
    for n in SIZES:
        phi = _randn(n, n)
        theta = phi + _randn(n, n + 1, 0.1)
        delta = _randn(n, n + 2, 0.05)
        qphi, _ = quantize_int8_ef(phi + _randn(n, n + 3, 0.01), block_size=256)
        qprog, _ = quantize_int8_ef(_randn(n, n + 4, 0.1), block_size=64)
        for payload in ((qphi, qprog), (None, None)):
            states = [(phi.clone(), theta.clone(), delta.clone()) for _ in range(2)]
            for (p, t, d), backend in zip(states, ("torch", "auto")):
                noloco_outer_update_(p, t, d, *payload, beta=0.7, gamma=0.6, mu=0.5, backend=backend)
            for a, b in zip(*states):
                torch.testing.assert_close(a, b, **FMA)
    assert triton_launches["noloco"] > 0


# ---- an outer step between two replicas on the GPU, through the wire's encoder and decoder ------------------


def _outer_step(device: torch.device, numel: int = 300_001) -> list[OuterState]:
    """Two replicas pair: each encodes its payload, the other's chunks arrive as int8 blocks on ``device``,
    are judged, and applied with the fused update. Returns both outer states."""
    services, base = [], torch.randn(numel, generator=torch.Generator().manual_seed(0))
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        phi = (base + 0.01 * torch.randn(numel, generator=g)).to(device)
        theta = phi + 0.01 * torch.randn(numel, generator=g).to(device)
        config = AveragingConfig(chunk_elements=1 << 16, beta=0.7, gamma=0.6, mu=0.5)
        services.append(offline_service(theta, OuterState.start(phi), config, "int8-ef", 256, seed))
    exchanges = [s._prepare() for s in services]
    for me, other in ((0, 1), (1, 0)):
        for index, pair in enumerate(exchanges[other].own_chunks):
            fields = {"session": b"s" * 16, "index": index, "count": len(exchanges[other].bounds), "numel": numel}
            data = encode_message("outer_chunk", fields, list(pair))
            message = decode_message(data, DEFAULT_LIMITS, ("outer_chunk",), device=device, keep_blocks=True)
            assert all(t.codes.device.type == device.type for t in message.tensors)  # int8 blocks, on the device
            exchanges[me].store(index, *message.tensors)
        assert exchanges[me].problem(services[me].config, known=False) is None
    for service, ex in zip(services, exchanges):
        service._apply(ex, use_partner=True)
    for service in services:
        assert service.state.phi.device.type == device.type and service.replica.flat.device.type == device.type
        assert service.state.residual_phi is not None  # the partner used our payload: error feedback kept
    return [s.state for s in services]


def test_an_outer_step_between_two_gpu_replicas_matches_the_cpu(triton_launches: dict[str, int]) -> None:
    on_gpu, on_cpu = _outer_step(GPU), _outer_step(torch.device("cpu"))
    assert triton_launches["quantize"] > 0 and triton_launches["noloco"] > 0
    for gpu, cpu in zip(on_gpu, on_cpu):
        assert gpu.outer_step == cpu.outer_step == 1
        for name in ("phi", "delta", "residual_phi", "residual_progress"):
            torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), **FMA)


def test_the_codecs_keep_bf16_and_fp32_on_the_gpu() -> None:
    """What a bf16 stage could hand the codec: encoded on the GPU, decoded onto it, dtype and values kept."""
    for dtype in (torch.float32, torch.bfloat16):
        x = _randn(4 * 33 * 64, 5).to(dtype).view(4, 33, 64)
        for codec in ("none", "fp16", "int8"):
            encoded = encode_tensor(x, codec, block_size=64)
            y = decode_tensor(encoded.meta, encoded.payload, DEFAULT_LIMITS, device=GPU)
            assert y.device.type == GPU.type and y.dtype == dtype and y.shape == x.shape
            torch.testing.assert_close(y.float(), x.float(), rtol=0.02, atol=0.05)


# ---- real swarmd processes on --device cuda (also `slow`, as every multi-process swarm test) ------------------


def _with_precision(spec: Path, precision: str) -> Path:
    spec.write_text(spec.read_text().replace("[optimizer]\n", f'[optimizer]\nprecision = "{precision}"\n'))
    return spec


@pytest.mark.slow
def test_a_two_stage_swarm_trains_on_cuda(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """Seed + 1+1 volunteers on --device cuda, fp32: 40 inner steps each, the loss falls, both say they
    compute on the GPU."""
    spec = _with_precision(write_spec(tmp_path / "run.toml"), "fp32")
    names = ("v0", "v1")
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--no-train")
        s.join_all({n: ["--stage", str(i), "--device", "cuda"] for i, n in enumerate(names)})
        wait_all_steps([s.child(n) for n in ("seed", *names)], [s.ready[n]["metrics_port"] for n in names], 40, 180)
        stop_children(s.children)
        for i, n in enumerate(names):
            out = s.output(n)
            assert s.child(n).process.returncode == 0, out
            assert "compute on cuda in fp32" in out, out
            match = SUMMARY_RE.search(out)
            assert match and int(match[1]) == i and int(match[2]) >= 40, out
            assert float(match[5]) < float(match[4]), f"{n}: loss {match[4]} -> {match[5]}"


@pytest.mark.slow
def test_noloco_replicas_pair_on_cuda_in_bf16(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """Seed + 2x2 volunteers on --device cuda, bf16, NoLoCo every 10 inner steps: every replica takes paired
    outer steps (the fused update on the GPU) and none is rejected."""
    spec = _with_precision(write_spec(tmp_path / "run.toml", outer="noloco", inner_steps=10, chunk_elements=16384),
                           "bf16")
    names = ("v0", "v1", "v2", "v3")
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--no-train")
        s.join_all({n: ["--stage", str(i % 2), "--device", "cuda"] for i, n in enumerate(names)})

        def outer(n: str, result: str) -> float:
            return s.metrics(n)[f'swarmd_outer_steps_total{{result="{result}"}}']

        for n in names:
            wait_for(lambda n=n: outer(n, "paired") >= 2, 150, f"{n}'s paired outer steps")
        assert all(outer(n, "rejected") == 0 for n in names)
        stop_children(s.children)
        for n in names:
            assert s.child(n).process.returncode == 0, s.output(n)
            assert "compute on cuda in bf16" in s.output(n), s.output(n)
