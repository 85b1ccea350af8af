"""deploy/: the compose file, the volunteer image and the systemd unit are valid as far as this machine can tell
(YAML parses, every file they name exists, `systemd-analyze verify` and `docker compose config` where they
work), and the swarmd command lines in them are ones swarmd accepts."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from swarmd.daemon.cli import build_parser, check_arguments

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "swarmd-volunteer.service"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yml").read_text())


def _check_swarmd_args(argv: list[str]) -> None:
    """``argv`` (after `swarmd`) parses and passes the checks swarmd runs before it starts anything."""
    check_arguments(build_parser().parse_args(argv))


def test_compose_services_and_the_files_they_mount_exist():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"seed", "prometheus", "grafana"}
    build = services["seed"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).resolve() == DOCKERFILE
    named = set(compose.get("volumes") or {})
    mounts: dict[str, str] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"
                mounts[target] = source
            else:
                assert source in named, f"{name} uses volume {source}, not declared under volumes:"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == "./grafana/dashboards"
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    # the files prometheus.yml names (relative to itself) are mounted beside it
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    named_files = list(config.get("rule_files", []))
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            named_files += sd["files"]
    for name in named_files:
        assert f"/etc/prometheus/{name}" in mounts, f"prometheus.yml reads {name}, which compose does not mount"
        targets = DEPLOY / mounts[f"/etc/prometheus/{name}"]
        if name.endswith(".json"):
            assert all(group["targets"] for group in json.loads(targets.read_text()))
    # the dashboards' provider reads the folder compose mounts them in
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "swarmd.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_compose_seed_command_is_one_swarmd_accepts():
    command = [re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", word) for word in _compose()["services"]["seed"]["command"]]
    _check_swarmd_args(command)


def test_dockerfile_copies_every_package_and_runs_swarmd_unprivileged():
    text = DOCKERFILE.read_text()
    lines = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0][:2] == ["FROM", "python:3.11-slim"]
    copied = {source for words in lines if words[0] == "COPY" for source in words[1:-1]}
    for source in copied:
        assert (ROOT / source).exists(), source
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(package_dirs.values()) <= copied, "a package the wheel needs is not copied into the image"
    assert "pyproject.toml" in copied and "README.md" in copied
    assert any(words[:2] == ["USER", "swarmd"] for words in lines)
    assert 'ENTRYPOINT ["swarmd"]' in text and "VOLUME /data" in text and "EXPOSE 9100" in text
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text  # CPU torch unless asked otherwise


def _unit_exec_start() -> list[str]:
    line = next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_unit_runs_a_join_swarmd_accepts_and_stops_cleanly():
    text = UNIT.read_text()
    for setting in ("Restart=on-failure", "KillMode=mixed", "KillSignal=SIGTERM", "StateDirectory=swarmd",
                    "RestartPreventExitStatus=2"):
        assert setting in text.splitlines(), setting
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M)[1])
    assert stop >= 60  # drain (5 s) + withdraw (3 s) + a large stage's checkpoint
    argv = _unit_exec_start()[1:]
    values = {"${SWARMD_PEER}": "/ip4/203.0.113.7/tcp/31337/p2p/QmPYDArFf69vbDHbnWagvuDHWJbQNoPd9enQNSRjed1pVA",
              "${SWARMD_METRICS_PORT}": "9100", "$SWARMD_ARGS": "--device cpu"}
    _check_swarmd_args([w for word in argv for w in values.get(word, word).split()])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    # verify insists that ExecStart's binary exists, and the unit names where the README installs swarmd
    # (/opt/swarmd/venv/bin/swarmd): check a copy that runs this interpreter's swarmd (or python) instead.
    binary = Path(sys.executable).parent / "swarmd"
    installed = _unit_exec_start()[0]
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(installed, str(binary if binary.exists() else sys.executable)))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True,
                         timeout=60)
    # verify exits 0 on unknown keys and bad values too, and only says so: any output is a failure
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


def _docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _docker_compose_works(), reason="no docker compose plugin here")
def test_compose_config_is_valid():
    # `config` only reads and resolves the file: no daemon and no network needed
    out = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "compose.yml"), "config", "-q"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
