"""One outer synchronization: NoLoCo pair exchange vs hivemind all-reduce, N replicas, same run.

    python bench/averaging.py [--sizes 10M,50M] [--replicas 2,4,8,16] [--methods allreduce,noloco]
                              [--no-shaped] [--no-loopback] [--quick]

For each network, replica count N and model size P (fp32 parameters), N peer processes are started
(each with its own p2pd; NAT traversal, AutoNAT and relays off; peers bootstrap only from peer 0):

- **all-reduce**: every peer runs a ``hivemind.DHT`` and a ``hivemind.averaging.DecentralizedAverager``
  over one flat fp32 tensor of P elements (target_group_size = min_group_size = N, compression
  ``NoCompression``, which is also hivemind's default) and calls ``averager.step()`` once. The result
  is checked: every peer must end with the mean of all N initial tensors.
- **NoLoCo**: every peer runs the daemon's own ``swarmd.daemon.outer_service.NoLoCoService`` (P2P, in-loop
  ``DHTNode``, ``Transport``, compute lane; the averaging config and codec of the daemon's default run
  spec ``daemon/default_run.toml``: ``int8-ef``, its pair timeout) over a replica holding the same flat vector, and calls ``outer_step()`` once: it pairs with
  one random partner through the DHT ready board and swaps phi and theta - phi, or steps solo.

The parent tells every peer to start at one common wall-clock time t0 (all peers share this machine's
clock); a method's time is from t0 until the last peer has finished its step. Each peer process
holds only its own method's state for one size at a time.

Networks:

- **loopback**: all peers on 127.0.0.1 of the root namespace, unshaped.
- **shaped** (root only): every peer in its own network namespace on a bridge, 100 Mbit/s per
  direction per peer (tc tbf) and 25 ms one-way delay (NFQUEUE holder, see bench/netns.py: this
  kernel has no netem). The link is measured before the runs (TCP connect and echo RTT, 20 MiB bulk
  transfer); if it is more than 20% off the intended shape, no shaped results are printed.

The table: N, params, network, NoLoCo seconds (paired peers / N), all-reduce seconds, ratio
all-reduce / NoLoCo, the longest NoLoCo compute-lane time (encode + update) and exchange time of any
peer, the mean CPU seconds (user + system) one peer's process tree (Python, p2pd, hivemind's helper
processes) spent on the step, how busy the machine's CPUs were from t0 until the last peer finished,
and the peak RSS of one peer's process tree. Configurations whose step would not fit in the
memory available are skipped (and say so) rather than risking the OOM killer. Every process,
namespace, rule and temporary directory the benchmark created is removed at the end, also on
errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netns  # bench/netns.py, next to this file
from peer import tree_pids  # bench/peer.py: a process and its live descendants

# all-reduce with hivemind's codecs: fp32 (NoCompression, hivemind's default), fp16, and 8-bit
# (Uniform8BitQuantization: one scale per part; hivemind's blockwise 8-bit codec needs bitsandbytes, which is not
# installed here). NoLoCo sends int8 blocks: bytes per element like the 8-bit all-reduce's.
ALLREDUCE_CODECS = {"allreduce": "NoCompression", "allreduce-fp16": "Float16Compression",
                    "allreduce-int8": "Uniform8BitQuantization"}
ALLREDUCE_BYTES_PER_ELEMENT = {"allreduce": 4, "allreduce-fp16": 2, "allreduce-int8": 1}
METHODS = (*ALLREDUCE_CODECS, "noloco")
MIB = 1 << 20
GIB = 1 << 30
# Extra bytes one peer allocates per fp32 parameter during a step (its peak over its idle footprint),
# measured on this machine: all-reduce ~4 copies (the shared tensor, hivemind's part buffers);
# NoLoCo ~11.5 (2.63 GiB peak RSS at 50M on 2026-11-23: the replica's vector, phi, delta, two error-feedback
# residuals, the snapshot, the partner's phi and progress, the re-read weights, the encoded payload and
# the quantizer's chunk temporaries). Used only to skip configurations that cannot fit in memory, instead of
# pushing the machine (and anything else running on it) into the OOM killer.
STEP_BYTES_PER_PARAM = {**{m: 4 * 4.25 for m in ALLREDUCE_CODECS}, "noloco": 4 * 11.5}
STEP_BYTES_PER_PEER = 100 * MIB


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * scale)


def size_label(n: int) -> str:
    return f"{n / 1e6:g}M"


# ---------------------------------------------------------------------------------------------------
# Peer processes (``averaging.py _peer``): one per replica, driven over stdin/stdout


def _say(kind: str, **fields) -> None:
    print(kind + " " + json.dumps(fields), flush=True)


def _sleep_until(t0: float) -> None:
    while (left := t0 - time.time()) > 0:
        time.sleep(min(left, 0.05))


def tree_peak_rss() -> int:
    """Sum of the peak RSS (VmHWM) of this process and its descendants (p2pd, hivemind's helpers), in bytes.

    Pages shared between them (hivemind's shared-memory tensors) count once per process that touched them.
    """
    total = 0
    for pid in tree_pids(os.getpid()):
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
    return total


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its live descendants (p2pd, hivemind's
    DHT and averager processes): read before and after a step, the difference is that step's CPU cost."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree_pids(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
        except (OSError, IndexError, ValueError):
            pass
    return total / ticks


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (idle and iowait count as not busy)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _reset_peak_rss() -> None:
    """Reset VmHWM of this process tree (``echo 5 > /proc/PID/clear_refs``), so each step reports its own peak."""
    for pid in tree_pids(os.getpid()):
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _make_tensor(numel: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g)


def peer_allreduce(args, commands) -> None:
    """All-reduce peer: one hivemind.DHT for the whole run, one DecentralizedAverager per size."""
    import hivemind
    import hivemind.compression
    import torch

    compression = getattr(hivemind.compression, ALLREDUCE_CODECS[args.method])
    torch.set_num_threads(1)
    dht = hivemind.DHT(
        initial_peers=args.initial_peers or None, host_maddrs=[f"/ip4/{args.host}/tcp/0"], start=True,
        nat_port_map=False, auto_nat=False, use_relay=False, use_auto_relay=False,
    )
    _say("READY", maddrs=[str(m) for m in dht.get_visible_maddrs()])
    for cmd in commands:
        if cmd["op"] == "quit":
            break
        numel, n = cmd["numel"], cmd["n"]
        _reset_peak_rss()
        tensor = _make_tensor(numel, seed=1000 * args.index + numel % 997)
        initial_sum = float(tensor.double().sum())
        averager = hivemind.averaging.DecentralizedAverager(
            [tensor], dht, start=True, prefix=f"bench{cmd['tag']}", target_group_size=n, min_group_size=n,
            min_matchmaking_time=cmd["matchmaking_s"], request_timeout=cmd["request_timeout_s"],
            compression=compression(), allreduce_timeout=cmd["timeout_s"],
        )
        del tensor  # the averager keeps the shared copy
        _say("PREPARED")
        go = next(commands)
        _sleep_until(go["t0"])
        if cmd.get("compute_s"):  # the straggler scenario: several outer steps, each after its compute time
            waits = []
            for compute_s in cmd["compute_s"]:
                time.sleep(compute_s)  # simulated inner steps: idle, so the network path is all that runs
                ready = time.time()
                try:
                    gathered = averager.step(timeout=cmd["timeout_s"], allow_retries=True)
                except Exception:  # noqa: BLE001  (a failed step counts as waited-for and not averaged)
                    gathered = None
                waits.append((time.time() - ready, len(gathered) if gathered else 0))
            _say("DONE", started=go["t0"], finished=time.time(), waits=waits, error=None, cpu_s=0.0, peak_rss=0,
                 group=n, initial_sum=0.0, final_sum=0.0, result="straggler")
            averager.shutdown()
            del averager
            gc.collect()
            _say("CLEAN")
            continue
        started, cpu0 = time.time(), tree_cpu_seconds()
        try:
            gathered = averager.step(timeout=cmd["timeout_s"], allow_retries=True)
            error = None
        except Exception as e:  # noqa: BLE001  (reported, not raised: the parent prints what happened)
            gathered, error = None, f"{type(e).__name__}: {e}"
        finished, cpu_s = time.time(), tree_cpu_seconds() - cpu0
        with averager.get_tensors() as tensors:
            final_sum = float(tensors[0].double().sum())
        _say("DONE", started=started, finished=finished, group=len(gathered) if gathered else 0, error=error,
             initial_sum=initial_sum, final_sum=final_sum, result="averaged" if gathered else "failed",
             cpu_s=cpu_s, peak_rss=tree_peak_rss())
        averager.shutdown()
        del averager
        gc.collect()
        _say("CLEAN")
    dht.shutdown()


class FlatReplica:
    """The replica the NoLoCo service reads and writes: one flat fp32 vector standing in for a model's weights.

    Reads copy, as reading a real model's parameters into one vector does (the service owns what it reads).
    """

    def __init__(self, flat):
        self.flat = flat

    def read_flat(self):
        return self.flat.clone()

    def write_flat(self, flat) -> None:
        self.flat = flat


def _warm_kernels(numel: int, chunk_elements: int, block_size: int) -> None:
    """Run swarmd.kernels' quantizer and NoLoCo update once at every chunk size of this step, so their
    torch.compile (swarmd.kernels.compiled: large CPU tensors) happens before t0. A daemon compiles once, at
    its first outer step, and then runs for hours: the timed step is its steady state."""
    import torch
    from swarmd.kernels import noloco_outer_update_, quantize_int8_ef
    from swarmd.swarm.outer import chunk_bounds

    for m in sorted({end - start for start, end in chunk_bounds(numel, chunk_elements)}):
        # views and whole tensors (each is a graph of its own): the daemon encodes chunks of phi (views) and
        # theta - phi (a new tensor), and updates chunks of its flat vectors (views)
        for z in (torch.zeros(m), torch.zeros(m)[:]):
            q, _ = quantize_int8_ef(z, None, block_size=block_size)
            quantize_int8_ef(z, z, block_size=block_size)
            noloco_outer_update_(z.clone()[:], z.clone()[:], z.clone()[:], q, q)
            noloco_outer_update_(z.clone()[:], z.clone()[:], z.clone()[:])


async def peer_noloco_async(args, commands) -> None:
    """NoLoCo peer: one P2P + DHTNode + Transport for the whole run, one NoLoCoService per size."""
    import dataclasses

    import torch
    from hivemind.dht.node import DHTNode
    from swarmd.daemon.compute import ComputeLane
    from swarmd.daemon.metrics import NodeMetrics
    from swarmd.daemon.identity import NodeIdentity
    from swarmd.daemon.outer_service import NoLoCoService
    from swarmd.daemon.records import record_signer
    from swarmd.daemon.p2p_host import create_p2p
    from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec
    from swarmd.daemon.transport import Transport
    from swarmd.protocols.limits import DEFAULT_LIMITS

    torch.set_num_threads(1)
    initial = list(args.initial_peers)
    # the daemon's identity and signed records: ready-board entries name their owner by its key
    identity = NodeIdentity.load_or_create(Path(tempfile.mkdtemp(prefix="swarmd-bench-id-")))
    signer = record_signer("bench", 1, identity)
    p2p = await create_p2p(initial_peers=initial, host_maddrs=[f"/ip4/{args.host}/tcp/0"],
                           identity_path=str(identity.path), nat_port_map=False, auto_nat=False, use_relay=False,
                           use_auto_relay=False)
    dht = await DHTNode.create(p2p=p2p, initial_peers=initial, ensure_bootstrap_success=bool(initial),
                               record_validator=signer.validator)
    metrics = NodeMetrics()
    transport = Transport(p2p, metrics, DEFAULT_LIMITS)
    lane = ComputeLane()
    peer_id = p2p.peer_id.to_base58()
    spec = RunSpec.load(DEFAULT_SPEC_PATH)  # the daemon's default run: its averaging config and codec
    _say("READY", maddrs=[str(m) for m in await p2p.get_visible_maddrs()])
    loop = asyncio.get_running_loop()

    async def next_command() -> dict:
        return await loop.run_in_executor(None, next, commands)

    while (cmd := await next_command())["op"] != "quit":
        numel = cmd["numel"]
        _reset_peak_rss()
        overrides = {k: v for k, v in cmd.get("averaging", {}).items() if v is not None}
        config = dataclasses.replace(spec.averaging, **overrides)
        codec = cmd.get("codec") or spec.compression.averaging
        # replicas of one stage: the same weights (a partner's phi far from ours is rejected), then their own progress
        replica = FlatReplica(_make_tensor(numel, seed=numel % 997))
        service = NoLoCoService(
            run_id=f"bench{cmd['tag']}", stage=0, peer_id=peer_id, board_subkey=signer.subkey, config=config,
            codec=codec,
            block_size=spec.compression.block_size, transport=transport, dht=dht, lane=lane, replica=replica,
            metrics=metrics, limits=DEFAULT_LIMITS, rng=random.Random(args.index * 7919 + numel),
        )
        await service.start()  # phi <- theta; then some "inner progress" so that theta - phi is not zero
        replica.flat.add_(_make_tensor(numel, seed=args.index + 1), alpha=0.01)
        warm0 = time.monotonic()
        await lane.run(_warm_kernels, numel, config.chunk_elements, spec.compression.block_size)
        warm_s = time.monotonic() - warm0
        sent0 = metrics.bytes_sent.labels("averaging")._value.get()
        wait0, swap0 = metrics.partner_wait._sum.get(), metrics.outer_exchange._sum.get()
        busy0 = lane.busy_seconds
        _say("PREPARED")
        go = await next_command()
        await asyncio.sleep(max(0.0, go["t0"] - time.time()))
        if cmd.get("compute_s"):  # the straggler scenario: several outer steps, each after its compute time
            waits = []
            for compute_s in cmd["compute_s"]:
                await asyncio.sleep(compute_s)  # simulated inner steps: idle, so the network path is all that runs
                replica.flat.add_(_make_tensor(numel, seed=args.index + 1 + len(waits)), alpha=0.01)
                ready, wait0, lane0 = time.time(), metrics.partner_wait._sum.get(), lane.busy_seconds
                try:
                    result = await service.outer_step()
                except Exception as e:  # noqa: BLE001
                    result = f"error {type(e).__name__}"
                waits.append((time.time() - ready, result, metrics.partner_wait._sum.get() - wait0,
                              lane.busy_seconds - lane0))
            _say("DONE", started=go["t0"], finished=time.time(), waits=waits, error=None, cpu_s=0.0, peak_rss=0,
                 result="straggler", sent_bytes=0, partner_wait_s=0, exchange_s=0, compute_s=0)
            del service, replica  # the next service's transport.serve replaces our handlers
            gc.collect()
            _say("CLEAN")
            continue
        started, cpu0 = time.time(), tree_cpu_seconds()
        try:
            result, error = await service.outer_step(), None
        except Exception as e:  # noqa: BLE001  (reported to the parent)
            result, error = "error", f"{type(e).__name__}: {e}"
        finished, cpu_s = time.time(), tree_cpu_seconds() - cpu0
        sent = metrics.bytes_sent.labels("averaging")._value.get() - sent0
        _say("DONE", started=started, finished=finished, result=result, error=error, sent_bytes=sent,
             partner_wait_s=metrics.partner_wait._sum.get() - wait0, exchange_s=metrics.outer_exchange._sum.get() - swap0,
             compute_s=lane.busy_seconds - busy0, cpu_s=cpu_s, peak_rss=tree_peak_rss(), warm_s=warm_s)
        del service, replica  # the next service's transport.serve replaces our handlers
        gc.collect()
        _say("CLEAN")
    lane.close()
    await dht.shutdown()
    await p2p.shutdown()
    shutil.rmtree(identity.path.parent, ignore_errors=True)


def peer_main(args) -> None:
    def commands():
        for line in sys.stdin:
            if line.strip():
                yield json.loads(line)
        yield {"op": "quit"}

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    if args.method in ALLREDUCE_CODECS:
        peer_allreduce(args, commands())
    else:
        asyncio.run(peer_noloco_async(args, commands()))
    _say("BYE")


# ---------------------------------------------------------------------------------------------------
# The parent: networks, peer groups, timing, the table


class MemorySampler:
    """Largest (MemTotal - MemAvailable) seen while active, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def used() -> int:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"] - info["MemAvailable"]

    @staticmethod
    def available() -> int:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return 0

    def reset(self) -> None:
        self.peak = self.used()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.used())

    def close(self) -> None:
        self._stop.set()


@dataclass
class Peer:
    index: int
    proc: subprocess.Popen
    log: Path
    lines: list = field(default_factory=list)


class PeerGroup:
    """N peer processes of one method on one network; a reader thread per peer collects its messages."""

    def __init__(self, method: str, n: int, net: netns.ShapedNetwork | None, workdir: Path, codec: str | None):
        self.method, self.n, self.net, self.workdir, self.codec = method, n, net, workdir, codec
        self.peers: list[Peer] = []
        self._cond = threading.Condition()

    def host(self, i: int) -> str:
        return self.net.ip(i) if self.net else "127.0.0.1"

    def _spawn(self, i: int, initial_peers: list[str]) -> Peer:
        short = "".join(w[0] for w in self.method.split("-"))  # a, af, ai, n: short, as unix socket paths live here
        tmp = self.workdir / f"{short}{self.n}p{i}"
        tmp.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, os.path.abspath(__file__), "_peer", "--method", self.method, "--index", str(i),
               "--host", self.host(i), *[a for m in initial_peers for a in ("--initial-peer", m)]]
        if self.net:
            cmd = self.net.exec_prefix(i) + cmd
        log = tmp / "stderr.log"
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
                                text=True, env=env, start_new_session=True)
        peer = Peer(i, proc, log)
        threading.Thread(target=self._read, args=(peer,), daemon=True).start()
        self.peers.append(peer)
        return peer

    def _read(self, peer: Peer) -> None:
        for line in peer.proc.stdout:
            kind, _, rest = line.strip().partition(" ")
            if kind in ("READY", "PREPARED", "DONE", "CLEAN", "BYE"):
                with self._cond:
                    peer.lines.append((kind, json.loads(rest) if rest else {}))
                    self._cond.notify_all()
        with self._cond:
            peer.lines.append(("EXIT", {}))
            self._cond.notify_all()

    def _wait(self, peers: list[Peer], kind: str, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = {}
                for p in peers:
                    for k, msg in p.lines:
                        if k == "EXIT":
                            raise RuntimeError(f"peer {p.index} exited early; see {p.log}:\n{_tail(p.log)}")
                        if k == kind:
                            got[p.index] = msg
                if len(got) == len(peers):
                    for p in peers:  # consume the messages
                        p.lines.remove(next(x for x in p.lines if x[0] == kind))
                    return [got[p.index] for p in peers]
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [p.index for p in peers if p.index not in got]
                    raise TimeoutError(f"peers {missing} did not report {kind} in {timeout:.0f} s; "
                                       f"see {peers[0].log.parent.parent}")
                self._cond.wait(min(left, 1.0))

    def _send(self, peers: list[Peer], msg: dict) -> None:
        line = json.dumps(msg) + "\n"
        for p in peers:
            p.proc.stdin.write(line)
            p.proc.stdin.flush()

    def start(self, timeout: float = 180) -> None:
        first = self._spawn(0, [])
        maddrs = self._wait([first], "READY", timeout)[0]["maddrs"]
        rest = [self._spawn(i, maddrs) for i in range(1, self.n)]
        self._wait(rest, "READY", timeout)

    def step(self, n: int, numel: int, tag: str, options: dict, timeout: float, mem: MemorySampler,
             compute_s: list[list[float]] | None = None) -> dict:
        """One synchronization of the first ``n`` peers (the others stay idle in the DHT). With ``compute_s``
        (per peer, its compute time before each of several outer steps: the straggler scenario) every peer
        reports its wait per outer step instead."""
        peers = self.peers[:n]
        baseline = MemorySampler.used()
        mem.reset()
        msg = {"op": "prepare", "numel": numel, "n": n, "tag": tag, "codec": self.codec, **options}
        if compute_s is None:
            self._send(peers, msg)
        else:
            for p, times in zip(peers, compute_s):
                self._send([p], {**msg, "compute_s": times})
        self._wait(peers, "PREPARED", timeout)
        t0 = time.time() + 1.0 + 0.05 * n
        self._send(peers, {"op": "go", "t0": t0})
        _sleep_until(t0)
        busy0, total0 = machine_cpu_ticks()
        done = self._wait(peers, "DONE", timeout)
        busy1, total1 = machine_cpu_ticks()
        peak = mem.peak
        self._wait(peers, "CLEAN", timeout)
        return {"numel": numel, "seconds": max(d["finished"] for d in done) - t0, "late_start_s": max(d["started"] for d in done) - t0,
                "peers": done, "mem_delta": peak - baseline,
                "machine_busy": (busy1 - busy0) / max(1, total1 - total0)}

    def stop(self) -> None:
        for p in self.peers:
            try:
                p.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                p.proc.stdin.close()
            except (BrokenPipeError, ValueError, OSError):
                pass
        deadline = time.monotonic() + 20
        for p in self.peers:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL every process of every peer (its own session: python, DHT/averager children, p2pd)."""
        for p in self.peers:
            for sig in (signal.SIGKILL,):
                try:
                    os.killpg(p.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                p.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.peers.clear()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Row:
    n: int
    numel: int
    network: str
    results: dict = field(default_factory=dict)  # method -> summary dict or {"skipped": why}


def summarize(method: str, step: dict, n: int) -> dict:
    peers = step["peers"]
    out = {"seconds": step["seconds"], "mem_delta": step["mem_delta"], "late_start_s": step["late_start_s"]}
    errors = [p["error"] for p in peers if p.get("error")]
    out["peak_rss"] = max(p["peak_rss"] for p in peers)
    out["cpu_s"] = sum(p["cpu_s"] for p in peers) / n  # mean CPU seconds per peer's process tree
    out["machine_busy"] = step["machine_busy"]
    late = step["late_start_s"]
    if method in ALLREDUCE_CODECS:
        # bytes each peer sends in hivemind's butterfly all-reduce: (N-1)/N of the tensor to scatter the parts,
        # as much again to gather the averaged parts (computed; hivemind counts no bytes)
        out["sent_mib_per_peer"] = 2 * (n - 1) / n * step["numel"] * ALLREDUCE_BYTES_PER_ELEMENT[method] / MIB
        expected = sum(p["initial_sum"] for p in peers) / n
        # fp32 must give the mean's sum to rounding; a lossy codec only a full group (its error on a sum of
        # millions of values says nothing about the average's quality)
        tol = 1e-3 * (abs(expected) + 1e3) if method == "allreduce" else float("inf")
        ok = [p for p in peers if p["group"] == n and abs(p["final_sum"] - expected) <= tol]
        out["ok"] = len(ok)
        out["note"] = f"{len(ok)}/{n} averaged"
        if len(ok) < n:
            groups = sorted(p["group"] for p in peers)
            spread = sum(abs(p["initial_sum"] - expected) for p in peers) / n
            worst = max(abs(p["final_sum"] - expected) for p in peers)
            out["note"] += (f" (group sizes seen {groups}; worst peer's sum is off the mean by {worst / spread:.2f}x "
                            "the spread of the initial sums)") + (f"; {errors[0][:200]}" if errors else "")
    else:
        results = [p["result"] for p in peers]
        out["paired"] = results.count("paired")
        out["ok"] = sum(r in ("paired", "solo") for r in results)
        counts = {r: results.count(r) for r in sorted(set(results))}
        out["note"] = ", ".join(f"{k} {v}" for k, v in counts.items()) + (f"; {errors[0][:200]}" if errors else "")
        out["compute_s"] = max(p["compute_s"] for p in peers)
        out["exchange_s"] = max(p["exchange_s"] for p in peers)
        out["sent_mib_per_peer"] = sum(p["sent_bytes"] for p in peers) / n / MIB
        out["pair_wait_s"] = sum(p["partner_wait_s"] for p in peers) / n  # mean per peer (bench/sync_model.py)
        out["exchange_s_mean"] = sum(p["exchange_s"] for p in peers) / n
        out["warm_s"] = max(p.get("warm_s", 0.0) for p in peers)
        out["note"] += (f"; max per peer: pair wait {max(p['partner_wait_s'] for p in peers):.2f} s, exchange "
                        f"{max(p['exchange_s'] for p in peers):.2f} s, compute lane {max(p['compute_s'] for p in peers):.2f} s"
                        f"; {out['sent_mib_per_peer']:.1f} MiB sent/peer; kernel warm-up (compile) before t0 "
                        f"{out['warm_s']:.1f} s")
    if late > 0.5:
        out["note"] += f"; last peer started {late:.1f} s late (busy CPU)"
    return out


def fits_in_memory(method: str, n: int, numel: int) -> tuple[bool, float]:
    """Whether n peers' step allocations fit in what is available now (idle peers are already counted)."""
    need = n * (STEP_BYTES_PER_PEER + STEP_BYTES_PER_PARAM[method] * numel)
    return need < 0.9 * MemorySampler.available(), need / GIB


def straggler_compute(n: int, steps: int, base_s: float, sigma: float, slow: float) -> list[list[float]]:
    """Per replica, its compute time before each outer step: base * lognormal(0, sigma), replica 0 ``slow`` times
    slower. Drawn from a seed per N, so every method sees the same times."""
    rng = random.Random(1000 + n)
    return [[base_s * rng.lognormvariate(0.0, sigma) * (slow if i == 0 else 1.0) for _ in range(steps)]
            for i in range(n)]


def run_straggler(name: str, method: str, group: PeerGroup, args, mem: MemorySampler, stragglers: dict) -> None:
    """The straggler scenario for one method: every N in --straggler-replicas, --straggler-steps outer steps."""
    for n in args.straggler_replicas:
        compute = straggler_compute(n, args.straggler_steps, args.straggler_base_s, 0.5, 4.0)
        label = f"[{name} {method} straggler N={n} {size_label(args.straggler_size)}]"
        opts = step_options(method, args)
        step = group.step(n, args.straggler_size, f"st{n}", opts, args.peer_timeout, mem, compute_s=compute)
        waits = [[w[0] for w in p["waits"]] for p in step["peers"]]  # [replica][outer step] seconds
        detail = [[w[1] for w in p["waits"]] for p in step["peers"]]  # group size, or NoLoCo's result
        # NoLoCo: the compute-lane seconds of each outer step (encode, update): all the daemon's training loses,
        # as it runs the rest of the step (pairing, exchange) beside its inner steps (run_at_boundaries)
        lane_s = [[w[3] for w in p["waits"]] for p in step["peers"]] if method == "noloco" else None
        stragglers[n, method] = {"waits": waits, "detail": detail, "compute": compute, "lane_s": lane_s}
        flat = [w for ws in waits for w in ws]
        print(f"{label} wait per replica per outer step: mean {sum(flat) / len(flat):.2f} s, max {max(flat):.2f} s; "
              f"the straggler's {sum(waits[0]) / len(waits[0]):.2f} s; {detail[0]}", flush=True)


def run_network(name: str, net: netns.ShapedNetwork | None, args, rows: list[Row], workdir: Path,
                mem: MemorySampler, cleanup_hooks: list, stragglers: dict | None = None) -> None:
    """Per method: start max(N) peers once, then time every (N, size) with the first N of them."""
    n_max = max(args.replicas + (args.straggler_replicas if stragglers is not None else []))
    for method in args.methods:
        group = PeerGroup(method, n_max, net, workdir / name[0], args.codec)
        cleanup_hooks.append(group.kill)
        t, used = time.monotonic(), MemorySampler.used()
        print(f"[{name} {method}] starting {n_max} peers...", flush=True)
        try:
            group.start()
            print(f"[{name} {method}] peers ready in {time.monotonic() - t:.1f} s, idle they use "
                  f"~{(MemorySampler.used() - used) / GIB:.1f} GiB", flush=True)
            for numel in args.sizes:
                for n in args.replicas:
                    label = f"[{name} {method} N={n} {size_label(numel)}]"
                    row = _row(rows, n, numel, name)
                    fits, need = fits_in_memory(method, n, numel)
                    if not fits:
                        row.results[method] = {"skipped": f"needs ~{need:.0f} GiB"}
                        print(f"{label} skipped: would need ~{need:.1f} GiB of memory", flush=True)
                        continue
                    tag = f"{name[:2]}{n}x{numel}"
                    try:
                        step = group.step(n, numel, tag, step_options(method, args), args.peer_timeout, mem)
                    except (TimeoutError, RuntimeError) as e:
                        row.results[method] = {"skipped": "error"}
                        print(f"{label} FAILED: {e}", flush=True)
                        raise
                    s = row.results[method] = summarize(method, step, n)
                    print(f"{label} {s['seconds']:.2f} s ({s['note']}; CPU {s['cpu_s']:.2f} s/peer, machine "
                          f"{100 * s['machine_busy']:.0f}% busy; peak RSS/peer {s['peak_rss'] / GIB:.2f} GiB, "
                          f"machine +{s['mem_delta'] / GIB:.1f} GiB)", flush=True)
            if stragglers is not None and (method == "noloco" or method == args.straggler_allreduce):
                run_straggler(name, method, group, args, mem, stragglers)
        except (TimeoutError, RuntimeError) as e:
            print(f"[{name} {method}] FAILED: {e}", flush=True)
        finally:
            group.stop()
            cleanup_hooks.remove(group.kill)


def step_options(method: str, args) -> dict:
    if method in ALLREDUCE_CODECS:
        # generous matchmaking on a busy 2-core machine; a full group starts as soon as it is complete
        return {"matchmaking_s": args.matchmaking_s, "request_timeout_s": args.request_timeout_s,
                "timeout_s": args.peer_timeout}
    return {"averaging": {"pair_timeout_s": args.pair_timeout_s, "exchange_timeout_s": args.exchange_timeout_s}}


def _row(rows: list[Row], n: int, numel: int, network: str) -> Row:
    for r in rows:
        if (r.n, r.numel, r.network) == (n, numel, network):
            return r
    rows.append(Row(n, numel, network))
    return rows[-1]


def format_table(rows: list[Row], methods: list[str]) -> str:
    """One line per (N, size, network, method): its seconds, their ratio to NoLoCo's, bytes sent per peer."""
    head = ("| N | params | network | method | s | s / NoLoCo s | MiB sent per peer per outer step | CPU s/peer | "
            "machine busy | peak RSS/peer GiB | notes |")
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r.network != "loopback", r.numel, r.n)):
        nl = r.results.get("noloco", {})
        for method in methods:
            res = r.results.get(method, {})
            if not res:
                continue
            if "skipped" in res:
                lines.append(f"| {r.n} | {size_label(r.numel)} | {r.network} | {method} | skipped ({res['skipped']}) "
                             "| - | - | - | - | - | - |")
                continue
            bad = "" if res["ok"] == r.n else " !"
            ratio = f"{res['seconds'] / nl['seconds']:.2f}x" if "seconds" in nl else "-"
            sent = f"{res['sent_mib_per_peer']:.1f}" + (" (computed)" if method in ALLREDUCE_CODECS else "")
            note = f"paired {res['paired']}/{r.n}" if method == "noloco" else res["note"].split(" (")[0]
            lines.append(f"| {r.n} | {size_label(r.numel)} | {r.network} | {method} | {res['seconds']:.2f}{bad} | "
                         f"{ratio} | {sent} | {res['cpu_s']:.2f} | {100 * res['machine_busy']:.0f}% | "
                         f"{res['peak_rss'] / GIB:.2f} | {note} |")
    lines.append("(! = not every peer completed a correct step; see the progress lines above)")
    return "\n".join(lines)


