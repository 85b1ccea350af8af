"""Pairing for NoLoCo outer steps, without a barrier: a small state machine per replica, no I/O.

A replica at an outer boundary is *ready* for a while (it says so on the stage's ready board in the
DHT). To avoid two replicas proposing to each other at once, only the replica with the smaller peer
id proposes: it draws a partner at random among the ready replicas with larger ids and sends a direct
proposal; a ready replica accepts the first proposal it gets and refuses the rest. The proposer drives
the exchange. A replica is in at most one pair per outer step; whoever finds no partner before its
deadline steps solo.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum


TAKEN = "already paired for this outer step"  # the refusal that will not change before the next step


class Phase(Enum):
    IDLE = "idle"  # between outer boundaries: proposals are refused
    READY = "ready"  # at a boundary, unpaired: the first proposal is accepted
    PROPOSING = "proposing"  # waiting for the answer to our proposal: others are refused
    PAIRED = "paired"  # in a pair for this outer step


@dataclass
class PairingState:
    """This replica's pairing for the current outer step."""

    peer_id: str
    phase: Phase = Phase.IDLE
    partner: str | None = None
    session: bytes | None = None

    @property
    def is_driver(self) -> bool:
        """The proposer (smaller peer id) drives the exchange."""
        return self.partner is not None and self.peer_id < self.partner

    def open(self) -> None:
        """We reached an outer boundary: ready for a partner."""
        self.phase, self.partner, self.session = Phase.READY, None, None

    def close(self) -> None:
        """The outer step is over (paired or not)."""
        self.phase, self.partner, self.session = Phase.IDLE, None, None

    def on_proposal(self, sender: str, session: bytes) -> str | None:
        """A proposal arrived. Accept it (None; we are now paired) or say why not."""
        if self.phase is Phase.PAIRED:
            return TAKEN
        if self.phase is not Phase.READY:
            return f"not ready for a partner ({self.phase.value})"
        if not sender < self.peer_id:
            return "proposals come from the replica with the smaller peer id"
        self.phase, self.partner, self.session = Phase.PAIRED, sender, session
        return None

    def propose(self, partner: str, session: bytes) -> None:
        """We send a proposal to ``partner``; refuse others until it is answered."""
        if self.phase is not Phase.READY or not partner > self.peer_id:
            raise RuntimeError(f"cannot propose to {partner} while {self.phase.value}")
        self.phase, self.partner, self.session = Phase.PROPOSING, partner, session

    def answered(self, accepted: bool) -> None:
        """Our proposal was answered (a failed call counts as a refusal)."""
        if self.phase is not Phase.PROPOSING:
            return
        if accepted:
            self.phase = Phase.PAIRED
        else:
            self.phase, self.partner, self.session = Phase.READY, None, None

    def is_partner(self, sender: str, session: bytes) -> bool:
        """True if ``sender`` is our partner in the pair identified by ``session``."""
        return self.phase is Phase.PAIRED and sender == self.partner and session == self.session

    def may_send_payload(self, sender: str, session: bytes) -> bool:
        """True if ``sender`` may send us its payload in ``session``: it is our partner, or the replica
        we proposed ``session`` to (it starts sending as soon as it accepts, so its first chunks can
        arrive before its acceptance does)."""
        return self.phase in (Phase.PROPOSING, Phase.PAIRED) and sender == self.partner and session == self.session


def proposal_candidates(my_id: str, ready: list[str], refused: set[str]) -> list[str]:
    """Ready replicas we may propose to: larger peer ids, not ourselves, not refused this step."""
    return [p for p in ready if p > my_id and p not in refused]


def choose_partner(my_id: str, ready: list[str], refused: set[str], rng: random.Random) -> str | None:
    """A uniformly random candidate to propose to, or None if there is none."""
    candidates = sorted(set(proposal_candidates(my_id, ready, refused)))
    return rng.choice(candidates) if candidates else None
