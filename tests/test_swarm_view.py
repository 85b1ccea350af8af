"""Swarm-wide numbers from the run's records: the heartbeat's loss and outer-step fields (hostile values
refused), the per-stage aggregation, and the swarmd_swarm_* gauges and churn counters (no network)."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import msgpack
import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from swarmd.daemon.identity import NodeIdentity
from swarmd.daemon.metrics import SwarmMetrics
from swarmd.daemon.peers import PeerTable
from swarmd.daemon.records import MAX_LOSS, Heartbeat, StageEntry, decode_heartbeat, record_signer, stage_key
from swarmd.daemon.swarm_view import swarm_view

FAR = 1e12  # an expiry that never comes


def _beat(step: int = 5, tput: float = 10.0, loss: float | None = None, outer=(0, 0, 0, 0), **flags) -> Heartbeat:
    return Heartbeat(throughput=tput, queue_depth=0, inner_step=step, samples=8 * step, maddrs=(), loss=loss,
                     outer_steps=outer, **flags)


def _raw(**fields) -> bytes:
    return msgpack.packb({"tput": 1.0, "queue": 0, "step": 1, "samples": 8, "maddrs": [], **fields})


def test_heartbeat_carries_loss_and_outer_steps():
    beat = _beat(loss=2.75, outer=(3, 1, 0, 2))
    assert decode_heartbeat(beat.encode()) == beat
    # before its first loss a node announces none; a diverged node's NaN or absurd loss is left out, not sent
    # (sent, it would make its whole entry invalid and drop it from every route)
    for loss in (None, math.nan, math.inf, -1.0, MAX_LOSS * 2):
        assert decode_heartbeat(_beat(loss=loss).encode()).loss is None
    # a heartbeat of a node from before these fields still reads
    old = decode_heartbeat(_raw())
    assert old is not None and old.loss is None and old.outer_steps == (0, 0, 0, 0)


@pytest.mark.parametrize("fields", [
    {"loss": math.nan}, {"loss": math.inf}, {"loss": -math.inf}, {"loss": -0.5}, {"loss": MAX_LOSS * 10},
    {"loss": "2.0"}, {"loss": 2}, {"loss": [2.0]}, {"loss": True},
    {"outer": [1, 2, 3]}, {"outer": [1, 2, 3, 4, 5]}, {"outer": [-1, 0, 0, 0]}, {"outer": [0, 0, 0, 2**60]},
    {"outer": [True, 0, 0, 0]}, {"outer": [0.5, 0, 0, 0]}, {"outer": {"paired": 1}}, {"outer": 7},
    # a claimed speed or count that would draw every route or overflow the swarm's sums
    {"tput": 1e308}, {"tput": math.inf}, {"tput": -1.0}, {"step": 2**60}, {"samples": 2**60}, {"queue": 2**30},
    {"step": True}, {"queue": False},
])
def test_hostile_fields_are_refused_at_the_door(fields, signer):
    value = _raw(**fields)
    assert decode_heartbeat(value) is None
    # the DHT validator runs the same decoder: such an entry, even signed by its owner, is never stored or returned
    assert not signer.validator.validate(_signed_stage_record(signer, value))
    assert signer.validator.validate(_signed_stage_record(signer, _raw(loss=2.0, outer=[1, 0, 0, 0])))


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return record_signer("run1", 2, NodeIdentity.load_or_create(tmp_path_factory.mktemp("alice")))


def _signed_stage_record(signer, value: bytes) -> DHTRecord:
    record = DHTRecord(DHTID.generate(source=stage_key("run1", 0)).to_bytes(), MSGPackSerializer.dumps(signer.subkey),
                       MSGPackSerializer.dumps(value), get_dht_time() + 5)
    return DHTRecord(record.key, record.subkey, signer.validator.sign_value(record), record.expiration_time)


@given(loss=st.floats(allow_nan=True, allow_infinity=True),
       outer=st.lists(st.integers(min_value=-2**63, max_value=2**64 - 1), min_size=0, max_size=6))
def test_decoded_fields_are_always_finite_and_bounded(loss, outer):
    beat = decode_heartbeat(_raw(loss=loss, outer=outer))
    if beat is not None:
        assert math.isfinite(beat.loss) and 0 <= beat.loss <= MAX_LOSS
        assert len(beat.outer_steps) == 4 and all(0 <= n <= 2**53 for n in beat.outer_steps)


def test_stage_view_sums_and_spans():
    stage0 = [StageEntry("a", _beat(step=10, tput=3.0, loss=2.0, outer=(2, 1, 0, 0)), FAR),
              StageEntry("b", _beat(step=14, tput=5.5, loss=3.0, outer=(1, 0, 1, 1)), FAR)]
    stage1 = [StageEntry("c", _beat(step=12, tput=4.0), FAR)]  # no loss yet
    view = swarm_view([stage0, stage1, []])
    assert view.nodes == 3 and view.peer_ids == {"a", "b", "c"}
    s0, s1, s2 = view.stages
    assert (s0.peers, s0.throughput, s0.inner_step_min, s0.inner_step_max, s0.loss) == (2, 8.5, 10, 14, 2.5)
    assert s0.outer_by_result() == {"paired": 3, "solo": 1, "rejected": 1, "failed": 1}
    assert (s1.peers, s1.loss, s1.inner_step_min, s1.inner_step_max) == (1, None, 12, 12)
    assert (s2.peers, s2.throughput, s2.inner_step_min, s2.loss) == (0, 0.0, None, None)
    assert s2.outer_steps == (0, 0, 0, 0)
    # a peer serving two stages (a hostile one can announce in both) counts once among the nodes
    assert swarm_view([stage0, [StageEntry("a", _beat(), FAR)]]).nodes == 2


def test_stage_view_is_the_same_whatever_the_order():
    entries = [StageEntry(str(i), _beat(step=i, tput=0.1 * (i + 1), loss=1.0 / (i + 1)), FAR) for i in range(20)]
    assert swarm_view([entries]) == swarm_view([list(reversed(entries))])


class _FakeDHT:
    """Answers a stage key's lookup with the dictionary record it was given."""

    def __init__(self, records: dict[str, dict]):
        self.records = records

    async def get(self, key: str, latest: bool = True):
        entries = self.records.get(key)
        return None if entries is None else SimpleNamespace(value=entries)


