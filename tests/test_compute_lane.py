"""The compute lane: one worker thread, and a clear refusal once the node is stopping."""

from __future__ import annotations

import asyncio
import threading

import pytest
from swarmd.daemon.compute import ComputeLane


def test_work_runs_off_the_loop_thread_and_returns_its_result():
    lane = ComputeLane()

    async def main() -> tuple[int, int]:
        return await lane.run(lambda a, b: a + b, 2, 3), await lane.run(threading.get_ident)

    try:
        total, worker = asyncio.run(main())
    finally:
        lane.close()
    assert total == 5 and worker != threading.get_ident()
    assert lane.depth == 0


def test_a_closed_lane_refuses_work_like_a_broken_stream():
    lane = ComputeLane()
    lane.close()
    with pytest.raises(ConnectionAbortedError, match="shutting down"):
        asyncio.run(lane.run(lambda: 1))
    assert lane.depth == 0
