"""One training step on one GPU: the swarm's stage path against a plain torch loop of the same model.

    python bench/gpu_step.py [--quick] [--precision fp32,bf16] [--peak-tflops T] [--compile-refs] [--no-kernels]

Rows, each in fp32 and in bf16 autocast (fp32 master weights and AdamW state, as optimizer.precision):
- **plain**: a torch loop on the whole model: forward, cross-entropy, backward, grad clip, AdamW (same groups);
- **swarm 1 stage**: the whole model as one ``StageWorker`` (input checks, gradient clipping, its syncs);
- **swarm 2 stages**: two ``StageWorker``s in this process, driven as the pipeline drives them (stage 0's
  no-grad forward, the last stage's forward + backward, stage 0's backward re-running its forward), the
  activations and their gradients each going through the codec (``encode_tensor`` on the GPU, the bytes to
  host memory and back, ``decode_tensor`` onto the GPU: swarmd.kernels' Triton quantizers).

Columns: tokens/s; MFU = 6 x parameters x tokens/s over the GPU's peak dense FLOP/s for the row's precision
(bf16 tensor cores, or plain fp32: torch leaves TF32 off), the model's FLOPs, not the hardware's: a stage
re-runs its forward in backward (swarm/stage.py), 8 x parameters per token; the row against the plain loop of
its precision;
the share of step time spent in the codec (GPU synced around it); peak memory. The peak comes from PEAK_TFLOPS
by device name, or --peak-tflops. Then the kernel table of bench/kernels.py on the same GPU (its torch.compile
references only with --compile-refs: they take minutes to compile).

Without CUDA it prints one line and exits 2 (nothing was measured); ``--allow-cpu`` runs the same code on the
CPU with a tiny model, fp32 only, as a dry run (tests/test_gpu_step.py). Figures go to bench/RESULTS.md ("GPU").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from swarmd.protocols.codecs import decode_tensor, encode_tensor
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.swarm.model import ModelConfig, build_stage, lm_loss
from swarmd.swarm.stage import StageWorker, optimizer_param_groups

NO_CUDA = 2  # exit status without a GPU: nothing was measured

# Peak dense TFLOP/s (no sparsity) by device-name substring, first match wins: bf16 tensor cores, plain fp32.
# NVIDIA's data sheets; SXM parts unless the name says otherwise.
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("RTX 4090", 165.0, 82.6),
]

SIZES = {  # (model, microbatch size, seq_len, timed steps)
    "full": (ModelConfig(vocab_size=256, dim=1024, n_layers=8, n_heads=16, max_seq_len=1024), 8, 1024, 20),
    "quick": (ModelConfig(vocab_size=256, dim=512, n_layers=4, n_heads=8, max_seq_len=512), 8, 512, 10),
    "cpu": (ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=2, max_seq_len=64), 2, 32, 2),
}
WARMUP_STEPS = 3
LR, WEIGHT_DECAY, BETAS, GRAD_CLIP = 3e-4, 0.01, (0.9, 0.95), 1.0


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's peak for ``device_name`` in ``precision`` ("bf16" or "fp32"), or None if not listed."""
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return bf16 if precision == "bf16" else fp32
    return None


@dataclass
class Row:
    name: str
    precision: str
    tokens_per_s: float
    codec_share: float | None  # fraction of step time in encode + decode; None: no codec on this path
    peak_gib: float | None  # None: not measured (CPU)


class Clock:
    """Wall time of GPU work: synchronizes before reading the clock (CUDA runs asynchronously)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.codec_s = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def codec(self) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.codec_s += time.perf_counter() - start


def _batches(config: ModelConfig, batch: int, seq: int, device: torch.device, count: int) -> list:
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g) for _ in range(count)]
    return [(d[:, :-1].to(device), d[:, 1:].to(device)) for d in data]


def _measure(step: Callable[[object], None], batches: list, clock: Clock, steps: int) -> float:
    """Seconds per step over ``steps`` timed steps, after the warm-up ones."""
    for b in batches[:WARMUP_STEPS]:
        step(b)
    clock.sync()
    clock.codec_s = 0.0
    start = time.perf_counter()
    for i in range(steps):
        step(batches[WARMUP_STEPS + i % (len(batches) - WARMUP_STEPS)])
    clock.sync()
    return (time.perf_counter() - start) / steps


def plain_step_fn(config: ModelConfig, device: torch.device, precision: str) -> Callable:
    model = build_stage(config, 0, 1, seed=0).to(device)
    opt = torch.optim.AdamW(optimizer_param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def step(batch) -> None:
        inputs, targets = batch
        with autocast:
            loss = lm_loss(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _worker(config: ModelConfig, stage: int, stages: int, device: torch.device, precision: str) -> StageWorker:
    return StageWorker(build_stage(config, stage, stages, seed=0), lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS,
                       grad_clip=GRAD_CLIP, device=device, precision=precision)


def swarm_step_fn(config: ModelConfig, stages: int, device: torch.device, precision: str, codec: str,
                  block_size: int, clock: Clock) -> Callable:
    chain = [_worker(config, s, stages, device, precision) for s in range(stages)]
    assert all(w.precision == precision for w in chain), "bf16 needs a CUDA device with bf16 support"
    counter = iter(range(1 << 62))

    def hop(t: torch.Tensor) -> torch.Tensor:
        """Through the wire's codec as the transport does it: encoded here, the bytes to host, decoded back."""
        with clock.codec():
            encoded = encode_tensor(t, codec, block_size=block_size)
            return decode_tensor(encoded.meta, encoded.payload, DEFAULT_LIMITS, device=device)

    def step(batch) -> None:
        inputs, targets = batch
        if stages == 1:
            chain[0].forward_backward_last(inputs, targets)
            return
        mb = next(counter).to_bytes(16, "little")
        x = inputs
        for worker in chain[:-1]:
            x = hop(worker.forward(mb, x))
        _, grad = chain[-1].forward_backward_last(x, targets)
        for worker in reversed(chain[:-1]):  # stage 0 returns None (its inputs are tokens)
            grad = worker.backward(mb, hop(grad))

    return step