def test_peer_table_serving_leaves_out_joining_leaving_and_expired(tmp_path):
    signers = {n: record_signer("run1", 1, NodeIdentity.load_or_create(tmp_path / n)) for n in "abcd"}
    now = get_dht_time()
    beats = {"a": (_beat(), now + 60), "b": (_beat(joining=True), now + 60), "c": (_beat(leaving=True), now + 60),
             "d": (_beat(), now - 1)}
    record = {signers[n].subkey: ValueWithExpiration(b.encode(), exp) for n, (b, exp) in beats.items()}
    table = PeerTable(1)
    asyncio.run(table.refresh(_FakeDHT({stage_key("run1", 0): record}), "run1"))
    serving = table.serving(0)
    assert len(serving) == 1 and serving[0].beat == beats["a"][0]
    assert swarm_view([serving]).nodes == 1


def _value(registry: CollectorRegistry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, labels)


def test_swarm_metrics_export_the_view_and_count_churn():
    registry = CollectorRegistry()
    gauges = SwarmMetrics(registry, 2)
    peers = {name: StageEntry(name, _beat(step=s, loss=1.5, outer=(1, 0, 0, 0)), FAR)
             for name, s in (("a", 4), ("b", 6), ("c", 5), ("d", 7))}
    gauges.update(swarm_view([[peers["a"], peers["b"]], [peers["c"], peers["d"]]]))
    assert _value(registry, "swarmd_swarm_nodes") == 4
    assert _value(registry, "swarmd_swarm_peers", stage="1") == 2
    assert _value(registry, "swarmd_swarm_throughput_samples_per_second", stage="0") == 20.0
    assert _value(registry, "swarmd_swarm_inner_step_min", stage="0") == 4
    assert _value(registry, "swarmd_swarm_inner_step_max", stage="1") == 7
    assert _value(registry, "swarmd_swarm_loss", stage="1") == 1.5
    assert _value(registry, "swarmd_swarm_outer_steps", stage="0", result="paired") == 2
    assert _value(registry, "swarmd_swarm_outer_steps", stage="0", result="failed") == 0
    # the first view is the baseline: peers already there when the exporter starts are no joins
    assert _value(registry, "swarmd_swarm_joins_total") == 0 and _value(registry, "swarmd_swarm_leaves_total") == 0
    # d leaves, e joins stage 0: one of each; stage 1 keeps c alone
    e = StageEntry("e", _beat(step=1), FAR)
    gauges.update(swarm_view([[peers["a"], peers["b"], e], [peers["c"]]]))
    assert _value(registry, "swarmd_swarm_nodes") == 4 and _value(registry, "swarmd_swarm_peers", stage="1") == 1
    assert _value(registry, "swarmd_swarm_joins_total") == 1 and _value(registry, "swarmd_swarm_leaves_total") == 1
    # a stage left empty: no step or loss to show (NaN), zero peers
    gauges.update(swarm_view([[peers["a"]], []]))
    assert _value(registry, "swarmd_swarm_peers", stage="1") == 0
    assert math.isnan(_value(registry, "swarmd_swarm_inner_step_min", stage="1"))
    assert math.isnan(_value(registry, "swarmd_swarm_loss", stage="1"))
    assert _value(registry, "swarmd_swarm_leaves_total") == 4
