"""swarmd against the field's own baseline: hivemind local-SGD peers, a plain torch loop and the demo swarm.

    python bench/peer.py [--systems hivemind,torch,swarmd] [--repeats 3] [--window 120] [--warmup 20]
                         [--hivemind-peers 4] [--wait-quiet 300] [--json OUT] [--spec RUN.toml] [--quick]
    python bench/peer.py --systems hivemind,torch --quick     # a smoke run, about two minutes

One run measures three systems on this machine, one at a time, each ``--repeats`` times (within a repeat the
order is hivemind, swarmd, torch: the torch loop needs the others' sample counts). All of them train the
whole model of the run spec (``daemon/default_run.toml`` by default: ``build_stage(spec.model, 0, 1, seed)``,
tokens -> logits) with the spec's AdamW (lr, betas, weight decay, grad clip; the daemon's parameter groups)
on microbatches of ``microbatch_size`` x ``seq_len`` (8 x 64) from the spec's corpus, each data stream a
``CorpusSampler`` of its own (``stream_seed(spec.seed, name)``), for ``--warmup`` seconds and then a timed
window of ``--window`` seconds:

- **hivemind**: ``--hivemind-peers`` processes (one torch thread each), each a ``hivemind.DHT`` on
  127.0.0.1 (p2pd with NAT port mapping, AutoNAT and relays off; peers bootstrap from peer 0 only, never from
  a public peer) and a ``hivemind.Optimizer`` with ``use_local_updates=True``: every local step applies
  AdamW, and the parameters are averaged (``hivemind.compression.Float16Compression``) each time the peers
  together processed ``target_batch_size = peers x microbatch x 50`` samples, i.e. about every 50 local steps.
  Each peer saves its model at the end of the window; the held-out loss is the mean over the peers' models.
- **torch**: one process, one model, plain AdamW, ``--torch-threads`` (2: the whole machine). It keeps training
  past its window until it has seen as many samples as swarmd and as hivemind did (counted from their start,
  warm-up included), and evaluates at each of those counts ("equal samples"; evaluation time is not training
  time: the loop's clock stops while it evaluates).
- **swarmd**: the demo swarm as ``swarmd demo`` starts it (``daemon/demo.py``): a seed (``--no-train``) and 4
  volunteers, ``--stage i % 2 --threads 1``, 2 stages x 2 replicas, on 127.0.0.1, with its own TMPDIR. After the
  window it is stopped with SIGTERM; each volunteer writes ``checkpoint.pt`` and the held-out loss is
  ``checkpoint_heldout_loss`` over those (mean over the stage-replica chains).

Measured per system and repeat: samples/s over the window (hivemind: the peers' local samples summed; swarmd:
the growth of ``swarmd_samples_total`` summed over the last-stage volunteers), the training loss over the
window's last 10 s (swarmd: ``swarmd_loss`` of the last-stage volunteers sampled every second), the held-out
loss at stop (equal wall time) and the samples seen by then. The tables give each repeat's values, the means,
and the ratios swarmd/hivemind and swarmd/torch of samples/s and held-out loss, at equal wall time and at equal
samples. At equal samples, swarmd/torch is swarmd's held-out loss over the torch loop's after as many samples;
swarmd/hivemind is the quotient of the two systems' such ratios (each against torch at its own sample count),
as the two never see the same number of samples. Lower held-out loss is better; a ratio < 1 favours swarmd.

The machine must be otherwise idle: with 2 threads on 2 cores, the torch loop runs up to 100x slower while
another process holds one core. Before each system the bench waits (``--wait-quiet``) until other processes
leave the CPUs alone, and every row reports how many cores other processes kept busy during its window
("other load": the machine's busy time minus this bench's process groups'); rows above 0.2 are flagged.

Every child process (and its p2pd) runs in its own process group and is killed at the end, also on errors and
Ctrl-C; the children get private TMPDIRs, and the ``/tmp/hivemind-*`` unix sockets their p2pd's leave (hivemind
puts them in /tmp whatever TMPDIR says) are removed.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import glob
import json
import math
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from swarmd.daemon.demo import (
    Child,
    read_metrics,
    start_child,
    stop_children,
    wait_ready,
)
from swarmd.daemon.heldout import checkpoint_heldout_loss, run_corpus, validation_set
from swarmd.daemon.identity import IDENTITY_FILE, NodeIdentity
from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec
from swarmd.swarm.data import CorpusSampler, stream_seed
from swarmd.swarm.evaluation import heldout_loss
from swarmd.swarm.model import StageModel, build_stage, lm_loss
from swarmd.swarm.stage import optimizer_param_groups

SYSTEMS = ("hivemind", "torch", "swarmd")
RUN_ORDER = ("hivemind", "swarmd", "torch")  # torch last: it trains on to the others' sample counts
LOSS_TAIL_S = 10.0  # the training loss is averaged over the window's last this many seconds
HIVEMIND_STEPS_PER_ROUND = 50  # local steps per peer between parameter averagings
HIVEMIND_SOCKET_GLOB = "/tmp/hivemind-*"
FOREIGN_LOAD_WARN = 0.2  # cores; more than this used by other processes during a window is flagged
MSG = "@@ "  # prefix of the hivemind peers' messages to the parent on their stdout
SHUTDOWN_MARKER = "=== bench: window over, shutting down ==="  # in a peer's log: what follows is its shutdown

Batch = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# What every system shares: spec, model, optimizer, data


@dataclass
class Setup:
    spec: RunSpec
    train: bytes
    val_batches: list[Batch]

    @property
    def microbatch(self) -> int:
        """Samples (sequences of seq_len tokens) per microbatch."""
        return self.spec.pipeline.microbatch_size


def load_setup(spec_path: Path) -> Setup:
    spec = RunSpec.load(spec_path)
    train, _ = run_corpus(spec)
    return Setup(spec, train, validation_set(spec))


def stream_name(base: str, repeat: int) -> str:
    """A data stream's name: ``base`` in the first repeat, a fresh stream in each later one."""
    return base if repeat == 0 else f"{base}-r{repeat}"


