"""Barrier-free pairing: the per-replica state machine, partner choice, and simulated swarms of replicas."""

from __future__ import annotations

import collections
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from swarmd.swarm.pairing import (
    TAKEN,
    PairingState,
    Phase,
    choose_partner,
    proposal_candidates,
)

S1, S2 = b"\x01" * 16, b"\x02" * 16


def ready(peer_id: str) -> PairingState:
    state = PairingState(peer_id)
    state.open()
    return state


def proposing(peer_id: str, partner: str, session: bytes = S1) -> PairingState:
    state = ready(peer_id)
    state.propose(partner, session)
    return state


def paired_by_proposal(peer_id: str, sender: str, session: bytes = S1) -> PairingState:
    state = ready(peer_id)
    assert state.on_proposal(sender, session) is None
    return state


# ---------------------------------------------------------------- state machine


def test_new_state_is_idle_and_unpaired():
    state = PairingState("b")
    assert (state.phase, state.partner, state.session) == (Phase.IDLE, None, None)
    assert not state.is_driver


def test_open_and_close_reset_the_pair():
    state = paired_by_proposal("b", "a")
    state.open()
    assert (state.phase, state.partner, state.session) == (Phase.READY, None, None)
    state = paired_by_proposal("b", "a")
    state.close()
    assert (state.phase, state.partner, state.session) == (Phase.IDLE, None, None)


def test_ready_accepts_the_first_proposal_from_a_smaller_id():
    state = ready("m")
    assert state.on_proposal("a", S1) is None
    assert (state.phase, state.partner, state.session) == (Phase.PAIRED, "a", S1)
    assert not state.is_driver  # the proposer drives


@pytest.mark.parametrize("sender", ["z", "m"])  # larger id, or our own id
def test_ready_refuses_a_proposal_from_a_larger_or_equal_id(sender: str):
    state = ready("m")
    why = state.on_proposal(sender, S1)
    assert isinstance(why, str) and "smaller" in why
    assert (state.phase, state.partner, state.session) == (Phase.READY, None, None)


@pytest.mark.parametrize(
    "make,phase",
    [
        (lambda: PairingState("m"), Phase.IDLE),
        (lambda: proposing("m", "z"), Phase.PROPOSING),
        (lambda: paired_by_proposal("m", "b", S2), Phase.PAIRED),
    ],
)
def test_refuses_proposals_unless_ready(make, phase: Phase):
    state = make()
    before = (state.phase, state.partner, state.session)
    why = state.on_proposal("a", S1)
    assert isinstance(why, str) and phase.value in why
    assert (state.phase, state.partner, state.session) == before


def test_a_paired_replica_refuses_a_second_proposal():
    state = ready("m")
    assert state.on_proposal("b", S1) is None
    assert state.on_proposal("a", S2) == TAKEN  # a refusal that holds for the rest of the outer step
    assert (state.partner, state.session) == ("b", S1)


def test_propose_from_ready_to_a_larger_id():
    state = proposing("m", "z", S1)
    assert (state.phase, state.partner, state.session) == (Phase.PROPOSING, "z", S1)


@pytest.mark.parametrize(
    "make,partner",
    [
        (lambda: PairingState("m"), "z"),  # idle
        (lambda: proposing("m", "y"), "z"),  # already proposing
        (lambda: paired_by_proposal("m", "a"), "z"),  # already paired
        (lambda: ready("m"), "a"),  # smaller id
        (lambda: ready("m"), "m"),  # ourselves
    ],
)
def test_propose_preconditions(make, partner: str):
    state = make()
    before = (state.phase, state.partner, state.session)
    with pytest.raises(RuntimeError):
        state.propose(partner, S2)
    assert (state.phase, state.partner, state.session) == before


def test_answered_yes_pairs_us_as_driver():
    state = proposing("m", "z", S1)
    state.answered(True)
    assert (state.phase, state.partner, state.session) == (Phase.PAIRED, "z", S1)
    assert state.is_driver


def test_answered_no_makes_us_ready_again():
    state = proposing("m", "z", S1)
    state.answered(False)
    assert (state.phase, state.partner, state.session) == (Phase.READY, None, None)
    state.propose("y", S2)  # and we may propose again
    assert state.partner == "y"


@pytest.mark.parametrize("accepted", [True, False])
@pytest.mark.parametrize(
    "make", [lambda: PairingState("m"), lambda: ready("m"), lambda: paired_by_proposal("m", "a")]
)
def test_answered_is_ignored_unless_proposing(make, accepted: bool):
    """A late answer (the step closed, or we got paired otherwise) changes nothing."""
    state = make()
    before = (state.phase, state.partner, state.session)
    state.answered(accepted)
    assert (state.phase, state.partner, state.session) == before


