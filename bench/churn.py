"""Churn and state sync: what killing and replacing volunteers costs a swarm, and how fast a joiner gets its state.

    python bench/churn.py [--part all|churn|sync] [--window 90] [--warmup 30] [--churn-every 15]
                          [--volunteers 4] [--state-mb 256] [--repeats 3] [--rate-mbit 100] [--delay-ms 25]
                          [--joiner-down-mbit 1000] [--no-shaped] [--keep DIR] [--json [OUT]] [--quick]
    python bench/churn.py --quick                 # smoke run of both parts, about 5 minutes
    python bench/churn.py --part sync --quick     # state sync only, about 1.5 minutes
    python bench/churn.py --part churn --quick    # churn only, about 4 minutes

Part 1, **churn** (one run each of "no churn" and "churn", in this order, on 127.0.0.1). Each run is a real
swarm as ``swarmd demo`` starts it (``daemon/demo.py``): a seed (``--no-train``) and ``--volunteers`` volunteers
pinned to ``--stage i % stages`` at the start, one torch thread each, on a copy of the run spec (default: the
embedded demo run, 2 stages) with ``[balancing] enabled = false`` (``--balancing`` keeps the spec's). Volunteer
``v<i>`` has the same libp2p key in both runs, so the two runs' drivers walk the corpus in the same orders. After
``--warmup`` seconds a window of ``--window`` seconds is measured:

- **no churn**: nothing happens.
- **churn**: every ``--churn-every`` seconds (at 0.5, 1.5, 2.5, ... times it within the window) a random ready
  volunteer whose stage keeps another ready replica is killed with SIGKILL to its process group (the node and its
  p2pd: a machine dying), and a replacement starts at once: half the time (when there is one) a restart of a
  killed volunteer with its old ``--node-dir`` (it returns to its checkpoint's stage and restores it, or downloads
  the stage's state from the live replicas when they are further along), else a fresh volunteer with no
  ``--stage`` (it picks the stage that limits the swarm and downloads its state).

Measured: **samples/s at the last stage**, the growth of ``swarmd_samples_total`` (scraped every second from each
node's ``/metrics``) of every last-stage volunteer while it was alive during the window, summed over the
volunteers (a killed one counts up to its last scrape, taken just before the kill) and divided by the window;
the **training loss** at equal wall time, the mean ``swarmd_loss`` of the last-stage volunteers scraped over the
window's last 10 s; and the **held-out loss** at equal wall time: after the window every live node is stopped
with SIGTERM (each volunteer writes ``NODE_DIR/checkpoint.pt``) and ``checkpoint_heldout_loss`` scores those
checkpoints on the run's validation windows. The table prints both runs and churn / no churn (target: samples/s
at least 0.8x). On a small machine the churn run also pays the replacements' start-up CPU (Python, torch, p2pd)
out of the same cores the swarm trains on: the events table gives each joiner's start-up CPU seconds (node and
p2pd, until it served) and their share of the machine's core-seconds in the window; "other load" shows how many
cores processes outside this bench used. ``--joiner-nice N`` (root) starts every replacement at nice N and puts it
back to 0 once it serves: its start-up then mostly runs on what the swarm leaves idle, as on a joiner's own machine
(it starts more slowly, so the swarm runs short of a replica for longer).

Part 2, **state sync** (a stage state of about ``--state-mb`` MiB: a ``build_stage`` of a larger ``ModelConfig``,
the stage of a 2-stage model, in a ``StageWorker`` that took one AdamW step, plus NoLoCo outer phi and delta).
Three processes, each with its own p2pd (hivemind ``P2P``, NAT traversal, AutoNAT and relays off): two donors,
each serving its copy of that state with the daemon's ``StateDonor`` (and a raw stream handler), and a joiner
that times, ``--repeats`` times each (medians are printed):

- **raw stream**: as many bytes as the state has, from donor 0 over one hivemind binary stream
  (``call_binary_stream_handler``; the donor writes 16 MiB at a time), until the joiner has read them all;
- **1 donor**: a ``StateDownload`` (the daemon's own, 16 MiB chunks, digests checked) from donor 0;
- **2 donors**: the same download striped over donors 0 and 1.

Before every download each donor drops its ``StateDonor`` and registers a new one, so every download pays for
its donors' snapshots and chunk digests (the "manifest" time; the rest is the "transfer" time), as the first
joiner after a quiet spell would. Networks:

- **loopback**: all three on 127.0.0.1 (on a 2-core machine the three processes and three p2pd's share the CPUs:
  the times there are CPU-bound, per-chunk work on both ends included);
- **shaped** (root only, ``bench/netns.py``): every process in its own network namespace on a bridge, each
  donor's upload ``--rate-mbit`` (100 Mbit/s; ``tc tbf``), ``--delay-ms`` one way (NFQUEUE holder; needs
  iptables, else the network is built without delay and says so); the joiner's download is
  ``--joiner-down-mbit`` (default 1000; 0: unshaped), so that two donors' uploads can add up, as a joiner
  with a faster downlink than each donor's uplink sees. The link is checked before the runs (``measure_link``);
  a link more than 20% off its rate gets no shaped results.

Targets: 1 donor at 0.8x or more of the raw stream's speed; 2 donors at 1.6x or more of 1 donor on the shaped
network. If the shaped network cannot be built here, the bench prints why and measures loopback only.

Every process (and its p2pd) runs in its own process group and is killed at the end, also on errors and Ctrl-C;
namespaces are deleted; the nodes' ``/tmp/hivemind-*`` sockets and the bench's folders are removed. Progress lines
go to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import gc
import itertools
import json
import math
import os
import platform
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netns  # bench/netns.py, next to this file
from peer import (  # bench/peer.py: process groups, private folders, hivemind's sockets, CPU accounting
    REAPER,
    Reaper,
    cpu_ticks,
    log_tail,
    machine_busy_ticks,
    private_folder,
    quiet_env,
    read_messages,
    say,
    tree_pids,
)
from swarmd.daemon.demo import (
    Child,
    node_command,
    read_metrics,
    stop_children,
    wait_ready,
)
from swarmd.daemon.heldout import checkpoint_heldout_loss, validation_set
from swarmd.daemon.identity import IDENTITY_FILE, NodeIdentity
from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec

MIB = 1 << 20
LOSS_TAIL_S = 10.0  # the training loss is the mean over the window's last this many seconds
POLL_S = 1.0  # seconds between scrapes of every node's /metrics
LOCAL = ["--host", "127.0.0.1", "--metrics-host", "127.0.0.1", "--metrics-port", "0"]
SYNC_DONE_RE = re.compile(r"state sync: done, (\d+) MiB in ([\d.]+) s \(\d+ MiB/s\) from (\d+) donor")
RESTORED_RE = re.compile(r"restored stage (\d+) from \S+ \(step (\d+)")
RAW_HANDLER = "swarmd-bench-raw"
RAW_BLOCK = 16 * MIB  # the raw stream's writes, as large as a state chunk
SYNC_STAGE, SYNC_STAGES = 1, 2  # the synced state: the last stage of a 2-stage model (its blocks, norm and head)
STATE_BYTES_PER_PARAM = 20  # fp32 weights, AdamW's two moments, outer phi and delta


def progress(text: str) -> None:
    print(f"[churn-bench] {text}", file=sys.stderr, flush=True)


def fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float:
    """a / b, NaN when either is missing or b is 0."""
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return math.nan
    return a / b


def median_cell(values: list[float], digits: int = 2) -> str:
    """Median, and each value in brackets when there are several."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    med = fmt(statistics.median(finite), digits)
    return med if len(values) == 1 else f"{med} ({', '.join(fmt(v, digits) for v in values)})"


