"""Poisoning: one hostile replica among a stage's NoLoCo replicas, against the same run without it.

    python bench/poisoning.py            # 6 replicas x 2 stages, 1000 inner steps, H = 50 (about 10 minutes)
    python bench/poisoning.py --quick    # a smaller model, 200 steps, H = 10 (what tests/test_poisoning.py runs)

The simulation is bench/convergence.py's (SimulatedSwarm: R replicas per stage, each stream's microbatches
routed through a random replica of every later stage, the daemon's inner AdamW), and every outer step goes
through the daemon's own code:

- per stage, replicas pair by a random matching in which nobody is paired with a peer it has banned or that
  has banned it (the daemon's proposers skip banned peers on the ready board, and refuse banned proposers);
- payloads travel through the spec's averaging codec (``wire_payload``: ``encode_payload``, ``decode_tensor``
  keeping int8 blocks; the sent chunks and the received ones), and an honest replica whose payload was used
  keeps its error feedback (``commit_residuals``);
- each honest replica judges its partner's payload as NoLoCoService does: ``payload_sums`` per chunk, then
  ``payload_problem`` under the run spec's AveragingConfig bounds (whether it paired with that partner before
  from ``PartnerBans.knows``), and ``pull_scale`` for the pull of a payload it accepts. The driver (the
  smaller index, the proposer in the daemon) judges first; if it rejects, the other's step "failed" (it got a
  reject verdict);
- every outcome goes through ``PartnerBans.settle`` (the daemon's ban rule, its clock the replica's outer steps);
- the update is ``outer_step_`` with the spec's beta, gamma (times the pull scale), mu and ``max_move`` clip; a
  rejected pair steps solo.

The poisoner is replica 0 of stage 0. It trains honestly (its forward and backward serve the pipeline with
honest weights); only what it does in outer steps is hostile:

- flip:  it sends phi' = -9 phi (a norm only 9x ours: under the old 10x norm bound) with its honest progress;
- drift: it sends a phi that moves by twice its honest update per outer step and never toward its partners
         (its phi plus an offset that grows by one honest update each outer step), with its progress doubled.
Its own outer step is an honest one, with whoever accepted it.

With ``--controls``, four more runs: each attack with the bounds off (no distance or progress check, no
clip: what the daemon did before, as its 10x norm bound let both attacks through), to show what the attacks do
when let in; and the drift done with its own weights (phi <- phi + 2 (theta - phi), no pull toward anyone:
the weights it serves the pipeline with drift too), once as above and once never paired with anyone (as if
banned from the start): the share of the damage its drifting weights do through the pipeline alone, which
no outer-step check can stop.

Reported: the honest replicas' final validation loss (the mean over the chains of replica i of every stage,
i != 0: the chains without the poisoner), its ratio to the same chains in the run without a poisoner, and how
many honest replicas paired with the poisoner and how many of those hold a ban on it at the end. The run
without a poisoner also reports what honest pairs show (distance between phis, progress ratio, move), what the
bounds in AveragingConfig are chosen against.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from convergence import Setup, SimulatedSwarm, wire_payload  # noqa: E402  (the simulation next door)
from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec  # noqa: E402
from swarmd.swarm.data import builtin_corpus, split_corpus, validation_batches  # noqa: E402
from swarmd.swarm.evaluation import heldout_loss  # noqa: E402
from swarmd.swarm.model import ModelConfig  # noqa: E402
from swarmd.swarm.outer import (  # noqa: E402
    OuterState,
    PartnerBans,
    chunk_bounds,
    commit_residuals,
    outer_step_,
    payload_problem,
    payload_sums,
    pull_scale,
    sum_of_squares,
)

MODES = ("none", "flip", "drift")
POISONER = 0  # replica index of the poisoner (in stage POISON_STAGE)
POISON_STAGE = 0
FLIP = -9.0  # flip: phi' = FLIP * phi
DRIFT = 2.0  # drift: the phi it sends moves this x its honest update per outer step; its progress sent: this x its own


@dataclass
class HonestStats:
    """What honest pairs showed (the maxima over every honest replica's judgement of an honest partner)."""

    pairs: int = 0
    distance_ratio: float = 0.0  # ||phi_partner - phi|| / ||our theta - phi||
    divergence: float = 0.0  # ||phi_partner - phi|| / ||phi||
    progress_ratio: float = 0.0  # ||partner's theta - phi|| / ||ours||
    move: float = 0.0  # ||phi change|| / ||phi|| before the clip
    rejected: int = 0  # honest payloads an honest replica rejected (false positives)
    pulls_clipped: int = 0  # honest payloads whose pull an honest replica clipped (pull_scale < 1)
    clipped: int = 0  # honest replicas' outer steps whose move was clipped (max_move)


@dataclass
class Outcome:
    """One mode's run."""

    mode: str
    honest_loss: float = math.nan
    paired_with_poisoner: set[int] = field(default_factory=set)  # honest replicas that were paired with it
    banned_by: set[int] = field(default_factory=set)  # honest replicas banning it at the end
    accepted_from_poisoner: int = 0  # poisoned payloads an honest replica accepted
    first_rejection: int | None = None  # outer step at which the poisoner was first rejected
    honest: HonestStats = field(default_factory=HonestStats)
    train_s: float = 0.0


def match(n: int, bans: list[PartnerBans], clocks: list[int], generator: torch.Generator,
          solo_rate: float = 0.0) -> list[tuple[int, int]]:
    """A random matching of ``n`` replicas (as many pairs as bans allow): walk a random order and pair each
    unpaired replica with the next unpaired one that neither bans nor is banned by. Without bans this is
    bench/convergence.py's random perfect matching (with ``solo_rate``, as there, a replica sits the step out
    with that chance: one that found no partner before its deadline). Pairs are (driver, other): the smaller
    index drives."""
    solo = torch.rand(n, generator=generator) < solo_rate
    order = [i for i in torch.randperm(n, generator=generator).tolist() if not solo[i]]
    partner: dict[int, int] = {}
    for k, i in enumerate(order):
        if i in partner:
            continue
        for j in order[k + 1 :]:
            banned = bans[i].is_banned(str(j), clocks[i]) or bans[j].is_banned(str(i), clocks[j])
            if j not in partner and not banned:
                partner[i], partner[j] = j, i
                break
    return sorted({(min(i, j), max(i, j)) for i, j in partner.items()})


def judge(own: OuterState, own_theta: torch.Tensor, payload: tuple[list, list], bounds: list[tuple[int, int]],
          setup: Setup, known: bool) -> tuple[str | None, float, tuple[float, float, float]]:
    """NoLoCoService's verdict on a partner's payload (``known``: paired with it before): (problem or None, the
    pull scale if accepted, (its distance from our phi in our own drifts, the same in ||phi||, its progress
    ratio to ours))."""
    progress_sq = distance_sq = 0.0
    for (start, end), (phi, progress) in zip(bounds, payload[1]):
        p_sq, d_sq = payload_sums(own.phi[start:end], phi, progress)
        progress_sq, distance_sq = progress_sq + p_sq, distance_sq + d_sq
    phi_norm, progress_norm = math.sqrt(sum_of_squares(own.phi)), math.sqrt(sum_of_squares(own_theta - own.phi))
    a = setup.averaging
    move_norm = own.last_move_norm
    problem = payload_problem(phi_norm, progress_norm, move_norm, progress_sq, distance_sq,
                              max_divergence=a.max_divergence, max_distance_ratio=a.max_distance_ratio,
                              max_progress_ratio=a.max_progress_ratio, known=known)
    pull = pull_scale(distance_sq, progress_norm, move_norm, a.max_distance_ratio)
    distance, drift, scale = math.sqrt(distance_sq), max(progress_norm, move_norm, 1e-12), max(progress_norm, 1e-12)
    return problem, pull, (distance / drift, distance / phi_norm, math.sqrt(progress_sq) / scale)


def honest_step(state: OuterState, theta: torch.Tensor, payload: tuple[list, list] | None,
                setup: Setup, pull: float = 1.0) -> torch.Tensor:
    """The daemon's outer step (paired with ``payload`` and its ``pull`` scale, or solo), clipped; returns the new
    weights (in ``theta``'s buffer)."""
    a = setup.averaging
    outer_step_(state, theta, payload[1] if payload is not None else None, beta=a.beta, gamma=a.gamma * pull,
                mu=a.mu, max_move=a.max_move)
    return theta


@dataclass
class Poisoner:
    """Replica POISONER of stage POISON_STAGE. It trains honestly; its outer steps are hostile."""

    mode: str  # "flip" or "drift"
    drifted_weights: bool = False  # drift: its own weights take the drifting steps (else only what it sends drifts)
    offset: torch.Tensor | None = None  # drift with honest weights: what it sends is its phi + offset

    def payload(self, state: OuterState, theta: torch.Tensor, bounds: list[tuple[int, int]],
                setup: Setup) -> tuple[list, list]:
        """What it sends: phi flipped; or a phi that drifts by one more honest update per outer step than its
        own, with its progress doubled."""
        progress = theta - state.phi
        if self.mode == "flip":
            phi, sent_progress = FLIP * state.phi, progress
        elif self.drifted_weights:
            phi, sent_progress = state.phi, DRIFT * progress
        else:
            self.offset = torch.zeros_like(progress) if self.offset is None else self.offset
            phi, sent_progress = state.phi + self.offset, DRIFT * progress
            self.offset += (DRIFT - 1.0) * progress  # the drift piles up, step after step
        return wire_payload(OuterState.start(phi), phi + sent_progress, bounds, setup)

    def step(self, state: OuterState, theta: torch.Tensor, payload: tuple[list, list] | None,
             setup: Setup, pull: float = 1.0) -> torch.Tensor:
        """Its own outer step: phi <- phi + 2 (theta - phi), no pull toward anyone, if its weights drift;
        else an honest one (with whoever accepted it)."""
        if self.mode == "drift" and self.drifted_weights:
            outer_step_(state, theta, beta=DRIFT, gamma=0.0, mu=0.0)
            return theta
        return honest_step(state, theta, payload, setup, pull)


def unguarded(setup: Setup) -> Setup:
    """``setup`` with the payload bounds and the clip off."""
    off = dataclasses.replace(setup.averaging, max_divergence=math.inf, max_distance_ratio=math.inf,
                              max_progress_ratio=math.inf, max_move=math.inf)
    return dataclasses.replace(setup, averaging=off)


def outer_round(replicas: list, states: list[OuterState], bans: list[PartnerBans], poisoner: Poisoner | None,
                isolated: bool, matching: torch.Generator, setup: Setup, result: Outcome) -> None:
    """One outer step of one stage's replicas: pair, exchange, judge, settle, update (see the module doc)."""
    n = len(replicas)
    thetas = [r.flat() for r in replicas]
    hostile = {POISONER} if poisoner is not None else set()
    clocks = [state.outer_step for state in states]  # each replica's ban clock: its own outer steps
    pairs = [pair for pair in match(n, bans, clocks, matching, setup.solo_rate)
             if not (isolated and hostile & set(pair))]
    bounds = chunk_bounds(thetas[0].numel(), setup.chunk_elements)
    payloads = [poisoner.payload(states[i], thetas[i], bounds, setup) if i in hostile
                else wire_payload(states[i], thetas[i], bounds, setup) for i in range(n)]
    stats, partner_of, pull = result.honest, {}, [1.0] * n
    for driver, other in pairs:
        rejecter = None
        for judge_i, sender in ((driver, other), (other, driver)):  # the driver's reject verdict ends it first
            if judge_i in hostile:
                continue  # the poisoner takes anything
            problem, pull[judge_i], (distance_ratio, divergence, ratio) = judge(
                states[judge_i], thetas[judge_i], payloads[sender], bounds, setup, bans[judge_i].knows(str(sender)))
            if not hostile:
                stats.pairs, stats.rejected = stats.pairs + 1, stats.rejected + (problem is not None)
                stats.pulls_clipped += problem is None and pull[judge_i] < 1.0
                stats.distance_ratio = max(stats.distance_ratio, distance_ratio)
                stats.divergence = max(stats.divergence, divergence)
                stats.progress_ratio = max(stats.progress_ratio, ratio)
            if problem is not None:
                rejecter = judge_i
                break
        for i, j in ((driver, other), (other, driver)):
            if i in hostile:
                continue
            outcome = "paired" if rejecter is None else "rejected" if rejecter == i else "failed"
            bans[i].settle(str(j), outcome, clocks[i])
            if j in hostile:
                result.paired_with_poisoner.add(i)
                if outcome == "paired":
                    result.accepted_from_poisoner += 1
                elif result.first_rejection is None:
                    result.first_rejection = clocks[i]
        if rejecter is None:
            partner_of[driver], partner_of[other] = other, driver
    for i in range(n):
        payload = payloads[partner_of[i]] if i in partner_of else None  # each payload is used once: scratch
        if i in hostile:
            replicas[i].load(poisoner.step(states[i], thetas[i], payload, setup, pull[i]))
            continue
        before = states[i].phi.clone()
        if i in partner_of:  # its payload was used: keep its error feedback
            commit_residuals(states[i], thetas[i], bounds, payloads[i][0])
        replicas[i].load(honest_step(states[i], thetas[i], payload, setup, pull[i]))
        if not hostile:
            moved = math.sqrt(sum_of_squares(states[i].phi - before)) / math.sqrt(sum_of_squares(before))
            stats.move = max(stats.move, moved / states[i].move_scale)
            stats.clipped += states[i].move_scale < 1.0


def run(mode: str, setup: Setup, label: str | None = None, *, isolated: bool = False,
        drifted_weights: bool = False) -> Outcome:
    """Train ``setup.steps`` inner steps with the poisoner in ``mode`` ("none": an honest replica 0).
    ``isolated``: nobody is ever paired with it; ``drifted_weights``: see Poisoner."""
    n = setup.replicas
    swarm = SimulatedSwarm(setup, [[i] for i in range(n)])
    outer = [[OuterState.start(stage[0].flat()) for _ in range(n)] for stage in swarm.stages]
    a = setup.averaging
    bans = [[PartnerBans(a.ban_outer_steps, a.max_failures) for _ in range(n)] for _ in swarm.stages]
    poisoner = Poisoner(mode, drifted_weights) if mode != "none" else None
    matching = torch.Generator().manual_seed(setup.seed)
    result = Outcome(label or mode)
    for step in range(1, setup.steps + 1):
        start = time.perf_counter()
        swarm.step()
        if step % setup.inner_steps == 0:
            for s, replicas in enumerate(swarm.stages):
                outer_round(replicas, outer[s], bans[s], poisoner if s == POISON_STAGE else None, isolated,
                            matching, setup, result)
        result.train_s += time.perf_counter() - start
    chains = swarm.chains()
    result.honest_loss = sum(heldout_loss(chains[i], setup.val) for i in range(n) if i != POISONER) / (n - 1)
    if poisoner is not None:
        stage = POISON_STAGE
        result.banned_by = {i for i in range(n) if i != POISONER
                            and bans[stage][i].is_banned(str(POISONER), outer[stage][i].outer_step)}
    print(f"{result.mode:>6}: honest val loss {result.honest_loss:.4f}, poisoner paired with "
          f"{sorted(result.paired_with_poisoner)}, banned by {sorted(result.banned_by)}, accepted "
          f"{result.accepted_from_poisoner}x, train {result.train_s:.0f} s", file=sys.stderr, flush=True)
    return result


def make_setup(quick: bool, steps: int | None = None, inner_steps: int | None = None, seed: int | None = None,
               solo_rate: float = 0.0, spec_path: Path = DEFAULT_SPEC_PATH) -> Setup:
    """The bench's setup: the run spec's optimizer, averaging (bounds, bans, clip), codec and stages, on the
    convergence bench's small model (``quick``: smaller still, and fewer steps)."""
    spec = RunSpec.load(spec_path)
    seq_len = spec.pipeline.seq_len
    dim, layers = (32, 2) if quick else (64, 2)
    model = ModelConfig(dim=dim, n_layers=layers, n_heads=spec.model.n_heads, max_seq_len=seq_len)
    train, val = split_corpus(builtin_corpus(), spec.data.val_fraction)
    steps = steps or (200 if quick else 1000)
    inner_steps = inner_steps or (10 if quick else spec.averaging.inner_steps)
    return Setup(
        model=model, optimizer=spec.optimizer, averaging=spec.averaging,
        seed=spec.seed if seed is None else seed, replicas=6, steps=steps, inner_steps=inner_steps,
        eval_every=steps, batch=spec.pipeline.microbatch_size, seq_len=seq_len, train=train,
        val=validation_batches(val, seq_len, 32, 2 if quick else 4),
        codec=spec.compression.averaging, block_size=spec.compression.block_size,
        chunk_elements=spec.averaging.chunk_elements, stages=spec.pipeline.stages, solo_rate=solo_rate,
    )


def run_all(setup: Setup, modes: tuple[str, ...] = MODES, controls: bool = False) -> dict[str, Outcome]:
    """Every mode's run, keyed by its label (with ``controls``, also the control runs: see the module doc)."""
    outcomes = {mode: run(mode, setup) for mode in modes}
    if controls:
        for mode in modes[1:]:
            label = f"{mode}, bounds off"
            outcomes[label] = run(mode, unguarded(setup), label)
        if "drift" in modes:
            for label, isolated in (("drift, drifted weights", False), ("drift, drifted weights, never paired", True)):
                outcomes[label] = run("drift", setup, label, isolated=isolated, drifted_weights=True)
    return outcomes


def holds(base: Outcome, attacked: Outcome) -> bool:
    """The acceptance: the honest replicas within 2% of the run without a poisoner, and the poisoner banned
    by every honest replica that was paired with it."""
    return (attacked.honest_loss <= 1.02 * base.honest_loss and bool(attacked.paired_with_poisoner)
            and attacked.paired_with_poisoner <= attacked.banned_by)


def table(outcomes: dict[str, Outcome]) -> str:
    """The markdown table of the runs (ratios against the run without a poisoner)."""
    base = outcomes["none"].honest_loss
    lines = ["| poisoner | honest final val loss | ratio to no poisoner | honest replicas paired with it "
             "| of those, banning it at the end | its payloads accepted | first rejected at outer step |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for o in outcomes.values():
        if o.mode == "none":
            lines.append(f"| none | {o.honest_loss:.4f} | 1.000 | - | - | - | - |")
            continue
        banned = len(o.banned_by & o.paired_with_poisoner)
        first = "-" if o.first_rejection is None else o.first_rejection
        lines.append(f"| {o.mode} | {o.honest_loss:.4f} | {o.honest_loss / base:.3f} | {len(o.paired_with_poisoner)} "
                     f"| {banned} | {o.accepted_from_poisoner} | {first} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="dim 32, 200 steps, H 10 (the test's run)")
    parser.add_argument("--steps", type=int, help="inner steps per replica (default 1000; --quick: 200)")
    parser.add_argument("--inner-steps", type=int, help="H (default: the spec's, 50; --quick: 10)")
    parser.add_argument("--seed", type=int, help="run seed (default: the spec's)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)} "
                        "(none is always run: the others' reference)")
    parser.add_argument("--controls", action="store_true", help="also the control runs: each attack with the "
                        "bounds off, and the drift done with the poisoner's own weights (see above)")
    parser.add_argument("--solo-rate", type=float, default=0.0, help="chance a replica finds no partner (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the runs are small)")
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC_PATH, help="run spec (default: embedded demo)")
    args = parser.parse_args()
    modes = tuple(m for m in MODES if m == "none" or m in args.modes.split(","))
    torch.set_num_threads(args.threads)
    setup = make_setup(args.quick, args.steps, args.inner_steps, args.seed, args.solo_rate, args.spec)
    a = setup.averaging
    print(f"6 replicas x {setup.stages} stages, dim {setup.model.dim} x {setup.model.n_layers} layers, "
          f"{setup.steps} steps, H {setup.inner_steps}, solo rate {setup.solo_rate}, codec {setup.codec}; "
          f"NoLoCo beta {a.beta} gamma {a.gamma} mu {a.mu}; bounds: max_divergence {a.max_divergence}, "
          f"max_distance_ratio {a.max_distance_ratio}, "
          f"max_progress_ratio {a.max_progress_ratio}, max_move {a.max_move}; bans {a.ban_outer_steps} outer steps, max_failures {a.max_failures}; "
          f"{os.cpu_count()} cores, {platform.machine()}, {args.threads} threads, torch {torch.__version__}",
          file=sys.stderr, flush=True)
    wall = time.perf_counter()
    outcomes = run_all(setup, modes, args.controls)
    print(table(outcomes))
    h = outcomes["none"].honest
    print(f"\nhonest pairs (no poisoner, {h.pairs} verdicts): distance from the judge's phi up to "
          f"{h.distance_ratio:.3f} x its own drift (bound {a.max_distance_ratio}) and {h.divergence:.3f} x "
          f"||phi|| (bound {a.max_divergence}); progress ratio up to {h.progress_ratio:.3f} (bound {a.max_progress_ratio}); move up to "
          f"{h.move:.3f} x ||phi|| (clip {a.max_move}); {h.rejected} rejected, {h.pulls_clipped} pulls and {h.clipped} moves clipped")
    failed = [mode for mode in modes[1:] if not holds(outcomes["none"], outcomes[mode])]
    if len(modes) > 1:
        verdict = "holds" if not failed else f"does NOT hold for {', '.join(failed)}"
        print(f"target (honest loss within 2% of no poisoner, poisoner banned by every replica it paired with): "
              f"{verdict}")
    print(f"total {time.perf_counter() - wall:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
