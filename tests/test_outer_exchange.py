"""One outer step's exchange record (swarmd.daemon.outer._Exchange): storing a partner's chunks, knowing
when its payload is complete, forgetting a would-be partner, and the first failure winning."""

from __future__ import annotations

import asyncio

import pytest
import torch
from swarmd.daemon.outer import _Exchange, _Failed, _settle
from swarmd.protocols.errors import ProtocolError
from swarmd.swarm.outer import chunk_bounds


def _exchange(numel: int = 10, chunk: int = 4) -> _Exchange:
    bounds = chunk_bounds(numel, chunk)
    return _Exchange(numel=numel, bounds=bounds, own_chunks=[], own_phi_norm=1.0, theta_snap=torch.zeros(numel),
                     partner_phi=[None] * len(bounds), partner_progress=[None] * len(bounds))


def _chunk(ex: _Exchange, index: int, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    start, end = ex.bounds[index]
    return torch.full((end - start,), value), torch.full((end - start,), -value)


def test_complete_once_every_chunk_arrived_in_any_order():
    ex = _exchange()
    for index in (2, 0):
        ex.store(index, *_chunk(ex, index, 1.0))
        assert not ex.complete.is_set()
    ex.store(1, *_chunk(ex, 1, 1.0))
    assert ex.complete.is_set() and ex.problem(max_norm_ratio=100.0) is None
    assert ex.phi_sq == pytest.approx(10.0) and ex.progress_sq == pytest.approx(10.0)
    with pytest.raises(ProtocolError, match="twice"):
        ex.store(1, *_chunk(ex, 1, 1.0))


def test_forget_partner_drops_what_a_would_be_partner_sent():
    ex = _exchange()
    for index in range(3):
        ex.store(index, *_chunk(ex, index, 5.0))
    ex.forget_partner()
    assert not ex.complete.is_set() and ex.received == set() and ex.phi_sq == ex.progress_sq == 0.0
    assert ex.partner_phi == [None] * 3 and "only 0 of 3" in ex.problem(max_norm_ratio=100.0)
    ex.store(0, *_chunk(ex, 0, 1.0))  # the real partner's chunks are taken afresh
    assert ex.received == {0}


def test_forget_partner_also_forgets_its_failure():
    """A would-be partner's bad chunk fails the exchange; if our proposal to it then fails, the next
    partner must not inherit that failure."""
    async def scenario() -> None:
        ex = _exchange()
        ex.failure = asyncio.get_running_loop().create_future()
        ex.fail(_Failed("bad chunk from the would-be partner"))
        ex.forget_partner()
        assert not ex.failure.done()
        ex.complete.set()
        await asyncio.wait_for(_settle(ex, ex.complete.wait()), 5)

    asyncio.run(scenario())


def test_settle_raises_the_first_failure_and_waits_for_everything_otherwise():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ex = _exchange()
        ex.failure = loop.create_future()
        slow = asyncio.ensure_future(asyncio.sleep(30))
        loop.call_later(0.01, ex.fail, _Failed("partner gone"))
        with pytest.raises(_Failed, match="partner gone"):
            await asyncio.wait_for(_settle(ex, slow, None), 5)
        assert slow.cancelled()  # what was still pending is stopped
        ex.fail(_Failed("a later failure"))
        with pytest.raises(_Failed, match="partner gone"):  # the first failure stays
            ex.failure.result()

        ok = _exchange()
        ok.failure = loop.create_future()
        loop.call_later(0.01, ok.complete.set)
        await asyncio.wait_for(_settle(ok, asyncio.sleep(0.02), ok.complete.wait(), None), 5)
        assert ok.complete.is_set() and not ok.failure.done()

    asyncio.run(scenario())