def verdict(value: float, target: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return "met" if value >= target else "NOT met"


# ---------------------------------------------------------------------------------------------------
# CPU used by others while a window runs


class CpuMeter:
    """Cores that processes other than this bench kept busy over a span: the machine's busy time less this
    process tree's (every node is a child of this process; the CPU time of nodes killed during the span is
    added as it stood just before the kill, see ``forget``)."""

    def __init__(self) -> None:
        self._start: tuple[float, int, int] | None = None
        self._dead_ticks = 0
        self.foreign_cores = math.nan

    def _ours(self) -> int:
        return cpu_ticks(tree_pids(os.getpid())) + self._dead_ticks

    def forget(self, pid: int) -> None:
        """Call just before killing ``pid``'s process tree: keep its CPU time in the books."""
        self._dead_ticks += cpu_ticks(tree_pids(pid))

    def start(self) -> None:
        self._start = (time.monotonic(), machine_busy_ticks(), self._ours())

    def stop(self) -> float:
        if self._start is None:
            return math.nan
        t0, busy0, ours0 = self._start
        t1, busy1, ours1 = time.monotonic(), machine_busy_ticks(), self._ours()
        hz = os.sysconf("SC_CLK_TCK")
        self.foreign_cores = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / hz / max(t1 - t0, 1e-9))
        return self.foreign_cores


# ---------------------------------------------------------------------------------------------------
# Part 1: a swarm with and without churn


def write_bench_spec(source: Path, target: Path, balancing: bool) -> RunSpec:
    """Copy the run spec at ``source`` to ``target``, with ``[balancing] enabled = false`` unless ``balancing``."""
    text = source.read_text()
    if not balancing:
        head, section, tail = text.partition("[balancing]")
        if section:
            tail, found = re.subn(r"(?m)^enabled\s*=\s*\w+", "enabled = false", tail, count=1)
            text = head + section + (tail if found else "\nenabled = false\n" + tail)
        else:
            text += "\n[balancing]\nenabled = false\n"
    target.write_text(text)
    spec = RunSpec.load(target)
    if not balancing and spec.balancing.enabled:
        raise RuntimeError(f"could not switch balancing off in {target}")
    return spec


@dataclass
class Volunteer:
    """One incarnation of a volunteer process (a restart with the same node dir is a new one)."""

    name: str
    kind: str  # "initial", "fresh" or "restart"
    child: Child
    log: Path
    started: float  # time.monotonic() at its start
    info: dict | None = None  # its ready.json
    ready_at: float | None = None
    startup_cpu_s: float | None = None  # CPU seconds its process group (node and p2pd) used before it served
    stage: int | None = None
    mark: float | None = None  # swarmd_samples_total at its latest scrape inside the window
    window_samples: float = 0.0  # last-stage samples counted for it inside the window
    ended: str | None = None  # None while alive; "killed", "exited <code>" or "stopped"

    @property
    def pid(self) -> int:
        return self.child.process.pid

    @property
    def node_dir(self) -> Path:
        return self.child.node_dir


@dataclass
class SwarmRun:
    """What one swarm run (with or without churn) measured."""

    system: str
    window_s: float
    samples: float  # last-stage samples during the window
    train_loss: float
    heldout: float
    foreign_cores: float
    kills: int
    joins: int
    events: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    series: list[tuple[float, float]] = field(default_factory=list)  # (s into the window, samples so far)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.window_s if self.window_s > 0 else math.nan


def slice_rates(series: list[tuple[float, float]], window_s: float, every: float) -> list[float]:
    """Samples/s in consecutive slices of ``every`` seconds of the window, from the cumulative ``series``
    (linear between scrapes)."""
    if len(series) < 2:
        return []

    def at(t: float) -> float:
        for (t0, s0), (t1, s1) in itertools.pairwise(series):
            if t0 <= t <= t1:
                return s0 + (s1 - s0) * (t - t0) / max(t1 - t0, 1e-9)
        return series[-1][1] if t > series[-1][0] else series[0][1]

    edges = [k * every for k in range(int(window_s / every + 1e-6) + 1)]  # whole slices only
    return [(at(b) - at(a)) / (b - a) for a, b in itertools.pairwise(edges)]


