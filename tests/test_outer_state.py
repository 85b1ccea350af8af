"""A replica's outer state: flat parameter vectors, chunking, payload checks, the ban rule, the NoLoCo step
(the kernel chunk by chunk on the partner's chunks as received) and its clip, and the error feedback."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from noloco_reference import noloco_update64
from swarmd.protocols.codecs import decode_tensor, encode_tensor
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.swarm.outer import (
    BAN_MAX_FACTOR,
    FAILURE_TABLE_SIZE,
    KNOWN_TABLE_SIZE,
    PIECE,
    OuterState,
    ParameterReplica,
    PartnerBans,
    assign_flat_,
    chunk_bounds,
    commit_residuals,
    encode_payload,
    flatten_parameters,
    outer_step_,
    payload_problem,
    payload_sums,
    payload_values,
    pull_scale,
)

COEFFS = {"beta": 0.7, "gamma": 0.7, "mu": 0.5}


class Tiny(torch.nn.Module):
    """Mixed shapes and dtypes, a frozen parameter, and a buffer (neither belongs to the replica)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(5, 3, generator=g))
        self.bias = torch.nn.Parameter(torch.randn(5, generator=g))
        self.bf16 = torch.nn.Parameter(torch.randn(2, 3, generator=g).to(torch.bfloat16))
        self.frozen = torch.nn.Parameter(torch.randn(4, generator=g), requires_grad=False)
        self.scalar = torch.nn.Parameter(torch.tensor(0.25))
        self.register_buffer("running", torch.zeros(7))


