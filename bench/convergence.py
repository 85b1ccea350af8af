"""Convergence at an equal token budget: synchronous data parallel vs DiLoCo vs NoLoCo vs no averaging.

    python bench/convergence.py [--steps 600] [--replicas 8] [--inner-steps 50] [--out bench/convergence.png]
    python bench/convergence.py --quick            # about a minute, for smoke testing

R replicas of a small byte-level model (the demo's architecture, smaller) are simulated in one process. As in
the swarm, the model is split into pipeline stages (the spec's, 2) and every stage has R replicas, each with
the daemon's inner AdamW (StageWorker's param groups, lr, betas, weight decay and per-stage grad clip from the
embedded run spec). Stream i's batches come from its own walk over the whole corpus (CorpusSampler seeded by
the run seed and the stream, as a driver's by its peer id) and enter stage 0's replica i; every later stage hands the R microbatches to its replicas by a fresh random permutation each step,
as the swarm's randomized pipelines route them (``--routing fixed``: stream i always meets replica i, i.e. R
independent whole models). Every method starts from the same weights and draws the same batches and routes,
so the runs differ only in how the replicas of a stage are combined:

(a) sync-dp: gradients averaged over the R streams every step; with equal batches that is one model
    stepping on the R batches concatenated, which is how it is computed here;
(b) diloco:  every H inner steps a stage's replicas average pseudo-gradients, outer Nesterov SGD (swarm/diloco.py);
(c) noloco:  every H inner steps a stage's replicas pair by a random perfect matching (a replica steps solo
    with probability --solo-rate, as one that found no partner before the deadline) and each applies the
    daemon's outer step (swarm/outer.py: outer_step_, the fused update of swarmd.kernels chunk by chunk) to
    its partner's phi and theta - phi as they arrive through the spec's averaging codec (int8 with error
    feedback: encode_payload, decode_tensor keeping int8 blocks, commit_residuals when the payload was used);
    the --codec none row is the fp32 reference;
(d) none:    the replicas never combine weights (random routing still mixes them).

Validation loss (fixed batches from the end of the embedded corpus) is measured every --eval-every steps,
right after any outer step. For the replicated methods the table reports the mean loss of the R chains
(replica i of every stage) and the loss of every stage's replicas averaged. Wall time counts training and outer steps, not evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from swarmd.daemon.spec import (
    DEFAULT_SPEC_PATH,
    AveragingConfig,
    OptimizerConfig,
    RunSpec,
)
from swarmd.protocols.codecs import decode_tensor
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.swarm.data import (
    CorpusSampler,
    builtin_corpus,
    split_corpus,
    stream_seed,
    validation_batches,
)
from swarmd.swarm.diloco import average_progress, diloco_update
from swarmd.swarm.evaluation import heldout_loss
from swarmd.swarm.model import (
    ModelConfig,
    StageModel,
    build_stage,
    count_parameters,
    lm_loss,
)
from swarmd.swarm.outer import (
    OuterState,
    Payload,
    assign_flat_,
    chunk_bounds,
    commit_residuals,
    encode_payload,
    flatten_parameters,
    outer_step_,
)
from swarmd.protocols.codecs import EncodedTensor
from swarmd.swarm.stage import optimizer_param_groups

METHODS = ("sync-dp", "diloco", "noloco", "none")


@dataclass
class Setup:
    """Everything shared by the methods of one run."""

    model: ModelConfig
    optimizer: OptimizerConfig
    averaging: AveragingConfig
    seed: int
    replicas: int
    steps: int
    inner_steps: int
    eval_every: int
    batch: int
    seq_len: int
    train: bytes
    val: list[tuple[torch.Tensor, torch.Tensor]]
    codec: str = "int8-ef"  # NoLoCo payloads, as the spec's compression.averaging
    block_size: int = 256
    chunk_elements: int = 1 << 20
    solo_rate: float = 0.0  # chance that a replica steps solo at an outer step
    cosine: bool = False  # inner lr: linear warm-up (4% of the steps), cosine decay to 10%
    diloco_nesterov: bool = True
    stages: int = 1  # pipeline stages; replicas combine per stage
    random_routing: bool = True  # each step, each stage after the first takes microbatches by a random permutation

    @property
    def tokens_per_step(self) -> int:
        """Tokens all replicas together train on per inner step (the same for every method)."""
        return self.replicas * self.batch * self.seq_len


@dataclass
class Curve:
    """Validation loss over training of one method."""

    method: str
    tokens: list[int] = field(default_factory=list)
    mean_loss: list[float] = field(default_factory=list)  # mean of the replicas' losses
    avg_loss: list[float] = field(default_factory=list)  # loss of the replicas' averaged weights
    train_s: float = 0.0


class StageReplica:
    """One simulated peer serving one stage: its part of the model and its inner AdamW as the daemon's
    StageWorker sets them up (param groups, lr, betas, weight decay, per-stage grad clip)."""

    def __init__(self, setup: Setup, stage: int):
        o = setup.optimizer
        self.model = build_stage(setup.model, stage, setup.stages, setup.seed)
        self.optimizer = torch.optim.AdamW(
            optimizer_param_groups(self.model, o.weight_decay),
            lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
        )
        self.grad_clip = o.grad_clip
        self.schedule = (
            torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: cosine_factor(step, setup.steps))
            if setup.cosine else None
        )

    def apply_gradients(self) -> None:
        """One inner step, as StageWorker._step: clip this stage's norm, skip a non-finite step, clear."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if math.isfinite(float(norm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.schedule is not None:
            self.schedule.step()

    def flat(self) -> torch.Tensor:
        """A flat fp32 copy of the weights (theta)."""
        return flatten_parameters(self.model.parameters())

    def load(self, flat: torch.Tensor) -> None:
        """Copy the weights in from a flat tensor, as the daemon does (assign_flat_); the AdamW state is kept.

        A copy, not torch's vector_to_parameters: that one makes the parameters views of ``flat``, so replicas
        loaded from one tensor would share (and all step on) the same weights.
        """
        assign_flat_(self.model.parameters(), flat)