def format_straggler(stragglers: dict, allreduce: str) -> str:
    """Wait per replica per outer step (from the end of its compute to the end of its outer step), by N."""
    lines = [("| N | method | mean wait per replica per outer step s | median s | the 4x straggler's s | "
              "mean wait / all-reduce's | NoLoCo: training blocked (compute lane) s | blocked / all-reduce's wait |"),
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({k[0] for k in stragglers}):
        base = stragglers.get((n, allreduce))
        base_mean = _mean([w for ws in base["waits"] for w in ws]) if base else None
        for method in (allreduce, "noloco"):
            got = stragglers.get((n, method))
            if not got:
                continue
            flat = sorted(w for ws in got["waits"] for w in ws)
            mean = _mean(flat)
            ratio = f"{mean / base_mean:.2f}" if base_mean else "-"
            lane = _mean([w for ws in got["lane_s"] for w in ws]) if got.get("lane_s") else None
            lane_cells = f"{lane:.2f} | {lane / base_mean:.3f}" if lane is not None and base_mean else "- | -"
            lines.append(f"| {n} | {method} | {mean:.2f} | {flat[len(flat) // 2]:.2f} | "
                         f"{_mean(got['waits'][0]):.2f} | {ratio} | {lane_cells} |")
    return "\n".join(lines)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10M,50M", help="comma-separated parameter counts (K/M suffixes)")
    parser.add_argument("--replicas", default="2,4,8,16", help="comma-separated replica counts N")
    parser.add_argument("--no-shaped", action="store_true", help="loopback only")
    parser.add_argument("--no-loopback", action="store_true", help="shaped network only")
    parser.add_argument("--quick", action="store_true", help="smoke test: --sizes 1M --replicas 2,4")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--codec", default=None, help="NoLoCo payload codec (default: default_run.toml's, int8-ef)")
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay (round trip: twice this)")
    parser.add_argument("--matchmaking-s", type=float, default=15.0, help="all-reduce min_matchmaking_time")
    parser.add_argument("--request-timeout-s", type=float, default=10.0, help="all-reduce matchmaking request_timeout")
    parser.add_argument("--pair-timeout-s", type=float, default=None, help="NoLoCo pair_timeout_s (default: default_run.toml's)")
    parser.add_argument("--exchange-timeout-s", type=float, default=None,
                        help="NoLoCo exchange_timeout_s (default: default_run.toml's)")
    parser.add_argument("--peer-timeout", type=float, default=420.0, help="seconds a step may take before giving up")
    parser.add_argument("--force-shaped", action="store_true", help="print shaped results even if the check fails")
    parser.add_argument("--straggler", action="store_true",
                        help="also the straggler scenario on loopback: compute times log-normal (sigma 0.5), replica 0 "
                             "4x slower, simulated by sleeping (peers idle, the network path real)")
    parser.add_argument("--straggler-replicas", default="4,8,16")
    parser.add_argument("--straggler-size", default="1M", help="parameters in the straggler scenario")
    parser.add_argument("--straggler-steps", type=int, default=3, help="outer steps per replica")
    parser.add_argument("--straggler-base-s", type=float, default=2.0, help="median compute time per outer step")
    parser.add_argument("--straggler-allreduce", default="allreduce", choices=list(ALLREDUCE_CODECS),
                        help="the all-reduce the straggler scenario compares against")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here (for bench/sync_model.py)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.replicas = "1M", "2,4"
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.replicas = [int(n) for n in args.replicas.split(",")]
    args.straggler_replicas = [int(n) for n in args.straggler_replicas.split(",")]
    args.straggler_size = parse_size(args.straggler_size)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or set(args.methods) - set(METHODS):
        parser.error(f"--methods: choose from {', '.join(METHODS)}")

    import torch  # only for the header line

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {MemorySampler.available() / GIB:.1f} GiB available, "
          f"torch {torch.__version__}, python {platform.python_version()}", flush=True)
    from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec

    spec = RunSpec.load(DEFAULT_SPEC_PATH)
    avg = spec.averaging
    print(f"sizes {[size_label(s) for s in args.sizes]}, replicas {args.replicas}; all-reduce: hivemind "
          f"DecentralizedAverager, NoCompression, min_matchmaking_time {args.matchmaking_s:g} s; NoLoCo: "
          f"swarmd.daemon.outer_service.NoLoCoService, codec {args.codec or spec.compression.averaging}, pair_timeout_s "
          f"{args.pair_timeout_s or avg.pair_timeout_s:g}, exchange_timeout_s "
          f"{args.exchange_timeout_s or avg.exchange_timeout_s:g}, chunk_elements {avg.chunk_elements}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="swb-avg-", dir="/tmp"))  # short: unix socket paths live under it
    cleanup_hooks: list = []
    nets: list[netns.ShapedNetwork] = []

    def cleanup() -> None:
        for hook in list(cleanup_hooks):  # noqa: PERF101  (hooks remove themselves)
            try:
                hook()
            except Exception as e:  # noqa: BLE001  (clean up as much as possible)
                print(f"cleanup: {e}", file=sys.stderr)
        cleanup_hooks.clear()
        for net in nets:
            net.teardown()
        nets.clear()
        shutil.rmtree(workdir, ignore_errors=True)

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mem = MemorySampler()
    rows: list[Row] = []
    stragglers: dict = {}
    verification: list[str] = []
    started = time.monotonic()
    try:
        if not args.no_loopback:
            run_network("loopback", None, args, rows, workdir, mem, cleanup_hooks,
                        stragglers if args.straggler else None)
        if not args.no_shaped:
            if os.geteuid() != 0:
                print("shaped network: skipped (needs root for network namespaces)", flush=True)
            else:
                verification = run_shaped(args, rows, workdir, mem, cleanup_hooks, nets)
    except (KeyboardInterrupt, SystemExit):
        print("interrupted; cleaning up", flush=True)
    finally:
        mem.close()
        cleanup()
    print()
    for line in verification:
        print(line)
    print(format_table(rows, args.methods))
    if stragglers:
        print(f"\nstraggler scenario, {size_label(args.straggler_size)} parameters, {args.straggler_steps} outer steps per "
              f"replica, compute median {args.straggler_base_s:g} s, log-normal sigma 0.5, replica 0 4x slower "
              "(sleeps: the peers are idle while 'computing'; the wait runs from the end of a replica's compute to the "
              "end of its outer step)")
        print(format_straggler(stragglers, args.straggler_allreduce))
    if args.json:
        args.json.write_text(json.dumps({
            "rows": [{"n": r.n, "numel": r.numel, "network": r.network, "results": r.results} for r in rows],
            "stragglers": [{"n": k[0], "method": k[1], **v} for k, v in stragglers.items()],
        }, indent=1))
    print(f"\ntotal time {time.monotonic() - started:.0f} s; leftover namespaces: {netns.leftover_namespaces() or 'none'}")


def run_shaped(args, rows, workdir, mem, cleanup_hooks, nets) -> list[str]:
    lines = [f"netem available: {netns.netem_available()} (delay injected by the NFQUEUE holder in bench/netns.py)"]
    print(lines[0], flush=True)
    net = netns.ShapedNetwork(max(args.replicas), args.rate_mbit, args.delay_ms)
    nets.append(net)
    print(f"[shaped] building {net.n} namespaces, {args.rate_mbit:g} Mbit/s per direction, "
          f"{2 * args.delay_ms:g} ms RTT...", flush=True)
    net.setup()
    problems = []
    for src, dst in ((0, 1), (1, 0)):
        m = netns.measure_link(net, src, dst)
        line = f"shaped link check, peer {src} -> peer {dst}: {netns.format_link(m)}"
        print(line, flush=True)
        lines.append(line)
        problems += netns.check_link(m, args.rate_mbit, args.delay_ms)
    if problems and not args.force_shaped:
        lines.append("shaped network is off by more than 20%, no shaped results: " + "; ".join(problems))
        print(lines[-1], flush=True)
        return lines
    before = len(rows)
    run_network("shaped", net, args, rows, workdir, mem, cleanup_hooks)
    net.teardown()
    stats = net.holder_stats or {}
    if stats:
        lines.append(f"delay holder: {stats['released']} packets held, lateness past the "
                     f"{args.delay_ms:g} ms: mean {stats['late_mean_ms']:.2f} ms, p99 <= {stats['late_p99_ms']:.1f} ms, "
                     f"max {stats['late_max_ms']:.1f} ms")
    if problems:
        lines.append(f"WARNING: shaped check failed ({'; '.join(problems)}), rows {before}.. printed anyway")
    return lines


def peer_entry() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("_peer")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--initial-peer", dest="initial_peers", action="append", default=[])
    peer_main(parser.parse_args())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_peer":
        peer_entry()
    else:
        main()
