"""DHT records of a run: key names, owner-signed subkeys, the record schemas, and their validation.

Every entry a node writes under the run's keys sits under a subkey that names its owner's public key
(hivemind's ``[owner:ssh-rsa ...]`` marker) and carries the owner's signature (hivemind's
RSASignatureValidator signs on store and checks on store and on every lookup answer). ``RunRecordValidator``
adds the run's own rules: on the run's keys only owner-signed dictionary entries, of bounded size and
lifetime, whose value parses. Readers take a peer's id from its entry's subkey, never from the value, so
nobody can write, mark or withdraw another peer's entry.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time
from swarmd.daemon.identity import NodeIdentity, peer_id_from_public_key
from swarmd.daemon.metrics import OUTER_RESULTS
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.swarm.routing import PeerInfo

_OWNER_PREFIX, _OWNER_SUFFIX = b"[owner:", b"]"
MAX_SUBKEY_BYTES = 1024  # an owner marker of a 4096-bit key is ~740 bytes
# The longest lifetime a record of each kind may claim: an entry cannot outlive its owner by more.
MAX_TTL_S = {"stage": 120.0, "ready": 600.0, "spec": 3600.0, "revoked": 3600.0}


def spec_key(run_id: str) -> str:
    return f"swarmd/{run_id}/spec"


def stage_key(run_id: str, stage: int) -> str:
    return f"swarmd/{run_id}/stage/{stage}"


def revoked_key(run_id: str) -> str:
    """The seed's revocation list of join tokens (private runs)."""
    return f"swarmd/{run_id}/revoked"


def ready_key(run_id: str, stage: int) -> str:
    """The stage's ready board: one short-lived subkey per replica waiting at an outer boundary."""
    return f"swarmd/{run_id}/ready/{stage}"


def encode_ready(outer_step: int, numel: int, paired: bool = False) -> bytes:
    """A ready-board entry. ``paired`` marks a replica that found its partner: proposers skip it."""
    entry = {"outer": outer_step, "numel": numel}
    if paired:
        entry["paired"] = True
    return msgpack.packb(entry, use_bin_type=True)


@functools.lru_cache(maxsize=4096)  # pure: a marker always names the same peer; parsing a key costs ~50 us
def _owner_of(marker: bytes) -> str | None:
    try:
        key = serialization.load_ssh_public_key(marker[len(_OWNER_PREFIX):-len(_OWNER_SUFFIX)])
    except (ValueError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, rsa.RSAPublicKey):
        return None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return peer_id_from_public_key(der)


def owner_peer_id(subkey: Any) -> str | None:
    """The peer id whose public key an owner-marker subkey names; None for any other subkey."""
    if not (isinstance(subkey, bytes) and len(subkey) <= MAX_SUBKEY_BYTES
            and subkey.startswith(_OWNER_PREFIX) and subkey.endswith(_OWNER_SUFFIX)):
        return None
    return _owner_of(subkey)


def _peer_entries(record: Any) -> Iterator[tuple[str, Any]]:
    """(owner's peer id, item) of every entry of a hivemind dictionary record with an owner-marker subkey."""
    if record is None or not isinstance(record.value, dict):
        return
    for subkey, item in record.value.items():
        if (peer_id := owner_peer_id(subkey)) is not None:
            yield peer_id, item


def decode_ready(value: Any) -> dict[str, Any] | None:
    """A ready-board entry's fields ({"outer", "numel", "paired"}), or None for anything malformed."""
    if not isinstance(value, bytes) or len(value) > 256:
        return None
    try:
        raw = msgpack.unpackb(value, raw=False, max_map_len=4, max_str_len=64)
    except (ValueError, TypeError, msgpack.ExtraData):
        return None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), int) and raw[k] >= 0 for k in ("outer", "numel")):
        return None
    return {"outer": raw["outer"], "numel": raw["numel"], "paired": raw.get("paired") is True}


def ready_peers(record: Any, numel: int) -> list[str]:
    """Owners of the ready board's well-formed entries of our parameter count that are not paired yet."""
    peers = []
    for peer_id, item in _peer_entries(record):
        entry = decode_ready(item.value)
        if entry is not None and entry["numel"] == numel and not entry["paired"]:
            peers.append(peer_id)
    return peers


