"""``swarmd demo``: a real local swarm, a seed plus volunteers as separate processes on 127.0.0.1.

Each node is a full ``swarmd`` process with its own p2pd; they find each other through the DHT
exactly as remote volunteers would. The launcher prefixes and relays their progress lines, stops
everything at the end (or on Ctrl-C), and prints how the loss moved.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from swarmd.daemon.heldout import checkpoint_heldout_loss, initial_heldout_loss, validation_set
from swarmd.daemon.spec import RunSpec

STAGE_RE = re.compile(r"\[stage (\d+)/\d+\] step")
SUMMARY_RE = re.compile(r"summary: stage (\d+) inner steps (\d+) samples (\d+) loss first ([0-9.]+) last ([0-9.]+)")


@dataclass
class Child:
    """One node process and what the launcher learned from its output."""

    name: str
    process: subprocess.Popen
    node_dir: Path
    stage: int | None = None
    summary: tuple[float, float] | None = None  # (first loss, mean of the last losses) printed at stop
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=2000))


def _relay(child: Child) -> None:
    assert child.process.stdout is not None
    for line in child.process.stdout:
        line = line.rstrip()
        child.lines.append(line)
        if summary := SUMMARY_RE.search(line):
            child.summary = (float(summary.group(4)), float(summary.group(5)))
        if match := STAGE_RE.search(line):
            child.stage = int(match.group(1))
        print(f"[{child.name}] {line}", flush=True)


def read_metrics(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """Scrape a node's /metrics into {'name{label="v"}': value} (labels sorted)."""
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def node_command(*args: str, launcher: tuple[str, ...] = ()) -> list[str]:
    """How the launcher starts a node: this Python, this swarmd (or ``launcher``, a script taking swarmd's args)."""
    return [sys.executable, *(launcher or ("-m", "swarmd.daemon.cli")), *args]


def start_child(
    name: str, args: list[str], node_dir: Path, env: dict[str, str], launcher: tuple[str, ...] = ()
) -> Child:
    process = subprocess.Popen(
        node_command(*args, "--node-dir", str(node_dir), launcher=launcher),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, start_new_session=True,  # a Ctrl-C reaches the launcher, which stops children cleanly
    )
    child = Child(name, process, node_dir)
    threading.Thread(target=_relay, args=(child,), daemon=True).start()
    return child


def wait_ready(child: Child, timeout: float) -> dict:
    """Wait for the node's ready.json (written once it serves); raise if it died or timed out."""
    path = child.node_dir / "ready.json"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return json.loads(path.read_text())
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with code {child.process.returncode} before it was ready")
        time.sleep(0.1)
    raise TimeoutError(f"{child.name} was not ready after {timeout:.0f} s")


def stop_children(children: list[Child], timeout: float = 30.0) -> None:
    """SIGTERM every child, wait, then SIGKILL whatever is left (and its process group: p2pd). A node's clean
    stop can take a drain, a last outer step and a checkpoint: ``timeout`` leaves room for them."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    end = time.monotonic() + timeout
    for child in children:
        try:
            child.process.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for child in children:
        try:
            os.killpg(child.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        child.process.wait()


def wait_all_steps(children: list[Child], ports: list[int], steps: int, timeout: float) -> None:
    """Wait until every node's swarmd_inner_steps_total reached ``steps``. Stopping nodes one by one as
    each gets there would strand the others (a driver with no next-stage peer left), so the launcher
    watches them all and stops them together."""
    end = time.monotonic() + timeout
    while True:
        for child in children:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name.strip()} exited with code {child.process.returncode}")
        if all(read_metrics(port)["swarmd_inner_steps_total"] >= steps for port in ports):
            return
        if time.monotonic() > end:
            raise TimeoutError(f"not every node reached {steps} inner steps in {timeout:.0f} s")
        time.sleep(0.5)


def run_demo(args: argparse.Namespace) -> int:
    """Start the local swarm, relay its progress, stop it when every volunteer reached ``--steps``."""
    spec = RunSpec.load(args.spec)
    stages = spec.pipeline.stages
    with tempfile.TemporaryDirectory(prefix="swarmd-demo-") as tmp:
        root = args.dir or Path(tmp)
        # hivemind leaves unix sockets in the temp folder: give the swarm its own
        env = {**os.environ, "TMPDIR": str(root), "HIVEMIND_LOGLEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}
        (root / "sockets").mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(root / "sockets")
        common = ["--host", "127.0.0.1", "--no-nat-traversal", "--metrics-host", "127.0.0.1", "--metrics-port", "0"]
        children: list[Child] = []
        started = time.monotonic()
        try:
            print(f"swarmd demo: seed + {args.volunteers} volunteers on 127.0.0.1, run {spec.run_id!r}, "
                  f"{stages} stages, {args.steps} inner steps each; files in {root}", flush=True)
            heldout = validation_set(spec)
            windows = sum(len(targets) for _, targets in heldout)
            start_loss = initial_heldout_loss(spec, heldout)
            print(f"[demo] held-out loss at start: {start_loss:.4f} ({windows} validation windows)", flush=True)
            seed = start_child("seed", ["seed", str(args.spec), "--no-train", *common], root / "seed", env)
            children.append(seed)
            seed_info = wait_ready(seed, 60)
            seed_addr = seed_info["maddrs"][0]
            for i in range(args.volunteers):
                # the demo pins the layout (stage i mod S) so every run is the same 2 x 2 swarm;
                # a real `swarmd join` picks the stage with the least throughput itself
                children.append(start_child(
                    f"v{i} ", ["join", seed_addr, *common, "--stage", str(i % stages), "--threads",
                               str(args.threads)], root / f"v{i}", env,
                ))
            volunteers = children[1:]
            ports = []
            for volunteer in volunteers:
                info = wait_ready(volunteer, 90)
                ports.append(info["metrics_port"])
                print(f"[demo] {volunteer.name.strip()} serves stage {info['stage']}, "
                      f"metrics on http://127.0.0.1:{info['metrics_port']}/metrics", flush=True)
            wait_all_steps(children, ports, args.steps, args.timeout - (time.monotonic() - started))
            print(f"[demo] every volunteer took {args.steps} inner steps; stopping the swarm", flush=True)
        except KeyboardInterrupt:
            print("[demo] interrupted", flush=True)
            return 130
        except (RuntimeError, TimeoutError) as e:
            print(f"[demo] failed: {e}", flush=True)
            return 1
        finally:
            stop_children(children)
        failed = [v.name.strip() for v in volunteers if v.process.returncode != 0]
        elapsed = time.monotonic() - started
        print(f"[demo] done in {elapsed:.0f} s", flush=True)
        time.sleep(0.2)  # let the relay threads print the nodes' last lines
        for v in volunteers:
            if v.summary is not None and v.stage == stages - 1:
                first, last = v.summary
                print(f"[demo] {v.name.strip()} (stage {v.stage}): loss {first:.3f} at its first microbatch, "
                      f"{last:.3f} over its last ten", flush=True)
        if failed:
            print(f"[demo] volunteers that failed: {', '.join(failed)}", flush=True)
            return 1
        try:
            end_loss = checkpoint_heldout_loss(spec, [v.node_dir / "checkpoint.pt" for v in volunteers], heldout)
        except ValueError as e:
            print(f"[demo] no held-out loss at end: {e}", flush=True)
            return 1
        print(f"[demo] held-out loss at end: {end_loss:.4f} (was {start_loss:.4f} at start; mean over the "
              f"pipelines the volunteers' final weights form)", flush=True)
        return 0
