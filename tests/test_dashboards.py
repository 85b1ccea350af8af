"""deploy/grafana/: the committed dashboards are what deploy/dashboards.py generates, are Grafana dashboard JSON,
use only catalog names; and, against a real Prometheus scraping a live swarm, every panel query returns data.

Also the node metrics the panels need: the host collector (process RSS and CPU, GPUs through NVML) and the
inner-step timing."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from grafana_foundation_sdk.models.dashboard import Dashboard
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from swarm_harness import swarm, wait_for, write_spec
from swarmd.daemon.host_metrics import HostCollector, read_proc_stat
from swarmd.daemon.metrics import NodeMetrics, SwarmMetrics
from swarmd.daemon.pipeline import PipelineService

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROMETHEUS = DEPLOY / "prometheus"
METRIC_NAME = re.compile(r"\b(swarmd_[a-z0-9_]+|up)\b")
PROMETHEUS_BUILTINS = {"up"}  # set by Prometheus for every target, not by a node
# Panels that stay empty on a machine without NVML (pynvml missing or no GPU): the host collector leaves the
# GPU series out rather than exporting zeros.
EMPTY_WITHOUT_NVML = {"GPU memory", "GPU utilization"}


def generator() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("swarmd_dashboards", DEPLOY / "dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, expr) of every panel target."""
    return [(d["title"], panel["title"], target["expr"])
            for d in dashboards().values() for panel in d["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def names_used_in_deploy() -> set[str]:
    text = "".join(p.read_text() for p in DASHBOARDS.glob("*.json"))
    text += "".join(rule["expr"] for rule in alert_rules())
    # Grafana's own syntax ($__rate_interval, label_values(...)) holds no metric names beyond swarmd_stage
    return set(METRIC_NAME.findall(text))


def exported_names(family: Metric) -> set[str]:
    """The sample names a family exports (also when it has no samples yet, e.g. a labelled gauge never set)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "info": ("_info",)}.get(family.type, ("",))
    return {family.name + suffix for suffix in suffixes} | {s.name for s in family.samples}


def catalog() -> set[str]:
    """Every sample name a node can export: NodeMetrics, the seed's SwarmMetrics, the host collector."""
    metrics = NodeMetrics()
    SwarmMetrics(metrics.registry, 2)
    names = {name for family in metrics.registry.collect() for name in exported_names(family)}
    return names | {name for family in metrics.host.describe() for name in exported_names(family)}


# ---- the committed files -----------------------------------------------------------------------------------


def test_committed_dashboards_are_what_the_generator_writes() -> None:
    rendered = generator().render()
    assert sorted(rendered) == sorted(p.name for p in DASHBOARDS.glob("*.json"))
    for name, text in rendered.items():
        assert (DASHBOARDS / name).read_text() == text, f"{name} is stale: run python deploy/dashboards.py"


def test_dashboards_are_grafana_dashboards() -> None:
    """Each file parses back into the SDK's Dashboard model unchanged; panels have ids, positions, queries."""
    uids = set()
    for name, raw in dashboards().items():
        model = Dashboard.from_json(raw)
        assert json.loads(json.dumps(model.to_json(), default=lambda o: o.to_json())) == raw, name
        assert raw["uid"] not in uids
        uids.add(raw["uid"])
        ids = [panel["id"] for panel in raw["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in raw["panels"]:
            assert panel["type"] in ("timeseries", "stat") and panel["title"] and panel["targets"], panel
            assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}
            assert 0 <= panel["gridPos"]["x"] < 24 and panel["gridPos"]["w"] > 0
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(set(ref_ids)) == len(ref_ids) and all(ref_ids)
            assert all(t["expr"] and t["datasource"]["uid"] == "prometheus" for t in panel["targets"])
    assert len(uids) == 7


def test_every_panel_query_parses_with_promtool(tmp_path: Path) -> None:
    """Without a server: each panel's query, as Grafana would send it, wrapped in a recording rule that
    ``promtool check rules`` parses (the live test below also runs them)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (apt-get install prometheus)")
        pytest.skip("promtool not installed")
    queries = panel_queries()
    rules = [{"record": f"swarmd:panel_{i}", "expr": grafana_to_promql(expr)} for i, (_, _, expr) in enumerate(queries)]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and f"SUCCESS: {len(queries)} rules found" in result.stdout, result.stdout + result.stderr


def test_provisioning_points_at_the_dashboards_and_the_datasource_they_use() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert (source["uid"], source["type"], source["url"]) == ("prometheus", "prometheus", "http://prometheus:9090")
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "swarmd.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_every_metric_name_in_deploy_is_in_the_catalog() -> None:
    used = names_used_in_deploy()
    assert {"swarmd_inner_step_duration_seconds_bucket", "swarmd_swarm_nodes", "up"} <= used
    assert used - catalog() - PROMETHEUS_BUILTINS == set()


# ---- the node metrics the panels need ----------------------------------------------------------------------


def samples(registry: CollectorRegistry) -> dict[str, float]:
    return {f"{s.name}{sorted(s.labels.items())}": s.value for family in registry.collect() for s in family.samples}


def test_host_collector_reads_the_node_and_its_p2pd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: no GPU series
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        wait_for(lambda: (read_proc_stat(child.pid) or (0,))[0] > 64 << 20, 10, "the stand-in p2pd's memory")
        registry = CollectorRegistry()
        registry.register(HostCollector(p2pd_pid=child.pid))
        got = samples(registry)
        assert got["swarmd_process_resident_memory_bytes[('process', 'p2pd')]"] > 64 << 20
        assert got["swarmd_process_resident_memory_bytes[('process', 'node')]"] > 0
        assert got["swarmd_process_cpu_seconds_total[('process', 'node')]"] > 0
        assert not any("gpu" in key for key in got)
    finally:
        child.kill()
        child.wait()
    gone = samples(registry)  # a p2pd that exited: its series go, the node's stay
    assert not any("p2pd" in key for key in gone) and any("node" in key for key in gone)


def test_host_collector_reads_gpus_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML answers as pynvml does on a machine with two GPUs (a fake module: no GPU here)."""

    class NVMLError(Exception):
        pass

    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) << 30, total=80 << 30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=50 * h),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    registry = CollectorRegistry()
    registry.register(HostCollector(p2pd_pid=None))
    got = samples(registry)
    assert got["swarmd_gpu_memory_used_bytes[('gpu', '1')]"] == 2 << 30
    assert got["swarmd_gpu_memory_total_bytes[('gpu', '0')]"] == 80 << 30
    assert got["swarmd_gpu_utilization_ratio[('gpu', '1')]"] == 0.5
    assert not any("p2pd" in key for key in got)
    monkeypatch.setattr(fake, "nvmlInit", lambda: (_ for _ in ()).throw(NVMLError("no driver")))
    assert not any("gpu" in key for key in samples(_registry_with(HostCollector())))


def _registry_with(collector: HostCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def test_inner_step_time_is_observed_between_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = NodeMetrics()
    service = types.SimpleNamespace(metrics=metrics, _last_step_at=None)
    clock = iter([100.0, 100.5, 102.5])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    PipelineService._time_steps(service, 1)  # the first step in a stage: nothing to measure from
    assert metrics.registry.get_sample_value("swarmd_inner_step_duration_seconds_count") == 0
    assert metrics.registry.get_sample_value("swarmd_last_inner_step_timestamp_seconds") > 1e9
    PipelineService._time_steps(service, 1)
    PipelineService._time_steps(service, 2)  # two steps landed at once: 2 s between them, 1 s each
    get = metrics.registry.get_sample_value
    assert get("swarmd_inner_step_duration_seconds_count") == 3
    assert get("swarmd_inner_step_duration_seconds_sum") == pytest.approx(2.5)
    assert get("swarmd_inner_step_duration_seconds_bucket", {"le": "0.5"}) == 1


# ---- a real Prometheus scraping a live swarm ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_config(targets: list[str]) -> dict:
    """deploy/prometheus/prometheus.yml with the same rules, static targets and a 2 s scrape."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="2s", evaluation_interval="2s")
    config["rule_files"] = [str(PROMETHEUS / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    del job["file_sd_configs"]
    job["static_configs"] = [{"targets": targets, "labels": {"run": "test"}}]
    return config


def instant_query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(urllib.request.urlopen(url, timeout=10).read())
    except urllib.error.HTTPError as e:  # a bad query: 400 with Prometheus' error
        return json.loads(e.read())


def scraped(base: str) -> int:
    """How many targets Prometheus scraped successfully (0 while it starts)."""
    try:
        result = instant_query(base, 'sum(up{job="swarmd"})')["data"]["result"]
    except (urllib.error.URLError, ConnectionError):
        return 0
    return int(float(result[0]["value"][1])) if result else 0


def outer_steps(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("swarmd_outer_steps_total"))


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "30s").replace("$instance", ".*")


@pytest.mark.slow
def test_panels_and_alerts_against_a_real_prometheus(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """A seed plus 2x2 volunteers (NoLoCo, so averaging has data), scraped for 40 s or more by Prometheus with
    deploy/'s config and rules; then every panel query returns data and every alert expression evaluates."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is required in CI (apt-get install prometheus)")
        pytest.skip("prometheus not installed")
    spec = write_spec(tmp_path / "run.toml", outer="noloco", inner_steps=10, chunk_elements=16384)
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--no-train")
        names = ["seed", *(f"v{i}" for i in range(4))]
        s.join_all({name: ["--stage", str(i % 2)] for i, name in enumerate(names[1:])})
        ports = {name: s.ready[name]["metrics_port"] for name in names}
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config([f"127.0.0.1:{p}" for p in ports.values()])))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with open(tmp_path / "prometheus.log", "w") as log:
            server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
        try:
            started = time.monotonic()
            wait_for(lambda: scraped(base) == len(names), 30, "Prometheus to scrape every node")
            # 40 s of scrapes (20 at 2 s), in which the replicas train and take outer steps; then 10 s more
            # after every volunteer's first outer step, so that its series has samples to take a rate of
            wait_for(lambda: all(outer_steps(s.metrics(n)) > 0 for n in names[1:]), 90,
                     "every volunteer's first outer step")
            time.sleep(max(10.0, 40 - (time.monotonic() - started)))
            texts = {name: s.metrics_text(name) for name in names}
            for name in names:  # the node found its p2pd; the volunteers timed their inner steps
                assert 'swarmd_process_resident_memory_bytes{process="p2pd"}' in texts[name]
            assert all(s.metrics(n)["swarmd_inner_step_duration_seconds_count"] > 0 for n in names[1:])

            # every name used in deploy/ is exported by a node or is in the catalog
            exported = set(METRIC_NAME.findall("".join(texts.values())))
            assert names_used_in_deploy() - exported - catalog() - PROMETHEUS_BUILTINS == set()

            legit_empty = {} if "swarmd_gpu_" in "".join(texts.values()) else dict.fromkeys(EMPTY_WITHOUT_NVML, "no NVML")
            assert "swarmd_swarm_nodes" in texts["seed"]  # the seed exports the swarm-wide gauges
            empty, failed = [], []
            for board, panel, expr in panel_queries():
                answer = instant_query(base, grafana_to_promql(expr))
                if answer.get("status") != "success":
                    failed.append((board, panel, expr, answer.get("error")))
                elif not answer["data"]["result"] and panel not in legit_empty:
                    empty.append((board, panel, expr))
                elif answer["data"]["result"] and panel in legit_empty:
                    empty.append((board, panel, f"expected empty ({legit_empty[panel]}) but has data"))
            assert not failed, failed
            assert not empty, empty
            for rule in alert_rules():
                answer = instant_query(base, rule["expr"])
                assert answer.get("status") == "success", (rule["alert"], answer)
            # the rules file loaded, and no rule fails to evaluate on real data
            rules = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10).read())["data"]["groups"]
            loaded = {r["name"]: r for g in rules for r in g["rules"]}
            assert sorted(loaded) == sorted(r["alert"] for r in alert_rules())
            assert all(r["health"] == "ok" for r in loaded.values()), loaded
        finally:
            server.terminate()
            server.wait(15)
