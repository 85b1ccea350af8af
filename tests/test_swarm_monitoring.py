"""An operator's view of a live swarm (seed + 2 stages x 2 volunteers, real processes on 127.0.0.1): the seed's
swarm-wide gauges, its /healthz and /status.json, `swarmd status --json`, a volunteer's status page rendered by
headless Chromium, and the gauges losing a volunteer that stops (SIGTERM) or dies (SIGKILL) within the
heartbeat expiry. One swarm serves every test (they run in file order; the last one stops volunteers)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from swarm_harness import Swarm, swarm, wait_for, write_spec
from swarmd.daemon.node import NodeOptions

pytestmark = pytest.mark.slow

STAGES = 2
VOLUNTEERS = {"v0": ["--stage", "0"], "v1": ["--stage", "1", "--swarm-metrics"], "v2": ["--stage", "0"],
              "v3": ["--stage", "1"]}
HEARTBEAT_S = NodeOptions.heartbeat_s
# A dead peer's entry outlives its last heartbeat by at most its TTL (3 heartbeats); the seed sees that at its
# next refresh (one heartbeat later). The slack: our scrape polling and a loaded 2-core machine.
EXPIRY_S = 3 * HEARTBEAT_S + HEARTBEAT_S
SLACK_S = 4.0


def _peers(m: dict[str, float], stage: int) -> float | None:
    return m.get(f'swarmd_swarm_peers{{stage="{stage}"}}')


def _whole(m: dict[str, float], nodes: int, per_stage: tuple[int, ...]) -> bool:
    return m.get("swarmd_swarm_nodes") == nodes and all(_peers(m, s) == n for s, n in enumerate(per_stage))


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return reply.status, reply.headers["Content-Type"], reply.read()


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Swarm]:
    """The swarm, once every volunteer trains and the seed's gauges show all four with a loss on each stage."""
    root = tmp_path_factory.mktemp("monitoring")
    sockets = tempfile.mkdtemp(prefix="swarmd-", dir="/tmp")  # short unix socket paths (see conftest.swarm_env)
    env = {**os.environ, "TMPDIR": sockets, "HIVEMIND_LOGLEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}
    try:
        with swarm(root, env) as s:
            s.start_seed(write_spec(root / "run.toml"), "--no-train")
            s.join_all(VOLUNTEERS)

            def trained() -> bool:
                m = s.metrics("seed")
                return _whole(m, 4, (2, 2)) and all(
                    math.isfinite(m.get(f'swarmd_swarm_loss{{stage="{i}"}}', math.nan)) for i in range(STAGES))

            wait_for(trained, 90, "the seed's gauges to show 2 x 2 training volunteers")
            yield s
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def test_seed_exports_the_whole_swarm(live: Swarm) -> None:
    s = live
    m = s.metrics("seed")
    for stage in map(str, range(STAGES)):
        assert m[f'swarmd_swarm_throughput_samples_per_second{{stage="{stage}"}}'] > 0
        low, high = m[f'swarmd_swarm_inner_step_min{{stage="{stage}"}}'], m[f'swarmd_swarm_inner_step_max{{stage="{stage}"}}']
        assert 0 <= low <= high
        assert 0 < m[f'swarmd_swarm_loss{{stage="{stage}"}}'] < 10
        for result in ("paired", "solo", "rejected", "failed"):  # outer = "none": every series exists, at 0
            assert m[f'swarmd_swarm_outer_steps{{result="{result}",stage="{stage}"}}'] == 0
    assert m["swarmd_swarm_joins_total"] >= 4  # the seed started first: it saw each volunteer appear
    labels = {name for key in m if key.startswith("swarmd_swarm_") for name in re.findall(r'(\w+)="', key)}
    assert labels == {"stage", "result"}  # no per-peer labels
    # --swarm-metrics on a volunteer: the same view; without it a volunteer exports none of it
    wait_for(lambda: _whole(s.metrics("v1"), 4, (2, 2)), 30, "v1's swarm-wide gauges (--swarm-metrics)")
    assert "swarmd_swarm_nodes" not in s.metrics("v0")
    if promtool := shutil.which("promtool"):  # the new families parse as Prometheus' own parser reads them
        check = subprocess.run([promtool, "check", "metrics"], input=s.metrics_text("seed"), capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr

    port = s.ready["seed"]["metrics_port"]
    assert _get(port, "/healthz")[::2] == (200, b"ok\n")
    status, content_type, body = _get(port, "/status.json")
    doc = json.loads(body)
    assert status == 200 and content_type == "application/json"
    assert doc["run_id"] == "test" and doc["nodes"] == 4
    assert doc["node"]["role"] == "seed" and doc["node"]["stage"] is None and doc["history"] == []
    assert [(row["stage"], row["peers"]) for row in doc["stages"]] == [(0, 2), (1, 2)]
    assert all(row["loss"] is not None and row["inner_step_min"] <= row["inner_step_max"] for row in doc["stages"])

    # an operator without a metrics port: the same document from the DHT, no node and no history
    reader = subprocess.run([sys.executable, "-m", "swarmd.daemon.cli", "status", "--json", s.seed_addr],
                            env=s.env, capture_output=True, text=True, timeout=120)
    assert reader.returncode == 0, reader.stderr
    printed = json.loads(reader.stdout)
    assert printed.keys() == doc.keys() and printed["node"] is None and printed["history"] == []
    assert [(row["stage"], row["peers"]) for row in printed["stages"]] == [(0, 2), (1, 2)]
    assert printed["stages"][0].keys() == doc["stages"][0].keys()


def test_status_page_renders_in_headless_chromium(live: Swarm, tmp_path: Path) -> None:
    """A driver's page: the stage table from the records and its own loss curve, drawn by the page's script."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (apt-get install chromium)")
        pytest.skip("chromium not installed")
    port = live.ready["v0"]["metrics_port"]

    def history() -> bool:
        points = json.loads(_get(port, "/status.json")[2])["history"]
        return sum(p["loss"] is not None for p in points) >= 3

    wait_for(history, 60, "three points of v0's loss history (one per progress line)")
    url = f"http://127.0.0.1:{port}/"
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900", "--hide-scrollbars",
               "--virtual-time-budget=5000"]
    screenshot = tmp_path / "status-page.png"
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=90, env=live.env)
    shot = subprocess.run([*browser, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=90,
                          env=live.env)
    assert dom.returncode == 0 and shot.returncode == 0, dom.stderr[-2000:] + shot.stderr[-2000:]
    html = dom.stdout
    assert html.count('class="stage-row"') == STAGES, html  # the table, rebuilt by the script from /status.json
    assert 'data-series="loss"' in html and 'data-series="samples_per_s"' in html  # both curves drawn
    assert re.search(r'<path d="M[^"]* L[^"]*" class="line s0" data-series="loss"', html)  # a line, not a dot
    assert '<span class="run" id="run">test</span>' in html and '<span id="conn" class="">updated ' in html
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _count(s: Swarm, name: str) -> float:
    return s.metrics("seed").get(name, 0.0)


def test_stopped_volunteers_leave_the_seeds_gauges(live: Swarm) -> None:
    """SIGTERM (a clean leave: a withdrawal) and SIGKILL of the node and its p2pd (a dead machine: its entry
    expires): each time the seed's gauges show one peer fewer within the heartbeat expiry."""
    s = live
    leaves = _count(s, "swarmd_swarm_leaves_total")
    cases = (("v3", signal.SIGTERM, (2, 1)), ("v2", signal.SIGKILL, (1, 1)))
    for victim, sig, per_stage in cases:
        process = s.child(victim).process
        start = time.monotonic()
        if sig == signal.SIGKILL:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.send_signal(sig)
        wait_for(lambda left=per_stage: _whole(s.metrics("seed"), sum(left), left), EXPIRY_S + SLACK_S,
                 f"the seed's gauges to drop {victim} ({sig.name})", poll=0.25)
        took = time.monotonic() - start
        print(f"{victim} ({sig.name}) left the seed's gauges after {took:.1f} s (expiry bound {EXPIRY_S:.0f} s)")
        leaves += 1
        assert _count(s, "swarmd_swarm_leaves_total") >= leaves
        process.wait(timeout=30)
    assert s.child("v3").process.returncode == 0, s.output("v3")  # a clean stop
    doc = json.loads(_get(s.ready["seed"]["metrics_port"], "/status.json")[2])
    assert doc["nodes"] == 2 and [row["peers"] for row in doc["stages"]] == [1, 1]
