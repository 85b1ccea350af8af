"""Shared fixtures: each test gets its own temp folder, used as TMPDIR by the nodes it starts; `cuda` tests
skip without a GPU."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import torch

# A `cuda` test runs the daemon's CUDA path for real: Triton kernels compiled for the GPU, not interpreted.
CUDA_SKIP = "needs a CUDA device (torch.cuda.is_available() is False); bench/run_gpu_checks.sh runs these on a GPU"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `cuda` tests without a GPU (one reason for all); with one, refuse the Triton interpreter."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    if not torch.cuda.is_available():
        reason = CUDA_SKIP
    elif os.environ.get("TRITON_INTERPRET", "0") == "1":
        reason = "TRITON_INTERPRET=1 would interpret the Triton kernels instead of running them on the GPU: unset it"
    else:
        return
    for item in cuda_items:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def swarm_env() -> Iterator[dict[str, str]]:
    """Environment for child nodes: a private TMPDIR (hivemind leaves sockets there), quiet hivemind logs.

    The folder sits directly under /tmp: unix socket paths (torch's shared-memory manager, used by
    hivemind's averager) must stay under 108 bytes, which pytest's deep tmp_path can exceed."""
    sockets = tempfile.mkdtemp(prefix="swarmd-", dir="/tmp")
    yield {**os.environ, "TMPDIR": sockets, "HIVEMIND_LOGLEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}
    shutil.rmtree(sockets, ignore_errors=True)
