"""Throughput of the compression kernels next to baselines measured in the same run.

GB/s counts the bytes each operation must read plus the bytes it must write, once each (its
minimal traffic), so every implementation of one operation is scored on the same byte count.
Baselines: a plain tensor copy (the memory-bandwidth ceiling), an eager unfused torch reference,
torch.compile of that reference (skipped if it fails), and on CUDA the Triton kernels, a
device-to-device copy and bitsandbytes blockwise 8-bit quantization when installed. On CPU the
"fallback" column is what dispatch runs (torch.compile of the fallback's expression for large
tensors, swarmd.kernels.compiled) and "eager fallback" the same call with that compile switched off.
A line before the table says whether every implementation gives bit-identical results.

    python bench/kernels.py [--numel 4194304] [--block-size 256] [--device cpu|cuda] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from swarmd.kernels import (
    dequantize_int4,
    dequantize_int8,
    dequantize_int8_accumulate,
    dequantize_int8_pair_average,
    noloco_outer_update_,
    quantize_int4_ef,
    quantize_int8_ef,
)
from swarmd.kernels.compiled import ENV_SWITCH


@dataclass
class Op:
    """One benchmarked operation: its minimal byte count and its implementations by name."""

    name: str
    nbytes: int
    impls: dict[str, Callable[[], object]]
    reset: Callable[[], object] | None = None  # restores the inputs before each timed call (not timed)


def _time_interleaved(op: Op, device: torch.device, repeat: int) -> dict[str, float]:
    """Median seconds of each of ``op``'s implementations after two warm-up calls each. The implementations
    take turns within every repeat, so that a neighbour's load on a shared machine weighs on all of them
    alike and their ratios hold even when the absolute figures swing."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    impls = dict(op.impls)
    for impl, fn in list(impls.items()):
        try:
            for _ in range(2):
                if op.reset is not None:
                    op.reset()
                fn()
            sync()
        except Exception as exc:  # noqa: BLE001 - e.g. torch.compile without a working toolchain
            print(f"# {op.name} / {impl} skipped: {exc.__class__.__name__}: {str(exc)[:120]}")
            del impls[impl]
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(repeat):
        for impl, fn in impls.items():
            if op.reset is not None:
                op.reset()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[impl].append(time.perf_counter() - t0)
    return {impl: statistics.median(t) for impl, t in times.items()}


def ref_quant(x: torch.Tensor, r: torch.Tensor, bs: int, qmax: int):
    y = (x.float() + r).view(-1, bs)
    scale = y.abs().amax(dim=1) / qmax
    v = torch.where(scale[:, None] > 0, y / scale[:, None], torch.zeros_like(y)).clamp(-qmax, qmax).round()
    return v, scale, (y - v * scale[:, None]).view(-1)


def ref_quant8(x, r, bs):
    v, scale, res = ref_quant(x, r, bs, 127)
    return v.to(torch.int8), scale, res


def ref_quant4(x, r, bs):
    v, scale, res = ref_quant(x, r, bs, 7)
    nib = (v.view(-1) + 8).to(torch.uint8)
    return nib[0::2] | (nib[1::2] << 4), scale, res


def ref_dequant8(codes, scales, bs):
    return (codes.view(-1, bs).float() * scales[:, None]).view(-1)


def ref_dequant4(codes, scales, bs):
    lo = (codes & 0xF).float() - 8
    hi = (codes >> 4).float() - 8
    return (torch.stack([lo, hi], dim=1).view(-1, bs) * scales[:, None]).view(-1)


def ref_accumulate(codes, scales, acc, bs):
    return acc.add_(ref_dequant8(codes, scales, bs))


def ref_pair_average(codes, scales, own, bs):
    return (own + ref_dequant8(codes, scales, bs)) / 2


def ref_noloco(phi, theta, delta, c1, s1, c2, s2, bs):
    # the update written out as one unfused expression (beta = gamma = 0.7, mu = 0.5), the baseline that
    # torch.compile fuses; the rule the swarm runs lives once, in swarmd.kernels (checked equal below)
    pphi, pprog = ref_dequant8(c1, s1, bs), ref_dequant8(c2, s2, bs)
    new_delta = 0.5 * delta + 0.7 * ((theta - phi + pprog) * 0.5) + 0.7 * ((phi + pphi) * 0.5 - phi)
    delta.copy_(new_delta)
    phi.add_(new_delta)
    theta.copy_(phi)


