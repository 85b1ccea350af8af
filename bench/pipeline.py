"""Pipeline throughput: a plain torch loop vs a 1-peer swarm vs 2-stage swarms, measured in one run.

    python bench/pipeline.py [--seconds 20] [--threads 1] [--only a,b,c,d,e]

(a) plain single-process torch training loop on the same model, microbatch and optimizer, --threads threads;
(b) a 1-peer swarm: `swarmd seed` with one stage, training alone (daemon, compute lane, metrics, DHT);
(c) the demo swarm: seed + 4 volunteers, 2 stages x 2 replicas, separate processes on 127.0.0.1;
(d) the plain loop of (a) on 2 threads: the baseline for (e);
(e) a 2-stage 1+1 swarm: seed (not training) + one volunteer per stage, one thread each, on 127.0.0.1, so every
    microbatch's activations and gradients cross the wire (int8, libp2p) between two processes.
Swarm rates come from the nodes' own swarmd_samples_total counters over a steady window after warm-up.
(e)/(d) compares samples/s per core: both use the machine's 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from swarmd.daemon.demo import read_metrics, start_child, stop_children, wait_ready
from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec
from swarmd.swarm.data import CorpusSampler, builtin_corpus, split_corpus, stream_seed
from swarmd.swarm.model import build_stage, lm_loss
from swarmd.swarm.stage import optimizer_param_groups

LOCAL = ["--host", "127.0.0.1", "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--progress-every", "60"]


def plain_loop(spec: RunSpec, seconds: float, threads: int) -> float:
    """(a) samples/s of the same training step with nothing around it."""
    torch.set_num_threads(threads)
    model = build_stage(spec.model, 0, 1, spec.seed)
    o = spec.optimizer
    opt = torch.optim.AdamW(optimizer_param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2))
    train, _ = split_corpus(builtin_corpus(), spec.data.val_fraction)
    p = spec.pipeline
    sampler = CorpusSampler(train, p.seq_len, p.microbatch_size, stream_seed(spec.seed, "plain-loop"))

    def step() -> None:
        inputs, targets = sampler.next_batch()
        loss = lm_loss(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(10):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * p.microbatch_size / (time.perf_counter() - start)


def swarm_rate(ports: list[int], warmup_samples: float, seconds: float) -> float:
    """samples/s summed over ``ports`` (each sample counted once: pass the last stage's nodes)."""
    def total() -> float:
        return sum(read_metrics(port)["swarmd_samples_total"] for port in ports)

    deadline = time.monotonic() + 120
    while total() < warmup_samples:
        if time.monotonic() > deadline:
            raise TimeoutError("the swarm did not warm up in 120 s")
        time.sleep(0.5)
    s1, t1 = total(), time.monotonic()
    time.sleep(seconds)
    return (total() - s1) / (time.monotonic() - t1)


def one_peer_swarm(spec_path: Path, root: Path, env: dict, seconds: float, threads: int) -> float:
    """(b) `swarmd seed` alone with a one-stage copy of the spec."""
    one_stage = root / "one_stage.toml"
    one_stage.write_text(spec_path.read_text().replace("stages = 2", "stages = 1"))
    child = start_child("seed1", ["seed", str(one_stage), *LOCAL, "--threads", str(threads)], root / "seed1", env)
    try:
        info = wait_ready(child, 90)
        return swarm_rate([info["metrics_port"]], 80, seconds)
    finally:
        stop_children([child])


def demo_swarm(spec_path: Path, root: Path, env: dict, seconds: float, volunteers: int = 4) -> float:
    """(c) seed + volunteers, stage i mod 2, one thread each (as `swarmd demo` runs them)."""
    children = [start_child("seed", ["seed", str(spec_path), "--no-train", *LOCAL], root / "seed", env)]
    try:
        seed_addr = wait_ready(children[0], 90)["maddrs"][0]
        for i in range(volunteers):
            children.append(start_child(
                f"v{i}", ["join", seed_addr, *LOCAL, "--stage", str(i % 2), "--threads", "1"], root / f"v{i}", env))
        infos = [wait_ready(c, 90) for c in children[1:]]
        last_stage = [info["metrics_port"] for info in infos if info["stage"] == 1]
        return swarm_rate(last_stage, 160, seconds)
    finally:
        stop_children(children)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window per setup (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for (a) and (b) (default 1)")
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC_PATH, help="run spec (default: embedded demo)")
    parser.add_argument("--only", default="a,b,c,d,e", help="comma-separated setups to run (default: all)")
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    spec = RunSpec.load(args.spec)
    with tempfile.TemporaryDirectory(prefix="swarmd-bench-") as tmp:
        root = Path(tmp)
        (root / "sockets").mkdir()
        env = {**os.environ, "TMPDIR": str(root / "sockets"), "HIVEMIND_LOGLEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}
        print(f"model dim {spec.model.dim} x {spec.model.n_layers} layers, microbatch {spec.pipeline.microbatch_size}"
              f" x {spec.pipeline.seq_len} tokens; {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
              f", torch {torch.__version__}; {args.seconds:.0f} s per setup", file=sys.stderr)
        got: dict[str, float] = {}
        if "a" in args.only:
            got["a"] = plain_loop(spec, args.seconds, args.threads)
        if "b" in args.only:
            got["b"] = one_peer_swarm(args.spec, root, env, args.seconds, args.threads)
        if "c" in args.only:
            got["c"] = demo_swarm(args.spec, root / "c", env, args.seconds)
        if "d" in args.only:
            got["d"] = plain_loop(spec, args.seconds, 2)
        if "e" in args.only:
            got["e"] = demo_swarm(args.spec, root / "e", env, args.seconds, volunteers=2)  # own node dirs: no stale state
    names = {"a": f"(a) plain torch loop, 1 process, {args.threads} thread(s)",
             "b": "(b) 1-peer swarm (swarmd seed, 1 stage)", "c": "(c) demo swarm: seed + 2x2 volunteers",
             "d": "(d) plain torch loop, 1 process, 2 threads", "e": "(e) 2-stage 1+1 swarm: seed + 2 volunteers"}
    base = {"a": "a", "b": "a", "c": "a", "d": "d", "e": "d"}
    print("| setup | samples/s | ratio to its baseline |\n|---|---:|---:|")
    for key, rate in got.items():
        ref = got.get(base[key])
        print(f"| {names[key]} | {rate:.1f} | " + (f"{rate / ref:.2f} ({base[key]})" if ref else "-") + " |")
    if "a" in got and "b" in got:
        print(f"\n(b)/(a) = {got['b'] / got['a']:.3f} (target >= 0.9)")
    if "d" in got and "e" in got:
        print(f"(e)/(d) = {got['e'] / got['d']:.3f} samples/s per core (target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
