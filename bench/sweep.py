"""Outer-step settings on the daemon's real path: the demo swarm (2 stages x 2 replicas, the pipeline with its
weight stashing, the int8-ef averaging codec, random pairing and solo steps) under each setting.

    python bench/sweep.py [--settings default,pair-avg,...] [--repeats 2] [--window 120] [--warmup 20]
    python bench/sweep.py --quick        # every setting once, 20 s windows

Each setting is the embedded demo spec with a few keys changed (SETTINGS below). Every run is a fresh swarm
measured as ``bench/peer.py`` measures swarmd (samples/s over the window, training loss over its last 10 s,
held-out loss of the volunteers' final weights on all validation windows). Within a repeat, all settings use
the same volunteer keys, so their drivers draw the same data streams; repeats use new keys, and the order of
the settings rotates between repeats so that drift of the machine's load hits them alike. The table gives
each setting's mean held-out loss (and every repeat's) and its ratio to the first setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import peer  # noqa: E402  (the bench next door: swarm runner, cleanup, load meter)
from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec  # noqa: E402

# name -> changes to the demo spec ("section.key": value)
SETTINGS: dict[str, dict[str, Any]] = {
    "paper b=g=0.7 mu=0.5": {"averaging.beta": 0.7, "averaging.gamma": 0.7, "averaging.mu": 0.5},
    "pair-avg b=g=1 mu=0": {"averaging.beta": 1.0, "averaging.gamma": 1.0, "averaging.mu": 0.0},
    "pair-avg H=25": {"averaging.beta": 1.0, "averaging.gamma": 1.0, "averaging.mu": 0.0, "averaging.inner_steps": 25},
    "pair-avg H=100": {"averaging.beta": 1.0, "averaging.gamma": 1.0, "averaging.mu": 0.0,
                       "averaging.inner_steps": 100},
    "b=g=1 mu=0.3": {"averaging.beta": 1.0, "averaging.gamma": 1.0, "averaging.mu": 0.3},
    "diloco lr=0.7 nesterov=0.9": {"run.outer": "diloco"},
    "diloco lr=1 momentum=0": {"run.outer": "diloco", "averaging.diloco_lr": 1.0, "averaging.diloco_momentum": 0.0},
    "none": {"run.outer": "none"},
    "weight_stashes=4": {"pipeline.weight_stashes": 4},
}
DEFAULT_SWEEP = ("paper b=g=0.7 mu=0.5", "pair-avg b=g=1 mu=0", "pair-avg H=25", "pair-avg H=100",
                 "diloco lr=0.7 nesterov=0.9", "none", "weight_stashes=4")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_variant(base: RunSpec, changes: dict[str, Any], path: Path) -> Path:
    """The base spec with ``changes`` applied, checked by RunSpec, written as a RUN.toml."""
    raw = base.to_dict()
    for key, value in changes.items():
        section, name = key.split(".")
        raw[section][name] = value
    RunSpec.from_dict(raw)  # a bad setting fails here, not in a node
    lines = []
    for section, table in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{name} = {toml_value(value)}" for name, value in table.items() if value is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(DEFAULT_SWEEP),
                        help="comma-separated names from SETTINGS (default: DEFAULT_SWEEP)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--window", type=float, default=120.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 20 s windows, 10 s warm-up")
    args = parser.parse_args()
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    if unknown := [n for n in names if n not in SETTINGS]:
        parser.error(f"unknown setting(s) {unknown}; known: {list(SETTINGS)}")
    if args.quick:
        args.repeats, args.window, args.warmup = 1, 20.0, 10.0
    base = RunSpec.load(DEFAULT_SPEC_PATH)
    work = Path(tempfile.mkdtemp(prefix="swarmd-sweep-"))
    runner = peer.parse_args(["--systems", "swarmd", "--window", str(args.window), "--warmup", str(args.warmup),
                              "--identities", str(work / "keys")])
    setup = peer.load_setup(DEFAULT_SPEC_PATH)  # corpus and validation windows are the same for every setting
    specs = {name: write_variant(base, SETTINGS[name], work / f"spec{i}.toml") for i, name in enumerate(names)}
    results: dict[str, list[peer.SystemRun]] = {name: [] for name in names}
    try:
        for repeat in range(args.repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for name in order:
                peer.progress(f"sweep: repeat {repeat + 1}/{args.repeats}, setting {name!r}")
                peer.wait_for_quiet(runner.wait_quiet)
                run = peer.run_swarmd(dataclasses.replace(setup, spec=RunSpec.load(specs[name])),
                                      argparse.Namespace(**{**vars(runner), "spec": specs[name]}), repeat)
                results[name].append(run)
    finally:
        peer.REAPER.clean()
    baseline = statistics.fmean(r.heldout for r in results[names[0]])
    print(f"\n| setting | held-out loss (each repeat) | ratio to {names[0]} | samples/s | train loss, last 10 s |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        runs = results[name]
        held = statistics.fmean(r.heldout for r in runs)
        print(f"| {name} | {held:.4f} ({', '.join(f'{r.heldout:.4f}' for r in runs)}) | {held / baseline:.3f} | "
              f"{statistics.fmean(r.samples_per_s for r in runs):.0f} | "
              f"{statistics.fmean(r.train_loss for r in runs):.4f} |")
    if args.json:
        args.json.write_text(json.dumps({name: [dataclasses.asdict(r) for r in runs]
                                         for name, runs in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
