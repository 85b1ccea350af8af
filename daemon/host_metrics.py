"""Host metrics of a node: memory and CPU of its own process and of its p2pd, and the GPUs NVML sees.

A prometheus_client custom collector, read at scrape time (nothing runs between scrapes). Process figures come
from /proc (Linux; elsewhere those series are absent). GPU figures come from NVML when ``pynvml`` (the
``nvidia-ml-py`` package) imports and a GPU exists; otherwise those series are absent, not zero.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PROCESSES = ("node", "p2pd")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def p2pd_pid(p2p: Any) -> int | None:
    """The pid of the p2pd that hivemind's P2P started (it keeps the subprocess as ``_child``), or None."""
    child = getattr(p2p, "_child", None)
    return getattr(child, "pid", None)


def read_proc_stat(pid: int) -> tuple[float, float] | None:
    """(resident bytes, user + system CPU seconds) of ``pid`` from /proc/<pid>/stat; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        utime, stime, rss_pages = int(fields[11]), int(fields[12]), int(fields[21])
    except (IndexError, ValueError):
        return None
    return rss_pages * _PAGE_BYTES, (utime + stime) / _TICKS_PER_S


class _Nvml:
    """NVML handles for every GPU, or none when pynvml is missing or finds no GPU."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError as e:  # no driver, no GPU: the GPU series stay absent
            logger.debug("NVML unavailable: %s", e)
            return
        self._nvml = pynvml

    def read(self) -> Iterator[tuple[str, int, int, float]]:
        """(gpu index, used bytes, total bytes, utilization 0..1) per GPU that answers."""
        for index, handle in enumerate(self.handles):
            try:
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                utilization = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            except self._nvml.NVMLError:
                continue
            yield str(index), int(memory.used), int(memory.total), utilization.gpu / 100.0


class HostCollector(Collector):
    """Collects ``swarmd_process_*`` for the node and its p2pd and ``swarmd_gpu_*`` per GPU."""

    def __init__(self, p2pd_pid: int | None = None, node_pid: int | None = None) -> None:
        self.pids = {"node": node_pid or os.getpid(), "p2pd": p2pd_pid}
        self.nvml = _Nvml()

    def describe(self) -> list[Metric]:
        """Every family this collector can export (the GPU ones too), so the catalog lists them everywhere."""
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        rss, cpu, used, total, utilization = self._families()
        for process, pid in self.pids.items():
            read = read_proc_stat(pid) if pid is not None else None
            if read is not None:
                rss.add_metric([process], read[0])
                cpu.add_metric([process], read[1])
        for gpu, gpu_used, gpu_total, gpu_utilization in self.nvml.read():
            used.add_metric([gpu], gpu_used)
            total.add_metric([gpu], gpu_total)
            utilization.add_metric([gpu], gpu_utilization)
        yield rss
        yield cpu
        for family in (used, total, utilization):
            if family.samples:
                yield family

    @staticmethod
    def _families() -> tuple[Metric, ...]:
        return (
            GaugeMetricFamily("swarmd_process_resident_memory_bytes",
                              "Resident memory of the node process and of its p2pd", labels=["process"]),
            CounterMetricFamily("swarmd_process_cpu_seconds", "User and system CPU time of the node process "
                                "and of its p2pd", labels=["process"]),
            GaugeMetricFamily("swarmd_gpu_memory_used_bytes", "GPU memory in use (all processes), per GPU NVML "
                              "sees", labels=["gpu"]),
            GaugeMetricFamily("swarmd_gpu_memory_total_bytes", "GPU memory, per GPU NVML sees", labels=["gpu"]),
            GaugeMetricFamily("swarmd_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran, "
                              "per GPU NVML sees", labels=["gpu"]),
        )
