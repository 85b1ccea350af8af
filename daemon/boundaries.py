"""When outer steps happen: every H inner steps, a loop shared by the NoLoCo and DiLoCo services."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

READY_CHECK_S = 1.0  # how often a replica that met no partner at its last outer step looks for one ready now


async def run_at_boundaries(
    outer_step: Callable[[], Awaitable[str]], current_step: Callable[[], int], inner_steps: int, stop: asyncio.Event,
    pin: Callable[[], Awaitable[bool]] | None = None, partner_ready: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Call ``outer_step`` each time ``current_step()`` reaches the next boundary, every ``inner_steps`` (H)
    inner steps, until ``stop`` is set. Shared by the NoLoCo and DiLoCo services.

    Without ``pin`` the boundaries are the multiples of H, and those an outer step overran (a long wait for a
    partner) are skipped. With ``pin`` (NoLoCoService.pin_boundary), every payload covers about H inner steps
    instead, not H plus however long the step before took (a partner's progress is judged against ours: the
    two must cover as many steps): after a "paired" step, whose update came from the weights at its start,
    the next boundary is H steps after that start (pinned by ``pin()`` when the step overran it, and then
    taken at once, its H steps counted on from where the pin read the weights, which can be later: the pin
    waits for the lane and for the step's snapshot); after any other step, whose update came from the weights
    at its end, H steps after that.
    The first boundary is then H steps after the loop starts too: a replica that just took a live replica's
    state (a joiner, a catch-up) would otherwise send a payload of a few inner steps at the next multiple of
    H, and its partners' phi, one solo step away from the weights it adopted, would lie many of its own
    drifts away from it (swarmd.swarm.outer.payload_problem).

    With ``partner_ready`` too (NoLoCoService.partner_ready), a step without a partner is followed by an early
    one as soon as a partner waits on the ready board, from H/2 steps after it on: two replicas whose
    boundaries fell further apart than the pairing timeout would otherwise miss each other at every boundary,
    each stepping solo while the other trains, since each solo wait shifts both by the same time.
    """
    start = current_step()
    boundary = (start // inner_steps + 1) * inner_steps if pin is None else start + inner_steps
    pinned_at: int | None = None  # the inner step whose weights the next step's payload is pinned to
    early_from: int | None = None  # after a step without a partner: meet a waiting one from this inner step on
    checked_at = -math.inf
    while not stop.is_set():
        if early_from is not None and current_step() >= early_from and time.monotonic() - checked_at >= READY_CHECK_S:
            checked_at = time.monotonic()
            if await partner_ready():
                boundary = current_step()
        if current_step() >= boundary and not stop.is_set():  # (stop may have come during partner_ready)
            step = asyncio.ensure_future(outer_step())
            following = (current_step() if pinned_at is None else pinned_at) + inner_steps
            result, pinned, pinned_step = None, False, 0
            try:
                while not step.done():
                    if pin is not None and not pinned and current_step() >= following:
                        pinned = await pin()  # the weights at the next boundary, which this step overran
                        pinned_step = current_step()  # at or after the inner step those weights were read at
                    await asyncio.wait({step}, timeout=0.05)
                result = step.result()
            except asyncio.CancelledError:
                step.cancel()
                await asyncio.wait({step})
                raise
            except Exception:  # a bug in one step must not end outer steps for good
                logger.exception("outer step failed")
            if pin is None:
                boundary = (current_step() // inner_steps + 1) * inner_steps
            elif result == "paired":
                boundary, pinned_at = following, pinned_step if pinned else None
            else:
                boundary, pinned_at = current_step() + inner_steps, None
            look_early = pin is not None and partner_ready is not None and result != "paired"
            early_from = current_step() + inner_steps // 2 if look_early else None
        await asyncio.sleep(0.05)