class SimulatedSwarm:
    """``streams`` data streams through ``setup.stages`` stages, each stage served by ``streams`` replicas.

    Stream i's batches come from its own CorpusSampler and enter stage 0's replica i (that stream's driver). With
    random routing each later stage hands its ``streams`` microbatches to its replicas by a fresh random
    permutation every step, as the swarm's balanced randomized pipelines do; with fixed routing stream i always
    meets replica i of every stage (independent whole-model replicas). Every replica thus takes one microbatch
    per inner step. sync-dp is one stream made of all the streams' batches, one replica per stage.
    """

    def __init__(self, setup: Setup, samplers_per_stream: list[list[int]]):
        self.setup = setup
        self.streams = len(samplers_per_stream)
        self.stages = [[StageReplica(setup, s) for _ in range(self.streams)] for s in range(setup.stages)]
        self.samplers = [
            [CorpusSampler(setup.train, setup.seq_len, setup.batch, stream_seed(setup.seed, f"stream-{i}"))
             for i in streams]
            for streams in samplers_per_stream
        ]
        # The same routing draws for every method, so the runs differ only in how replicas are combined.
        self.routing = torch.Generator().manual_seed(setup.seed + 1)

    def step(self) -> None:
        """One inner step: every stream's microbatch forward and backward through its route, then every replica steps."""
        identity = list(range(self.streams))
        routes = [identity] + [
            torch.randperm(self.streams, generator=self.routing).tolist() if self.setup.random_routing else identity
            for _ in range(1, self.setup.stages)
        ]
        for i, samplers in enumerate(self.samplers):
            batches = [sampler.next_batch() for sampler in samplers]
            x = torch.cat([b[0] for b in batches])
            for stage, route in zip(self.stages, routes):
                x = stage[route[i]].model(x)
            lm_loss(x, torch.cat([b[1] for b in batches])).backward()
        for stage in self.stages:
            for replica in stage:
                replica.apply_gradients()

    def chains(self) -> list[list[StageModel]]:
        """Stream i's models through replica i of every stage (for evaluation)."""
        return [[stage[i].model for stage in self.stages] for i in range(self.streams)]


