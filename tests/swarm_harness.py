"""Start real swarmd nodes as separate processes on 127.0.0.1, read their metrics, tear them down.

Built on the demo launcher's own process helpers, so the tests start nodes exactly as users do.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from swarmd.daemon.demo import SUMMARY_RE, Child, read_metrics, start_child, stop_children, wait_ready  # noqa: F401 (tests import SUMMARY_RE from here)

LOCAL = ["--host", "127.0.0.1", "--no-nat-traversal", "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--progress-every", "2"]


def write_spec(path: Path, *, deadline_s: float = 60.0, hop_timeout_s: float = 10.0, stages: int = 2,
               microbatches_per_step: int = 1, outer: str = "none", inner_steps: int = 50,
               pair_timeout_s: float = 5.0, exchange_timeout_s: float = 20.0, chunk_elements: int = 1 << 20,
               eval_every_steps: int = 100, checkpoint_every: int = 5, balancing: bool = False,
               min_dwell_s: float = 60.0, check_every_s: float = 30.0) -> Path:
    """A small run spec for tests (the demo's model, tighter timings where a test needs them). Rebalancing is
    off unless asked for: most tests place their volunteers and expect them to stay."""
    path.write_text(f"""
[run]
id = "test"
seed = 0
outer = "{outer}"
[averaging]
inner_steps = {inner_steps}
pair_timeout_s = {pair_timeout_s}
exchange_timeout_s = {exchange_timeout_s}
chunk_elements = {chunk_elements}
[model]
dim = 64
n_layers = 2
n_heads = 2
max_seq_len = 64
[pipeline]
stages = {stages}
microbatch_size = 8
seq_len = 32
max_inflight = 4
hop_timeout_s = {hop_timeout_s}
microbatch_deadline_s = {deadline_s}
[optimizer]
lr = 0.003
microbatches_per_step = {microbatches_per_step}
[evaluation]
every_steps = {eval_every_steps}
batches = 4
[checkpoint]
every_outer_steps = {checkpoint_every}
[balancing]
enabled = {str(balancing).lower()}
min_dwell_s = {min_dwell_s}
check_every_s = {check_every_s}
""")
    return path


class Swarm:
    """A seed plus volunteers; every process is stopped on exit, whatever happened."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.children: list[Child] = []
        self.ready: dict[str, dict] = {}
        self.seed_addr = ""

    def start_seed(self, spec: Path, *extra: str) -> Child:
        child = self._start("seed", ["seed", str(spec), *LOCAL, *extra])
        self.seed_addr = self.ready["seed"]["maddrs"][0]
        return child

    def join_all(self, volunteers: dict[str, list[str]], launchers: dict[str, tuple[str, ...]] | None = None) -> None:
        """Start volunteers together (as a crowd joining at once would), then wait until each serves.

        ``launchers`` maps a volunteer to a script that runs swarmd with a fault (tests/adversary_node.py)."""
        launchers = launchers or {}
        started = [self._start(name, ["join", self.seed_addr, *LOCAL, "--threads", "1", *extra], wait=False,
                               launcher=launchers.get(name, ()))
                   for name, extra in volunteers.items()]
        for child in started:
            self.ready[child.name] = wait_ready(child, 90)

    def join(self, name: str, *extra: str, wait: bool = True) -> Child:
        """Start one volunteer (again, if ``name`` ran before: with its old node directory)."""
        return self._start(name, ["join", self.seed_addr, *LOCAL, "--threads", "1", *extra], wait=wait)

    def _start(self, name: str, args: list[str], wait: bool = True, launcher: tuple[str, ...] = ()) -> Child:
        (self.root / name / "ready.json").unlink(missing_ok=True)  # a restart: its last run's file is stale
        child = start_child(name, args, self.root / name, self.env, launcher=launcher)
        self.children.append(child)
        if wait:
            self.ready[name] = wait_ready(child, 90)
        return child

    def child(self, name: str) -> Child:
        """The latest process started under ``name``."""
        return next(c for c in reversed(self.children) if c.name == name)

    def metrics(self, name: str) -> dict[str, float]:
        """Scrape a node's /metrics into {'name{label="v"}': value}."""
        return read_metrics(self.ready[name]["metrics_port"])

    def metrics_text(self, name: str) -> str:
        port = self.ready[name]["metrics_port"]
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    def output(self, name: str) -> str:
        return "\n".join(self.child(name).lines)


@contextlib.contextmanager
def swarm(root: Path, env: dict[str, str]) -> Iterator[Swarm]:
    s = Swarm(root, env)
    try:
        yield s
    finally:
        stop_children(s.children)


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    """Poll ``condition`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if result := condition():
            return result
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
