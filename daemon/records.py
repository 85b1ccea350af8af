"""DHT records of a run: key names, the heartbeat record's schema, and its validation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.swarm.routing import PeerInfo


def spec_key(run_id: str) -> str:
    return f"swarmd/{run_id}/spec"


def stage_key(run_id: str, stage: int) -> str:
    return f"swarmd/{run_id}/stage/{stage}"


def ready_key(run_id: str, stage: int) -> str:
    """The stage's ready board: one short-lived subkey per replica waiting at an outer boundary."""
    return f"swarmd/{run_id}/ready/{stage}"


def encode_ready(outer_step: int, numel: int, paired: bool = False) -> bytes:
    """A ready-board entry. ``paired`` marks a replica that found its partner: proposers skip it."""
    entry = {"outer": outer_step, "numel": numel}
    if paired:
        entry["paired"] = True
    return msgpack.packb(entry, use_bin_type=True)


def _peer_entries(record: Any) -> Iterator[tuple[str, Any]]:
    """(peer id, item) of every subkey of a hivemind dictionary record whose subkey is a sane peer id."""
    if record is None or not isinstance(record.value, dict):
        return
    for subkey, item in record.value.items():
        if isinstance(subkey, str) and len(subkey) <= 128:
            yield subkey, item


def ready_peers(record: Any, numel: int) -> list[str]:
    """Peer ids on a ready board record whose entry is well formed, of our parameter count and not paired yet."""
    peers = []
    for subkey, item in _peer_entries(record):
        value = item.value
        if not isinstance(value, bytes) or len(value) > 256:
            continue
        try:
            raw = msgpack.unpackb(value, raw=False, max_map_len=4, max_str_len=64)
            ok = isinstance(raw, dict) and raw.get("numel") == numel and raw.get("paired") is not True
        except (ValueError, TypeError, msgpack.ExtraData):
            ok = False
        if ok:
            peers.append(subkey)
    return peers


@dataclass(frozen=True)
class Heartbeat:
    """What a serving peer announces about itself under its stage's key (subkey: its peer id)."""

    throughput: float  # samples/s its compute lane sustains
    queue_depth: int
    inner_step: int
    samples: int
    maddrs: tuple[str, ...]
    leaving: bool = False  # a withdrawal: the peer left this stage (records cannot be deleted, only outlived)

    def encode(self) -> bytes:
        raw = {"tput": self.throughput, "queue": self.queue_depth, "step": self.inner_step,
               "samples": self.samples, "maddrs": list(self.maddrs)}
        if self.leaving:
            raw["leaving"] = True
        return msgpack.packb(raw, use_bin_type=True)


def decode_heartbeat(value: Any) -> Heartbeat | None:
    """Parse a heartbeat value from the DHT; None for anything malformed, oversized or absurd."""
    if not isinstance(value, bytes) or len(value) > DEFAULT_LIMITS.max_record_bytes:
        return None
    try:
        raw = msgpack.unpackb(value, raw=False, max_array_len=64, max_map_len=16, max_str_len=512)
        tput, queue, step, samples = float(raw["tput"]), raw["queue"], raw["step"], raw["samples"]
        maddrs, leaving = raw["maddrs"], raw.get("leaving", False)
    except (ValueError, TypeError, KeyError, msgpack.ExtraData):
        return None
    if not (math.isfinite(tput) and tput >= 0) or not all(isinstance(x, int) and x >= 0 for x in (queue, step, samples)):
        return None
    if not isinstance(maddrs, list) or not all(isinstance(m, str) for m in maddrs) or not isinstance(leaving, bool):
        return None
    return Heartbeat(tput, queue, step, samples, tuple(maddrs), leaving)


def peers_from_record(stage: int, record: Any) -> list[tuple[PeerInfo, Heartbeat]]:
    """All valid peers in a stage record (a hivemind dictionary value with subkeys), withdrawn ones left out."""
    peers = []
    for subkey, item in _peer_entries(record):
        beat = decode_heartbeat(item.value)
        if beat is None or beat.leaving:
            continue
        info = PeerInfo(
            peer_id=subkey, stage=stage, throughput=beat.throughput, queue_depth=beat.queue_depth,
            inner_step=beat.inner_step, expires=item.expiration_time,
        )
        peers.append((info, beat))
    return peers
