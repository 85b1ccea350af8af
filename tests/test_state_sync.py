"""Streamed, multi-donor state sync between real p2pd daemons on 127.0.0.1 (hivemind P2P instances in this
process, the daemon's own Transport, StateDonor and StateDownload): striping, a donor that dies mid-transfer,
a busy donor, and donors that send corrupt chunks or stall (dropped, banned, counted)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from swarmd.daemon.compute import ComputeLane
from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.p2p_host import create_p2p
from swarmd.daemon import state_sync
from swarmd.daemon.state_sync import REQUESTS_IN_FLIGHT, StateDonor, StateDownload, StateSyncError
from swarmd.daemon.transport import Transport
from swarmd.protocols import rpc
from swarmd.protocols.codecs import EncodedTensor
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.protocols.wire import decode_message, encode_message
from swarmd.swarm.model import count_parameters
from swarmd.swarm.outer import OuterState, flatten_parameters
from swarmd.swarm.routing import BanList
from swarmd.swarm.state_layout import read_chunk, take_snapshot
from test_state_layout import train_one_step, worker

CHUNK = 4096  # bytes: the tiny stage state becomes a few hundred chunks, enough to stripe and to fail midway


@dataclass
class Peer:
    p2p: object
    transport: Transport
    lane: ComputeLane
    metrics: NodeMetrics

    @property
    def id(self) -> str:
        return self.p2p.peer_id.to_base58()


async def start_peer(initial: list[str]) -> Peer:
    p2p = await create_p2p(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                           nat_port_map=False, auto_nat=False, use_relay=False)
    metrics = NodeMetrics()
    return Peer(p2p, Transport(p2p, metrics, DEFAULT_LIMITS), ComputeLane(), metrics)


async def stop_peer(peer: Peer) -> None:
    await peer.p2p.shutdown()
    peer.lane.close()


def source_state(seed: int = 1):
    w = worker(seed)
    train_one_step(w, 0)
    w.inner_step = 7
    numel = count_parameters(w.model)
    generator = torch.Generator().manual_seed(seed)
    return w, OuterState(phi=torch.randn(numel, generator=generator), delta=torch.randn(numel, generator=generator),
                         outer_step=3)


async def start_donor(initial: list[str], max_uploads: int = 2) -> tuple[Peer, StateDonor]:
    peer = await start_peer(initial)
    w, outer = source_state()
    donor = StateDonor(peer.transport, 1, peer.lane, lambda: take_snapshot(w, outer), peer.metrics,
                       max_uploads=max_uploads, chunk_bytes=CHUNK)
    await donor.register()
    return peer, donor


def download(joiner: Peer, chunk_timeout_s: float = 10.0, max_donors: int = 2) -> tuple[StateDownload, object]:
    target = worker(2)
    bans = BanList(base_s=600.0, max_s=600.0)  # a ban outlasts the test however slow a loaded machine runs it
    return StateDownload(joiner.transport, 1, target, joiner.lane, True, joiner.metrics, bans,
                         max_donors=max_donors, chunk_timeout_s=chunk_timeout_s, say=lambda text: None), target


def assert_cloned(target, result) -> None:
    source, outer = source_state()
    assert torch.equal(flatten_parameters(target.model.parameters()), flatten_parameters(source.model.parameters()))
    assert result.inner_step == 7 and result.outer_step == 3
    assert torch.equal(result.outer[0], outer.phi) and torch.equal(result.outer[1], outer.delta)
    train_one_step(source, 1)
    train_one_step(target, 1)  # AdamW moments came along
    assert torch.equal(flatten_parameters(target.model.parameters()), flatten_parameters(source.model.parameters()))


async def swarm(n_donors: int, **donor_kw) -> tuple[list[tuple[Peer, StateDonor]], Peer]:
    first = await start_donor([], **donor_kw)
    maddrs = [str(m) for m in await first[0].p2p.get_visible_maddrs()]
    donors = [first] + [await start_donor(maddrs, **donor_kw) for _ in range(n_donors - 1)]
    return donors, await start_peer(maddrs)


async def teardown(donors, joiner) -> None:
    for peer in [joiner, *(p for p, _ in donors)]:
        await stop_peer(peer)


def rejected(peer: Peer, reason: str) -> float:
    return peer.metrics.rejected.labels(reason)._value.get()


def test_a_joiner_stripes_chunks_across_two_donors_and_clones_the_state():
    async def scenario():
        donors, joiner = await swarm(2)
        try:
            job, target = download(joiner)
            result = await job.run(lambda: _const([p.id for p, _ in donors]))
            assert sorted(result.donors) == sorted(p.id for p, _ in donors)  # both served chunks
            assert joiner.metrics.bytes_received.labels("state")._value.get() >= result.nbytes
            assert_cloned(target, result)
        finally:
            await teardown(donors, joiner)

    asyncio.run(scenario())


def test_a_donor_that_dies_mid_transfer_loses_its_chunks_to_the_other():
    async def scenario():
        donors, joiner = await swarm(2)
        (victim, victim_donor), _ = donors
        served = 0
        original = victim_donor._on_chunk

        async def dying(sender, message):
            nonlocal served
            served += 1
            if served == 20:
                asyncio.get_running_loop().create_task(victim.p2p.shutdown())
            return await original(sender, message)

        await victim.transport.serve(rpc.STATE_CHUNK, "state_chunk", dying, ("state_chunk_request",))
        try:
            job, target = download(joiner, chunk_timeout_s=5.0)
            result = await job.run(lambda: _const([p.id for p, _ in donors]))
            assert served >= 20
            assert_cloned(target, result)
            assert rejected(joiner, "digest") == 0  # a dead donor is not a hostile one
        finally:
            await teardown(donors, joiner)

    asyncio.run(scenario())


def _nan_chunk(donor: StateDonor):
    async def handler(sender, message):
        served = donor._serving(message.fields["session"])
        parts = read_chunk(served.snapshot.tensors, served.plan[message.fields["index"]])
        bad = [EncodedTensor({"dtype": "float32", "shape": list(p.shape), "codec": "none"},
                             np.full(p.numel(), np.nan, dtype="<f4").tobytes()) for p in parts]
        return encode_message("state_chunk", dict(message.fields), bad)
    return handler


def _wrong_digest(donor: StateDonor):
    async def handler(sender, message):
        served = donor._serving(message.fields["session"])
        parts = [p.clone() + 1.0 for p in read_chunk(served.snapshot.tensors, served.plan[message.fields["index"]])]
        from swarmd.protocols.codecs import encode_tensor
        return encode_message("state_chunk", dict(message.fields), [encode_tensor(p, "none") for p in parts])
    return handler


def _wrong_shape(donor: StateDonor):
    async def handler(sender, message):
        from swarmd.protocols.codecs import encode_tensor
        return encode_message("state_chunk", dict(message.fields), [encode_tensor(torch.zeros(3), "none")])
    return handler


def _stall(donor: StateDonor):
    async def handler(sender, message):
        await asyncio.sleep(30)
        raise ProtocolError("busy", "never")
    return handler


@pytest.mark.parametrize("make_handler, reason", [(_nan_chunk, "nonfinite"), (_wrong_digest, "digest"),
                                                  (_wrong_shape, "shape"), (_stall, "stalled")],
                         ids=["nan", "digest", "shape", "stall"])
def test_a_bad_or_stalled_donor_is_dropped_and_the_joiner_completes_elsewhere(make_handler, reason):
    async def scenario():
        donors, joiner = await swarm(2)
        (bad, bad_donor), (good, _) = donors
        await bad.transport.serve(rpc.STATE_CHUNK, "state_chunk", make_handler(bad_donor), ("state_chunk_request",))
        try:
            job, target = download(joiner, chunk_timeout_s=2.0)
            result = await job.run(lambda: _const([bad.id, good.id]))
            assert result.donors == [good.id]
            assert_cloned(target, result)
            assert rejected(joiner, reason) >= 1
            assert job.bans.is_banned(bad.id, time.time())
        finally:
            await teardown(donors, joiner)

    asyncio.run(scenario())


def test_a_busy_donor_sends_the_joiner_elsewhere_and_no_donor_is_a_clear_error():
    async def scenario():
        donors, joiner = await swarm(2, max_uploads=1)
        (first, first_donor), (second, _) = donors
        try:
            # one joiner holds the first donor's only upload slot: the next one is told busy, goes to the second
            hold = StateDownload(joiner.transport, 1, worker(3), joiner.lane, True, joiner.metrics, BanList(),
                                 max_donors=1, say=lambda text: None)
            opened = await hold._open_sessions([first.id], 1)
            assert opened and first_donor.sessions == 1
            job, target = download(joiner, max_donors=2)
            result = await job.run(lambda: _const([first.id, second.id]))
            assert result.donors == [second.id] and any("busy" in e for e in job.errors)
            assert_cloned(target, result)
            nobody, _ = download(joiner)
            with pytest.raises(StateSyncError, match="no replica of stage 1 could serve its state"):
                await nobody.run(lambda: _const([]))
        finally:
            await teardown(donors, joiner)

    asyncio.run(scenario())


def test_a_donor_answers_at_most_a_few_chunk_requests_of_a_session_at_once():
    async def scenario():
        donors, joiner = await swarm(1)
        (first, donor), = donors
        try:
            hold = StateDownload(joiner.transport, 1, worker(3), joiner.lane, True, joiner.metrics, BanList(),
                                 max_donors=1, say=lambda text: None)
            (opened,) = await hold._open_sessions([first.id], 1)
            request = decode_message(encode_message("state_chunk_request",
                                                    {"session": opened.manifest.session, "index": 0}))
            answers = await asyncio.gather(*(donor._on_chunk(joiner.id, request) for _ in range(6)),
                                           return_exceptions=True)
            refused = [a for a in answers if isinstance(a, ProtocolError)]
            assert len(answers) - len(refused) == REQUESTS_IN_FLIGHT
            assert all(a.reason == "busy" for a in refused)
            assert isinstance(await donor._on_chunk(joiner.id, request), bytes)  # the slots came back
        finally:
            await teardown(donors, joiner)

    asyncio.run(scenario())


async def _const(value):
    return value


def test_a_later_joiner_gets_a_fresh_snapshot_and_a_donor_holds_at_most_two(monkeypatch):
    """Joiners within SNAPSHOT_SHARE_S of a snapshot share it; one that comes later gets the donor's state as it is
    now (steps and outer state), while the older snapshot still serves its session; a third snapshot while two are
    in use is refused as busy."""
    monkeypatch.setattr(state_sync, "SNAPSHOT_SHARE_S", 300.0)  # "later" is set by age(), not by a slow machine

    def age(donor: StateDonor) -> None:
        """As if SNAPSHOT_SHARE_S had passed since every snapshot was taken (a loaded machine's download can
        take longer than any real wait)."""
        for served in donor._snapshots:
            served.taken_at -= state_sync.SNAPSHOT_SHARE_S + 1.0

    async def scenario():
        peer = await start_peer([])
        w, outer = source_state()
        donor = StateDonor(peer.transport, 1, peer.lane, lambda: take_snapshot(w, outer), peer.metrics,
                           max_uploads=8, chunk_bytes=CHUNK)
        await donor.register()
        maddrs = [str(m) for m in await peer.p2p.get_visible_maddrs()]
        joiners = [await start_peer(maddrs) for _ in range(4)]
        try:
            def fetch(joiner: Peer):
                return download(joiner, max_donors=1)[0].run(lambda: _const([peer.id]))

            first = await fetch(joiners[0])
            w.inner_step, outer.outer_step = 50, 4
            shared = await fetch(joiners[1])  # within the share window: the same snapshot
            assert (first.inner_step, first.outer_step) == (shared.inner_step, shared.outer_step) == (7, 3)
            age(donor)
            later = await fetch(joiners[2])
            assert (later.inner_step, later.outer_step) == (50, 4)
            assert len(donor._snapshots) == 2 and donor.sessions == 3  # the first two sessions are not idle yet
            w.inner_step = 60
            age(donor)
            with pytest.raises(StateSyncError, match="busy"):
                await fetch(joiners[3])
        finally:
            await teardown([(peer, donor)], joiners[0])
            for joiner in joiners[1:]:
                await stop_peer(joiner)

    asyncio.run(scenario())