MAX_TOKEN_BYTES = 2048  # a join token: a few fields and a 2048- or 4096-bit RSA signature


@dataclass(frozen=True)
class Heartbeat:
    """What a peer announces about itself under its stage's key (subkey: its owner marker).

    ``joining``: the peer is loading the stage's state and serves nothing yet (it is a member, not a route).
    ``leaving``: a withdrawal: the peer left this stage (records cannot be deleted, only outlived).
    ``token``: its join token, in a private run (every reader checks it).
    ``loss``: its latest training loss (None until it has one; a loss outside 0..MAX_LOSS is not announced).
    ``outer_steps``: its outer steps so far by result, in the order of OUTER_RESULTS (paired, solo, rejected, failed).
    """

    throughput: float  # samples/s its compute lane sustains
    queue_depth: int
    inner_step: int
    samples: int
    maddrs: tuple[str, ...]
    leaving: bool = False
    joining: bool = False
    token: bytes = b""
    loss: float | None = None
    outer_steps: tuple[int, int, int, int] = (0, 0, 0, 0)

    def encode(self) -> bytes:
        raw = {"tput": self.throughput, "queue": self.queue_depth, "step": self.inner_step,
               "samples": self.samples, "maddrs": list(self.maddrs)}
        for flag in ("leaving", "joining"):
            if getattr(self, flag):
                raw[flag] = True
        if self.token:
            raw["token"] = self.token
        if _valid_loss(self.loss):  # a diverged node's NaN or huge loss must not make its whole entry invalid
            raw["loss"] = float(self.loss)
        if any(self.outer_steps):
            raw["outer"] = list(self.outer_steps)
        return msgpack.packb(raw, use_bin_type=True)


MAX_LOSS = 1e4  # far above any cross-entropy (ln of a vocabulary), far below what breaks a sum
MAX_COUNT = 2**53  # no honest count comes near; below it a count and its sums stay exact in a float
# samples/s of one node: far above any accelerator's, far below what breaks a sum of hundreds of peers (a member
# can still overstate its speed within this bound; routing weights are what it claims)
MAX_THROUGHPUT = 1e7
MAX_QUEUE = 1 << 20


def _valid_count(n: Any, bound: int = MAX_COUNT) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= bound


def _valid_loss(loss: Any) -> bool:
    return isinstance(loss, float) and math.isfinite(loss) and 0.0 <= loss <= MAX_LOSS


def _valid_outer(outer: Any) -> bool:
    return (isinstance(outer, list) and len(outer) == len(OUTER_RESULTS)
            and all(_valid_count(n) for n in outer))


def decode_heartbeat(value: Any) -> Heartbeat | None:
    """Parse a heartbeat value from the DHT; None for anything malformed, oversized or absurd."""
    if not isinstance(value, bytes) or len(value) > DEFAULT_LIMITS.max_record_bytes:
        return None
    try:
        raw = msgpack.unpackb(value, raw=False, max_array_len=64, max_map_len=16, max_str_len=512,
                              max_bin_len=MAX_TOKEN_BYTES)
        tput, queue, step, samples = float(raw["tput"]), raw["queue"], raw["step"], raw["samples"]
        maddrs, token = raw["maddrs"], raw.get("token", b"")
        leaving, joining = raw.get("leaving", False), raw.get("joining", False)
        loss, outer = raw.get("loss"), raw.get("outer", [0] * len(OUTER_RESULTS))
    except (ValueError, TypeError, KeyError, msgpack.ExtraData):
        return None
    if not (loss is None or _valid_loss(loss)) or not _valid_outer(outer):
        return None
    if not 0.0 <= tput <= MAX_THROUGHPUT:  # "not": NaN is refused too
        return None
    if not (_valid_count(queue, MAX_QUEUE) and _valid_count(step) and _valid_count(samples)):
        return None
    if not isinstance(maddrs, list) or not all(isinstance(m, str) for m in maddrs):
        return None
    if not isinstance(leaving, bool) or not isinstance(joining, bool) or not isinstance(token, bytes):
        return None
    return Heartbeat(tput, queue, step, samples, tuple(maddrs), leaving, joining, token, loss, tuple(outer))