def cosine_factor(step: int, steps: int) -> float:
    """Inner lr multiplier: linear warm-up over 4% of ``steps``, then cosine decay to 0.1 (as NoLoCo's configs)."""
    warmup = max(1, steps // 25)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def evaluate(swarm: SimulatedSwarm, scratch: list[StageModel], val: list) -> tuple[float, float]:
    """(mean loss over the streams' chains, loss of every stage's replicas averaged); one evaluation if all equal."""
    flats = [[r.flat() for r in stage] for stage in swarm.stages]
    chains = swarm.chains()
    if all(torch.equal(f, stage[0]) for stage in flats for f in stage[1:]):
        loss = heldout_loss(chains[0], val)
        return loss, loss
    mean = sum(heldout_loss(chain, val) for chain in chains) / len(chains)
    for model, stage in zip(scratch, flats):
        assign_flat_(model.parameters(), torch.stack(stage).mean(0))
    return mean, heldout_loss(scratch, val)


def run_method(method: str, setup: Setup) -> Curve:
    """Train ``method`` for ``setup.steps`` inner steps, evaluating along the way."""
    a, n = setup.averaging, setup.replicas
    swarm = SimulatedSwarm(setup, [list(range(n))] if method == "sync-dp" else [[i] for i in range(n)])
    scratch = [build_stage(setup.model, s, setup.stages, setup.seed) for s in range(setup.stages)]
    # Outer state per stage: replicas of a stage only ever combine with each other.
    phi = [stage[0].flat() for stage in swarm.stages]  # all replicas start from the same weights
    momentum = [torch.zeros_like(p) for p in phi]  # DiLoCo's outer Nesterov buffer (zero start = torch's b = g)
    outer = [[OuterState.start(p) for _ in range(n)] for p in phi]  # NoLoCo: each replica's own phi, delta
    matching = torch.Generator().manual_seed(setup.seed)

    curve = Curve(method)

    def record(step: int) -> None:
        mean, avg = evaluate(swarm, scratch, setup.val)
        curve.tokens.append(step * setup.tokens_per_step)
        curve.mean_loss.append(mean)
        curve.avg_loss.append(avg)
        print(f"{method:>8} step {step:5d}/{setup.steps}  {step * setup.tokens_per_step / 1e6:6.2f}M tokens  "
              f"val {mean:.4f}  averaged weights {avg:.4f}  train {curve.train_s:6.1f} s", file=sys.stderr, flush=True)

    record(0)
    for step in range(1, setup.steps + 1):
        start = time.perf_counter()
        swarm.step()
        if method in ("diloco", "noloco") and step % setup.inner_steps == 0:
            for s, replicas in enumerate(swarm.stages):
                thetas = [r.flat() for r in replicas]
                if method == "diloco":
                    phi[s], momentum[s] = diloco_update(
                        phi[s], average_progress(phi[s], thetas), momentum[s], lr=a.diloco_lr,
                        momentum_coef=a.diloco_momentum, nesterov=setup.diloco_nesterov,
                    )
                    for replica in replicas:
                        replica.load(phi[s])
                    continue
                solo = torch.rand(n, generator=matching) < setup.solo_rate
                order = [i for i in torch.randperm(n, generator=matching).tolist() if not solo[i]]
                partner = {}
                for i, j in zip(order[0::2], order[1::2]):  # odd count: the last one steps alone
                    partner[i], partner[j] = j, i
                bounds = chunk_bounds(thetas[0].numel(), setup.chunk_elements)
                # every payload is encoded from the pre-step state, then every replica applies its update
                payloads = [wire_payload(outer[s][i], thetas[i], bounds, setup) for i in range(n)]
                for i in range(n):
                    j = partner.get(i)
                    if j is not None:  # our payload was used by j: keep its error feedback
                        commit_residuals(outer[s][i], thetas[i], bounds, payloads[i][0])
                    outer_step_(outer[s][i], thetas[i], payloads[j][1] if j is not None else None,
                                beta=a.beta, gamma=a.gamma, mu=a.mu)
                    replicas[i].load(thetas[i])
        curve.train_s += time.perf_counter() - start
        if step % setup.eval_every == 0 or step == setup.steps:
            record(step)
    return curve


def wire_payload(
    state: OuterState, theta: torch.Tensor, bounds: list[tuple[int, int]], setup: Setup
) -> tuple[list[tuple[EncodedTensor, EncodedTensor]], list[tuple[Payload, Payload]]]:
    """This replica's (phi, theta - phi) as the daemon encodes it, and as a partner receives it (int8 blocks
    kept as they are, as the daemon's transport does)."""
    chunks = encode_payload(state, theta, bounds, setup.codec, setup.block_size)
    received = [tuple(decode_tensor(t.meta, t.payload, DEFAULT_LIMITS, keep_blocks=True) for t in pair)
                for pair in chunks]
    return chunks, received


def plot(curves: list[Curve], setup: Setup, path: Path) -> None:
    """Validation loss vs tokens, one line per method (dashed: the replicas' averaged weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for curve, color in zip(curves, ("black", "tab:blue", "tab:orange", "tab:gray")):
        millions = [t / 1e6 for t in curve.tokens]
        ax.plot(millions, curve.mean_loss, color=color, label=curve.method if curve.method == "sync-dp" else
                f"{curve.method} (mean of replicas)")
        if curve.avg_loss != curve.mean_loss:
            ax.plot(millions, curve.avg_loss, color=color, linestyle="--", label=f"{curve.method} (averaged weights)")
    # Skip the first, steep part of the curves: the differences are at the end.
    later = [loss for c in curves for losses in (c.mean_loss, c.avg_loss) for loss in losses[min(2, len(losses) - 1):]]
    ax.set_ylim(min(later) - 0.05, max(later) + 0.05)
    ax.set_xlabel("tokens trained, all replicas (millions)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"{setup.replicas} replicas x {setup.stages} stage(s), "
                 f"{'random' if setup.random_routing else 'fixed'} routing, H = {setup.inner_steps}, "
                 f"dim {setup.model.dim} x {setup.model.n_layers} layers", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="inner steps per replica (default 600; --quick: 100)")
    parser.add_argument("--replicas", type=int, default=8, help="simulated replicas per stage, one data stream each (default 8)")
    parser.add_argument("--inner-steps", type=int, help="H, inner steps between outer steps (default 50; --quick: 25)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default: --inner-steps)")
    parser.add_argument("--dim", type=int, default=64, help="model width (default 64; the demo uses 128)")
    parser.add_argument("--layers", type=int, default=2, help="model depth (default 2; the demo uses 4)")
    parser.add_argument("--stages", type=int, help="pipeline stages (default: the spec's, 2)")
    parser.add_argument("--routing", choices=("random", "fixed"), default="random",
                        help="random: every step each later stage takes the microbatches by a random permutation, as "
                        "the swarm routes them (default); fixed: stream i always meets replica i of every stage")
    parser.add_argument("--batch", type=int, help="sequences per replica per step (default: the spec's microbatch)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC_PATH, help="run spec for the optimizer, seed, "
                        "seq_len and NoLoCo/DiLoCo coefficients (default: embedded demo)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("convergence.png"),
                        help="plot path (default: bench/convergence.png)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 100 steps, H 25, less validation data")
    diag = parser.add_argument_group("variants (for diagnosis; the defaults are the daemon's settings)")
    diag.add_argument("--lr", type=float, help="inner AdamW lr (default: the spec's)")
    diag.add_argument("--cosine", action="store_true", help="inner lr warm-up + cosine decay to 10%%")
    diag.add_argument("--codec", help="NoLoCo payload codec (default: the spec's compression.averaging; none: fp32)")
    diag.add_argument("--solo-rate", type=float, default=0.0, help="chance a replica finds no partner (default 0)")
    diag.add_argument("--beta", type=float, help="NoLoCo beta (default: the spec's)")
    diag.add_argument("--gamma", type=float, help="NoLoCo gamma (default: the spec's)")
    diag.add_argument("--diloco-momentum", type=float, help="DiLoCo outer momentum (default: the spec's, 0.9)")
    diag.add_argument("--diloco-heavy-ball", action="store_true",
                      help="DiLoCo outer step with plain (heavy-ball) momentum instead of Nesterov")
    diag.add_argument("--noloco-mu", type=float, help="NoLoCo outer momentum (default: the spec's, 0.5)")
    args = parser.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    steps = args.steps or (100 if args.quick else 600)
    inner_steps = args.inner_steps or (25 if args.quick else 50)
    eval_every = args.eval_every or inner_steps
    if min(steps, inner_steps, eval_every, args.replicas, args.threads) < 1:
        parser.error("--steps, --inner-steps, --eval-every, --replicas and --threads must be >= 1")
    if args.stages is not None and not 1 <= args.stages <= args.layers:
        parser.error(f"--stages must be in 1..{args.layers} (--layers)")

    torch.set_num_threads(args.threads)
    spec = RunSpec.load(args.spec)
    seq_len = spec.pipeline.seq_len
    model = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=spec.model.n_heads, max_seq_len=seq_len)
    train, val = split_corpus(builtin_corpus(), spec.data.val_fraction)
    optimizer = spec.optimizer if args.lr is None else dataclasses.replace(spec.optimizer, lr=args.lr)
    averaging = dataclasses.replace(
        spec.averaging,
        diloco_momentum=spec.averaging.diloco_momentum if args.diloco_momentum is None else args.diloco_momentum,
        mu=spec.averaging.mu if args.noloco_mu is None else args.noloco_mu,
        beta=spec.averaging.beta if args.beta is None else args.beta,
        gamma=spec.averaging.gamma if args.gamma is None else args.gamma,
    )
    setup = Setup(
        model=model, optimizer=optimizer, averaging=averaging, seed=spec.seed, replicas=args.replicas,
        steps=steps, inner_steps=inner_steps, eval_every=eval_every,
        batch=args.batch or spec.pipeline.microbatch_size, seq_len=seq_len, train=train,
        val=validation_batches(val, seq_len, 32, 2 if args.quick else 4),
        codec=args.codec or spec.compression.averaging, block_size=spec.compression.block_size,
        chunk_elements=spec.averaging.chunk_elements, solo_rate=args.solo_rate, cosine=args.cosine, diloco_nesterov=not args.diloco_heavy_ball,
        stages=args.stages or spec.pipeline.stages, random_routing=args.routing == "random",
    )
    o, a = setup.optimizer, setup.averaging
    val_windows = sum(inputs.shape[0] for inputs, _ in setup.val)
    print(f"model dim {model.dim} x {model.n_layers} layers ({count_parameters(build_stage(model, 0, 1, 0)):,} "
          f"params), {setup.stages} stage(s), {'random' if setup.random_routing else 'fixed'} routing, {setup.replicas} replicas x {setup.batch} x {seq_len} tokens per step, {steps} steps "
          f"({steps * setup.tokens_per_step / 1e6:.2f}M tokens), H {inner_steps}; AdamW lr {o.lr} wd "
          f"{o.weight_decay} betas ({o.beta1}, {o.beta2}) clip {o.grad_clip}{' cosine' if setup.cosine else ''}; "
          f"whole-corpus streams; NoLoCo codec {setup.codec}, solo rate {setup.solo_rate}; DiLoCo lr {a.diloco_lr} "
          f"{'Nesterov' if setup.diloco_nesterov else 'heavy-ball'} momentum {a.diloco_momentum}; NoLoCo beta {a.beta} gamma {a.gamma} mu {a.mu}; validation {val_windows} x "
          f"{seq_len} bytes; {os.cpu_count()} cores, {platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}", file=sys.stderr, flush=True)

    can_plot = importlib.util.find_spec("matplotlib") is not None
    if not can_plot:
        print("matplotlib is not installed (pip install -e '.[bench]'): the table only, no plot", file=sys.stderr)
    wall, cpu = time.perf_counter(), time.process_time()
    curves = [run_method(method, setup) for method in methods]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    base = next((c.mean_loss[-1] for c in curves if c.method == "sync-dp"), None)
    print("| method | final val loss (mean of replicas) | val loss of averaged weights | ratio to sync-dp "
          "| train wall s |\n|---|---:|---:|---:|---:|")
    for c in curves:
        ratio = f"{c.mean_loss[-1] / base:.3f}" if base else "-"
        print(f"| {c.method} | {c.mean_loss[-1]:.4f} | {c.avg_loss[-1]:.4f} | {ratio} | {c.train_s:.0f} |")
    final = {c.method: c.mean_loss[-1] for c in curves}
    if "noloco" in final and "diloco" in final:
        holds = "holds" if final["noloco"] <= final["diloco"] else "does NOT hold"
        print(f"\nNoLoCo {final['noloco']:.4f} vs DiLoCo {final['diloco']:.4f}: target NoLoCo <= DiLoCo {holds}")
    if can_plot:
        plot(curves, setup, args.out)
    print(f"plot: {args.out if can_plot else 'none'}; total {wall:.0f} s wall, {cpu:.0f} s process CPU (evaluation included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
