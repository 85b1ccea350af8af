"""Shared fixtures: each test gets its own temp folder, used as TMPDIR by the nodes it starts."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def swarm_env() -> Iterator[dict[str, str]]:
    """Environment for child nodes: a private TMPDIR (hivemind leaves sockets there), quiet hivemind logs.

    The folder sits directly under /tmp: unix socket paths (torch's shared-memory manager, used by
    hivemind's averager) must stay under 108 bytes, which pytest's deep tmp_path can exceed."""
    sockets = tempfile.mkdtemp(prefix="swarmd-", dir="/tmp")
    yield {**os.environ, "TMPDIR": sockets, "HIVEMIND_LOGLEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}
    shutil.rmtree(sockets, ignore_errors=True)
