"""deploy/prometheus/: the alert rules and the scrape config pass promtool, and every rule has unit tests
(deploy/prometheus/tests/) where it fires and where it must not."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (apt-get install prometheus)")
        pytest.skip("promtool not installed")
    return path


def run_promtool(*args: str) -> str:
    result = subprocess.run([promtool(), *args], check=False, cwd=PROMETHEUS, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def alert_names() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def test_rules_and_config_pass_promtool_check() -> None:
    assert "SUCCESS: 7 rules found" in run_promtool("check", "rules", "alerts.yml")
    run_promtool("check", "config", "prometheus.yml")  # also checks the rule_files it names


def test_rule_unit_tests_pass() -> None:
    output = run_promtool("test", "rules", *(str(p.relative_to(PROMETHEUS)) for p in RULE_TESTS))
    assert output.count("SUCCESS") == len(RULE_TESTS), output


def test_every_rule_has_a_firing_and_a_silent_case() -> None:
    """Each alert is tested at least once where it must fire and once where it must not."""
    fires: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../alerts.yml"], path
        for case in doc["tests"]:
            for check in case["alert_rule_test"]:
                (fires if check["exp_alerts"] else silent).add(check["alertname"])
    names = alert_names()
    assert len(names) == len(set(names))
    assert sorted(fires) == sorted(names), f"rules never tested firing: {set(names) - fires}"
    assert sorted(silent) == sorted(names), f"rules never tested silent: {set(names) - silent}"


def test_scrape_config_loads_the_rules_and_the_node_list() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "swarmd"  # SwarmdNodeDown selects up{job="swarmd"}
    assert job["file_sd_configs"][0]["files"] == ["nodes.json"]
    assert (PROMETHEUS / "nodes.json").exists()
