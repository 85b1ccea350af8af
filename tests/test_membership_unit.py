"""Join tokens, the run's record rules and the membership policy, as plain functions (no network)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time
from swarmd.daemon.identity import NodeIdentity
from swarmd.daemon.membership import (
    Membership, TokenError, check_token, mint_token, read_revocations, revoke_tokens, token_bytes,
)
from swarmd.daemon.peers import PeerTable
from swarmd.daemon.records import (
    Heartbeat, StageEntry, encode_ready, owner_peer_id, ready_key, record_signer, stage_key,
)

MESSAGES = {"run": "is for run", "peer": "is for peer", "stage": "allows stages", "revoked": "was revoked",
            "expired": "expired", "seed": "not signed by this run's seed"}
BEAT = Heartbeat(throughput=10.0, queue_depth=0, inner_step=5, samples=40, maddrs=("/ip4/127.0.0.1/tcp/1",))


@pytest.fixture(scope="module")
def ids(tmp_path_factory) -> dict[str, NodeIdentity]:
    return {name: NodeIdentity.load_or_create(tmp_path_factory.mktemp(name)) for name in ("seed", "alice", "mallory")}


def test_a_token_grants_what_it_says(ids):
    seed, alice = ids["seed"], ids["alice"]
    text, grant = mint_token(seed, "run1", 60, peer_id=alice.peer_id, stages=[1])
    raw = token_bytes(text)
    assert check_token(raw, seed.public_der, "run1", alice.peer_id, 1, frozenset()) == grant
    assert check_token(raw, seed.public_der, "run1", alice.peer_id, None, frozenset()).token_id == grant.token_id
    refusals = {
        "run": dict(run_id="run2"),
        "peer": dict(peer_id=ids["mallory"].peer_id),
        "stage": dict(stage=0),
        "revoked": dict(revoked=frozenset({grant.token_id})),
        "expired": dict(now=time.time() + 61),
        "seed": dict(seed_public_der=ids["mallory"].public_der),
    }
    for what, change in refusals.items():
        kw = dict(raw=raw, seed_public_der=seed.public_der, run_id="run1", peer_id=alice.peer_id, stage=1,
                  revoked=frozenset()) | change
        with pytest.raises(TokenError, match=MESSAGES[what]):
            check_token(**kw)


def test_forged_and_garbled_tokens_are_refused(ids):
    seed, mallory = ids["seed"], ids["mallory"]
    forged, _ = mint_token(mallory, "run1", 60)  # right format, wrong signer
    with pytest.raises(TokenError, match="not signed by this run's seed"):
        check_token(token_bytes(forged), seed.public_der, "run1", mallory.peer_id, None, frozenset())
    good, _ = mint_token(seed, "run1", 60)
    raw = bytearray(token_bytes(good))
    raw[-5] ^= 0xFF  # a flipped signature byte
    with pytest.raises(TokenError):
        check_token(bytes(raw), seed.public_der, "run1", mallory.peer_id, None, frozenset())
    for garbage in (b"\xc1", b"\x80", b"\x00" * 10):
        with pytest.raises(TokenError, match="malformed"):
            check_token(garbage, seed.public_der, "run1", mallory.peer_id, None, frozenset())
    for text in ("", "!!!not base64!!!", "A" * 5000):
        with pytest.raises(TokenError):
            token_bytes(text)


def test_revocations_file_round_trip(tmp_path: Path):
    assert read_revocations(tmp_path) == frozenset()
    assert revoke_tokens(tmp_path, ["0123456789abcdef"]) == {"0123456789abcdef"}
    assert revoke_tokens(tmp_path, ["fedcba9876543210"]) == {"0123456789abcdef", "fedcba9876543210"}
    assert read_revocations(tmp_path) == {"0123456789abcdef", "fedcba9876543210"}
    with pytest.raises(TokenError):
        revoke_tokens(tmp_path, ["not-an-id"])


def _record(key: str, subkey: bytes | str, value: bytes, ttl: float = 5.0) -> DHTRecord:
    return DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey),
                     MSGPackSerializer.dumps(value), get_dht_time() + ttl)


def test_only_owner_signed_well_formed_entries_pass(ids):
    alice = record_signer("run1", 2, ids["alice"])
    mallory = record_signer("run1", 2, ids["mallory"])
    assert owner_peer_id(alice.subkey) == ids["alice"].peer_id

    def signed(signer, record: DHTRecord) -> DHTRecord:
        return DHTRecord(record.key, record.subkey, signer.validator.sign_value(record), record.expiration_time)

    own = signed(alice, _record(stage_key("run1", 1), alice.subkey, BEAT.encode()))
    assert alice.validator.validate(own) and mallory.validator.validate(own)  # everyone accepts it
    cases = {
        # mallory writes under alice's marker: she cannot sign for alice's key
        "foreign": signed(mallory, _record(stage_key("run1", 1), alice.subkey, BEAT.encode())),
        # an entry under a bare peer id: no owner, no signature
        "unsigned": _record(stage_key("run1", 1), ids["alice"].peer_id, BEAT.encode()),
        "not a heartbeat": signed(alice, _record(stage_key("run1", 1), alice.subkey, b"\xc1junk")),
        "oversize": signed(alice, _record(stage_key("run1", 1), alice.subkey, b"\0" * 20000)),
        "immortal": signed(alice, _record(stage_key("run1", 1), alice.subkey, BEAT.encode(), ttl=1e6)),
        "bad ready entry": signed(alice, _record(ready_key("run1", 0), alice.subkey, BEAT.encode())),
    }
    for what, record in cases.items():
        assert not alice.validator.validate(record), what
    tampered = DHTRecord(own.key, own.subkey, own.value.replace(b"\x05", b"\x06", 1), own.expiration_time)
    assert not alice.validator.validate(tampered)
    regular = DHTRecord(own.key, DHTProtocol.IS_REGULAR_VALUE, own.value, own.expiration_time)
    assert not alice.validator.validate(regular)
    ready = signed(alice, _record(ready_key("run1", 0), alice.subkey, encode_ready(3, 100)))
    assert alice.validator.validate(ready)
    # keys outside the run (another run, hivemind's own records) are not the run's business
    assert alice.validator.validate(_record("some/other/key", "peer", b"anything"))
    assert alice.validator.validate(_record(stage_key("run2", 1), "peer", b"anything"))


def test_private_run_members_need_a_valid_token(ids):
    seed, alice, mallory = ids["seed"], ids["alice"], ids["mallory"]
    text, grant = mint_token(seed, "run1", 60, stages=[1])
    table = PeerTable(2)
    membership = Membership("run1", True, seed.public_der, table, refresh=lambda: None)
    with_token = StageEntry(alice.peer_id, Heartbeat(1.0, 0, 0, 0, (), token=token_bytes(text)), 1e12)
    without = StageEntry(mallory.peer_id, Heartbeat(1.0, 0, 0, 0, ()), 1e12)
    the_seed = StageEntry(seed.peer_id, Heartbeat(1.0, 0, 0, 0, ()), 1e12)
    assert membership.accepts(with_token, 1) and not membership.accepts(with_token, 0)  # stages [1] only
    assert not membership.accepts(without, 1)
    assert membership.accepts(the_seed, 0)  # the seed signs the tokens: it needs none
    membership.revoked = frozenset({grant.token_id})
    assert not membership.accepts(with_token, 1)
    leaving = StageEntry(alice.peer_id, Heartbeat(1.0, 0, 0, 0, (), leaving=True, token=token_bytes(text)), 1e12)
    membership.revoked = frozenset()
    assert membership.accepts(leaving, 0)  # a withdrawal is checked without its stage
    open_run = Membership("run1", False, seed.public_der, table, refresh=lambda: None)
    assert open_run.accepts(without, 0)