def sampler_for(spec: RunSpec, train: bytes, name: str) -> CorpusSampler:
    p = spec.pipeline
    return CorpusSampler(train, p.seq_len, p.microbatch_size, seed=stream_seed(spec.seed, name))


def whole_model(spec: RunSpec) -> StageModel:
    return build_stage(spec.model, 0, 1, spec.seed)


def make_adamw(spec: RunSpec, params: Any) -> torch.optim.AdamW:
    """The spec's inner AdamW over ``params`` (parameter groups or tensors)."""
    o = spec.optimizer
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)


def forward_backward(model: StageModel, batch: Batch, grad_clip: float) -> float:
    """Loss and clipped gradients of one microbatch (the caller steps and zeroes)."""
    inputs, targets = batch
    loss = lm_loss(model(inputs), targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    return float(loss.detach())


def tail_mean(losses: list[tuple[float, float]], end: float, span: float = LOSS_TAIL_S) -> float:
    """Mean of the (time, loss) pairs in [end - span, end]; NaN when there are none."""
    tail = [loss for t, loss in losses if end - span <= t <= end]
    return statistics.fmean(tail) if tail else math.nan


def progress(text: str) -> None:
    print(f"[bench] {text}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Process hygiene: process groups, private temp folders, the p2pd sockets hivemind leaves in /tmp


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def unix_socket_paths() -> dict[str, str]:
    """{socket inode: bound path} of every named unix socket, from /proc/net/unix."""
    paths = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8:
                paths[fields[6]] = fields[7]
    return paths


def owned_hivemind_sockets(pids: list[int]) -> set[str]:
    """The ``/tmp/hivemind-*`` socket paths bound by any of ``pids`` (p2pd's and its clients')."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    paths = unix_socket_paths()
    prefix = HIVEMIND_SOCKET_GLOB.rstrip("*")
    return {paths[i] for i in inodes if i in paths and paths[i].startswith(prefix)}


def group_members(pgids: set[int]) -> list[int]:
    """Processes (zombies included) whose process group is one of ``pgids``."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) in pgids:  # field 5 of proc(5): pgrp
            members.append(int(pid))
    return members


def wait_groups_gone(pgids: set[int], timeout: float = 5.0) -> None:
    """Wait until the killed groups' orphans (a p2pd whose parent died first) are reaped by init."""
    end = time.monotonic() + timeout
    while pgids and (left := group_members(pgids)):
        if time.monotonic() > end:
            print(f"[bench] processes still there after SIGKILL: {left}", file=sys.stderr, flush=True)
            return
        time.sleep(0.1)


def p2pd_problems(pids: list[int]) -> list[str]:
    """What is wrong with the network settings of the p2pd's among ``pids``: each must have NAT port mapping,
    AutoNAT and relays off, listen on 127.0.0.1 only and bootstrap from loopback peers only."""
    problems = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith("p2pd"):
            continue
        flags = dict(arg.lstrip("-").partition("=")[::2] for arg in argv[1:] if arg.startswith("-"))
        wrong = [f"{key}={flags.get(key)}" for key in ("natPortMap", "autonat", "relay", "autoRelay")
                 if flags.get(key) != "0"]
        for key in ("hostAddrs", "bootstrapPeers"):
            wrong += [f"{key} {a}" for a in flags.get(key, "").split(",") if a and not a.startswith("/ip4/127.0.0.1/")]
        if wrong:
            problems.append(f"p2pd {pid}: {', '.join(wrong)}")
    return problems


class Reaper:
    """Everything this run started or created: process groups, folders, p2pd sockets. ``clean()`` removes
    them all (SIGTERM, a grace period, SIGKILL to each whole group); it runs at exit, whatever the exit."""

    def __init__(self) -> None:
        self.groups: dict[int, subprocess.Popen] = {}
        self.folders: list[Path] = []
        self.sockets: set[str] = set()
        self.network_problems: list[str] = []  # p2pd's started with other than loopback-only settings

    def add_process(self, proc: subprocess.Popen) -> None:
        self.groups[proc.pid] = proc  # started with start_new_session: its pid is its group id

    def note_sockets(self) -> None:
        """Remember the /tmp/hivemind-* sockets our live processes have bound, to remove them after the stop;
        and check that their p2pd's keep to the loopback interface."""
        pids = [p for pid in self.groups for p in tree_pids(pid)]
        self.sockets |= owned_hivemind_sockets(pids)
        for problem in p2pd_problems(pids):
            if problem not in self.network_problems:
                self.network_problems.append(problem)
                print(f"[bench] WARNING: {problem}", flush=True)

    def stop_groups(self, grace: float = 10.0) -> None:
        live = [proc for proc in self.groups.values() if proc.poll() is None]
        for proc in live:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill_groups()

    def kill_groups(self, only: set[int] | None = None) -> None:
        """SIGKILL every group (or those in ``only``): the child and whatever it left behind (p2pd, hivemind's
        helper processes), and wait until all of them are gone."""
        pgids = set(self.groups) if only is None else set(self.groups) & only
        for pgid in pgids:
            proc = self.groups[pgid]
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                print(f"[bench] process {pgid} did not die", file=sys.stderr, flush=True)
            del self.groups[pgid]
        wait_groups_gone(pgids)

    def remove_files(self) -> None:
        for path in sorted(self.sockets):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                print(f"[bench] cannot remove {path}: {e}", file=sys.stderr, flush=True)
        self.sockets.clear()
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        self.folders.clear()

    def clean(self) -> None:
        self.stop_groups(grace=5.0)
        self.remove_files()


REAPER = Reaper()


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime jiffies of ``pids`` (those still alive)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def machine_busy_ticks() -> int:
    """Busy jiffies of all CPUs since boot (idle and iowait do not count)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]


class LoadMeter:
    """How many cores processes other than this bench's kept busy during a window: the machine's busy time
    minus that of this process and its children's process groups. Anything well above 0 means the numbers
    of that window were measured on a shared machine (a torch loop with 2 threads slows down many times
    when another process holds one of 2 cores)."""

    def __init__(self) -> None:
        self._start: tuple[float, int, int] | None = None
        self.foreign_cores = math.nan

    @staticmethod
    def _ours() -> int:
        pids = tree_pids(os.getpid()) + [p for pgid in REAPER.groups for p in tree_pids(pgid)]
        return cpu_ticks(sorted(set(pids)))

    def _sample(self) -> tuple[float, int, int]:
        return time.monotonic(), machine_busy_ticks(), self._ours()

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float:
        assert self._start is not None, "LoadMeter.stop before start"
        (t0, busy0, ours0), (t1, busy1, ours1) = self._start, self._sample()
        hz = os.sysconf("SC_CLK_TCK")
        self.foreign_cores = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / hz / max(t1 - t0, 1e-9))
        return self.foreign_cores

    def at_times(self, start: float, end: float) -> threading.Thread:
        """Measure from wall-clock time ``start`` to ``end`` in a background thread (join it for the result)."""
        def run() -> None:
            _sleep_until(start)
            self.start()
            _sleep_until(end)
            self.stop()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


def private_folder(prefix: str) -> Path:
    """A new folder directly under /tmp (unix socket paths under it must stay short), removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    REAPER.folders.append(folder)
    return folder


def quiet_env(tmpdir: Path, threads: int | None = None, hivemind_log: str = "ERROR") -> dict[str, str]:
    env = {**os.environ, "TMPDIR": str(tmpdir), "HIVEMIND_LOGLEVEL": hivemind_log, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def log_problems(path: Path, marker: str = "") -> tuple[list[str], list[str]]:
    """The warning, error and traceback lines of a child's log: (before the ``marker`` line, after it)."""
    keys = ("WARN", "ERROR", "Traceback", "Exception")
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return [], []
    cut = lines.index(marker) if marker in lines else len(lines)
    return ([line for line in lines[:cut] if any(k in line for k in keys)],
            [line for line in lines[cut:] if any(k in line for k in keys)])


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_quiet(max_wait: float, probe: float = 2.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes use less than FOREIGN_LOAD_WARN cores over ``probe`` s,
    so that a system does not start its run on a machine someone else is busy on. Returns the last load seen."""
    end = time.monotonic() + max_wait
    told = False
    while True:
        meter = LoadMeter()
        meter.start()
        time.sleep(probe)
        load = meter.stop()
        if load < FOREIGN_LOAD_WARN or time.monotonic() >= end:
            if told or load >= FOREIGN_LOAD_WARN:
                progress(f"other processes use {load:.2f} cores; going on")
            return load
        if not told:
            progress(f"other processes use {load:.2f} cores of this machine; waiting up to {max_wait:.0f} s for "
                     "them to finish")
            told = True


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass
class SystemRun:
    """One system, one repeat."""

    system: str
    repeat: int
    window_s: float
    window_samples: float  # samples processed during the window
    total_samples: float  # samples processed from the start to the stop (warm-up included)
    train_loss: float  # mean training loss over the window's last LOSS_TAIL_S seconds
    heldout: float  # held-out loss of the model(s) at the stop: equal wall time
    foreign_cores: float = math.nan  # cores other processes kept busy during the window (see LoadMeter)
    # torch only: {"swarmd" | "hivemind": (target samples, samples when evaluated, held-out loss)}
    equal_samples: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.window_samples / self.window_s


# ---------------------------------------------------------------------------------------------------
# hivemind: one peer process (``peer.py _hivemind_peer``), driven over stdin/stdout


def say(kind: str, **fields: Any) -> None:
    """A child's message to its parent: one line on stdout (``read_messages`` parses it)."""
    print(MSG + json.dumps({"kind": kind, **fields}), flush=True)


def _sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 0.05))


def _keep_sockets_in(folder: str) -> None:
    """hivemind names p2pd's unix sockets /tmp/hivemind-* whatever TMPDIR says, and leaves them behind when a
    p2pd is killed: point them into this peer's own folder (the DHT and averager processes are forked from
    here after this, so they inherit it)."""
    from hivemind.p2p import P2P

    P2P._UNIX_SOCKET_PREFIX = f"/unix{os.path.abspath(folder)}/hivemind-"


def hivemind_peer_main(args: argparse.Namespace) -> None:
    """One hivemind peer: DHT + Optimizer(use_local_updates), trains until the parent's end time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    torch.set_num_threads(1)
    import hivemind
    from hivemind.compression import Float16Compression

    _keep_sockets_in(tempfile.gettempdir())
    setup = load_setup(args.spec)
    spec = setup.spec
    dht = hivemind.DHT(
        initial_peers=args.initial_peer or None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
        nat_port_map=False, auto_nat=False, use_relay=False, use_auto_relay=False,
    )
    model = whole_model(spec)
    opt = hivemind.Optimizer(
        dht=dht, run_id=args.run_id, target_batch_size=args.peers * setup.microbatch * HIVEMIND_STEPS_PER_ROUND,
        batch_size_per_step=setup.microbatch, params=optimizer_param_groups(model, spec.optimizer.weight_decay),
        optimizer=lambda params: make_adamw(spec, params), use_local_updates=True,
        matchmaking_time=args.matchmaking_time, averaging_timeout=args.averaging_timeout,
        state_averaging_compression=Float16Compression(), verbose=False,
    )
    say("READY", maddrs=[str(m) for m in dht.get_visible_maddrs()])
    go = json.loads(sys.stdin.readline())
    sampler = sampler_for(spec, setup.train, args.stream)
    stats = train_hivemind_peer(model, opt, sampler, spec.optimizer.grad_clip, go)
    torch.save(model.state_dict(), args.out)
    say("DONE", **stats)
    # hivemind 1.1.12 logs errors while it shuts down (the DHT process fails to rebuild a pipe from the
    # averager, then is terminated "the hard way"): the parent counts what follows this line separately
    print(SHUTDOWN_MARKER, file=sys.stderr, flush=True)
    opt.shutdown()
    dht.shutdown()
    say("BYE")


def train_hivemind_peer(model: StageModel, opt: Any, sampler: CorpusSampler, grad_clip: float,
                        go: dict[str, float]) -> dict[str, Any]:
    """Local steps from ``go['t0']`` until ``go['t_end']``; counts, losses and epochs at the window's edges."""
    _sleep_until(go["t0"])
    samples, window_samples, start_epoch = 0, None, None
    losses: list[tuple[float, float]] = []
    next_report = time.time() + go.get("report_every", 15.0)
    while (now := time.time()) < go["t_end"]:
        if window_samples is None and now >= go["t_start"]:
            window_samples, start_epoch = samples, opt.local_epoch
        loss = forward_backward(model, sampler.next_batch(), grad_clip)
        opt.step()
        opt.zero_grad()
        samples += sampler.batch_size
        losses.append((time.time(), loss))
        if time.time() >= next_report:
            next_report += go.get("report_every", 15.0)
            say("PROGRESS", samples=samples, loss=tail_mean(losses, time.time()), epoch=opt.local_epoch)
    if window_samples is None:
        window_samples, start_epoch = samples, opt.local_epoch
    return {"total_samples": samples, "window_samples": samples - window_samples, "steps": len(losses),
            "train_loss": tail_mean(losses, go["t_end"]), "start_epoch": start_epoch, "end_epoch": opt.local_epoch}


@dataclass
class HivemindPeer:
    index: int
    proc: subprocess.Popen
    folder: Path
    messages: queue.Queue = field(default_factory=queue.Queue)

    @property
    def log(self) -> Path:
        return self.folder / "stderr.log"

    @property
    def model_path(self) -> Path:
        return self.folder / "model.pt"


def read_messages(proc: subprocess.Popen, messages: queue.Queue) -> None:
    """Put a child's ``say`` messages into ``messages``, then {"kind": "EXIT"} when its stdout closes."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(MSG):
            messages.put(json.loads(line[len(MSG):]))
    messages.put({"kind": "EXIT"})


def spawn_hivemind_peer(index: int, args: argparse.Namespace, root: Path, run_id: str, stream: str,
                        initial_peers: list[str]) -> HivemindPeer:
    folder = root / f"h{index}"  # short: unix socket paths live here
    folder.mkdir()
    cmd = [sys.executable, os.path.abspath(__file__), "_hivemind_peer", "--spec", str(args.spec),
           "--peers", str(args.hivemind_peers), "--run-id", run_id, "--stream", stream,
           "--out", str(folder / "model.pt"), "--matchmaking-time", str(args.hivemind_matchmaking),
           "--averaging-timeout", str(args.hivemind_averaging_timeout),
           *[a for m in initial_peers for a in ("--initial-peer", m)]]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=(folder / "stderr.log").open("w"), text=True,
                            env=quiet_env(folder, threads=1, hivemind_log="WARNING"), start_new_session=True)
    REAPER.add_process(proc)
    peer = HivemindPeer(index, proc, folder)
    threading.Thread(target=read_messages, args=(proc, peer.messages), daemon=True).start()
    return peer


def wait_message(peer: HivemindPeer, kind: str, timeout: float,
                 on_progress: Callable[[HivemindPeer, dict], None] | None = None) -> dict:
    """The peer's next ``kind`` message; PROGRESS messages on the way go to ``on_progress``."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        try:
            msg = peer.messages.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if msg["kind"] == kind:
            return msg
        if msg["kind"] == "EXIT":
            raise RuntimeError(f"hivemind peer {peer.index} exited early; {peer.log}:\n{log_tail(peer.log)}")
        if msg["kind"] == "PROGRESS" and on_progress:
            on_progress(peer, msg)
    raise TimeoutError(f"hivemind peer {peer.index}: no {kind} after {timeout:.0f} s; {peer.log}:\n"
                       f"{log_tail(peer.log)}")


def send(peer: HivemindPeer, message: dict) -> None:
    assert peer.proc.stdin is not None
    peer.proc.stdin.write(json.dumps(message) + "\n")
    peer.proc.stdin.flush()


def load_models(setup: Setup, paths: list[Path]) -> list[StageModel]:
    models = []
    for path in paths:
        models.append(whole_model(setup.spec))
        models[-1].load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return models


def replica_spread(models: list[StageModel]) -> float:
    """Mean over the models of ||theta_i - mean theta|| / ||mean theta||: near 0 when averaging keeps them together."""
    flats = [torch.nn.utils.parameters_to_vector(m.parameters()).detach() for m in models]
    mean = torch.stack(flats).mean(0)
    return statistics.fmean(float((f - mean).norm() / mean.norm()) for f in flats)


def start_hivemind_peers(args: argparse.Namespace, root: Path, repeat: int) -> list[HivemindPeer]:
    """Peer 0 first (it bootstraps from nobody), then the others from peer 0's loopback address."""
    run_id = f"swarmd-bench-{os.getpid()}-{repeat}"
    peers = [spawn_hivemind_peer(0, args, root, run_id, stream_name("hivemind-0", repeat), [])]
    maddrs = wait_message(peers[0], "READY", args.start_timeout)["maddrs"]
    loopback = [m for m in maddrs if m.startswith("/ip4/127.0.0.1/")] or maddrs
    for i in range(1, args.hivemind_peers):
        peers.append(spawn_hivemind_peer(i, args, root, run_id, stream_name(f"hivemind-{i}", repeat), loopback))
    for peer in peers[1:]:
        wait_message(peer, "READY", args.start_timeout)
    REAPER.note_sockets()
    return peers


def stop_hivemind_peers(peers: list[HivemindPeer], timeout: float = 30.0) -> None:
    """Wait for the peers' own clean shutdown, then SIGKILL their groups (p2pd included)."""
    end = time.monotonic() + timeout
    for peer in peers:
        try:
            peer.proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    REAPER.note_sockets()
    for peer in peers:
        if peer.proc.poll() is None and timeout > 0:
            progress(f"hivemind peer {peer.index} did not exit by itself; killing it")
    REAPER.kill_groups({peer.proc.pid for peer in peers})


def run_hivemind(setup: Setup, args: argparse.Namespace, repeat: int) -> SystemRun:
    n = args.hivemind_peers
    root = private_folder("swb-peer-hm-")
    progress(f"hivemind #{repeat + 1}: starting {n} peers (DHT on 127.0.0.1, local updates, averaging every "
             f"{n * setup.microbatch * HIVEMIND_STEPS_PER_ROUND} samples, fp16)")
    peers = start_hivemind_peers(args, root, repeat)
    try:
        t0 = time.time() + 1.0
        go = {"t0": t0, "t_start": t0 + args.warmup, "t_end": t0 + args.warmup + args.window,
              "report_every": args.report_every}
        for peer in peers:
            send(peer, go)
        meter = LoadMeter()
        metering = meter.at_times(go["t_start"], go["t_end"])
        progress(f"hivemind #{repeat + 1}: all {n} peers up; warm-up {args.warmup:g} s, window {args.window:g} s")

        def report(peer: HivemindPeer, msg: dict) -> None:
            progress(f"hivemind #{repeat + 1} peer {peer.index}: {msg['samples']} samples, "
                     f"loss {msg['loss']:.3f}, epoch {msg['epoch']}")

        done = [wait_message(p, "DONE", args.warmup + args.window + 120, report) for p in peers]
        metering.join(10)
        stop_hivemind_peers(peers)
        models = load_models(setup, [p.model_path for p in peers])
        losses = [heldout_loss([model], setup.val_batches) for model in models]
        spread = replica_spread(models)
    finally:
        stop_hivemind_peers(peers, timeout=0)
    logs = {p.index: log_problems(p.log, SHUTDOWN_MARKER) for p in peers}
    problems = [f"peer {i}: {line}" for i, (during, _) in logs.items() for line in during]
    at_shutdown = sum(len(after) for _, after in logs.values())
    for line in problems[:5]:
        progress(f"hivemind #{repeat + 1} {line[:300]}")
    run = SystemRun(
        system="hivemind", repeat=repeat, window_s=args.window,
        window_samples=sum(d["window_samples"] for d in done), total_samples=sum(d["total_samples"] for d in done),
        train_loss=statistics.fmean(d["train_loss"] for d in done), heldout=statistics.fmean(losses),
        foreign_cores=meter.foreign_cores,
        details={"peers": done, "peer_heldout": losses, "replica_spread": spread, "log_problems": problems,
                 "log_problems_at_shutdown": at_shutdown},
    )
    epochs = [d["end_epoch"] - d["start_epoch"] for d in done]
    progress(f"hivemind #{repeat + 1}: {run.samples_per_s:.1f} samples/s, {run.total_samples:.0f} samples in all, "
             f"train loss {run.train_loss:.4f}, held-out {run.heldout:.4f} (peers "
             f"{', '.join(f'{x:.4f}' for x in losses)}); epochs in the window per peer {epochs}, replica spread "
             f"{spread:.4f}; {len(problems)} warning/error lines in the peers' logs while training ({at_shutdown} at "
             f"shutdown); other load {meter.foreign_cores:.2f} cores")
    return run


# ---------------------------------------------------------------------------------------------------
# The plain torch loop: in this process, its clock stopped while it evaluates


class TrainClock:
    """Seconds of training: wall time minus the time spent evaluating."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._excluded = 0.0

    def __call__(self) -> float:
        return time.monotonic() - self._start - self._excluded

    def untimed(self, fn: Callable[[], float]) -> float:
        """``fn()``, its duration not counted as training."""
        began = time.monotonic()
        try:
            return fn()
        finally:
            self._excluded += time.monotonic() - began


@dataclass
class TorchLoop:
    """The plain loop's state: one model, AdamW, its own data stream."""

    setup: Setup
    model: StageModel
    opt: torch.optim.Optimizer
    sampler: CorpusSampler
    clock: TrainClock = field(default_factory=TrainClock)
    samples: int = 0
    losses: list[tuple[float, float]] = field(default_factory=list)  # (training seconds, loss)

    @classmethod
    def create(cls, setup: Setup, stream: str) -> TorchLoop:
        spec = setup.spec
        model = whole_model(spec)
        opt = make_adamw(spec, optimizer_param_groups(model, spec.optimizer.weight_decay))
        return cls(setup, model, opt, sampler_for(spec, setup.train, stream))

    def step(self) -> None:
        loss = forward_backward(self.model, self.sampler.next_batch(), self.setup.spec.optimizer.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.samples += self.sampler.batch_size
        self.losses.append((self.clock(), loss))

    def evaluate(self) -> float:
        return self.clock.untimed(lambda: heldout_loss([self.model], self.setup.val_batches))


def run_torch(setup: Setup, args: argparse.Namespace, repeat: int, targets: dict[str, float]) -> SystemRun:
    """Train for warm-up + window, then on to every sample count in ``targets``, evaluating at each."""
    tag = f"torch #{repeat + 1}"
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    pending = sorted(targets.items(), key=lambda item: item[1])
    horizon = args.warmup + args.window
    limit = horizon * (1 + args.torch_max_extra)  # give up on sample targets past this much training
    progress(f"{tag}: one process, {args.torch_threads} threads; warm-up {args.warmup:g} s, window {args.window:g} s"
             + ("; then on to " + ", ".join(f"{v:.0f} samples ({k})" for k, v in pending) if pending else ""))
    loop = TorchLoop.create(setup, stream_name("torch", repeat))
    start_samples = end_samples = heldout = train_loss = None
    meter = LoadMeter()
    equal: dict[str, tuple[float, float, float]] = {}
    next_report = args.report_every

    def evaluate_reached() -> None:
        while pending and loop.samples >= pending[0][1]:
            name, target = pending.pop(0)
            equal[name] = (target, loop.samples, loop.evaluate())
            progress(f"{tag}: {loop.samples} samples (= {name}'s {target:.0f}): held-out {equal[name][2]:.4f}")

    try:
        while heldout is None or (pending and loop.clock() < limit):
            evaluate_reached()
            if start_samples is None and loop.clock() >= args.warmup:
                start_samples = loop.samples
                meter.start()
            if heldout is None and loop.clock() >= horizon:
                meter.stop()
                end_samples, train_loss, heldout = loop.samples, tail_mean(loop.losses, horizon), loop.evaluate()
                progress(f"{tag}: window over, {(end_samples - start_samples) / args.window:.1f} samples/s, "
                         f"{end_samples} samples in all, held-out {heldout:.4f}, other load "
                         f"{meter.foreign_cores:.2f} cores")
                continue
            loop.step()
            if loop.clock() >= next_report:
                next_report += args.report_every
                progress(f"{tag}: {loop.clock():.0f} s of training, {loop.samples} samples, loss "
                         f"{tail_mean(loop.losses, loop.clock()):.3f}")
        evaluate_reached()
    finally:
        torch.set_num_threads(previous_threads)
    for name, target in pending:
        progress(f"{tag}: did not reach {name}'s {target:.0f} samples in {limit:.0f} s of training")
    return SystemRun(system="torch", repeat=repeat, window_s=args.window, window_samples=end_samples - start_samples,
                     total_samples=end_samples, train_loss=train_loss, heldout=heldout, equal_samples=equal,
                     foreign_cores=meter.foreign_cores,
                     details={"trained_samples": loop.samples, "trained_s": loop.clock()})


# ---------------------------------------------------------------------------------------------------
# swarmd: the demo swarm (daemon/demo.py's launcher functions)


def last_stage_values(ports: list[int], metric: str) -> list[float]:
    return [read_metrics(port).get(metric, math.nan) for port in ports]


def watch_window(tag: str, children: list[Child], last_ports: list[int], args: argparse.Namespace,
                 meter: LoadMeter) -> tuple[float, float, float, float]:
    """Warm-up, then the window: (samples at window start, at end, window seconds, mean loss of its last 10 s)."""
    def check_alive() -> None:
        for child in children:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name.strip()} exited with code {child.process.returncode}")

    time.sleep(args.warmup)
    check_alive()
    start_samples = sum(last_stage_values(last_ports, "swarmd_samples_total"))
    meter.start()
    started = time.monotonic()
    end = started + args.window
    progress(f"{tag}: window starts, {start_samples:.0f} last-stage samples so far")
    losses: list[float] = []
    next_report = started + args.report_every
    while (now := time.monotonic()) < end:
        time.sleep(min(1.0, end - now))
        check_alive()
        if end - time.monotonic() <= LOSS_TAIL_S:
            losses += [v for v in last_stage_values(last_ports, "swarmd_loss") if math.isfinite(v)]
        if time.monotonic() >= next_report:
            next_report += args.report_every
            REAPER.note_sockets()
            progress(f"{tag}: {time.monotonic() - started:.0f} s into the window, "
                     f"{sum(last_stage_values(last_ports, 'swarmd_samples_total')):.0f} last-stage samples")
    end_samples = sum(last_stage_values(last_ports, "swarmd_samples_total"))
    window_s = time.monotonic() - started
    meter.stop()
    return start_samples, end_samples, window_s, statistics.fmean(losses) if losses else math.nan


def volunteer_dir(root: Path, index: int, args: argparse.Namespace, repeat: int) -> Path:
    """Volunteer ``index``'s node folder; with ``--identities`` it gets that repeat's fixed key (a driver's data
    stream is seeded by its peer id, so runs with the same keys train on the same data)."""
    node_dir = root / f"v{index}"
    if args.identities is not None:
        identity = NodeIdentity.load_or_create(args.identities / f"r{repeat}" / f"v{index}")
        node_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(identity.path, node_dir / IDENTITY_FILE)
    return node_dir


def start_swarm(tag: str, root: Path, args: argparse.Namespace, repeat: int) -> tuple[list[Child], list[dict]]:
    """A seed and the volunteers, as ``swarmd demo`` starts them; returns the children and volunteers' ready.json."""
    spec = RunSpec.load(args.spec)
    env = quiet_env(root / "sockets")
    (root / "sockets").mkdir()
    common = ["--host", "127.0.0.1", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
              "--progress-every", str(args.swarm_progress_every)]
    children: list[Child] = []
    try:
        children.append(start_child(f"{tag} seed", ["seed", str(args.spec), "--no-train", *common],
                                    root / "seed", env))
        REAPER.add_process(children[0].process)
        seed_addr = wait_ready(children[0], args.start_timeout)["maddrs"][0]
        for i in range(args.swarm_volunteers):
            children.append(start_child(f"{tag} v{i}", ["join", seed_addr, *common, "--stage",
                                                        str(i % spec.pipeline.stages), "--threads", "1"],
                                        volunteer_dir(root, i, args, repeat), env))
            REAPER.add_process(children[-1].process)
        infos = [wait_ready(c, args.start_timeout) for c in children[1:]]
    except BaseException:
        REAPER.note_sockets()
        stop_children(children)
        raise
    REAPER.note_sockets()
    return children, infos


def run_swarmd(setup: Setup, args: argparse.Namespace, repeat: int) -> SystemRun:
    tag = f"swarmd #{repeat + 1}"
    root = private_folder("swb-peer-sw-")
    stages = setup.spec.pipeline.stages
    progress(f"{tag}: starting a seed and {args.swarm_volunteers} volunteers ({stages} stages) on 127.0.0.1")
    children, infos = start_swarm(tag, root, args, repeat)
    volunteers = children[1:]
    last_ports = [info["metrics_port"] for info in infos if info["stage"] == stages - 1]
    try:
        progress(f"{tag}: volunteers serve stages {[info['stage'] for info in infos]}; warm-up {args.warmup:g} s, "
                 f"window {args.window:g} s")
        meter = LoadMeter()
        start_samples, end_samples, window_s, train_loss = watch_window(tag, children, last_ports, args, meter)
        REAPER.note_sockets()
    finally:
        stopping = time.monotonic()
        stop_children(children, timeout=60)  # volunteers write their checkpoints at stop
        REAPER.kill_groups({child.process.pid for child in children})
    progress(f"{tag}: stopped in {time.monotonic() - stopping:.0f} s; exit codes "
             f"{[c.process.returncode for c in children]}")
    checkpoints = [v.node_dir / "checkpoint.pt" for v in volunteers]
    if missing := [str(p) for p in checkpoints if not p.exists()]:
        raise RuntimeError(f"{tag}: no checkpoint at {missing}")
    heldout = checkpoint_heldout_loss(setup.spec, checkpoints, setup.val_batches)
    run = SystemRun(system="swarmd", repeat=repeat, window_s=window_s, window_samples=end_samples - start_samples,
                    total_samples=end_samples, train_loss=train_loss, heldout=heldout,
                    foreign_cores=meter.foreign_cores, details={"stages": [info["stage"] for info in infos],
                             "exit_codes": [c.process.returncode for c in children]})
    progress(f"{tag}: {run.samples_per_s:.1f} samples/s, {end_samples:.0f} samples in all, train loss "
             f"{train_loss:.4f}, held-out {heldout:.4f}, other load {meter.foreign_cores:.2f} cores")
    return run


# ---------------------------------------------------------------------------------------------------
# Tables


def fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def mean_and_values(values: list[float], digits: int = 4) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "n/a"
    mean = fmt(statistics.fmean(finite), digits)
    return mean if len(values) == 1 else f"{mean} ({', '.join(fmt(v, digits) for v in values)})"


def by_repeat(runs: list[SystemRun], system: str) -> dict[int, SystemRun]:
    return {r.repeat: r for r in runs if r.system == system}


def torch_at(runs: list[SystemRun], system: str) -> dict[int, float]:
    """Per repeat: the torch loop's held-out loss after as many samples as ``system`` saw."""
    return {r.repeat: r.equal_samples[system][2] for r in runs if r.system == "torch" and system in r.equal_samples}


def print_runs(runs: list[SystemRun]) -> None:
    print("| system | repeat | window s | samples/s | train loss (last 10 s) | samples at stop | held-out at stop "
          "| other load (cores) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(runs, key=lambda r: (SYSTEMS.index(r.system), r.repeat)):
        print(f"| {r.system} | {r.repeat + 1} | {r.window_s:.0f} | {r.samples_per_s:.1f} | {fmt(r.train_loss)} "
              f"| {r.total_samples:.0f} | {fmt(r.heldout)} | {fmt(r.foreign_cores, 2)} |")
        for name, (target, reached, loss) in sorted(r.equal_samples.items()):
            print(f"| torch @ {name} samples | {r.repeat + 1} | | | | {reached:.0f} (target {target:.0f}) "
                  f"| {fmt(loss)} | |")
    if busy := [r for r in runs if r.foreign_cores > FOREIGN_LOAD_WARN]:
        print(f"\nWARNING: other processes kept > {FOREIGN_LOAD_WARN:g} cores busy during "
              + ", ".join(f"{r.system} #{r.repeat + 1} ({r.foreign_cores:.2f})" for r in busy)
              + ": those numbers were measured on a shared machine.")


def print_summary(runs: list[SystemRun], systems: list[str]) -> None:
    print("\nMeans over repeats (each repeat's value in brackets):\n")
    print("| system | samples/s | train loss (last 10 s) | samples at stop | held-out, equal wall time "
          "| torch held-out at its samples | held-out / torch's at equal samples |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for system in systems:
        rs = by_repeat(runs, system)
        if not rs:
            continue
        at = torch_at(runs, system)
        rel = [rs[i].heldout / at[i] for i in sorted(rs) if i in at]
        print(f"| {system} | {mean_and_values([r.samples_per_s for r in rs.values()], 1)} "
              f"| {mean_and_values([r.train_loss for r in rs.values()])} "
              f"| {mean_and_values([r.total_samples for r in rs.values()], 0)} "
              f"| {mean_and_values([r.heldout for r in rs.values()])} "
              f"| {mean_and_values(list(at.values())) if at else 'n/a'} "
              f"| {mean_and_values(rel) if rel else 'n/a'} |")


def ratios(runs: list[SystemRun]) -> dict[str, dict[str, list[float]]]:
    """Per-repeat ratios of swarmd to hivemind and to torch (only repeats where both ran)."""
    sw, hm, tc = by_repeat(runs, "swarmd"), by_repeat(runs, "hivemind"), by_repeat(runs, "torch")
    sw_at, hm_at = torch_at(runs, "swarmd"), torch_at(runs, "hivemind")
    out: dict[str, dict[str, list[float]]] = {"swarmd/hivemind": {}, "swarmd/torch": {}}
    for name, other in (("swarmd/hivemind", hm), ("swarmd/torch", tc)):
        both = [i for i in sorted(sw) if i in other]
        out[name]["samples/s"] = [sw[i].samples_per_s / other[i].samples_per_s for i in both]
        out[name]["held-out, equal wall time"] = [sw[i].heldout / other[i].heldout for i in both]
    out["swarmd/torch"]["held-out, equal samples"] = [sw[i].heldout / sw_at[i] for i in sorted(sw) if i in sw_at]
    out["swarmd/hivemind"]["held-out, equal samples"] = [
        (sw[i].heldout / sw_at[i]) / (hm[i].heldout / hm_at[i]) for i in sorted(sw) if i in sw_at and i in hm_at]
    return out


def print_ratios(table: dict[str, dict[str, list[float]]]) -> None:
    print("\nRatios (mean over repeats, each repeat's in brackets; held-out: < 1 favours swarmd):\n")
    print("| measure | swarmd/hivemind | swarmd/torch |")
    print("|---|---:|---:|")
    for measure in ("samples/s", "held-out, equal wall time", "held-out, equal samples"):
        cells = [mean_and_values(table[name].get(measure, []), 3) if table[name].get(measure) else "n/a"
                 for name in ("swarmd/hivemind", "swarmd/torch")]
        print(f"| {measure} | {cells[0]} | {cells[1]} |")


# ---------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="systems to run (default hivemind,torch,swarmd)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per system (default 3)")
    parser.add_argument("--window", type=float, default=120.0, help="timed window in seconds (default 120)")
    parser.add_argument("--warmup", type=float, default=20.0, help="training before the window, seconds (default 20)")
    parser.add_argument("--hivemind-peers", type=int, default=4, help="hivemind peer processes (default 4)")
    parser.add_argument("--hivemind-matchmaking", type=float, default=5.0,
                        help="hivemind.Optimizer matchmaking_time, seconds (default 5)")
    parser.add_argument("--hivemind-averaging-timeout", type=float, default=60.0,
                        help="hivemind.Optimizer averaging_timeout, seconds (default 60)")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch threads of the plain loop (default 2)")
    parser.add_argument("--torch-max-extra", type=float, default=4.0,
                        help="the torch loop trains at most this many times warm-up + window more to reach the "
                             "others' sample counts (default 4)")
    parser.add_argument("--swarm-volunteers", type=int, default=4, help="swarmd volunteers (default 4)")
    parser.add_argument("--swarm-progress-every", type=float, default=30.0, help="node progress lines every N s")
    parser.add_argument("--report-every", type=float, default=15.0, help="bench progress lines every N s")
    parser.add_argument("--wait-quiet", type=float, default=300.0,
                        help="before each system, wait up to this many seconds until other processes leave the "
                             "CPUs alone (default 300; 0: don't wait)")
    parser.add_argument("--start-timeout", type=float, default=120.0, help="seconds for a peer or node to come up")
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC_PATH, help="run spec (default: embedded demo)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write every raw number here")
    parser.add_argument("--identities", type=Path, default=None, metavar="DIR",
                        help="swarmd volunteers take fixed keys from DIR/r<repeat>/v<i> (created if missing), "
                        "so that runs of different settings train on the same data streams")
    parser.add_argument("--quick", action="store_true", help="smoke run: window 20 s, warm-up 10 s, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.window, args.warmup, args.repeats = 20.0, 10.0, 1
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := [s for s in args.system_list if s not in SYSTEMS]:
        parser.error(f"unknown system(s) {unknown}; known: {', '.join(SYSTEMS)}")
    if args.window <= LOSS_TAIL_S:
        parser.error(f"--window must be longer than {LOSS_TAIL_S:g} s")
    return args


def parse_peer_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="peer.py _hivemind_peer")
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--matchmaking-time", type=float, required=True)
    parser.add_argument("--averaging-timeout", type=float, required=True)
    parser.add_argument("--initial-peer", action="append", default=[])
    return parser.parse_args(argv)


def run_repeat(setup: Setup, args: argparse.Namespace, repeat: int, runs: list[SystemRun]) -> None:
    """Every chosen system once, hivemind and swarmd before the torch loop (it needs their sample counts)."""
    done: dict[str, SystemRun] = {}
    for system in RUN_ORDER:
        if system not in args.system_list:
            continue
        if args.wait_quiet > 0:
            wait_for_quiet(args.wait_quiet)
        if system == "hivemind":
            done[system] = run_hivemind(setup, args, repeat)
        elif system == "swarmd":
            done[system] = run_swarmd(setup, args, repeat)
        else:
            targets = {name: run.total_samples for name, run in done.items()}
            done[system] = run_torch(setup, args, repeat, targets)
        runs.append(done[system])
        REAPER.remove_files()


def write_json(path: Path, args: argparse.Namespace, setup: Setup, runs: list[SystemRun]) -> None:
    raw = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "spec": setup.spec.to_dict(), "cores": os.cpu_count(),
        "runs": [{**dataclasses.asdict(r), "samples_per_s": r.samples_per_s} for r in runs],
        "ratios": ratios(runs),
    }
    path.write_text(json.dumps(raw, indent=2, default=str) + "\n")
    progress(f"raw numbers written to {path}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_hivemind_peer":
        hivemind_peer_main(parse_peer_args(sys.argv[2:]))
        return 0
    args = parse_args()
    atexit.register(REAPER.clean)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally blocks, like Ctrl-C
    sockets_before = set(glob.glob(HIVEMIND_SOCKET_GLOB))
    torch.set_num_threads(args.torch_threads)  # evaluation, while nothing else runs
    setup = load_setup(args.spec)
    m, p = setup.spec.model, setup.spec.pipeline
    progress(f"model dim {m.dim} x {m.n_layers} layers (whole), microbatch {p.microbatch_size} x {p.seq_len} "
             f"tokens, lr {setup.spec.optimizer.lr:g}; systems {args.system_list}, {args.repeats} repeat(s), "
             f"warm-up {args.warmup:g} s + window {args.window:g} s; {os.cpu_count()} cores; "
             f"{len(setup.val_batches)} validation batches")
    runs: list[SystemRun] = []
    started = time.monotonic()
    status = 0
    try:
        for repeat in range(args.repeats):
            run_repeat(setup, args, repeat, runs)
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or SIGTERM (sys.exit(143))
        progress("interrupted; cleaning up")
        status = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
    except (RuntimeError, TimeoutError, ValueError) as e:
        progress(f"failed: {e}")
        status = 1
    finally:
        REAPER.clean()
    leftover = sorted(set(glob.glob(HIVEMIND_SOCKET_GLOB)) - sockets_before)
    progress(f"done in {time.monotonic() - started:.0f} s; new /tmp/hivemind-* sockets left: {leftover or 'none'}; "
             f"p2pd's with other than loopback-only settings: {REAPER.network_problems or 'none'}")
    if runs:
        print()
        print_runs(runs)
        print_summary(runs, [s for s in SYSTEMS if s in args.system_list])
        print_ratios(ratios(runs))
        if args.json:
            write_json(args.json, args, setup, runs)
    return status


if __name__ == "__main__":
    sys.exit(main())