@dataclass(frozen=True)
class StageEntry:
    """One validated entry of a stage record: its owner, its heartbeat and when it expires."""

    peer_id: str
    beat: Heartbeat
    expires: float

    def info(self, stage: int) -> PeerInfo:
        b = self.beat
        return PeerInfo(peer_id=self.peer_id, stage=stage, throughput=b.throughput, queue_depth=b.queue_depth,
                        inner_step=b.inner_step, expires=self.expires)


def stage_entries(record: Any) -> list[StageEntry]:
    """Every well-formed, owner-signed entry of a stage record (joining and leaving ones included)."""
    entries = []
    for peer_id, item in _peer_entries(record):
        beat = decode_heartbeat(item.value)
        if beat is not None:
            entries.append(StageEntry(peer_id, beat, item.expiration_time))
    return entries


def encode_revocations(token_ids: list[str]) -> bytes:
    """The seed's revocation list: the ids of the join tokens it revoked."""
    return msgpack.packb({"revoked": list(token_ids)}, use_bin_type=True)


MAX_REVOCATIONS = 512


def decode_revocations(value: Any) -> frozenset[str] | None:
    """The token ids of a revocation list, or None for anything malformed or oversized."""
    if not isinstance(value, bytes) or len(value) > DEFAULT_LIMITS.max_record_bytes:
        return None
    try:
        raw = msgpack.unpackb(value, raw=False, max_array_len=MAX_REVOCATIONS, max_map_len=1, max_str_len=64)
        ids = raw["revoked"]
    except (ValueError, TypeError, KeyError, msgpack.ExtraData):
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return None
    return frozenset(ids)


class RunRecordValidator(RecordValidatorBase):
    """The run's rules for its DHT keys (other keys pass untouched): only dictionary entries under an owner
    marker, of bounded size and lifetime, whose value parses as that key's record. Runs after hivemind's
    RSASignatureValidator, which has checked the owner's signature and stripped it."""

    def __init__(self, run_id: str, stages: int):
        keys = {spec_key(run_id): "spec", revoked_key(run_id): "revoked"}
        for s in range(stages):
            keys[stage_key(run_id, s)] = "stage"
            keys[ready_key(run_id, s)] = "ready"
        self._kinds = {DHTID.generate(source=key).to_bytes(): kind for key, kind in keys.items()}

    def validate(self, record: DHTRecord) -> bool:
        kind = self._kinds.get(record.key)
        if kind is None:
            return True
        if record.subkey == DHTProtocol.IS_REGULAR_VALUE or len(record.subkey) > MAX_SUBKEY_BYTES + 8:
            return False
        if len(record.value) > DEFAULT_LIMITS.max_record_bytes + 16:
            return False
        if record.expiration_time > get_dht_time() + MAX_TTL_S[kind]:
            return False
        try:
            subkey, value = MSGPackSerializer.loads(record.subkey), MSGPackSerializer.loads(record.value)
        except Exception:  # msgpack raises several types on garbage
            return False
        if owner_peer_id(subkey) is None or not isinstance(value, bytes):
            return False
        if kind == "stage":
            return decode_heartbeat(value) is not None
        if kind == "ready":
            return decode_ready(value) is not None
        if kind == "revoked":
            return decode_revocations(value) is not None
        return True  # the spec: its reader checks the seed's signature inside it

    @property
    def priority(self) -> int:
        return 5  # after the signature validator (10), on the stripped value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


class _IdentityKey(RSAPrivateKey):
    """hivemind's RSA key wrapper around the node's own libp2p key (its constructor would make a new key)."""

    def __init__(self, private_key: rsa.RSAPrivateKey):  # not calling super().__init__: it generates a key
        self._private_key = private_key


@dataclass(frozen=True)
class RecordSigner:
    """What a node needs to write and read the run's records: its owner marker (the subkey of its entries)
    and the DHT validator that signs its entries and checks everyone's."""

    subkey: bytes
    validator: CompositeValidator


def record_signer(run_id: str, stages: int, identity: NodeIdentity | None) -> RecordSigner:
    """The signer of ``identity`` (None: a reader that writes nothing, e.g. ``swarmd status``)."""
    key = _IdentityKey(identity.private_key) if identity is not None else RSAPrivateKey()
    signature = RSASignatureValidator(key)
    validator = CompositeValidator([signature, RunRecordValidator(run_id, stages)])
    return RecordSigner(subkey=signature.local_public_key, validator=validator)