def test_answer_after_close_is_ignored():
    state = proposing("m", "z")
    state.close()
    state.answered(True)
    assert (state.phase, state.partner, state.session) == (Phase.IDLE, None, None)


def test_is_partner():
    state = paired_by_proposal("m", "a", S1)
    assert state.is_partner("a", S1)
    assert not state.is_partner("a", S2)  # wrong session
    assert not state.is_partner("b", S1)  # wrong peer
    state.close()
    assert not state.is_partner("a", S1)


def test_is_partner_only_once_paired():
    state = proposing("m", "z", S1)
    assert not state.is_partner("z", S1)  # not before the answer
    state.answered(True)
    assert state.is_partner("z", S1)
    assert not ready("m").is_partner("z", S1)


def test_may_send_payload_from_the_replica_we_propose_to():
    """The replica we proposed to starts pushing its payload as soon as it accepts: its chunks are welcome
    while our proposal is still out, in that session only, and not after a refusal or the step's end."""
    state = proposing("m", "z", S1)
    assert state.may_send_payload("z", S1)
    assert not state.may_send_payload("z", S2) and not state.may_send_payload("y", S1)
    state.answered(True)
    assert state.may_send_payload("z", S1)
    state.close()
    assert not state.may_send_payload("z", S1)
    refused = proposing("m", "z", S1)
    refused.answered(False)
    assert not refused.may_send_payload("z", S1)
    assert not ready("m").may_send_payload("z", S1)
    assert paired_by_proposal("m", "a", S1).may_send_payload("a", S1)


# ---------------------------------------------------------------- choosing a partner


def test_proposal_candidates():
    assert proposal_candidates("m", ["a", "m", "n", "z", "q"], {"q"}) == ["n", "z"]
    assert proposal_candidates("m", [], set()) == []


def test_choose_partner_none_without_candidates():
    rng = random.Random(0)
    assert choose_partner("m", [], set(), rng) is None
    assert choose_partner("m", ["a", "b", "m"], set(), rng) is None
    assert choose_partner("m", ["a", "n", "z"], {"n", "z"}, rng) is None


