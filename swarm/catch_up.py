"""Whether a replica that started without its stage's state must fetch it before its first outer step.

Two volunteers that join an untrained stage together both read it at step 0 and start from the run's initial
weights. If one of them starts training seconds later, the other has taken solo outer steps by the late one's
first boundary, and the two phis lie too far apart for either payload to pass the other's checks
(swarmd.swarm.outer.payload_problem): they would reject and ban each other for good. The late one adopts the
leader's state instead, as a joiner does (hivemind's optimizer likewise loads state from its peers when it
falls behind the collaboration).
"""

from __future__ import annotations

from collections.abc import Iterable

from .routing import PeerInfo


def replica_ahead(peers: Iterable[PeerInfo], stage: int, own_step: int, margin: int) -> PeerInfo | None:
    """The most advanced replica of ``stage`` among ``peers`` if it is more than ``margin`` inner steps ahead
    of ``own_step``, else None."""
    lead = max((p for p in peers if p.stage == stage), key=lambda p: p.inner_step, default=None)
    return lead if lead is not None and lead.inner_step > own_step + margin else None
