"""One outer step's exchange record (swarmd.daemon.outer_exchange.Exchange): storing a partner's chunks, judging its
payload against our phi and progress, knowing when it is complete or has stalled, forgetting a would-be
partner, and the first failure winning. And when outer steps run (run_at_boundaries)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch
from swarmd.daemon.boundaries import run_at_boundaries
from swarmd.daemon.outer_exchange import Exchange, Failed, Stalled, settle
from swarmd.daemon.spec import AveragingConfig
from swarmd.protocols.errors import ProtocolError
from swarmd.swarm.outer import chunk_bounds

CONFIG = AveragingConfig(max_divergence=1.0, max_distance_ratio=5.0, max_progress_ratio=2.0)


def _exchange(numel: int = 10, chunk: int = 4, own_progress: float = 1.0) -> Exchange:
    """Our phi is all ones (norm sqrt(numel)), our progress norm ``own_progress``."""
    bounds = chunk_bounds(numel, chunk)
    return Exchange(numel=numel, bounds=bounds, own_chunks=[], own_phi=torch.ones(numel),
                     own_phi_norm=math.sqrt(numel), own_progress_norm=own_progress, own_move_norm=0.0,
                     theta_snap=torch.zeros(numel),
                     partner_phi=[None] * len(bounds), partner_progress=[None] * len(bounds))


def _chunk(ex: Exchange, index: int, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    start, end = ex.bounds[index]
    return torch.full((end - start,), value), torch.full((end - start,), -value)


def test_complete_once_every_chunk_arrived_in_any_order():
    ex = _exchange()
    for index in (2, 0):
        ex.store(index, *_chunk(ex, index, 1.0))
        assert not ex.complete.is_set()
    ex.store(1, *_chunk(ex, 1, 1.0))
    assert ex.complete.is_set()
    assert ex.distance_sq == 0.0 and ex.progress_sq == pytest.approx(10.0)
    with pytest.raises(ProtocolError, match="twice"):
        ex.store(1, *_chunk(ex, 1, 1.0))


def _partner(phi: float, progress: float, own_progress: float = 1.0) -> Exchange:
    ex = _exchange(own_progress=own_progress)
    for index, (start, end) in enumerate(ex.bounds):
        ex.store(index, torch.full((end - start,), phi), torch.full((end - start,), progress))
    return ex


def test_problem_judges_the_payload_against_our_phi_and_progress():
    """Our phi: ones(10), norm 3.16; our progress norm 1 (or 0.5)."""
    assert _partner(1.5, 0.3).problem(CONFIG, True) is None  # 0.5 x ||phi|| and 1.58 progress norms away, progress 0.95
    assert _partner(1.5, 0.3).divergence == pytest.approx(0.5)  # the metric: in ||phi||
    assert "phi's norm away" in _partner(-9.0, 0.3).problem(CONFIG, True)  # phi' = -9 phi
    assert "phi's norm away" in _partner(2.01, 0.3).problem(CONFIG, True)  # 1.01 x ||phi||
    assert _partner(1.79, 0.15, own_progress=0.5).problem(CONFIG, True) is None  # 4.996 progress norms
    assert "own drift" in _partner(1.8, 0.15, own_progress=0.5).problem(CONFIG, True)  # 5.06
    assert "progress norm" in _partner(1.0, 0.64).problem(CONFIG, True)  # progress norm 2.02: over 2x ours
    far = _partner(1.8, 0.15, own_progress=0.5)  # met for the first time: accepted, its pull scaled to 5 of 5.06
    assert far.problem(CONFIG, False) is None and far.pull_scale(CONFIG) == pytest.approx(5.0 / far.drift_ratio)
    assert _partner(1.79, 0.15, own_progress=0.5).pull_scale(CONFIG) == 1.0


def test_forget_partner_drops_what_a_would_be_partner_sent():
    ex = _exchange()
    for index in range(3):
        ex.store(index, *_chunk(ex, index, 5.0))
    ex.forget_partner()
    assert not ex.complete.is_set() and ex.received == set() and ex.progress_sq == ex.distance_sq == 0.0
    assert ex.partner_phi == [None] * 3 and "only 0 of 3" in ex.problem(CONFIG, True)
    ex.store(0, *_chunk(ex, 0, 1.0))  # the real partner's chunks are taken afresh
    assert ex.received == {0}


def test_forget_partner_also_forgets_its_failure():
    """A would-be partner's bad chunk fails the exchange; if our proposal to it then fails, the next
    partner must not inherit that failure."""
    async def scenario() -> None:
        ex = _exchange()
        ex.failure = asyncio.get_running_loop().create_future()
        ex.fail(Failed("bad chunk from the would-be partner"))
        ex.forget_partner()
        assert not ex.failure.done()
        ex.complete.set()
        await asyncio.wait_for(settle(ex, ex.complete.wait()), 5)

    asyncio.run(scenario())


def test_settle_raises_the_first_failure_and_waits_for_everything_otherwise():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ex = _exchange()
        ex.failure = loop.create_future()
        slow = asyncio.ensure_future(asyncio.sleep(30))
        loop.call_later(0.01, ex.fail, Failed("partner gone"))
        with pytest.raises(Failed, match="partner gone"):
            await asyncio.wait_for(settle(ex, slow, None), 5)
        assert slow.cancelled()  # what was still pending is stopped
        ex.fail(Failed("a later failure"))
        with pytest.raises(Failed, match="partner gone"):  # the first failure stays
            ex.failure.result()

        ok = _exchange()
        ok.failure = loop.create_future()
        loop.call_later(0.01, ok.complete.set)
        await asyncio.wait_for(settle(ok, asyncio.sleep(0.02), ok.complete.wait(), None), 5)
        assert ok.complete.is_set() and not ok.failure.done()

    asyncio.run(scenario())


def test_watch_stall_raises_when_the_partner_sends_nothing():
    """No chunk for the timeout (from pairing, then from each chunk): Stalled. Chunks that keep coming, or
    a payload complete in time, keep it quiet."""
    async def scenario() -> None:
        ex = _exchange()
        ex.last_arrival = time.monotonic()
        started = time.monotonic()
        with pytest.raises(Stalled, match="0 of 3"):
            await asyncio.wait_for(ex.watch_stall(0.2), 5)
        assert 0.15 < time.monotonic() - started < 2

        ex = _exchange()
        ex.last_arrival = time.monotonic()
        watch = asyncio.ensure_future(ex.watch_stall(0.3))
        for index in range(3):  # 0.45 s in all, each chunk within the timeout of the last
            await asyncio.sleep(0.15)
            ex.store(index, *_chunk(ex, index, 1.0))
        await asyncio.wait_for(watch, 5)
        assert ex.complete.is_set()

        ex = _exchange()
        ex.last_arrival = time.monotonic()
        watch = asyncio.ensure_future(ex.watch_stall(0.2))
        await asyncio.sleep(0.05)
        ex.store(0, *_chunk(ex, 0, 1.0))
        with pytest.raises(Stalled, match="1 of 3"):
            await asyncio.wait_for(watch, 5)

    asyncio.run(scenario())


async def _until(condition, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


async def _schedule(results: list[str], with_pin: bool, moves: list[tuple[int, int | None]],
                    ready: bool | None = None) -> tuple[list, list, list]:
    """Drive run_at_boundaries (H = 10) with a fake inner step: the first outer step lasts until released.
    ``moves``: (inner step to set, how many outer steps to wait for then, or None: just let it poll).
    ``ready``: what partner_ready answers (None: no partner_ready). Returns (the inner step each outer step
    started at, the inner steps pin was called at, the inner steps partner_ready was asked at)."""
    inner, stop, release = 0, asyncio.Event(), asyncio.Event()
    starts, pins, asked = [], [], []

    async def outer_step() -> str:
        starts.append(inner)
        if len(starts) == 1:
            await release.wait()
        return results[min(len(starts), len(results)) - 1]

    async def pin() -> bool:
        pins.append(inner)
        return True

    async def partner_ready() -> bool:
        asked.append(inner)
        return bool(ready)

    runner = asyncio.create_task(run_at_boundaries(outer_step, lambda: inner, 10, stop, pin=pin if with_pin else None,
                                                   partner_ready=None if ready is None else partner_ready))
    await asyncio.sleep(0.1)  # the runner starts at inner step 0: its first boundary is 10
    for step, starts_then in moves:
        inner = step
        if step == 28:
            release.set()  # the first outer step ends at inner step 28
        if starts_then is None:
            await asyncio.sleep(0.2)
        else:
            await _until(lambda: len(starts) == starts_then)
    stop.set()
    await asyncio.wait_for(runner, 5)
    return starts, pins, asked


def test_a_paired_step_that_overran_a_boundary_pins_it_and_the_next_step_starts_at_once():
    """The first outer step (at inner step 10) is paired and lasts until step 28: the boundary at 20 is pinned
    as the inner step passes it, the next step starts as soon as the first ends, the one after at 30."""
    starts, pins, _ = asyncio.run(_schedule(["paired"], True, [(10, 1), (20, None), (28, 2), (29, None), (30, 3)]))
    assert starts == [10, 28, 30] and pins == [20]


def test_a_late_pin_counts_the_next_h_steps_from_where_it_read_the_weights():
    """The first step started at 10 and could only be pinned at 26 (the pin waits for the lane and for the
    step's snapshot): the second step starts as the first ends, at 28, with the weights of 26, and the third
    comes H steps after 26 (at 36, not at 35, the first step seen past 30). Counted from 20, a pin read after
    30 would start the third step at once, on weights no inner step had changed since the second's: a
    payload of zero progress."""
    starts, pins, _ = asyncio.run(_schedule(["paired"], True, [(10, 1), (26, None), (28, 2), (35, None), (36, 3)]))
    assert starts == [10, 28, 36] and pins == [26]


def test_after_a_step_without_a_partner_the_next_comes_h_steps_after_it_ended():
    """Its update came from the weights as it ended (at 28): the next step comes at 38, not at 30."""
    starts, pins, _ = asyncio.run(_schedule(["solo"], True, [(10, 1), (25, None), (28, None), (37, None), (38, 2)]))
    assert starts == [10, 38] and pins == [25]


def test_after_a_step_without_a_partner_one_waiting_on_the_board_is_met_from_h_over_2_on():
    """The solo step ended at 28: from 33 on the replica asks whether a partner waits, and steps when one does
    (at 34 here), not at 38. Two replicas whose boundaries drifted apart meet again this way."""
    starts, _, asked = asyncio.run(_schedule(["solo"], True, [(10, 1), (28, None), (32, None), (34, 2)], ready=True))
    assert starts == [10, 34] and asked == [34]


def test_no_early_step_when_no_partner_waits_or_after_a_paired_step():
    starts, _, asked = asyncio.run(_schedule(["solo"], True, [(10, 1), (28, None), (34, None), (38, 2)], ready=False))
    assert starts == [10, 38] and asked == [34]
    starts, _, asked = asyncio.run(_schedule(["paired"], True, [(10, 1), (20, None), (28, 2), (29, None), (30, 3)],
                                              ready=True))
    assert starts == [10, 28, 30] and asked == []


def test_without_pin_overrun_boundaries_are_skipped():
    """DiLoCo's schedule: the multiples of H; the boundary at 20, overrun, is skipped."""
    starts, pins, _ = asyncio.run(_schedule(["paired"], False, [(10, 1), (25, None), (28, None), (29, None), (30, 2)]))
    assert starts == [10, 30] and pins == []


def _first_boundary(with_pin: bool, start: int) -> int:
    """The inner step at which run_at_boundaries (H = 10), started at inner step ``start``, takes its first step."""
    inner, stop, seen = start, asyncio.Event(), []

    async def outer_step() -> str:
        seen.append(inner)
        stop.set()
        return "solo"

    async def pin() -> bool:
        return True

    async def drive() -> None:
        nonlocal inner
        runner = asyncio.create_task(run_at_boundaries(outer_step, lambda: inner, 10, stop,
                                                       pin=pin if with_pin else None))
        while not stop.is_set():
            await asyncio.sleep(0.06)  # slower than the runner's poll: it sees every step
            inner += 1
        await asyncio.wait_for(runner, 5)

    asyncio.run(drive())
    return seen[0]


def test_a_replica_that_entered_with_adopted_state_steps_h_steps_later():
    """NoLoCo's first boundary is H steps after the loop starts (a joiner's payload then covers H of its own
    inner steps, not the 3 up to the next multiple of H); DiLoCo keeps the multiples of H."""
    assert _first_boundary(True, 167) == 177
    assert _first_boundary(False, 167) == 170
    assert _first_boundary(True, 0) == 10