def eager_only(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with swarmd.kernels' torch.compile path switched off: the eager fallback."""

    def run() -> object:
        saved = os.environ.get(ENV_SWITCH)
        os.environ[ENV_SWITCH] = "0"
        try:
            return fn()
        finally:
            if saved is None:
                del os.environ[ENV_SWITCH]
            else:
                os.environ[ENV_SWITCH] = saved

    return run


def build_ops(n: int, bs: int, device: torch.device, use_compile: bool, triton: bool) -> list[Op]:
    """The operations with every implementation available on ``device``."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device, generator=g)
    r = torch.randn(n, device=device, generator=g) * 0.01
    own = torch.randn(n, device=device, generator=g)
    acc = torch.zeros(n, device=device)
    phi, theta, delta = (torch.randn(n, device=device, generator=g) for _ in range(3))
    start = [t.clone() for t in (phi, theta, delta)]

    def reset_noloco() -> None:
        # repeated in-place updates drive delta toward zero (subnormal floats are slow on CPU): every
        # implementation starts from the same values
        for t, s0 in zip((phi, theta, delta), start):
            t.copy_(s0)

    q8, _ = quantize_int8_ef(x, r, block_size=bs)
    q4, _ = quantize_int4_ef(x, r, block_size=bs)
    nb = q8.scales.numel() * 4
    f32 = 4 * n

    def variants(public: Callable[[str], object], ref: Callable[[], object], ref_args: tuple) -> dict:
        impls: dict[str, Callable[[], object]] = {"fallback": lambda: public("torch")}
        if device.type == "cpu":
            impls["eager fallback"] = eager_only(lambda: public("torch"))
        if triton:
            impls["triton"] = lambda: public("triton")
        impls["eager-ref"] = lambda: ref(*ref_args)
        if use_compile:
            compiled = torch.compile(ref, dynamic=False)
            impls["compiled-ref"] = lambda: compiled(*ref_args)
        return impls

    ops = [
        Op("copy fp32", 2 * f32, {"copy": lambda: acc.copy_(x)}),
        Op(
            "quantize_int8_ef",
            2 * f32 + n + nb + f32,
            variants(lambda b: quantize_int8_ef(x, r, block_size=bs, backend=b), ref_quant8, (x, r, bs)),
        ),
        Op(
            "dequantize_int8",
            n + nb + f32,
            variants(lambda b: dequantize_int8(q8, acc, backend=b), ref_dequant8, (q8.codes, q8.scales, bs)),
        ),
        Op(
            "dequantize_int8_accumulate",
            n + nb + 2 * f32,
            variants(
                lambda b: dequantize_int8_accumulate(q8, acc, backend=b),
                ref_accumulate,
                (q8.codes, q8.scales, acc, bs),
            ),
        ),
        Op(
            "dequantize_int8_pair_average",
            n + nb + 2 * f32,
            variants(
                lambda b: dequantize_int8_pair_average(q8, own, acc, backend=b),
                ref_pair_average,
                (q8.codes, q8.scales, own, bs),
            ),
        ),
        Op(
            "quantize_int4_ef",
            2 * f32 + n // 2 + nb + f32,
            variants(lambda b: quantize_int4_ef(x, r, block_size=bs, backend=b), ref_quant4, (x, r, bs)),
        ),
        Op(
            "quantize_int4_ef stochastic",
            2 * f32 + n // 2 + nb + f32,
            {
                "fallback": lambda: quantize_int4_ef(x, r, block_size=bs, stochastic=True, seed=1, backend="torch"),
                **(
                    {"triton": lambda: quantize_int4_ef(x, r, block_size=bs, stochastic=True, seed=1, backend="triton")}
                    if triton
                    else {}
                ),
            },
        ),
        Op(
            "dequantize_int4",
            n // 2 + nb + f32,
            variants(lambda b: dequantize_int4(q4, acc, backend=b), ref_dequant4, (q4.codes, q4.scales, bs)),
        ),
        Op(
            "noloco_outer_update_",
            3 * f32 + 2 * (n + nb) + 3 * f32,
            variants(
                lambda b: noloco_outer_update_(phi, theta, delta, q8, q8, backend=b),
                ref_noloco,
                (phi, theta, delta, q8.codes, q8.scales, q8.codes, q8.scales, bs),
            ),
            reset_noloco,
        ),
    ]
    if device.type == "cuda":
        try:
            import bitsandbytes.functional as bnbf

            ops.append(
                Op(
                    "bnb quantize_blockwise (8-bit, no EF)",
                    f32 + n + nb,
                    {"bitsandbytes": lambda: bnbf.quantize_blockwise(x, blocksize=bs)},
                )
            )
        except Exception as exc:  # noqa: BLE001 - optional baseline
            print(f"# bitsandbytes baseline skipped: {exc.__class__.__name__}: {exc}")
    return ops


def check_identical(n: int, bs: int, device: torch.device, use_compile: bool) -> str:
    """Whether the fallback (compiled and eager), the eager reference and its compiled form give bit-identical
    int8 codes and scales, and NoLoCo phi and delta, on the bench's inputs."""
    g = torch.Generator(device=device).manual_seed(1)
    x, r = torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g) * 0.01
    phi0, theta0, delta0 = (torch.randn(n, device=device, generator=g) for _ in range(3))
    quant = {"fallback": lambda: quantize_int8_ef(x, r, block_size=bs, backend="torch"),
             "eager fallback": eager_only(lambda: quantize_int8_ef(x, r, block_size=bs, backend="torch")),
             "eager-ref": lambda: ref_quant8(x, r, bs)}
    if use_compile:
        compiled_quant = torch.compile(ref_quant8, dynamic=False)
        quant["compiled-ref"] = lambda: compiled_quant(x, r, bs)
    got = {k: f() for k, f in quant.items()}
    q = got["fallback"][0]
    refs = ("eager-ref", "compiled-ref")  # these return (codes as (blocks, block_size), scales, residual)
    same_q = {k: torch.equal(v[0].reshape(-1) if k in refs else v[0].codes, q.codes)
              and torch.equal(v[1] if k in refs else v[0].scales, q.scales) for k, v in got.items()}

    def noloco(fn: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        phi, theta, delta = phi0.clone(), theta0.clone(), delta0.clone()
        fn(phi, theta, delta)
        return phi, delta

    upd = {"fallback": lambda p, t, d: noloco_outer_update_(p, t, d, q, q, backend="torch"),
           "eager fallback": lambda p, t, d: eager_only(lambda: noloco_outer_update_(p, t, d, q, q, backend="torch"))(),
           "eager-ref": lambda p, t, d: ref_noloco(p, t, d, q.codes, q.scales, q.codes, q.scales, bs)}
    if use_compile:
        compiled_noloco = torch.compile(ref_noloco, dynamic=False)
        upd["compiled-ref"] = lambda p, t, d: compiled_noloco(p, t, d, q.codes, q.scales, q.codes, q.scales, bs)
    res = {k: noloco(f) for k, f in upd.items()}
    same_u = {k: all(torch.equal(a, b) for a, b in zip(v, res["fallback"])) for k, v in res.items()}
    return ("bit-identical to the fallback: int8 codes and scales " + ", ".join(f"{k} {'yes' if v else 'NO'}"
            for k, v in same_q.items() if k != "fallback") + "; NoLoCo phi and delta " +
            ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same_u.items() if k != "fallback"))