class ChurnSwarm:
    """A seed and volunteers on 127.0.0.1 that this bench starts, scrapes, kills and replaces."""

    def __init__(self, label: str, root: Path, spec_path: Path, spec: RunSpec, identities: Path,
                 args: argparse.Namespace, reaper: Reaper, rng: random.Random):
        self.label, self.root, self.spec_path, self.spec = label, root, spec_path, spec
        self.identities, self.args, self.reaper, self.rng = identities, args, reaper, rng
        self.last_stage = spec.pipeline.stages - 1
        self.env = quiet_env(root / "tmp")
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        self.common = [*LOCAL, "--progress-every", str(args.node_progress_every)]
        self.seed: Child | None = None
        self.seed_addr = ""
        self.volunteers: list[Volunteer] = []  # every incarnation, in start order
        self.killed: list[str] = []  # names whose node dir may come back
        self.fresh_count = 0
        self.window_start: float | None = None
        self.tail_losses: list[float] = []
        self.series: list[tuple[float, float]] = []  # (seconds into the window, last-stage samples so far)
        self.events: list[dict] = []
        self.cpu = CpuMeter()

    # ---- processes

    def _launch(self, name: str, argv: list[str], node_dir: Path) -> tuple[Child, Path]:
        node_dir.mkdir(parents=True, exist_ok=True)
        (node_dir / "ready.json").unlink(missing_ok=True)  # a restart must not find its last life's
        log = self.root / "logs" / f"{name}.{sum(v.name == name for v in self.volunteers)}.log"
        with log.open("w") as out:
            process = subprocess.Popen(node_command(*argv, "--node-dir", str(node_dir)), stdout=out,
                                       stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.reaper.add_process(process)
        return Child(name, process, node_dir), log

    def start(self) -> None:
        """The seed, then the initial volunteers on stage i % stages; wait until all serve."""
        self.seed, _ = self._launch("seed", ["seed", str(self.spec_path), "--no-train", *self.common],
                                    self.root / "seed")
        self.seed_addr = wait_ready(self.seed, self.args.start_timeout)["maddrs"][0]
        stages = self.spec.pipeline.stages
        for i in range(self.args.volunteers):
            node_dir = self.root / f"v{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            identity = NodeIdentity.load_or_create(self.identities / f"v{i}")
            shutil.copy(identity.path, node_dir / IDENTITY_FILE)
            self.start_volunteer(f"v{i}", "initial", ["--stage", str(i % stages)])
        for v in self.volunteers:
            self._mark_ready(v, wait_ready(v.child, self.args.start_timeout))
        self.reaper.note_sockets()

    def start_volunteer(self, name: str, kind: str, extra: list[str] = ()) -> Volunteer:
        child, log = self._launch(name, ["join", self.seed_addr, *self.common, "--threads", "1", *extra],
                                  self.root / name)
        v = Volunteer(name, kind, child, log, time.monotonic())
        self.volunteers.append(v)
        return v

    def _mark_ready(self, v: Volunteer, info: dict) -> None:
        v.info, v.ready_at, v.stage = info, time.monotonic(), info["stage"]
        v.startup_cpu_s = cpu_ticks(tree_pids(v.pid)) / os.sysconf("SC_CLK_TCK")
        if self.args.joiner_nice and v.kind != "initial":
            os.setpriority(os.PRIO_PGRP, v.pid, 0)

    def live(self) -> list[Volunteer]:
        return [v for v in self.volunteers if v.ended is None]

    def ready(self) -> list[Volunteer]:
        return [v for v in self.live() if v.info is not None]

    def check(self) -> None:
        """Notice volunteers that became ready or died by themselves; fail if the seed died."""
        if self.seed is not None and self.seed.process.poll() is not None:
            raise RuntimeError(f"{self.label}: the seed exited with code {self.seed.process.returncode}")
        for v in self.live():
            if v.info is None and (v.node_dir / "ready.json").exists():
                self._mark_ready(v, json.loads((v.node_dir / "ready.json").read_text()))
                self._event(v, "ready", stage=v.stage, ready_s=round(v.ready_at - v.started, 1))
                progress(f"{self.label}: {v.name} ({v.kind}) serves stage {v.stage}, "
                         f"{v.ready_at - v.started:.1f} s after its start")
            if v.child.process.poll() is not None:
                v.ended = f"exited {v.child.process.returncode}"
                self._event(v, "exited", code=v.child.process.returncode)
                tail = log_tail(v.log, 4).replace("\n", " | ")
                progress(f"{self.label}: {v.name} ({v.kind}) exited by itself with code "
                         f"{v.child.process.returncode}: {tail}")
                self.reaper.kill_groups({v.pid})

    # ---- measuring

    def _scrape(self, v: Volunteer) -> dict[str, float] | None:
        try:
            return read_metrics(v.info["metrics_port"])
        except OSError:  # dying, or not yet serving
            return None

    def poll(self, end: float | None) -> None:
        """Scrape every ready volunteer (all at once: a busy node answers slowly); inside the window, count its
        last-stage samples and, in the window's last LOSS_TAIL_S, its loss."""
        ready = self.ready()
        with ThreadPoolExecutor(max_workers=max(len(ready), 1)) as pool:
            scraped = list(pool.map(self._scrape, ready))
        now = time.monotonic()
        for v, values in zip(ready, scraped):
            self._count(v, values, now, end)
        if self.window_start is not None:
            self.series.append((round(now - self.window_start, 2), self.window_samples()))

    def _poll_one(self, v: Volunteer, end: float | None) -> None:
        self._count(v, self._scrape(v), time.monotonic(), end)

    def _count(self, v: Volunteer, values: dict[str, float] | None, now: float, end: float | None) -> None:
        if values is None:
            return
        v.stage = int(values.get("swarmd_stage", v.stage if v.stage is not None else -1))
        samples = values.get("swarmd_samples_total", 0.0)
        if self.window_start is None:
            return
        if v.mark is None:  # first scrape in the window: a process started inside it counted from zero
            v.mark = 0.0 if v.started >= self.window_start else samples
        if v.stage == self.last_stage:
            v.window_samples += max(samples - v.mark, 0.0)
            loss = values.get("swarmd_loss", math.nan)
            if end is not None and end - now <= LOSS_TAIL_S and math.isfinite(loss) and loss > 0:
                self.tail_losses.append(loss)
        v.mark = samples

    def begin_window(self) -> None:
        self.window_start = time.monotonic()
        for v in self.ready():
            self._poll_one(v, None)
        self.series.append((0.0, 0.0))
        self.cpu.start()

    def window_samples(self) -> float:
        return sum(v.window_samples for v in self.volunteers)

    # ---- churn

    def _event(self, v: Volunteer, what: str, **details: Any) -> None:
        t = time.monotonic() - (self.window_start or time.monotonic())
        self.events.append({"t": round(t, 1), "event": what, "node": v.name, "kind": v.kind, **details})

    def churn_once(self, end: float) -> None:
        """Kill one ready volunteer whose stage keeps another ready replica, and start a replacement."""
        counts = Counter(v.stage for v in self.ready())
        eligible = sorted((v for v in self.ready() if counts[v.stage] > 1), key=lambda v: v.name)
        if not eligible:
            progress(f"{self.label}: no stage has two ready replicas; no kill this time")
            self.events.append({"t": round(time.monotonic() - self.window_start, 1), "event": "kill skipped"})
            return
        victim = self.rng.choice(eligible)
        self._poll_one(victim, end)  # its samples up to now count
        self.reaper.note_sockets()  # remember its p2pd's sockets: SIGKILL leaves them in /tmp
        self.cpu.forget(victim.pid)
        self.reaper.kill_groups({victim.pid})
        victim.ended = "killed"
        self._event(victim, "kill", stage=victim.stage)
        self.killed.append(victim.name)
        live_names = {v.name for v in self.live()}
        restartable = [n for n in self.killed if n not in live_names]
        if restartable and self.rng.random() < 0.5:
            name, kind = self.rng.choice(restartable), "restart"
            self.killed.remove(name)
        else:
            self.fresh_count += 1
            name, kind = f"f{self.fresh_count}", "fresh"
        joiner = self.start_volunteer(name, kind)
        if self.args.joiner_nice:
            # its p2pd, started later by the node, inherits this; _mark_ready puts the group back to 0
            os.setpriority(os.PRIO_PGRP, joiner.pid, self.args.joiner_nice)
        self._event(joiner, "join", id=len(self.volunteers) - 1)
        progress(f"{self.label}: killed {victim.name} (stage {victim.stage}); started {name} ({kind})")

    # ---- the end

    def stop(self) -> list[Path]:
        """SIGTERM every live node (volunteers write their checkpoints), SIGKILL what is left; return the
        checkpoints written at this stop."""
        self.reaper.note_sockets()
        live = self.live()
        children = [c for c in [self.seed, *(v.child for v in live)] if c is not None]
        stopping = time.time()
        stop_children(children, timeout=60)
        self.reaper.kill_groups({c.process.pid for c in children})
        checkpoints = []
        for v in live:
            v.ended = "stopped"
            path = v.node_dir / "checkpoint.pt"
            if v.info is not None and path.exists() and path.stat().st_mtime >= stopping - 1:
                checkpoints.append(path)
        return checkpoints

    def describe_joins(self) -> None:
        """Add to each join event where the joiner's state came from (its log), when it served, how it ended."""
        for event in self.events:
            if event["event"] != "join":
                continue
            v = self.volunteers[event["id"]]
            text = v.log.read_text(errors="replace") if v.log.exists() else ""
            if m := SYNC_DONE_RE.search(text):
                event["state"] = f"download {m[1]} MiB in {m[2]} s from {m[3]} donor(s)"
            elif m := RESTORED_RE.search(text):
                event["state"] = f"own checkpoint (step {m[2]})"
            else:
                event["state"] = "-"
            event["stage"] = v.stage
            event["ready_s"] = None if v.ready_at is None else round(v.ready_at - v.started, 1)
            event["startup_cpu_s"] = None if v.startup_cpu_s is None else round(v.startup_cpu_s, 1)
            event["end"] = v.ended


def run_swarm(label: str, churn: bool, root: Path, spec_path: Path, spec: RunSpec, identities: Path,
              args: argparse.Namespace, reaper: Reaper) -> SwarmRun:
    """Start a swarm, warm it up, measure a window (with churn or without), stop it, score its checkpoints."""
    swarm = ChurnSwarm(label, root, spec_path, spec, identities, args, reaper, random.Random(args.seed))
    progress(f"{label}: starting a seed and {args.volunteers} volunteers ({spec.pipeline.stages} stages) on 127.0.0.1")
    try:
        swarm.start()
        progress(f"{label}: volunteers serve stages {[v.stage for v in swarm.volunteers]}; warm-up {args.warmup:g} s")
        warm_end = time.monotonic() + args.warmup
        while time.monotonic() < warm_end:
            time.sleep(min(POLL_S, max(warm_end - time.monotonic(), 0)))
            swarm.check()
        swarm.begin_window()
        start = swarm.window_start
        end = start + args.window
        kills = [start + (k + 0.5) * args.churn_every for k in range(int(args.window // args.churn_every))] if churn else []
        progress(f"{label}: window of {args.window:g} s starts" + (f", {len(kills)} kills and joins" if churn else ""))
        next_poll, next_report = start + POLL_S, start + args.report_every
        while (now := time.monotonic()) < end:
            if kills and now >= kills[0]:
                kills.pop(0)
                swarm.churn_once(end)
            if now >= next_poll:
                next_poll = max(next_poll + POLL_S, now)
                swarm.poll(end)
                swarm.check()
            if now >= next_report:
                next_report += args.report_every
                swarm.reaper.note_sockets()
                progress(f"{label}: {now - start:.0f} s into the window, {swarm.window_samples():.0f} last-stage "
                         f"samples, live volunteers (name:stage) {sorted(f'{v.name}:{v.stage}' for v in swarm.live())}")
            wake = min([next_poll, next_report, end] + kills[:1])
            time.sleep(max(0.0, min(wake - time.monotonic(), POLL_S)))
        swarm.poll(end)
        window_s = time.monotonic() - start
        foreign = swarm.cpu.stop()
        samples = swarm.window_samples()
        train_loss = statistics.fmean(swarm.tail_losses) if swarm.tail_losses else math.nan
        progress(f"{label}: window over: {samples:.0f} last-stage samples in {window_s:.1f} s "
                 f"({samples / window_s:.1f}/s), training loss {fmt(train_loss)}; stopping the swarm")
    finally:
        checkpoints = swarm.stop()
        keep_logs(args.keep, root / "logs", root.name)
    swarm.describe_joins()
    notes = [f"{e['node']} exited by itself (code {e['code']})" for e in swarm.events if e["event"] == "exited"]
    heldout = math.nan
    try:
        batches = validation_set(spec, args.heldout_batches)
        heldout = checkpoint_heldout_loss(spec, checkpoints, batches)
        progress(f"{label}: held-out loss {heldout:.4f} over {len(checkpoints)} checkpoints, {len(batches)} batches")
    except ValueError as e:
        notes.append(f"no held-out loss: {e}")
        progress(f"{label}: no held-out loss: {e}")
    return SwarmRun(label, window_s, samples, train_loss, heldout, foreign,
                    kills=sum(e["event"] == "kill" for e in swarm.events),
                    joins=sum(e["event"] == "join" for e in swarm.events), events=swarm.events, notes=notes,
                    series=swarm.series)


def keep_logs(keep: Path | None, logs: Path, name: str) -> None:
    """Copy the log files under ``logs`` to ``keep/name`` (nothing without ``--keep``)."""
    if keep is None or not logs.exists():
        return
    target = keep / name
    target.mkdir(parents=True, exist_ok=True)
    for log in logs.rglob("*.log"):
        shutil.copy(log, target / "-".join(log.relative_to(logs).parts))


def run_churn_part(args: argparse.Namespace, reaper: Reaper) -> list[SwarmRun]:
    root = private_folder("swb-churn-")
    spec_path = root / "run.toml"
    spec = write_bench_spec(args.spec, spec_path, args.balancing)
    m, p = spec.model, spec.pipeline
    progress(f"churn: run {spec.run_id!r}, model dim {m.dim} x {m.n_layers} layers, {p.stages} stages, microbatch "
             f"{p.microbatch_size} x {p.seq_len}, outer {spec.outer} every {spec.averaging.inner_steps} steps, "
             f"checkpoint every {spec.checkpoint.every_outer_steps} outer steps, balancing "
             f"{'on' if spec.balancing.enabled else 'off'}; warm-up {args.warmup:g} s, window {args.window:g} s, "
             f"churn every {args.churn_every:g} s")
    runs = []
    for label, churn in (("no churn", False), (f"churn (every {args.churn_every:g} s)", True)):
        folder = root / ("churn" if churn else "steady")
        folder.mkdir()
        runs.append(run_swarm(label, churn, folder, spec_path, spec, root / "ids", args, reaper))
    return runs


def print_churn(runs: list[SwarmRun], every: float) -> None:
    print("\n## swarm throughput and loss, with churn against without\n")
    print("| system | window s | samples/s (last stage) | training loss (last 10 s) | held-out loss at stop "
          "| kills / joins | other load (cores) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r.system} | {r.window_s:.0f} | {r.samples_per_s:.1f} | {fmt(r.train_loss)} | {fmt(r.heldout)} "
              f"| {r.kills} / {r.joins} | {fmt(r.foreign_cores, 2)} |")
    if len(runs) == 2:
        steady, churn = runs
        speed = ratio(churn.samples_per_s, steady.samples_per_s)
        print(f"| churn / no churn | | {fmt(speed, 2)}x (target >= 0.8: {verdict(speed, 0.8)}) "
              f"| {fmt(ratio(churn.train_loss, steady.train_loss), 3)}x | {fmt(ratio(churn.heldout, steady.heldout), 3)}x "
              "| | |")
        print("\n(loss ratios: < 1 favours the churn run)")
    slices = {r.system: slice_rates(r.series, r.window_s, every) for r in runs}
    width = max((len(v) for v in slices.values()), default=0)
    if width:
        print(f"\nlast-stage samples/s in each {every:g} s of the window (in the churn run, a kill and a join at the "
              "middle of each)\n")
        print("| system | " + " | ".join(f"{k * every:g}-{(k + 1) * every:g} s" for k in range(width)) + " |")
        print("|---|" + "---:|" * width)
        for system, rates in slices.items():
            print(f"| {system} | " + " | ".join(f"{x:.1f}" for x in rates) + " |" * (width - len(rates) + 1))
    for r in runs:
        for note in r.notes:
            print(f"note, {r.system}: {note}")
        if r.foreign_cores > 0.2:
            print(f"WARNING, {r.system}: other processes kept {r.foreign_cores:.2f} cores busy during its window")
    for r in runs:
        if not r.events:
            continue
        print(f"\n{r.system}: events (t: seconds into the window; ready: seconds from start to serving; start-up "
              "CPU: CPU seconds the joiner and its p2pd used until then)\n")
        print("| t | event | node | kind | stage | ready s | start-up CPU s | state from | end |")
        print("|---:|---|---|---|---:|---:|---:|---|---|")
        for e in r.events:
            if e["event"] not in ("kill", "join", "exited", "kill skipped"):
                continue
            cells = [e.get(key) for key in ("stage", "ready_s", "startup_cpu_s")]
            print(f"| {e['t']} | {e['event']} | {e.get('node', '')} | {e.get('kind', '')} | "
                  + " | ".join("" if c is None else str(c) for c in cells)
                  + f" | {e.get('state', '')} | {e.get('end', '') or ''} |")
        startup = sum(e.get("startup_cpu_s") or 0.0 for e in r.events if e["event"] == "join")
        machine = r.window_s * (os.cpu_count() or 1)
        if startup:
            print(f"\nthe joiners' start-up took {startup:.1f} CPU seconds, {100 * startup / machine:.0f}% of the "
                  f"machine's {machine:.0f} core-seconds in the window (on a real swarm each joiner brings its own)")


# ---------------------------------------------------------------------------------------------------
# Part 2: state sync, the processes (``churn.py _sync_peer``)


def sync_model_config(state_mb: float) -> tuple[int, int]:
    """(dim, layers of the synced stage) whose stage state is about ``state_mb`` MiB: dim 512 (256 or 128 for
    small states) and as many blocks as it takes."""
    from swarmd.swarm.model import ModelConfig

    target = state_mb * MIB
    for dim in (512, 256, 128):
        ffn = ModelConfig(dim=dim, n_heads=max(dim // 64, 2)).ffn_hidden
        per_layer = (4 * dim * dim + 3 * dim * ffn + 2 * dim) * STATE_BYTES_PER_PARAM
        if 2 * per_layer <= target or dim == 128:
            return dim, max(1, round((target - dim * 257 * STATE_BYTES_PER_PARAM) / per_layer))
    raise AssertionError("unreachable")


def _sync_stage_worker(dim: int, layers: int):
    from swarmd.swarm.model import ModelConfig, build_stage
    from swarmd.swarm.stage import StageWorker

    config = ModelConfig(vocab_size=256, dim=dim, n_layers=SYNC_STAGES * layers, n_heads=max(dim // 64, 2),
                         max_seq_len=64)
    return StageWorker(build_stage(config, SYNC_STAGE, SYNC_STAGES, 0), lr=1e-3)


def donor_state(dim: int, layers: int, seed: int):
    """A donor's stage: weights, AdamW moments after one step on random gradients, and outer phi and delta."""
    import torch
    from swarmd.swarm.outer import OuterState, flatten_parameters

    worker = _sync_stage_worker(dim, layers)
    generator = torch.Generator().manual_seed(seed)
    for param in worker.model.parameters():
        param.grad = torch.randn(param.shape, generator=generator) * 1e-3
    worker.optimizer.step()
    worker.optimizer.zero_grad(set_to_none=True)
    worker.inner_step = 100
    flat = flatten_parameters(worker.model.parameters()).detach()
    outer = OuterState(phi=flat.clone(), delta=torch.randn(flat.numel(), generator=generator) * 1e-3, outer_step=2)
    return worker, outer


async def _serve_raw(block: bytes, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The raw baseline's sender: read an 8-byte length, write that many bytes in RAW_BLOCK writes, then wait
    for the caller to hang up (closing first can make p2pd drop bytes still in flight)."""
    try:
        left = int.from_bytes(await reader.readexactly(8), "big")
        view = memoryview(block)
        while left > 0:
            n = min(left, len(block))
            writer.write(view[:n])
            await writer.drain()
            left -= n
        await asyncio.wait_for(reader.read(1), 60)
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()


async def _fetch_raw(p2p: Any, peer: str, nbytes: int) -> float:
    """Seconds from opening a stream to ``peer``'s raw handler until ``nbytes`` bytes have arrived."""
    from hivemind.p2p import PeerID

    start = time.monotonic()
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), RAW_HANDLER)
    try:
        writer.write(nbytes.to_bytes(8, "big"))
        await writer.drain()
        got = 0
        while got < nbytes:
            data = await reader.read(1 << 22)
            if not data:
                raise ConnectionError(f"raw stream ended after {got} of {nbytes} bytes")
            got += len(data)
        return time.monotonic() - start
    finally:
        writer.close()


async def _download(transport: Any, lane: Any, metrics: Any, worker: Any, donors: list[str]) -> dict:
    """One StateDownload from ``donors``: total seconds, manifest seconds (sessions opened, target
    allocated) and transfer seconds."""
    from swarmd.daemon.state_sync import StateDownload
    from swarmd.swarm.routing import BanList

    opened: list[float] = []

    def say(text: str) -> None:
        if text.startswith("state sync: stage"):
            opened.append(time.monotonic())
        print(text, file=sys.stderr, flush=True)

    async def candidates() -> list[str]:
        return list(donors)

    job = StateDownload(transport, SYNC_STAGE, worker, lane, True, metrics, BanList(), max_donors=len(donors), say=say)
    start = time.monotonic()
    result = await job.run(candidates)
    end = time.monotonic()
    mark = opened[0] if opened else start
    return {"seconds": end - start, "manifest_s": mark - start, "transfer_s": end - mark, "nbytes": result.nbytes,
            "donors_used": len(result.donors), "errors": job.errors[-4:]}


async def sync_peer_async(args: argparse.Namespace) -> None:
    """A donor (StateDonor + raw handler over its own stage state) or the joiner, driven over stdin/stdout."""
    import torch
    from swarmd.daemon.compute import ComputeLane
    from swarmd.daemon.metrics import NodeMetrics
    from swarmd.daemon.p2p_host import create_p2p  # p2pd's unix sockets go into this peer's TMPDIR
    from swarmd.daemon.state_sync import StateDonor
    from swarmd.daemon.transport import Transport
    from swarmd.protocols.limits import DEFAULT_LIMITS
    from swarmd.swarm.state_layout import stage_layout, state_bytes, take_snapshot

    torch.set_num_threads(1)
    p2p = await create_p2p(initial_peers=args.initial_peer, host_maddrs=[f"/ip4/{args.host}/tcp/0"],
                           nat_port_map=False, auto_nat=False, use_relay=False, use_auto_relay=False)
    metrics = NodeMetrics()
    transport = Transport(p2p, metrics, DEFAULT_LIMITS)
    lane = ComputeLane()
    donor = None
    if args.role == "donor":
        worker, outer = donor_state(args.dim, args.layers, seed=args.index + 1)

        async def new_donor() -> StateDonor:
            served = StateDonor(transport, SYNC_STAGE, lane, lambda: take_snapshot(worker, outer), metrics)
            await served.register()
            return served

        donor = await new_donor()
        block = os.urandom(RAW_BLOCK)
        await p2p.add_binary_stream_handler(RAW_HANDLER, functools.partial(_serve_raw, block))
    else:
        worker = _sync_stage_worker(args.dim, args.layers)
    nbytes = state_bytes(stage_layout(worker.model, worker.optimizer, True, True))
    say("READY", peer_id=p2p.peer_id.to_base58(), maddrs=[str(m) for m in await p2p.get_visible_maddrs()],
          state_bytes=nbytes)
    loop = asyncio.get_running_loop()
    while (line := await loop.run_in_executor(None, sys.stdin.readline)).strip():
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        try:
            if op == "fresh":  # drop the snapshot and its sessions: the next download pays for a new one
                await donor.close()
                donor = await new_donor()
                gc.collect()
                say("FRESH")
            elif op == "raw":
                say("RAW", seconds=await _fetch_raw(p2p, cmd["peer"], cmd["nbytes"]))
            elif op == "sync":
                say("SYNC", **await _download(transport, lane, metrics, worker, cmd["donors"]))
                gc.collect()
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # noqa: BLE001  (reported to the parent)
            say("ERROR", error=f"{type(e).__name__}: {e}")
    lane.close()
    await p2p.shutdown()
    say("BYE")


def sync_peer_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="churn.py _sync_peer")
    parser.add_argument("--role", choices=("donor", "joiner"), required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--initial-peer", action="append", default=[])
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        import uvloop  # the daemon's event loop

        uvloop.run(sync_peer_async(args))
    except ImportError:
        asyncio.run(sync_peer_async(args))


# ---------------------------------------------------------------------------------------------------
# Part 2: the parent


@dataclass
class SyncProc:
    """One state-sync peer process and the messages it sent."""

    name: str
    proc: subprocess.Popen
    folder: Path
    messages: queue.Queue = field(default_factory=queue.Queue)
    info: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.folder / "stderr.log"

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]


def spawn_sync_proc(name: str, role: str, index: int, host: str, exec_prefix: list[str], dim: int, layers: int,
                    initial: list[str], root: Path, reaper: Reaper) -> SyncProc:
    folder = root / name  # short: p2pd's unix sockets live here
    folder.mkdir()
    cmd = [*exec_prefix, sys.executable, os.path.abspath(__file__), "_sync_peer", "--role", role, "--index",
           str(index), "--host", host, "--dim", str(dim), "--layers", str(layers),
           *[a for m in initial for a in ("--initial-peer", m)]]
    with (folder / "stderr.log").open("w") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=quiet_env(folder, threads=1), start_new_session=True)
    reaper.add_process(proc)
    p = SyncProc(name, proc, folder)
    threading.Thread(target=read_messages, args=(proc, p.messages), daemon=True).start()
    return p


def wait_for(p: SyncProc, kind: str, timeout: float) -> dict:
    """The process's next message, which must be ``kind``."""
    try:
        msg = p.messages.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"{p.name}: no {kind} after {timeout:.0f} s; {p.log}:\n{log_tail(p.log)}") from None
    if msg["kind"] == "EXIT":
        raise RuntimeError(f"{p.name} exited early; {p.log}:\n{log_tail(p.log)}")
    if msg["kind"] != kind:
        raise RuntimeError(f"{p.name}: {msg.get('error', msg)} (expected {kind}); {p.log}:\n{log_tail(p.log, 5)}")
    return msg


def ask(p: SyncProc, command: dict, reply: str, timeout: float) -> dict:
    assert p.proc.stdin is not None
    p.proc.stdin.write(json.dumps(command) + "\n")
    p.proc.stdin.flush()
    return wait_for(p, reply, timeout)


def stop_sync_procs(procs: list[SyncProc], reaper: Reaper) -> None:
    for p in procs:
        try:
            p.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            p.proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass
    end = time.monotonic() + 15
    for p in procs:
        try:
            p.proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    reaper.kill_groups({p.proc.pid for p in procs})


@dataclass
class SyncRow:
    """One network's state-sync measurements (one value per repeat)."""

    network: str
    state_bytes: int = 0
    raw_s: list[float] = field(default_factory=list)
    one: list[dict] = field(default_factory=list)
    two: list[dict] = field(default_factory=list)
    skipped: str = ""
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def _median(values: list[float]) -> float:
        return statistics.median(values) if values else math.nan

    @property
    def raw_median(self) -> float:
        return self._median(self.raw_s)

    def median(self, which: str, key: str = "seconds") -> float:
        return self._median([d[key] for d in getattr(self, which)])


def expected_seconds(nbytes: int, rate_mbit: float | None) -> float:
    """How long ``nbytes`` take at ``rate_mbit`` (loopback: a generous guess of 20 MB/s on a busy machine)."""
    return nbytes / (rate_mbit * 1e6 / 8 if rate_mbit else 20e6)


def measure_sync(row: SyncRow, net: netns.ShapedNetwork | None, args: argparse.Namespace, reaper: Reaper,
                 root: Path) -> None:
    """Two donors and a joiner on ``net`` (None: loopback); raw stream, 1-donor and 2-donor downloads,
    ``--repeats`` times each."""
    dim, layers = sync_model_config(args.state_mb)
    host = (lambda i: net.ip(i)) if net else (lambda i: "127.0.0.1")
    prefix = (lambda i: net.exec_prefix(i)) if net else (lambda i: [])
    folder = root / row.network.split()[0]
    folder.mkdir()
    procs: list[SyncProc] = []
    try:
        for i in range(2):
            procs.append(spawn_sync_proc(f"d{i}", "donor", i, host(i), prefix(i), dim, layers, [], folder, reaper))
        for p in procs:
            p.info = wait_for(p, "READY", args.start_timeout)
        initial = [p.info["maddrs"][0] for p in procs]
        joiner = spawn_sync_proc("j", "joiner", 2, host(2), prefix(2), dim, layers, initial, folder, reaper)
        procs.append(joiner)
        joiner.info = wait_for(joiner, "READY", args.start_timeout)
        d0, d1 = procs[0], procs[1]
        nbytes = row.state_bytes = d0.info["state_bytes"]
        if joiner.info["state_bytes"] != nbytes:
            raise RuntimeError(f"joiner's state is {joiner.info['state_bytes']} bytes, the donors' {nbytes}")
        timeout = 120 + 6 * expected_seconds(nbytes, args.rate_mbit if net else None)
        for d in (d0, d1):  # open the connections before anything is timed
            ask(joiner, {"op": "raw", "peer": d.peer_id, "nbytes": MIB}, "RAW", timeout)
        label = f"[sync {row.network}]"
        progress(f"{label} state {nbytes / MIB:.0f} MiB (stage of dim {dim} x {layers} blocks); {args.repeats} repeat(s)")
        for repeat in range(args.repeats):
            raw = ask(joiner, {"op": "raw", "peer": d0.peer_id, "nbytes": nbytes}, "RAW", timeout)["seconds"]
            row.raw_s.append(raw)
            progress(f"{label} #{repeat + 1} raw stream: {raw:.2f} s ({nbytes / MIB / raw:.1f} MiB/s)")
            for which, donors in (("one", [d0]), ("two", [d0, d1])):
                for d in (d0, d1):
                    ask(d, {"op": "fresh"}, "FRESH", 60)
                got = ask(joiner, {"op": "sync", "donors": [d.peer_id for d in donors]}, "SYNC", timeout)
                getattr(row, which).append(got)
                if got["donors_used"] != len(donors):
                    row.notes.append(f"#{repeat + 1}: a {len(donors)}-donor download used {got['donors_used']} "
                                     f"donor(s): {'; '.join(got['errors'])}")
                progress(f"{label} #{repeat + 1} {len(donors)} donor(s): {got['seconds']:.2f} s (manifest "
                         f"{got['manifest_s']:.2f} s, transfer {got['transfer_s']:.2f} s, "
                         f"{got['nbytes'] / MIB / got['seconds']:.1f} MiB/s) from {got['donors_used']} donor(s)")
    finally:
        stop_sync_procs(procs, reaper)
        keep_logs(args.keep, folder, f"sync-{folder.name}")


def link_problems(m: dict, rate_mbit: float, delay_ms: float) -> list[str]:
    """``netns.check_link``'s complaints; without delay, only throughput is checked (there is no RTT to hit)."""
    problems = netns.check_link(m, rate_mbit, max(delay_ms, 1e-9))
    return problems if delay_ms > 0 else [p for p in problems if not p.startswith(("connect_ms", "echo_rtt_ms"))]


def shape_joiner_download(net: netns.ShapedNetwork, joiner: int, rate_mbit: float) -> None:
    """Replace the joiner's download shaping (the bridge end of its veth) by ``rate_mbit`` (0: none)."""
    tc = ["ip", "netns", "exec", net.bridge_ns, "tc", "qdisc"]
    if rate_mbit <= 0:
        netns.run([*tc, "del", "dev", f"v{joiner}", "root"])
        return
    burst = max(65536, int(rate_mbit * 1e6 / 8 / 250))
    limit = max(int(rate_mbit * 1e6 / 8 * 0.1), 200_000)
    netns.run([*tc, "replace", "dev", f"v{joiner}", "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst),
               "limit", str(limit)])


def build_shaped(args: argparse.Namespace, nets: list[netns.ShapedNetwork]) -> tuple[netns.ShapedNetwork | None, str, list[str]]:
    """The shaped network for the sync part (3 namespaces), its label and the lines its checks printed; None
    and why when it cannot be built here or is off its shape."""
    lines: list[str] = []
    if os.geteuid() != 0:
        return None, "needs root for network namespaces", lines
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return None, f"the {tool!r} command is missing (iproute2)", lines
    delay = args.delay_ms
    if delay > 0:
        try:
            netns.iptables_binary()
        except RuntimeError as e:
            lines.append(f"no {delay:g} ms delay on the shaped network: {e}; rate shaping only")
            progress(lines[-1])
            delay = 0.0
    net = netns.ShapedNetwork(3, args.rate_mbit, delay)
    nets.append(net)
    try:
        net.setup()
        shape_joiner_download(net, 2, args.joiner_down_mbit)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        why = getattr(e, "stderr", "") or str(e)
        net.teardown()
        return None, f"could not build it: {why.strip()}", lines
    down = f"{args.joiner_down_mbit:g} Mbit/s" if args.joiner_down_mbit > 0 else "unshaped"
    label = f"shaped ({args.rate_mbit:g} Mbit/s per donor, {delay:g} ms one way, joiner download {down})"
    problems = []
    for src in (0, 1):
        m = netns.measure_link(net, src, 2, bulk_mb=args.link_check_mb)
        lines.append(f"shaped link check, donor {src} -> joiner: {netns.format_link(m)}")
        progress(lines[-1])
        problems += link_problems(m, args.rate_mbit, delay)
    if problems:
        net.teardown()
        return None, "the link is off its shape by more than 20%: " + "; ".join(problems), lines
    return net, label, lines


def run_sync_part(args: argparse.Namespace, reaper: Reaper, nets: list[netns.ShapedNetwork]) -> tuple[list[SyncRow], list[str]]:
    root = private_folder("swb-sync-")
    rows: list[SyncRow] = []
    lines: list[str] = []
    dim, layers = sync_model_config(args.state_mb)
    progress(f"sync: state of ~{args.state_mb:g} MiB (stage {SYNC_STAGE} of {SYNC_STAGES}, dim {dim}, {layers} "
             f"blocks), {args.repeats} repeat(s) per network")

    def measure(row: SyncRow, net: netns.ShapedNetwork | None, name: str) -> None:
        rows.append(row)
        try:
            measure_sync(row, net, args, reaper, root)
        except (RuntimeError, TimeoutError) as e:
            row.skipped = f"failed: {e}"
            progress(f"[sync {name}] FAILED: {e}")

    measure(SyncRow("loopback (127.0.0.1)"), None, "loopback")
    if args.no_shaped:
        return rows, lines
    net, label, lines = build_shaped(args, nets)
    if net is None:
        rows.append(SyncRow("shaped", skipped=label))
        progress(f"[sync shaped] not measured: {label}")
        return rows, lines
    try:
        measure(SyncRow(label), net, "shaped")
    finally:
        net.teardown()
        nets.remove(net)
    stats = net.holder_stats
    if stats:
        lines.append(f"delay holder: {stats['released']} packets held, lateness: mean {stats['late_mean_ms']:.2f} ms, "
                     f"p99 <= {stats['late_p99_ms']:.1f} ms, max {stats['late_max_ms']:.1f} ms")
    return rows, lines


def print_sync(rows: list[SyncRow], lines: list[str], repeats: int) -> None:
    print("\n## state sync: 1 donor against 2 donors, beside a raw p2pd stream of the same bytes\n")
    for line in lines:
        print(line)
    medians = "medians over the repeats, each repeat's value in brackets" if repeats > 1 else "one repeat"
    print(f"({medians}; speed ratios: the baseline's seconds over the download's; manifest: from the start until "
          "the sessions are open and the joiner's buffers allocated, i.e. mostly the donors' snapshots and chunk "
          "digests; transfer: the chunks)\n")
    # the targets are about a network-bound join (the shaped network); loopback is CPU-bound on a small machine
    print("| network | state MiB | raw stream s | raw MiB/s | 1 donor s | 1 donor / raw (>= 0.8 shaped) "
          "| 2 donors s | 2 donors / 1 donor (>= 1.6 shaped) | manifest s, 1 / 2 donors | transfer s, 1 / 2 donors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.skipped or not r.raw_s:
            print(f"| {r.network} | {r.skipped or 'no result'} | | | | | | | | |")
            continue
        raw, one, two = r.raw_median, r.median("one"), r.median("two")
        speed_one, speed_two = ratio(raw, one), ratio(one, two)
        shaped = r.network.startswith("shaped")
        print(f"| {r.network} | {r.state_bytes / MIB:.0f} | {median_cell(r.raw_s)} | {r.state_bytes / MIB / raw:.1f} "
              f"| {median_cell([d['seconds'] for d in r.one])} | {fmt(speed_one, 2)}x"
              f"{f' ({verdict(speed_one, 0.8)})' if shaped else ''} "
              f"| {median_cell([d['seconds'] for d in r.two])} | {fmt(speed_two, 2)}x"
              f"{f' ({verdict(speed_two, 1.6)})' if shaped else ''} "
              f"| {fmt(r.median('one', 'manifest_s'), 2)} / {fmt(r.median('two', 'manifest_s'), 2)} "
              f"| {fmt(r.median('one', 'transfer_s'), 2)} / {fmt(r.median('two', 'transfer_s'), 2)} |")
    for r in rows:
        for note in r.notes:
            print(f"note, {r.network}: {note}")


# ---------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "churn", "sync"), default="all", help="what to measure (default all)")
    churn = parser.add_argument_group("part 1: churn")
    churn.add_argument("--window", type=float, default=90.0, help="measured window, seconds (default 90)")
    churn.add_argument("--warmup", type=float, default=30.0, help="training before the window, seconds (default 30)")
    churn.add_argument("--churn-every", type=float, default=15.0, help="a kill and a join every this many seconds")
    churn.add_argument("--volunteers", type=int, default=4, help="volunteers at the start (default 4: 2 stages x 2)")
    churn.add_argument("--spec", type=Path, default=DEFAULT_SPEC_PATH, help="run spec (default: the embedded demo run)")
    churn.add_argument("--balancing", action="store_true", help="keep the spec's [balancing] (default: off)")
    churn.add_argument("--heldout-batches", type=int, default=1 << 20,
                       help="validation batches for the held-out loss (default: all of the corpus's)")
    churn.add_argument("--seed", type=int, default=0, help="seed of the churn schedule's random choices")
    churn.add_argument("--joiner-nice", type=int, default=0, metavar="N",
                       help="start replacements at this nice value until they serve (default 0: off; as root, "
                            "e.g. 10 keeps their start-up off the swarm's CPU, as a joiner's own machine would)")
    churn.add_argument("--node-progress-every", type=float, default=10.0, help="nodes' progress lines (their logs)")
    sync = parser.add_argument_group("part 2: state sync")
    sync.add_argument("--state-mb", type=float, default=256.0, help="stage state size, MiB (default 256)")
    sync.add_argument("--repeats", type=int, default=3, help="timings of each kind per network (default 3)")
    sync.add_argument("--rate-mbit", type=float, default=100.0, help="shaped upload per peer, Mbit/s (default 100)")
    sync.add_argument("--delay-ms", type=float, default=25.0, help="shaped one-way delay, ms (default 25; needs iptables)")
    sync.add_argument("--joiner-down-mbit", type=float, default=1000.0,
                      help="the joiner's shaped download, Mbit/s (default 1000; 0: unshaped)")
    sync.add_argument("--link-check-mb", type=int, default=20, help="MiB of the shaped link check (default 20)")
    sync.add_argument("--no-shaped", action="store_true", help="loopback only")
    parser.add_argument("--start-timeout", type=float, default=180.0, help="seconds for a process to come up")
    parser.add_argument("--report-every", type=float, default=15.0, help="progress lines every this many seconds")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="copy every node's and peer's log to DIR before the bench's folders are removed")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="OUT",
                        help="write every raw number as JSON to OUT (no OUT: to stdout, after the tables)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: window 30 s, warm-up 15 s, churn every 10 s, 8 held-out batches, "
                             "state 32 MiB, 1 repeat, 10 MiB link check")
    args = parser.parse_args(argv)
    if args.quick:
        args.window, args.warmup, args.churn_every, args.heldout_batches = 30.0, 15.0, 10.0, 8
        args.state_mb, args.repeats, args.link_check_mb = 32.0, 1, 10
    if args.window <= LOSS_TAIL_S:
        parser.error(f"--window must be longer than {LOSS_TAIL_S:g} s")
    if args.churn_every <= 0 or args.churn_every > args.window:
        parser.error("--churn-every must be in (0, --window]")
    if args.joiner_nice and os.geteuid() != 0:
        parser.error("--joiner-nice needs root (only root can put a process back to nice 0)")
    if args.volunteers < 2:
        parser.error("--volunteers must be at least 2")
    if args.repeats < 1 or args.state_mb <= 0:
        parser.error("--repeats and --state-mb must be positive")
    return args


def write_json(target: str, args: argparse.Namespace, runs: list[SwarmRun], rows: list[SyncRow], lines: list[str]) -> None:
    raw = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "churn": [{**asdict(r), "samples_per_s": r.samples_per_s} for r in runs],
        "sync": [asdict(r) for r in rows],
        "sync_network_lines": lines,
    }
    text = json.dumps(raw, indent=2, default=str) + "\n"
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text)
        progress(f"raw numbers written to {target}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_sync_peer":
        sync_peer_main(sys.argv[2:])
        return 0
    args = parse_args()
    reaper = REAPER  # bench/peer.py's: its private_folder registers there, and it cleans up at exit
    nets: list[netns.ShapedNetwork] = []

    def cleanup() -> None:
        reaper.clean()
        for net in nets:
            net.teardown()
        nets.clear()

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally blocks, like Ctrl-C
    started = time.monotonic()
    progress(f"{os.cpu_count()} cores, {platform.machine()}; part {args.part}")
    runs: list[SwarmRun] = []
    rows: list[SyncRow] = []
    lines: list[str] = []
    status = 0
    try:
        if args.part in ("all", "churn"):
            runs = run_churn_part(args, reaper)
        if args.part in ("all", "sync"):
            rows, lines = run_sync_part(args, reaper, nets)
    except (KeyboardInterrupt, SystemExit) as e:
        progress("interrupted; cleaning up")
        status = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
    except (RuntimeError, TimeoutError, ValueError, OSError) as e:
        progress(f"failed: {type(e).__name__}: {e}")
        status = 1
    finally:
        cleanup()
    progress(f"done in {time.monotonic() - started:.0f} s; leftover namespaces: "
             f"{netns.leftover_namespaces() or 'none'}")
    if runs:
        print_churn(runs, args.churn_every)
    if rows:
        print_sync(rows, lines, args.repeats)
    if args.json and (runs or rows):
        write_json(args.json, args, runs, rows, lines)
    return status


if __name__ == "__main__":
    sys.exit(main())