def run_row(name: str, make_step: Callable[[Clock], Callable], batches: list, device: torch.device, steps: int,
            precision: str, tokens_per_step: int, has_codec: bool) -> Row:
    gc.collect()  # the previous row's model and optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    clock = Clock(device)
    step = make_step(clock)
    seconds = _measure(step, batches, clock, steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    share = clock.codec_s / (seconds * steps) if has_codec else None
    return Row(name, precision, tokens_per_step / seconds, share, peak)


def kernel_table(device: torch.device, compile_refs: bool) -> None:
    """bench/kernels.py's table on ``device``, through its own main() (its command line, as if run directly)."""
    path = Path(__file__).with_name("kernels.py")
    args = ["--device", device.type]
    if device.type != "cuda":  # the dry run
        args += ["--numel", str(1 << 16), "--repeat", "1"]
    if not compile_refs or device.type != "cuda":
        args.append("--no-compile")
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    saved = sys.argv
    sys.argv = [str(path), *args]
    try:
        print(f"\n## kernels: python bench/kernels.py {' '.join(args)}\n", flush=True)
        module.main()
    finally:
        sys.argv = saved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller model (dim 512, 4 layers, 512 tokens) and fewer steps")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's peak dense TFLOP/s for MFU when its name is not in PEAK_TFLOPS (used for every row)")
    p.add_argument("--codec", default="int8", help="activation and gradient codec of the 2-stage rows (default int8)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20, 10 with --quick)")
    p.add_argument("--no-kernels", action="store_true", help="skip bench/kernels.py's table")
    p.add_argument("--compile-refs", action="store_true",
                   help="let the kernel table torch.compile its references (minutes of compilation on a GPU)")
    p.add_argument("--allow-cpu", action="store_true", help="dry run on the CPU (tiny model; for the tests)")
    args = p.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda")
        size = "quick" if args.quick else "full"
    elif args.allow_cpu:
        device, size = torch.device("cpu"), "cpu"
    else:
        print("gpu_step: no CUDA device (torch.cuda.is_available() is False): nothing measured; "
              "run it on a GPU machine (bench/run_gpu_checks.sh)", flush=True)
        return NO_CUDA
    precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    if not precisions or any(x not in ("fp32", "bf16") for x in precisions):
        p.error(f"--precision takes fp32 and/or bf16, got {args.precision!r}")
    if device.type != "cuda" and "bf16" in precisions:
        print("# bf16 rows skipped: a CPU stage computes in fp32 (swarmd.swarm.stage.compute_precision)")
        precisions = [x for x in precisions if x != "bf16"] or ["fp32"]
    config, batch, seq, steps = SIZES[size]
    steps = args.steps or steps
    batches = _batches(config, batch, seq, device, WARMUP_STEPS + min(steps, 8))
    params = sum(t.numel() for t in build_stage(config, 0, 1, seed=0).parameters())
    tokens_per_step = batch * seq
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    rows: list[Row] = []
    for precision in precisions:
        rows.append(run_row("plain torch loop", lambda c, pr=precision: plain_step_fn(config, device, pr), batches,
                            device, steps, precision, tokens_per_step, False))
        for stages, label in ((1, "swarm 1 stage"), (2, f"swarm 2 stages, {args.codec} hops")):
            rows.append(run_row(
                label, lambda c, s=stages, pr=precision: swarm_step_fn(config, s, device, pr, args.codec,
                                                                       args.block_size, c),
                batches, device, steps, precision, tokens_per_step, stages > 1))
        for r in rows[-3:]:
            print(f"# measured {r.name}, {r.precision}: {r.tokens_per_s:,.0f} tokens/s", flush=True)

    triton = "-"
    with contextlib.suppress(ImportError):
        import triton as _triton

        triton = _triton.__version__
    print(f"\ndevice: {name}, torch {torch.__version__}, triton {triton}")
    print(f"model: dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads, vocab {config.vocab_size}, "
          f"{params / 1e6:.1f}M parameters; microbatch {batch} x {seq} tokens; AdamW; "
          f"{WARMUP_STEPS} warm-up + {steps} timed steps per row")
    print("MFU = 6 x parameters x tokens/s / peak; codec = share of step time in encode + decode (GPU synced)\n")
    print("| path | precision | tokens/s | MFU | x plain | codec share | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    plain = {r.precision: r.tokens_per_s for r in rows if r.name == "plain torch loop"}
    for r in rows:
        peak = args.peak_tflops or peak_tflops(name, r.precision)
        mfu = f"{6 * params * r.tokens_per_s / (peak * 1e12):.1%}" if peak else "-"
        share = f"{r.codec_share:.1%}" if r.codec_share is not None else "-"
        print(f"| {r.name} | {r.precision} | {r.tokens_per_s:,.0f} | {mfu} | {r.tokens_per_s / plain[r.precision]:.2f}x "
              f"| {share} | {'-' if r.peak_gib is None else f'{r.peak_gib:.2f}'} |", flush=True)
    if not (args.peak_tflops or peak_tflops(name, "fp32")):
        print(f"# MFU: {name!r} is not in PEAK_TFLOPS; pass --peak-tflops")

    if args.no_kernels:
        return 0
    try:
        kernel_table(device, args.compile_refs)
    except Exception:  # noqa: BLE001 - the step table above stands; say why the kernel table is missing
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
