"""Shared fixtures: each test gets its own temp folder, used as TMPDIR by the nodes it starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def swarm_env(tmp_path: Path) -> dict[str, str]:
    """Environment for child nodes: a private TMPDIR (hivemind leaves sockets there), quiet hivemind logs."""
    sockets = tmp_path / "tmp"
    sockets.mkdir()
    return {**os.environ, "TMPDIR": str(sockets), "HIVEMIND_LOGLEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}