def _rand(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- flat vectors


def test_flatten_is_a_float32_copy_in_order():
    model = Tiny()
    params = [model.weight, model.bias, model.bf16, model.scalar]
    flat = flatten_parameters(params)
    assert flat.dtype == torch.float32 and flat.shape == (15 + 5 + 6 + 1,)
    assert torch.equal(flat[:15], model.weight.detach().reshape(-1))
    assert torch.equal(flat[20:26], model.bf16.detach().float().reshape(-1))
    assert flat[-1] == 0.25
    flat += 1  # a copy: the model is untouched
    assert model.scalar.item() == 0.25


def test_replica_holds_the_trainable_parameters_only():
    model = Tiny()
    replica = ParameterReplica(model)
    assert [id(p) for p in replica.params] == [id(p) for p in (model.weight, model.bias, model.bf16, model.scalar)]
    assert replica.read_flat().numel() == 27


def test_flat_round_trip_including_bf16():
    model = Tiny()
    replica = ParameterReplica(model)
    frozen = model.frozen.detach().clone()
    flat = replica.read_flat()
    new = flat * 2 + 1
    replica.write_flat(new)
    assert model.bf16.dtype == torch.bfloat16 and model.weight.dtype == torch.float32
    back = replica.read_flat()
    # float32 parameters exactly; the bf16 one up to its rounding
    assert torch.equal(back[:20], new[:20]) and torch.equal(back[26:], new[26:])
    assert torch.allclose(back[20:26], new[20:26], rtol=2**-7, atol=0)
    assert torch.equal(back[20:26], new[20:26].to(torch.bfloat16).float())
    assert torch.equal(model.frozen, frozen)
    # writing what we read changes nothing
    replica.write_flat(back)
    assert torch.equal(replica.read_flat(), back)


def test_write_flat_keeps_the_parameter_objects():
    model = Tiny()
    replica = ParameterReplica(model)
    before = [id(p) for p in model.parameters()]
    replica.write_flat(torch.zeros(27))
    assert [id(p) for p in model.parameters()] == before
    assert all(float(p.detach().abs().sum()) == 0 for p in replica.params)


def test_assign_flat_raises_on_too_long():
    params = [torch.zeros(3), torch.zeros(2)]
    with pytest.raises(ValueError, match="6 elements"):
        assign_flat_(params, torch.ones(6))


@pytest.mark.parametrize("n", [0, 2, 3, 4])
def test_assign_flat_raises_value_error_on_too_short(n: int):
    params = [torch.zeros(3), torch.zeros(2)]
    with pytest.raises(ValueError):
        assign_flat_(params, torch.ones(n))
    assert all(bool((p == 0).all()) for p in params), "a wrong size must not leave the model half written"


# ---------------------------------------------------------------- chunks


@pytest.mark.parametrize("numel,chunk", [(1, 1), (7, 3), (10, 10), (11, 10), (1001, 64), (5, 1000)])
def test_chunk_bounds_cover_exactly(numel: int, chunk: int):
    bounds = chunk_bounds(numel, chunk)
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert all(0 < end - start <= chunk for start, end in bounds)
    assert len(bounds) == math.ceil(numel / chunk)


@given(numel=st.integers(0, 2000), chunk=st.integers(1, 300))
@settings(max_examples=60, deadline=None)
def test_chunk_bounds_partition(numel: int, chunk: int):
    bounds = chunk_bounds(numel, chunk)
    covered = [i for start, end in bounds for i in range(start, end)]
    assert covered == list(range(numel))
    assert all(end - start == chunk for start, end in bounds[:-1])


def test_chunk_bounds_edge_cases():
    assert chunk_bounds(0, 4) == []
    with pytest.raises(ValueError):
        chunk_bounds(10, 0)
    with pytest.raises(ValueError):
        chunk_bounds(10, -1)


# ---------------------------------------------------------------- outer state and payload checks


def test_start_takes_a_float32_copy():
    theta = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    state = OuterState.start(theta)
    assert state.phi.dtype == torch.float32 and torch.equal(state.phi, theta.float())
    assert torch.equal(state.delta, torch.zeros(3)) and state.outer_step == 0 and state.numel == 3
    theta32 = torch.ones(4)
    state = OuterState.start(theta32)
    theta32 += 1
    assert torch.equal(state.phi, torch.ones(4))  # not a view of the model's vector


def test_payload_sums_hand_example():
    own = torch.tensor([1.0, 1.0, 1.0])
    assert payload_sums(own, torch.tensor([4.0, 5.0, 1.0]), torch.tensor([1.0, -2.0, 2.0])) == (9.0, 25.0)
    # float64 sums: no float32 overflow for large values
    _, distance_sq = payload_sums(torch.zeros(4), torch.full((4,), 1e30), torch.zeros(4))
    assert distance_sq == pytest.approx(4e60)


def test_chunked_payload_sums_add_up():
    own, phi, progress = _rand(1000, 0), _rand(1000, 1), _rand(1000, 2)
    parts = [payload_sums(own[s:e], phi[s:e], progress[s:e]) for s, e in chunk_bounds(1000, 77)]
    whole = payload_sums(own, phi, progress)
    assert sum(p for p, _ in parts) == pytest.approx(whole[0], rel=1e-12)
    assert sum(d for _, d in parts) == pytest.approx(whole[1], rel=1e-12)


BOUNDS = {"max_divergence": 1.0, "max_distance_ratio": 5.0, "max_progress_ratio": 2.0, "known": True}
NEW = {**BOUNDS, "known": False}  # a partner met for the first time


def _problem(own_phi: torch.Tensor, own_progress: torch.Tensor, phi: torch.Tensor, progress: torch.Tensor) -> str | None:
    """payload_problem on tensors, as the daemon sums them."""
    return payload_problem(float(own_phi.double().norm()), float(own_progress.double().norm()), 0.0,
                           *payload_sums(own_phi, phi, progress), **BOUNDS)


def test_payload_problem_accepts_an_honest_partner():
    """A partner that trained apart from us: its phi a few of our progress norms away, its progress like ours."""
    phi, progress = _rand(500, 3), 0.1 * _rand(500, 5)
    partner_phi = phi + 0.3 * _rand(500, 4)  # 3 x our progress norm away (0.3 x ||phi||)
    assert _problem(phi, progress, partner_phi, 0.1 * _rand(500, 6)) is None
    assert _problem(phi, progress, phi.clone(), torch.zeros(500)) is None
    # right at the bounds is still fine
    assert payload_problem(10.0, 2.0, 0.0, 4.0**2, 10.0**2, **BOUNDS) is None


@pytest.mark.parametrize("scale", [-9.0, -1.0, 0.0, 2.0, 1e6])
def test_payload_problem_rejects_a_partner_far_from_our_phi(scale: float):
    """phi' = -9 phi passed the old 10x norm bound; phi' = 0 or 2 phi would pull ours far in one step."""
    phi, progress = _rand(500, 3), 0.1 * _rand(500, 5)
    why = _problem(phi, progress, scale * phi, progress.clone())
    assert isinstance(why, str) and "away" in why


def test_payload_problem_bounds_the_distance_in_our_progress_norms_and_in_our_phi_norm():
    """Whichever bound is the tighter rules: our progress norm 1, ||phi|| 10 (the first bound, 5) or 4 (the
    second, 4)."""
    assert payload_problem(10.0, 1.0, 0.0, 1.0, 4.99**2, **BOUNDS) is None
    assert "own drift" in payload_problem(10.0, 1.0, 0.0, 1.0, 5.01**2, **BOUNDS)
    assert payload_problem(4.0, 1.0, 0.0, 1.0, 3.99**2, **BOUNDS) is None
    assert "phi's norm away" in payload_problem(4.0, 1.0, 0.0, 1.0, 4.01**2, **BOUNDS)


def test_payload_problem_measures_the_distance_in_our_last_move_when_that_is_larger():
    """Right after a solo step that covered a long wait, our phi moved by 3 (||delta||) while our progress since
    is 1: a partner still where we left sits 3 away, within 5 x 3; the ||phi|| bound still rules."""
    assert payload_problem(100.0, 1.0, 3.0, 1.0, 3.0**2, **BOUNDS) is None
    assert payload_problem(100.0, 1.0, 3.0, 1.0, 14.99**2, **BOUNDS) is None
    assert "own drift" in payload_problem(100.0, 1.0, 3.0, 1.0, 15.01**2, **BOUNDS)
    assert "own drift" in payload_problem(100.0, 1.0, 0.5, 1.0, 5.01**2, **BOUNDS)  # progress is the larger
    assert "phi's norm away" in payload_problem(10.0, 1.0, 3.0, 1.0, 10.01**2, **BOUNDS)
    assert "progress norm" in payload_problem(100.0, 1.0, 3.0, 2.01**2, 0.0, **BOUNDS)  # not in the move


def test_a_partner_met_for_the_first_time_may_lie_farther_and_its_pull_is_clipped():
    """Our progress norm 1: a known partner 10 away is rejected; one met for the first time is accepted, with
    half its pull (as if 5 away); the ||phi|| bound and the progress bound hold for both."""
    assert "own drift" in payload_problem(100.0, 1.0, 0.0, 1.0, 10.0**2, **BOUNDS)
    assert payload_problem(100.0, 1.0, 0.0, 1.0, 10.0**2, **NEW) is None
    assert pull_scale(10.0**2, 1.0, 0.0, 5.0) == pytest.approx(0.5)
    assert pull_scale(4.99**2, 1.0, 0.0, 5.0) == 1.0 and pull_scale(14.99**2, 1.0, 3.0, 5.0) == 1.0
    assert pull_scale(10.0**2, 0.0, 0.0, 5.0) == 0.0  # no drift of our own yet: no pull from afar
    assert pull_scale(10.0**2, 0.0, 0.0, math.inf) == 1.0  # an unbounded ratio never clips (inf x 0 is no bound)
    assert "phi's norm" in payload_problem(10.0, 1.0, 0.0, 1.0, 10.01**2, **NEW)
    assert "progress norm" in payload_problem(100.0, 1.0, 0.0, 2.01**2, 0.0, **NEW)


def test_early_in_training_the_phi_bound_counts_our_own_drift():
    """One outer step early in training can move phi by more than its norm: a partner as far as our own drift
    is no stranger than that. phi' = -9 phi stays out."""
    assert payload_problem(1.0, 1.25, 0.0, 1.25**2, 1.2**2, **BOUNDS) is None
    assert "phi's norm" in payload_problem(1.0, 1.25, 0.0, 1.25**2, 1.3**2, **BOUNDS)
    assert "phi's norm" in payload_problem(1.0, 1.25, 0.0, 1.25**2, 10.0**2, **NEW)


def test_a_catch_up_met_for_the_first_time_may_lie_past_the_phi_bound_within_reach():
    """A catch-up's phi is its donor's weights at the download: as far from the donor's phi as the donor's
    progress was then, which can exceed its drift now (1.5 against 1.25) and ||phi|| (1): the donor accepts it
    at their first meeting, unclipped (within 5 drifts); a known partner that far is refused."""
    assert payload_problem(1.0, 1.25, 0.0, 1.25**2, 1.5**2, **NEW) is None
    assert pull_scale(1.5**2, 1.25, 0.0, 5.0) == 1.0
    assert "phi's norm" in payload_problem(1.0, 1.25, 0.0, 1.25**2, 1.5**2, **BOUNDS)
    # past 5 drifts it is the ||phi|| bound that lets a first meeting in, with its pull clipped
    assert payload_problem(100.0, 1.0, 0.0, 1.0, 20.0**2, **NEW) is None and pull_scale(20.0**2, 1.0, 0.0, 5.0) == 0.25
    assert "phi's norm" in payload_problem(10.0, 1.0, 0.0, 1.0, 10.5**2, **NEW)


def test_a_clipped_pull_moves_phi_as_far_as_a_partner_at_the_bound_would():
    """A partner 4x farther than the bound: with gamma scaled by pull_scale, our phi moves by what a partner at
    the bound in the same direction would have moved it."""
    phi, direction = _rand(500, 3), _rand(500, 4)
    direction *= 1.0 / float(direction.norm())
    drift = 0.1
    far = [(phi + 20 * drift * direction, torch.zeros(500))]
    at_bound = [(phi + 5 * drift * direction, torch.zeros(500))]
    scale = pull_scale(float((far[0][0] - phi).double().norm()) ** 2, drift, 0.0, 5.0)
    clipped, reference = OuterState.start(phi), OuterState.start(phi)
    outer_step_(clipped, phi.clone(), far, beta=1.0, gamma=scale, mu=0.0)
    outer_step_(reference, phi.clone(), at_bound, beta=1.0, gamma=1.0, mu=0.0)
    assert scale == pytest.approx(0.25) and torch.allclose(clipped.phi, reference.phi, atol=1e-6)


def test_own_move_counts_only_after_a_solo_step():
    """The last move widens our bound only if it was all our own learning: a paired move carries the partner's
    pull (a poisoner's, maybe)."""
    theta = _rand(500, 3)
    state = OuterState.start(theta)
    assert state.last_move_norm == 0.0  # no move yet
    moved = theta + 0.1 * _rand(500, 5)
    outer_step_(state, moved.clone(), None, beta=1.0, gamma=1.0, mu=0.0)
    assert state.last_move_norm == pytest.approx(float((moved - theta).double().norm()))
    outer_step_(state, moved.clone(), None, beta=1.0, gamma=1.0, mu=0.0, max_move=1.0)  # no progress: no move
    assert state.last_move_norm == 0.0
    partner = [(state.phi.clone(), torch.zeros(500))]
    outer_step_(state, (state.phi + 0.1).clone(), partner, beta=1.0, gamma=1.0, mu=0.0)
    assert state.last_move_norm == 0.0


def test_a_joiner_takes_its_weights_as_phi_and_the_rebase_as_its_last_move():
    """A NoLoCo joiner keeps the donor's delta and outer step, takes the downloaded weights as phi, and counts
    the rebase from the donor's phi (or the donor's last move, the larger) as its own last move: a partner
    still at the donor's phi is then within its distance bound."""
    donor = OuterState.start(_rand(500, 3))
    donor.delta.copy_(0.01 * _rand(500, 4))
    donor.outer_step = 7
    donor_phi, donor_delta = donor.phi.clone(), donor.delta.clone()  # join takes the downloaded buffers over
    theta = donor.phi + 0.2 * _rand(500, 5)  # the donor's progress at the snapshot
    joiner = OuterState.join(theta.clone(), donor)
    assert torch.equal(joiner.phi, theta) and torch.equal(joiner.delta, donor_delta) and joiner.outer_step == 7
    assert joiner.last_move_norm == pytest.approx(float((theta - donor_phi).double().norm()), rel=1e-6)
    own_progress = 0.02 * float(_rand(500, 6).norm())  # a few inner steps of its own
    distance_sq = float((donor_phi - joiner.phi).double().norm()) ** 2
    assert payload_problem(float(joiner.phi.norm()), own_progress, joiner.last_move_norm, own_progress**2,
                           distance_sq, **BOUNDS) is None
    assert "own drift" in payload_problem(float(joiner.phi.norm()), own_progress, 0.0, own_progress**2,
                                          distance_sq, **BOUNDS)


def test_payload_problem_rejects_progress_over_the_ratio_of_ours():
    phi, progress = _rand(500, 3), 0.1 * _rand(500, 5)
    assert _problem(phi, progress, phi.clone(), 1.9 * progress) is None
    why = _problem(phi, progress, phi.clone(), 2.01 * progress)
    assert isinstance(why, str) and "progress" in why


@pytest.mark.parametrize("progress_sq,distance_sq", [(math.inf, 0.0), (0.0, math.inf), (math.nan, 0.0), (0.0, math.nan)])
def test_payload_problem_rejects_nonfinite_sums(progress_sq: float, distance_sq: float):
    assert payload_problem(1.0, 1.0, 0.0, progress_sq, distance_sq, **BOUNDS) is not None


def test_payload_problem_with_no_progress_of_our_own():
    """A replica that made no progress has no yardstick: it accepts only a payload identical to its own."""
    assert payload_problem(1.0, 0.0, 0.0, 0.0, 0.0, **BOUNDS) is None
    assert payload_problem(1.0, 0.0, 0.0, 0.0, 1e-6, **BOUNDS) is not None
    assert payload_problem(1.0, 0.0, 0.0, 1e-6, 0.0, **BOUNDS) is not None
    assert payload_problem(0.0, 0.0, 0.0, 0.0, 0.0, **BOUNDS) is None  # phi = 0 too


# ---------------------------------------------------------------- the ban rule


def test_a_rejected_payload_bans_its_sender_at_once_for_ban_steps_outer_steps():
    bans = PartnerBans(ban_steps=4, max_failures=3)
    assert bans.settle("p", "rejected", now=10) == ("rejected", True)
    assert all(bans.is_banned("p", now) for now in range(10, 14)) and not bans.is_banned("p", 14)
    assert not bans.is_banned("q", 10)


def test_a_stall_bans_but_the_step_counts_as_failed():
    bans = PartnerBans(ban_steps=4, max_failures=3)
    assert bans.settle("p", "stalled", now=0) == ("failed", True)
    assert bans.is_banned("p", 3)


def test_failures_ban_only_when_repeated_in_a_row():
    """A partner that went away once (it died) is not banned; max_failures failures in a row are."""
    bans = PartnerBans(ban_steps=4, max_failures=3)
    assert bans.settle("p", "failed", 0) == ("failed", False)
    assert bans.settle("p", "failed", 1) == ("failed", False)
    assert bans.settle("p", "paired", 2) == ("paired", False)  # a good exchange clears the count
    assert bans.settle("p", "failed", 3) == ("failed", False)
    assert bans.settle("p", "failed", 4) == ("failed", False)
    assert not bans.is_banned("p", 4)
    assert bans.settle("p", "failed", 5) == ("failed", True)
    assert bans.is_banned("p", 6)
    assert bans.settle("p", "failed", 9) == ("failed", False)  # the count starts over after a ban


def test_a_partner_is_known_once_paired_and_the_table_is_bounded():
    bans = PartnerBans(ban_steps=4, max_failures=3)
    assert not bans.knows("p")
    bans.settle("p", "failed", 0)
    assert not bans.knows("p")
    bans.settle("p", "paired", 1)
    assert bans.knows("p")
    for i in range(KNOWN_TABLE_SIZE):
        bans.settle(f"q{i}", "paired", 2)
    assert not bans.knows("p") and bans.knows(f"q{KNOWN_TABLE_SIZE - 1}")


def test_a_repeat_offender_is_banned_longer_up_to_the_max_factor():
    bans = PartnerBans(ban_steps=2, max_failures=3)
    now, lengths = 0, []
    for _ in range(8):  # rejected again as soon as each ban ends
        bans.settle("p", "rejected", now)
        end = now
        while bans.is_banned("p", end):
            end += 1
        lengths.append(end - now)
        now = end
    assert lengths[:4] == [2, 4, 8, 16]
    assert max(lengths) == 2 * BAN_MAX_FACTOR
    bans.settle("p", "paired", now)  # one good step does not launder the record
    bans.settle("p", "rejected", now)
    assert bans.is_banned("p", now + 2 * BAN_MAX_FACTOR - 1)


def test_the_failure_table_is_bounded():
    bans = PartnerBans(ban_steps=1, max_failures=2)
    for i in range(FAILURE_TABLE_SIZE + 10):
        bans.settle(f"p{i}", "failed", 0)
    assert len(bans._failures) == FAILURE_TABLE_SIZE
    assert bans.settle("p0", "failed", 0) == ("failed", False)  # forgotten: its first failure again
    assert bans.settle(f"p{FAILURE_TABLE_SIZE + 9}", "failed", 0) == ("failed", True)  # remembered


def test_settle_refuses_unknown_outcomes_and_bad_settings():
    with pytest.raises(ValueError):
        PartnerBans(ban_steps=4, max_failures=3).settle("p", "solo", 0)
    with pytest.raises(ValueError):
        PartnerBans(ban_steps=0, max_failures=3)
    with pytest.raises(ValueError):
        PartnerBans(ban_steps=1, max_failures=0)


# ---------------------------------------------------------------- the outer step


def _setup(n: int = 257, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, generator=g)
    state = OuterState(phi=phi.clone(), delta=0.05 * torch.randn(n, generator=g), outer_step=3)
    theta_snap = phi + 0.1 * torch.randn(n, generator=g)
    partner_phi = phi + 0.02 * torch.randn(n, generator=g)
    partner_progress = 0.1 * torch.randn(n, generator=g)
    return state, theta_snap, partner_phi, partner_progress


def _as_received(partner_phi, partner_progress, cuts=None, codec="int8", block_size=64):
    """The partner's (phi, progress) as the daemon holds it: chunks through the codec, kept as int8 blocks."""
    cuts = cuts or [0, partner_phi.numel()]

    def wire(t: torch.Tensor):
        encoded = encode_tensor(t, codec, block_size=block_size)
        return decode_tensor(encoded.meta, encoded.payload, DEFAULT_LIMITS, keep_blocks=True)

    return [(wire(partner_phi[a:b]), wire(partner_progress[a:b])) for a, b in itertools.pairwise(cuts)]


def _decoded(received):
    return tuple(torch.cat([payload_values(pair[k]) for pair in received]) for k in (0, 1))


@pytest.mark.parametrize("paired", [True, False])
def test_outer_step_is_noloco(paired: bool):
    state, theta, partner_phi, partner_progress = _setup()
    received = _as_received(partner_phi, partner_progress) if paired else None
    decoded = _decoded(received) if paired else (None, None)
    want_phi, want_theta, want_delta = noloco_update64(state.phi, theta, state.delta, *decoded, **COEFFS)
    outer_step_(state, theta, received, **COEFFS)
    for got, want in ((theta, want_theta), (state.phi, want_phi), (state.delta, want_delta)):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert state.outer_step == 4


def test_outer_step_works_in_place():
    """No model-sized temporaries: phi, delta and theta are updated in their own buffers."""
    state, theta, partner_phi, partner_progress = _setup(seed=2)
    ptrs = state.phi.data_ptr(), state.delta.data_ptr(), theta.data_ptr()
    outer_step_(state, theta, _as_received(partner_phi, partner_progress), **COEFFS)
    assert (state.phi.data_ptr(), state.delta.data_ptr(), theta.data_ptr()) == ptrs
    assert torch.equal(theta, state.phi)


def test_outer_step_refuses_aliased_buffers():
    state, _, _, _ = _setup(seed=7)
    with pytest.raises(ValueError):
        outer_step_(state, state.phi, **COEFFS)


def test_outer_step_counts_steps():
    state, theta_snap, _, _ = _setup(seed=3)
    state.outer_step = 0
    for i in range(1, 4):
        outer_step_(state, theta_snap.clone(), **COEFFS)
        assert state.outer_step == i


def test_outer_step_hand_example():
    """phi=0, delta=1, theta=2, partner phi=4 and progress=0, beta=gamma=mu=0.5:
    delta = 0.5*1 + 0.5*(2+0)/2 + 0.5*(2-0) = 2; phi = 2; theta = 2."""
    state = OuterState(phi=torch.tensor([0.0]), delta=torch.tensor([1.0]))
    theta = torch.tensor([2.0])
    outer_step_(state, theta, [(torch.tensor([4.0]), torch.tensor([0.0]))], beta=0.5, gamma=0.5, mu=0.5)
    assert state.delta.item() == 2.0 and state.phi.item() == 2.0 and theta.item() == 2.0


def test_two_replicas_paired_from_the_same_payloads_move_together():
    """Both sides apply the step from the two exchanged payloads: gamma = 1 lands both on the same phi."""
    a, theta_a, _, _ = _setup(seed=5)
    b, theta_b, _, _ = _setup(seed=6)
    a.delta.zero_()
    b.delta.zero_()
    pa, pb = a.phi.clone(), b.phi.clone()
    prog_a, prog_b = theta_a - pa, theta_b - pb
    outer_step_(a, theta_a.clone(), [(pb.clone(), prog_b.clone())], beta=1.0, gamma=1.0, mu=0.0)
    outer_step_(b, theta_b.clone(), [(pa.clone(), prog_a.clone())], beta=1.0, gamma=1.0, mu=0.0)
    assert torch.allclose(a.phi, b.phi, atol=1e-6)
    assert not torch.allclose(pa, pb, atol=1e-2)


def test_outer_step_on_chunked_partner_equals_one_chunk():
    """The partner's payload as it arrives (consecutive chunks, whole blocks each, the last one odd) gives
    bit-for-bit the result of one chunk covering the vector, over a vector longer than a solo step's piece."""
    n = PIECE + 12_345
    results = []
    for cuts in ([0, n], [0, 64 * 7, 64 * 1600, PIECE, n]):
        state, theta, partner_phi, partner_progress = _setup(n=n, seed=11)
        outer_step_(state, theta, _as_received(partner_phi, partner_progress, cuts), **COEFFS)
        results.append((theta, state.phi, state.delta))
    for flat, chunked in zip(*results):
        assert torch.equal(flat, chunked)


def test_outer_step_refuses_badly_chunked_partners():
    state, theta, partner_phi, partner_progress = _setup(seed=12)
    with pytest.raises(ValueError, match="cover"):  # chunks that do not cover the vector
        outer_step_(state, theta, [(partner_phi[:100], partner_progress[:100])], **COEFFS)
    with pytest.raises(ValueError, match="alike"):
        outer_step_(state, theta, [(partner_phi[:100], partner_progress[:50]),
                                   (partner_phi[100:], partner_progress[50:])], **COEFFS)
    assert state.outer_step == 3  # refused before touching anything


@pytest.mark.parametrize("n", [257, PIECE + 12_345])
def test_outer_step_clips_the_move_of_phi(n: int):
    """A move over max_move x ||phi|| is scaled down to it, in the same direction; the clipped delta is the
    momentum carried on, and theta is the clipped phi."""
    state, theta_snap, partner_phi, partner_progress = _setup(n=n, seed=14)
    hostile = [(partner_phi - 9 * state.phi, partner_progress)]
    free = OuterState(phi=state.phi.clone(), delta=state.delta.clone())
    outer_step_(free, theta_snap.clone(), hostile, **COEFFS)
    free_move = free.phi - state.phi
    assert free_move.norm() > 0.5 * state.phi.norm()
    old_phi, theta = state.phi.clone(), theta_snap.clone()
    outer_step_(state, theta, hostile, **COEFFS, max_move=0.5)
    move = state.phi - old_phi
    assert float(move.norm()) == pytest.approx(0.5 * float(old_phi.norm()), rel=1e-5)
    assert torch.allclose(move, free_move * state.move_scale, atol=1e-5)
    assert state.move_scale == pytest.approx(float(0.5 * old_phi.norm() / free_move.norm()), rel=1e-5)
    assert torch.allclose(state.delta, move, atol=1e-6)
    assert torch.equal(theta, state.phi)


def test_outer_step_under_the_clip_is_unchanged():
    results = []
    for max_move in (math.inf, 10.0):
        state, theta, partner_phi, partner_progress = _setup(seed=16)
        outer_step_(state, theta, [(partner_phi, partner_progress)], **COEFFS, max_move=max_move)
        assert state.move_scale == 1.0
        results.append((theta, state.phi, state.delta))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- error feedback


def test_payload_sums_read_int8_blocks_as_decoded():
    own, phi, progress = _rand(300, 0), _rand(300, 1), _rand(300, 2)
    (received,) = _as_received(phi, progress)
    want = payload_sums(own, payload_values(received[0]), payload_values(received[1]))
    assert payload_sums(own, *received) == pytest.approx(want, rel=1e-12)


def test_residuals_are_committed_only_for_a_used_payload():
    """encode_payload leaves the residuals alone; commit_residuals (the partner used the payload) makes them
    the error of what was sent: x + residual - decoded(sent), per chunk."""
    state, theta, _, _ = _setup(n=1000, seed=20)
    bounds = chunk_bounds(1000, 256)
    first = encode_payload(state, theta, bounds, "int8-ef", 64)
    assert state.residual_phi is None  # nothing committed by encoding
    commit_residuals(state, theta, bounds, first)
    sent_phi = torch.cat([payload_values(decode_tensor(p.meta, p.payload, DEFAULT_LIMITS)) for p, _ in first])
    sent_progress = torch.cat([payload_values(decode_tensor(q.meta, q.payload, DEFAULT_LIMITS)) for _, q in first])
    assert torch.equal(state.residual_phi, state.phi - sent_phi)
    assert torch.equal(state.residual_progress, (theta - state.phi) - sent_progress)
    # the next payload carries that error; encoding it (a solo or failed step after) changes nothing
    kept = state.residual_phi.clone(), state.residual_progress.clone()
    second = encode_payload(state, theta, bounds, "int8-ef", 64)
    assert torch.equal(state.residual_phi, kept[0]) and torch.equal(state.residual_progress, kept[1])
    # and the residual is exactly what the quantizer carried: the two agree bit for bit
    from swarmd.kernels import quantize_int8_ef

    _, carried = quantize_int8_ef(state.phi[:256], kept[0][:256], block_size=64)
    commit_residuals(state, theta, bounds, second)
    assert torch.equal(state.residual_phi[:256], carried)


def test_codecs_without_error_feedback_keep_no_residual():
    state, theta, _, _ = _setup(n=300, seed=21)
    bounds = chunk_bounds(300, 256)
    for codec in ("none", "int8"):
        commit_residuals(state, theta, bounds, encode_payload(state, theta, bounds, codec, 64))
        assert state.residual_phi is None and state.residual_progress is None