def main() -> None:
    """Run every operation and print a markdown table of GB/s and ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=1 << 22)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    n = args.numel // args.block_size * args.block_size  # whole blocks, so the eager references stay simple
    triton_ok = device.type == "cuda"
    if triton_ok:
        try:
            import triton  # noqa: F401
        except ImportError:
            triton_ok = False
    ops = build_ops(n, args.block_size, device, not args.no_compile, triton_ok)
    identical = check_identical(n, args.block_size, device, not args.no_compile)

    gbps: dict[tuple[str, str], float] = {}
    for op in ops:
        for impl, seconds in _time_interleaved(op, device, args.repeat).items():
            gbps[op.name, impl] = op.nbytes / seconds / 1e9
    copy = gbps["copy fp32", "copy"]

    cols = ["fallback", "eager fallback", "triton", "eager-ref", "compiled-ref", "bitsandbytes"]
    cols = [c for c in cols if any(k[1] == c for k in gbps)]
    print(
        f"device: {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, numel {n}, block_size {args.block_size}"
    )
    print(f"plain copy: {copy:.2f} GB/s; cells: GB/s (fraction of copy); last columns: speed-up of the fused op")
    print(identical)
    head = ["op", "MB moved"] + cols
    if "eager-ref" in cols:
        head.append("fallback / eager")
    if "compiled-ref" in cols:
        head.append("fallback / compiled")
    if "triton" in cols:
        head += ["triton / eager", "triton / compiled"] if "compiled-ref" in cols else ["triton / eager"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for op in ops[1:]:
        row = [op.name, f"{op.nbytes / 1e6:.1f}"]
        for c in cols:
            v = gbps.get((op.name, c))
            row.append(f"{v:.2f} ({v / copy:.2f})" if v else "-")

        def ratio(a: str, b: str, name: str = op.name) -> str:
            va, vb = gbps.get((name, a)), gbps.get((name, b))
            return f"{va / vb:.2f}x" if va and vb else "-"

        if "eager-ref" in cols:
            row.append(ratio("fallback", "eager-ref"))
        if "compiled-ref" in cols:
            row.append(ratio("fallback", "compiled-ref"))
        if "triton" in cols:
            row.append(ratio("triton", "eager-ref"))
            if "compiled-ref" in cols:
                row.append(ratio("triton", "compiled-ref"))
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
