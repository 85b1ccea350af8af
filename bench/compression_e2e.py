"""End-to-end compression: the 2x2 demo swarm trained with fp32 vs int8 activations and gradients.

    python bench/compression_e2e.py [--steps 300] [--repeats 2] [--codecs none,int8]

Each run starts a fresh local swarm on 127.0.0.1 (seed + 4 volunteers, stage i mod 2, one torch thread each,
as `swarmd demo` runs it) on the embedded demo spec with ``outer = "none"`` (no averaging between replicas:
only the pipeline differs) and the codec under test on both pipeline channels, and stops it once every
volunteer took ``--steps`` inner steps. Runs alternate between codecs so machine-load drift hits them alike.
Within one repeat every codec's swarm reuses the same volunteer identities: a driver's data stream is seeded
by its peer id, so the codecs train on the same data streams and differ in the codec (and the swarm's timing) only;
each repeat draws new identities, hence new streams.

- bytes/sample: activations + gradients bytes sent (``swarmd_sent_bytes_total``: requests and their acks,
  summed over all nodes) over the samples the drivers (stage 0) saw through (``swarmd_samples_total``),
  both scraped the moment the last volunteer reached ``--steps``;
- final loss: mean over the last-stage nodes of their ``summary:`` line's "last" (mean of their last 10 losses);
- val loss: the checkpoints the volunteers write at stop, evaluated on the fixed validation windows of the
  corpus (every window of its held-out tail), averaged over every chain of one replica per stage. The
  training losses above come from 10 microbatches of 512 tokens each and are noisy; this one is not.

Per-codec rows give the mean over repeats and, after the +-, the standard deviation between repeats; the
"vs" columns are the mean (+- sd) over repeats of the % difference to the baseline's swarm of the same repeat.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from swarmd.daemon.checkpoint import model_state, read_checkpoint_tensors
from swarmd.daemon.demo import (
    Child,
    read_metrics,
    start_child,
    stop_children,
    wait_all_steps,
    wait_ready,
)
from swarmd.daemon.identity import IDENTITY_FILE, NodeIdentity
from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec
from swarmd.protocols.codecs import CODECS
from swarmd.swarm.data import builtin_corpus, split_corpus, validation_batches
from swarmd.swarm.model import build_stage, lm_loss

PIPELINE_CHANNELS = ("activations", "gradients")
TARGET_BYTES_RATIO = 3.5  # int8 must cut bytes per sample at least this much vs "none"
TARGET_LOSS_PCT = 2.0  # and land within this many % of its final loss


@dataclass
class RunResult:
    codec: str
    repeat: int
    seconds: float
    pipeline_bytes: float  # activations + gradients bytes sent, all nodes
    driver_samples: float  # samples completed by the stage-0 nodes
    dropped: float  # microbatches the drivers dropped or saw expire
    final_loss: float  # mean over last-stage nodes of their mean of the last 10 losses
    val_loss: float  # the stopped replicas' weights on the validation windows, mean over stage chains
    problems: list[str]  # warning / error lines from the nodes

    @property
    def bytes_per_sample(self) -> float:
        return self.pipeline_bytes / self.driver_samples


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # strings and lists of strings: JSON's syntax is valid TOML here


def write_spec(base: RunSpec, codec: str, path: Path) -> Path:
    """``base`` with ``codec`` on both pipeline channels and no outer step, as a RUN.toml."""
    spec = dataclasses.replace(
        base, run_id=f"e2e-{codec}", outer="none",
        compression=dataclasses.replace(base.compression, activations=codec, gradients=codec),
    )
    lines = []
    for section, values in spec.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    assert RunSpec.load(path) == spec, "the written spec does not read back the same"
    return path


@torch.no_grad()
def validation_losses(spec: RunSpec, checkpoints: list[list[Path]], batches: list) -> dict[tuple[int, ...], float]:
    """Loss on ``batches`` (mean next-byte cross-entropy) of every chain of one checkpoint per stage,
    keyed by the chain's replica index at each stage. Each stage's outputs are computed once per prefix."""
    chains: list[tuple[tuple[int, ...], list[torch.Tensor]]] = [((), [inputs for inputs, _ in batches])]
    for stage, paths in enumerate(checkpoints):
        models = []
        for path in paths:
            model = build_stage(spec.model, stage, spec.pipeline.stages, spec.seed)
            model.load_state_dict(model_state(read_checkpoint_tensors(path)[1]))
            models.append(model.eval())
        chains = [(ids + (i,), [model(x) for x in xs]) for ids, xs in chains for i, model in enumerate(models)]
    windows = sum(len(targets) for _, targets in batches)
    return {ids: sum(float(lm_loss(logits, targets)) * len(targets) for logits, (_, targets) in zip(xs, batches))
            / windows for ids, xs in chains}


def leftover_processes(marker: str) -> list[str]:
    """Processes still alive whose command line mentions ``marker`` (the swarm's own folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def node_problems(children: list[Child]) -> list[str]:
    keys = ("WARNING", "ERROR", "Traceback", "Exception")
    return [f"{c.name.strip()}: {line}" for c in children for line in c.lines if any(k in line for k in keys)]


def draw_identities(folder: Path, count: int) -> list[Path]:
    """``count`` fresh volunteer keys under ``folder`` (a driver's data stream is seeded by its peer id)."""
    keys = []
    for i in range(count):
        identity = NodeIdentity.load_or_create(folder / f"v{i}")
        print(f"[bench] v{i}: peer {identity.peer_id[-8:]}", flush=True)
        keys.append(identity.path)
    return keys


def run_swarm(base: RunSpec, codec: str, repeat: int, args: argparse.Namespace, val: list,
              keys: list[Path]) -> RunResult:
    """One fresh swarm trained to ``args.steps`` inner steps per volunteer with ``codec``."""
    tag = f"{codec}#{repeat + 1}"
    stages = base.pipeline.stages
    local = ["--host", "127.0.0.1", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
             "--progress-every", str(args.progress_every)]
    with tempfile.TemporaryDirectory(prefix=f"swarmd-e2e-{codec}-") as tmp:
        root = Path(tmp)
        (root / "sockets").mkdir()
        # hivemind leaves unix sockets in the temp folder: every swarm gets its own
        env = {**os.environ, "TMPDIR": str(root / "sockets"), "HIVEMIND_LOGLEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}
        spec_path = write_spec(base, codec, root / "run.toml")
        children: list[Child] = []
        started = time.monotonic()
        try:
            children.append(start_child(f"{tag} seed", ["seed", str(spec_path), "--no-train", *local],
                                        root / "seed", env))
            seed_info = wait_ready(children[0], 90)
            for i in range(args.volunteers):
                (root / f"v{i}").mkdir()
                shutil.copy(keys[i], root / f"v{i}" / IDENTITY_FILE)
                children.append(start_child(
                    f"{tag} v{i}", ["join", seed_info["maddrs"][0], *local, "--stage", str(i % stages),
                                    "--threads", str(args.threads)], root / f"v{i}", env))
            infos = [wait_ready(c, 90) for c in children[1:]]
            ports = [info["metrics_port"] for info in infos]
            print(f"[bench] {tag}: {args.volunteers} volunteers serve stages {[i['stage'] for i in infos]}; "
                  f"training to {args.steps} inner steps each", flush=True)
            wait_all_steps(children, ports, args.steps, args.timeout)
            # scrape everything at once, before the stop: the metrics endpoints close with the nodes
            scraped = [read_metrics(port) for port in ports]
            seconds = time.monotonic() - started
        finally:
            stop_started = time.monotonic()
            stop_children(children, timeout=60)  # nodes write checkpoints at stop: slow on a loaded machine
            stop_seconds = time.monotonic() - stop_started
        if left := leftover_processes(str(root)):
            raise RuntimeError(f"{tag}: processes left after the stop: {left}")
        volunteers = children[1:]
        exits = [f"{c.name.strip()} exited with {c.process.returncode}" for c in children if c.process.returncode]
        checkpoints = [[c.node_dir / "checkpoint.pt" for c, info in zip(volunteers, infos) if info["stage"] == s]
                       for s in range(stages)]
        eval_started = time.monotonic()
        chain_losses = validation_losses(base, checkpoints, val)
        val_loss = statistics.fmean(chain_losses.values())
        eval_seconds = time.monotonic() - eval_started
    # the relay threads print the summaries the nodes write at stop: give them a moment to get there
    last_stage = [c for c, info in zip(volunteers, infos) if info["stage"] == stages - 1]
    end = time.monotonic() + 10
    while any(c.summary is None for c in last_stage) and time.monotonic() < end:
        time.sleep(0.1)
    if missing := [c.name for c in last_stage if c.summary is None]:
        raise RuntimeError(f"{tag}: no summary line from {missing}")
    drivers = [m for m, info in zip(scraped, infos) if info["stage"] == 0]
    result = RunResult(
        codec=codec, repeat=repeat, seconds=seconds,
        pipeline_bytes=sum(m[f'swarmd_sent_bytes_total{{channel="{ch}"}}'] for m in scraped for ch in PIPELINE_CHANNELS),
        driver_samples=sum(m["swarmd_samples_total"] for m in drivers),
        dropped=sum(m[f'swarmd_microbatches_total{{result="{r}"}}'] for m in drivers for r in ("dropped", "expired")),
        final_loss=statistics.fmean(c.summary[1] for c in last_stage),
        val_loss=val_loss,
        problems=exits + node_problems(children),
    )
    print(f"[bench] {tag}: trained in {seconds:.0f} s (start included), stopped in {stop_seconds:.0f} s, "
          f"evaluated in {eval_seconds:.0f} s; {result.bytes_per_sample:,.0f} bytes/sample over "
          f"{result.driver_samples:.0f} samples, final loss {result.final_loss:.4f}, val loss {val_loss:.4f}, "
          f"{result.dropped:.0f} microbatches dropped/expired, {len(result.problems)} warning lines", flush=True)
    print(f"[bench] {tag}: val loss per chain of replicas (stage 0 > stage 1 ...): " + ", ".join(
        ">".join(checkpoints[stage][i].parent.name for stage, i in enumerate(ids)) + f" {loss:.4f}"
        for ids, loss in chain_losses.items()), flush=True)
    return result


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="inner steps every volunteer takes (default 300)")
    parser.add_argument("--repeats", type=int, default=2, help="swarms per codec (default 2)")
    parser.add_argument("--codecs", default="none,int8", help="codecs to compare, the first is the baseline "
                        "(default none,int8)")
    parser.add_argument("--volunteers", type=int, default=4, help="volunteers per swarm (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per volunteer (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="max seconds of training per swarm")
    parser.add_argument("--progress-every", type=float, default=15.0, help="node progress lines every N s")
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC_PATH, help="run spec (default: embedded demo)")
    args = parser.parse_args()
    # a SIGTERM unwinds like Ctrl-C, through the finally blocks that stop the swarm's processes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    codecs = args.codecs.split(",")
    if unknown := [c for c in codecs if c not in CODECS]:
        parser.error(f"unknown codec(s) {unknown}; known: {', '.join(CODECS)}")
    base = RunSpec.load(args.spec)
    m, p = base.model, base.pipeline
    print(f"[bench] model dim {m.dim} x {m.n_layers} layers, {p.stages} stages, microbatch {p.microbatch_size} x "
          f"{p.seq_len} tokens, outer none; {args.volunteers} volunteers; codecs {codecs}, {args.repeats} "
          f"repeat(s), {args.steps} inner steps each; {os.cpu_count()} cores", flush=True)
    torch.set_num_threads(1)  # the evaluation between swarms: 2 threads on a shared 2-core machine run 3x slower
    _, val = split_corpus(builtin_corpus(), base.data.val_fraction)
    val_batches = validation_batches(val, p.seq_len, 32, max_batches=1 << 20)
    results: list[RunResult] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="swarmd-e2e-keys-") as keys_dir:
        for repeat in range(args.repeats):
            keys = draw_identities(Path(keys_dir) / str(repeat), args.volunteers)
            for codec in codecs:  # alternate, so load drift on the machine hits every codec alike
                results.append(run_swarm(base, codec, repeat, args, val_batches, keys))
    print(f"\n[bench] {len(results)} swarms in {time.monotonic() - started:.0f} s; validation: "
          f"{sum(len(t) for t, _ in val_batches)} windows of {p.seq_len} bytes\n")

    print("| run | codec | seconds | driver samples | bytes/sample | dropped+expired | final loss | val loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.repeat + 1} | {r.codec} | {r.seconds:.0f} | {r.driver_samples:.0f} | {r.bytes_per_sample:,.0f} "
              f"| {r.dropped:.0f} | {r.final_loss:.4f} | {r.val_loss:.4f} |")

    baseline = codecs[0]
    by_codec = {codec: sorted((r for r in results if r.codec == codec), key=lambda r: r.repeat) for codec in codecs}

    def paired_pct(codec: str, key: str) -> tuple[float, float]:
        """Mean and sd over repeats of ``key``'s % difference to the baseline's swarm of the same repeat."""
        return mean_sd([100 * (getattr(r, key) - getattr(b, key)) / getattr(b, key)
                        for r, b in zip(by_codec[codec], by_codec[baseline])])

    base_bytes = statistics.fmean(r.bytes_per_sample for r in by_codec[baseline])
    print(f"\n| codec | bytes/sample | bytes ratio vs {baseline} | final loss (last 10) | vs {baseline} "
          f"| val loss | vs {baseline} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    verdicts = {}
    for codec, runs in by_codec.items():
        (b, b_sd), (loss, loss_sd), (v, v_sd) = (mean_sd([getattr(r, key) for r in runs])
                                                 for key in ("bytes_per_sample", "final_loss", "val_loss"))
        (d, d_sd), (vd, vd_sd) = paired_pct(codec, "final_loss"), paired_pct(codec, "val_loss")
        verdicts[codec] = (base_bytes / b, d, vd)
        print(f"| {codec} | {b:,.0f} +- {b_sd:,.0f} | {base_bytes / b:.2f}x | {loss:.4f} +- {loss_sd:.4f} "
              f"| {d:+.2f}% +- {d_sd:.2f} | {v:.4f} +- {v_sd:.4f} | {vd:+.2f}% +- {vd_sd:.2f} |")

    if "int8" in verdicts and baseline == "none":
        ratio, diff, val_diff = verdicts["int8"]
        print(f"\nint8 vs none: bytes/sample cut {ratio:.2f}x (target >= {TARGET_BYTES_RATIO}x: "
              f"{'ok' if ratio >= TARGET_BYTES_RATIO else 'MISSED'}); final loss {diff:+.2f}%, val loss "
              f"{val_diff:+.2f}% (target within {TARGET_LOSS_PCT}%: "
              f"{'ok' if abs(diff) <= TARGET_LOSS_PCT else 'MISSED'}, "
              f"{'ok' if abs(val_diff) <= TARGET_LOSS_PCT else 'MISSED'})")
    problems = [line for r in results for line in r.problems]
    if problems:
        print(f"\n{len(problems)} warning/error lines from the nodes, first ones:")
        for line in problems[:10]:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
