"""The README's install path, for real: build swarmd's wheel, install it with the pinned CPU torch into a fresh
venv, and run `swarmd --help` and `swarmd join --help` from that venv (README, "Join from another machine")."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the README's CPU line (.ci/run installs the same)


def _source_tree(into: Path) -> Path:
    """A copy of the files a clone would have (tracked, plus new ones git does not ignore): the build writes
    build/ and *.egg-info beside the sources, and must not do so in the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not in a clone of it either
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def _run(*args: str | Path, timeout: float) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, args))}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.timeout(1200)
def test_wheel_installs_into_a_fresh_venv(tmp_path: Path) -> None:
    source = _source_tree(tmp_path / "src")
    # `python -m build` does the same in an isolated environment; pip's own builder needs no extra package
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
         source, timeout=300)
    wheel = next((tmp_path / "dist").glob("swarmd-*.whl"))
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, timeout=120)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    _run(*pip, TORCH, timeout=600)
    _run(*pip, wheel, timeout=600)
    swarmd = venv / "bin" / "swarmd"
    assert "swarmd join MULTIADDR" in _run(swarmd, "--help", timeout=120).stdout
    assert "--no-nat-traversal" in _run(swarmd, "join", "--help", timeout=120).stdout
    assert "MULTIADDR" in _run(swarmd, "doctor", "--help", timeout=120).stdout
