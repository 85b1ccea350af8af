"""bench/gpu_step.py: one clear line and exit 2 without a GPU; its whole path as a CPU dry run; the peak table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_peaks_come_from_the_device_name() -> None:
    gpu_step = _load()
    assert gpu_step.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert gpu_step.peak_tflops("NVIDIA H100 PCIe", "fp32") == 51.0
    assert gpu_step.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert gpu_step.peak_tflops("NVIDIA L40S", "bf16") == 362.0  # not L4's
    assert gpu_step.peak_tflops("Some Future GPU", "bf16") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_cuda_it_says_so_in_one_line_and_exits_2() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.count("\n") == 1 and "no CUDA device" in proc.stdout, proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is bench/run_gpu_checks.sh's")
def test_the_dry_run_prints_the_step_and_kernel_tables() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu"], capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for row in ("| plain torch loop | fp32 |", "| swarm 1 stage | fp32 |", "| swarm 2 stages, int8 hops | fp32 |",
                "| quantize_int8_ef |", "| noloco_outer_update_ |"):
        assert row in proc.stdout, proc.stdout