@given(
    my_id=st.text(alphabet="abcdef", min_size=1, max_size=3),
    board=st.lists(st.text(alphabet="abcdef", min_size=1, max_size=3), max_size=12),
    refused_mask=st.lists(st.booleans(), min_size=12, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_choose_partner_only_larger_unrefused_ids(my_id, board, refused_mask, seed):
    refused = {p for p, r in zip(board, refused_mask) if r}
    choice = choose_partner(my_id, board, refused, random.Random(seed))
    allowed = {p for p in board if p > my_id and p not in refused}
    if allowed:
        assert choice in allowed
    else:
        assert choice is None


def test_choose_partner_is_uniform_over_candidates():
    rng = random.Random(1234)
    # duplicates on the board must not weigh a candidate more
    board = ["a", "c", "d", "d", "d", "e", "f", "m", "z"]
    draws = collections.Counter(choose_partner("b", board, {"f"}, rng) for _ in range(6000))
    assert set(draws) == {"c", "d", "e", "m", "z"}
    for peer, count in draws.items():  # 1200 expected each; 4 sigma is about 124
        assert 1050 < count < 1350, (peer, draws)


def test_choose_partner_is_deterministic_given_the_seed():
    board = [f"p{i:02d}" for i in range(20)]
    one = [choose_partner("p03", board, set(), random.Random(7)) for _ in range(5)]
    assert len(set(one)) == 1
    # the board's order does not matter either (candidates are sorted before drawing)
    assert choose_partner("p03", board[::-1], set(), random.Random(7)) == one[0]


# ---------------------------------------------------------------- simulated swarms


def peer_ids(rng: random.Random, n: int) -> list[str]:
    ids: set[str] = set()
    while len(ids) < n:
        ids.add("12D3Koo" + "".join(rng.choice("0123456789abcdefABCDEF") for _ in range(8)))
    return sorted(ids, key=lambda _: rng.random())


def check_pairs(states: dict[str, PairingState]) -> list[tuple[str, str]]:
    """Every pair is symmetric with one session, nobody is in two pairs; returns the pairs (driver first)."""
    pairs = []
    for pid, s in states.items():
        if s.phase is Phase.PAIRED:
            other = states[s.partner]
            assert other.phase is Phase.PAIRED and other.partner == pid and other.session == s.session
            assert s.is_driver != other.is_driver
            if s.is_driver:
                pairs.append((pid, s.partner))
    members = [p for pair in pairs for p in pair]
    assert len(members) == len(set(members))
    sessions = [states[d].session for d, _ in pairs]
    assert len(sessions) == len(set(sessions))
    return pairs


def new_session(rng: random.Random) -> bytes:
    return rng.getrandbits(128).to_bytes(16, "big")


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("seed", range(6))
def test_sequential_proposals_yield_a_maximal_matching(n: int, seed: int):
    """Each replica in turn runs the daemon's loop (choose, propose, the partner answers, answered) until paired
    or out of candidates. Everyone is on the board, paired replicas included (records expire, they are not
    removed), so one pass must pair all but at most one replica."""
    rng = random.Random(seed)
    ids = peer_ids(rng, n)
    states = {p: ready(p) for p in ids}
    for pid in ids:
        me, refused = states[pid], set()
        while me.phase is Phase.READY:
            board = [p for p in ids if p != pid]
            candidate = choose_partner(pid, board, refused, rng)
            if candidate is None:
                break
            session = new_session(rng)
            me.propose(candidate, session)
            accepted = states[candidate].on_proposal(pid, session) is None
            me.answered(accepted)
            if not accepted:
                refused.add(candidate)
    pairs = check_pairs(states)
    assert len(pairs) == n // 2
    assert sum(s.phase is Phase.READY for s in states.values()) == n % 2


def run_interleaved(ids: list[str], rng: random.Random, max_rounds: int = 200) -> tuple[dict[str, PairingState], int]:
    """Proposals and their answers in flight at once, delivered in random order.

    Mirrors NoLoCoService: a READY replica reads the board, chooses and proposes (synchronously); the
    partner's on_proposal runs when the request arrives; answered() runs when the reply arrives. A refused
    candidate is not asked again within a round (REFUSAL_MEMORY_S). Checks the pair invariants after every event.
    """
    states = {p: ready(p) for p in ids}
    for rounds in range(1, max_rounds + 1):
        refused: dict[str, set[str]] = {p: set() for p in ids}
        requests: list[tuple[str, str, bytes]] = []  # (sender, to, session)
        replies: list[tuple[str, str, bool]] = []  # (proposer, candidate, accepted)
        while True:
            actions = [("propose", p) for p in ids if states[p].phase is Phase.READY
                       and choose_partner(p, ids, refused[p], rng) is not None]
            actions += [("request", i) for i in range(len(requests))]
            actions += [("reply", i) for i in range(len(replies))]
            if not actions:
                break
            what, arg = rng.choice(actions)
            if what == "propose":
                candidate = choose_partner(arg, [p for p in ids if p != arg], refused[arg], rng)
                session = new_session(rng)
                states[arg].propose(candidate, session)
                requests.append((arg, candidate, session))
            elif what == "request":
                sender, to, session = requests.pop(arg)
                replies.append((sender, to, states[to].on_proposal(sender, session) is None))
            else:
                proposer, candidate, accepted = replies.pop(arg)
                states[proposer].answered(accepted)
                if not accepted:
                    refused[proposer].add(candidate)
            # while messages fly: a PAIRED replica's partner is PAIRED with it (same session), or is the
            # proposer still waiting for the reply that accepts
            accepting = {(proposer, candidate) for proposer, candidate, ok in replies if ok}
            for pid, s in states.items():
                if s.phase is Phase.PAIRED:
                    other = states[s.partner]
                    assert other.partner == pid and other.session == s.session
                    assert other.phase is Phase.PAIRED or (
                        other.phase is Phase.PROPOSING and (s.partner, pid) in accepting
                    )
        check_pairs(states)
        unpaired = [p for p in ids if states[p].phase is Phase.READY]
        if len(unpaired) <= 1:
            return states, rounds
    return states, max_rounds


@pytest.mark.parametrize("n", [2, 5, 8, 13])
@pytest.mark.parametrize("seed", range(8))
def test_interleaved_proposals_pair_everyone_but_one(n: int, seed: int):
    rng = random.Random(1000 * n + seed)
    ids = peer_ids(rng, n)
    states, rounds = run_interleaved(ids, rng)
    pairs = check_pairs(states)
    assert len(pairs) == n // 2, f"after {rounds} rounds"


def test_interleaved_with_late_arrivals_and_early_leavers():
    """Some replicas never open (still inner-stepping): they refuse, and the rest still pair among themselves."""
    rng = random.Random(99)
    ids = peer_ids(rng, 12)
    states = {p: PairingState(p) for p in ids}
    open_ids = ids[:9]
    for p in open_ids:
        states[p].open()
    # the board holds every id (stale records of the idle ones); idle ones refuse
    for pid in sorted(open_ids):
        me, refused = states[pid], set()
        while me.phase is Phase.READY:
            candidate = choose_partner(pid, ids, refused, rng)
            if candidate is None:
                break
            session = new_session(rng)
            me.propose(candidate, session)
            me.answered(states[candidate].on_proposal(pid, session) is None)
            if me.phase is Phase.READY:
                refused.add(candidate)
    pairs = check_pairs(states)
    assert all(states[p].phase is Phase.IDLE for p in ids[9:])
    assert len(pairs) == 4
