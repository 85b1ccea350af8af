"""The compute lane: one worker thread that runs all model work in order, off the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ComputeLane:
    """Runs callables on a single thread so kernels never block the loop and device work stays ordered.

    It also measures itself: ``busy_seconds`` (time spent computing) and ``depth`` (queued + running).
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarmd-compute")
        self.depth = 0
        self.busy_seconds = 0.0
        self.closed = False

    def _timed(self, fn: Callable[..., T], *args) -> T:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.busy_seconds += time.perf_counter() - start

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(*args)`` on the lane and await its result. Once the lane is closed (the node is
        stopping) this raises ConnectionAbortedError: a request still in flight then ends like a broken stream."""
        if self.closed:
            raise ConnectionAbortedError("the node is shutting down")
        self.depth += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, *args)
        finally:
            self.depth -= 1

    async def run_timed(self, fn: Callable[..., T], *args) -> tuple[T, float]:
        """Like ``run``, also returning the seconds ``fn`` itself took (queue wait excluded)."""

        def timed() -> tuple[T, float]:
            start = time.perf_counter()
            result = fn(*args)
            return result, time.perf_counter() - start

        return await self.run(timed)

    def close(self) -> None:
        """Finish the running callable, drop queued ones, refuse new ones."""
        self.closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)


class ThroughputMeter:
    """Samples per compute-second, smoothed: what this peer could sustain if kept busy."""

    def __init__(self, initial: float = 0.0, smoothing: float = 0.2):
        self.value = initial
        self._smoothing = smoothing

    def update(self, samples: int, seconds: float) -> None:
        if seconds <= 0 or samples <= 0:
            return
        rate = samples / seconds
        self.value = rate if self.value <= 0 else (1 - self._smoothing) * self.value + self._smoothing * rate
