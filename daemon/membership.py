"""Who may talk to this node: members of the run, and in a private run only holders of a seed-signed token.

A join token is ``base64url(msgpack({"body": body, "sig": signature}))``, with ``body`` the msgpack of
``{"run", "id", "exp", "peer"?, "stages"?}`` signed by the seed's key (the key that signed the run spec).
A volunteer puts its token into every heartbeat; every reader checks it (signature, run, expiry, peer,
stage, revocation) before it counts the heartbeat's owner as a member. The seed revokes tokens by
publishing a signed list of their ids (``records.revoked_key``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
from swarmd.daemon.identity import NodeIdentity, peer_id_from_public_key, verify_signature
from swarmd.daemon.peers import PeerTable
from swarmd.daemon.records import MAX_REVOCATIONS, MAX_TOKEN_BYTES, StageEntry

MEMBER_REFRESH_S = 1.0  # an unknown caller makes us re-read the records at most this often


class TokenError(ValueError):
    """A join token is malformed, forged, expired, revoked or not for this peer, run or stage."""


@dataclass(frozen=True)
class JoinToken:
    """What a token grants: joining ``run_id`` until ``expires`` (unix time), as ``peer_id`` (None: any peer),
    on ``stages`` (None: any stage)."""

    token_id: str
    run_id: str
    expires: float
    peer_id: str | None = None
    stages: tuple[int, ...] | None = None


def mint_token(identity: NodeIdentity, run_id: str, ttl_s: float, peer_id: str | None = None,
               stages: Sequence[int] | None = None) -> tuple[str, JoinToken]:
    """A token signed by ``identity`` (the seed's key). Returns (the token text, what it grants)."""
    token = JoinToken(token_id=os.urandom(8).hex(), run_id=run_id, expires=time.time() + ttl_s, peer_id=peer_id,
                      stages=None if stages is None else tuple(sorted(set(stages))))
    body = {"run": token.run_id, "id": token.token_id, "exp": token.expires}
    if peer_id is not None:
        body["peer"] = peer_id
    if token.stages is not None:
        body["stages"] = list(token.stages)
    packed = msgpack.packb(body, use_bin_type=True)
    raw = msgpack.packb({"body": packed, "sig": identity.sign(packed)}, use_bin_type=True)
    return base64.urlsafe_b64encode(raw).decode().rstrip("="), token


def token_bytes(text: str) -> bytes:
    """The raw bytes of a token as printed by ``mint_token`` (what heartbeats carry)."""
    text = text.strip()
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("the join token is not valid base64: copy it whole from `swarmd token mint`") from None
    if not raw or len(raw) > MAX_TOKEN_BYTES:
        raise TokenError(f"the join token is empty or longer than {MAX_TOKEN_BYTES} bytes")
    return raw


@functools.lru_cache(maxsize=1024)  # pure: checking an RSA signature costs ~50 us, and heartbeats repeat
def _signed_token(raw: bytes, seed_public_der: bytes) -> JoinToken | str:
    """The token ``raw`` if ``seed_public_der`` signed it, else why not (a string: lru_cache keeps no exceptions)."""
    try:
        outer = msgpack.unpackb(raw, raw=False, max_map_len=2, max_bin_len=MAX_TOKEN_BYTES)
        packed, signature = outer["body"], outer["sig"]
        if not isinstance(packed, bytes) or not isinstance(signature, bytes):
            return "malformed join token"
        body = msgpack.unpackb(packed, raw=False, max_map_len=8, max_array_len=1024, max_str_len=128)
        token = JoinToken(token_id=body["id"], run_id=body["run"], expires=float(body["exp"]),
                          peer_id=body.get("peer"),
                          stages=None if body.get("stages") is None else tuple(int(s) for s in body["stages"]))
    except (ValueError, TypeError, KeyError, msgpack.ExtraData):
        return "malformed join token"
    if not isinstance(token.token_id, str) or not isinstance(token.run_id, str) \
            or not (token.peer_id is None or isinstance(token.peer_id, str)):
        return "malformed join token"
    if not verify_signature(seed_public_der, packed, signature):
        return f"the join token is not signed by this run's seed ({peer_id_from_public_key(seed_public_der)})"
    return token


def check_token(raw: bytes, seed_public_der: bytes, run_id: str, peer_id: str, stage: int | None,
                revoked: frozenset[str], now: float | None = None) -> JoinToken:
    """The token ``raw`` if it lets ``peer_id`` take part in ``run_id`` (on ``stage``; None: any) now.
    Raises TokenError saying why not."""
    token = _signed_token(raw, seed_public_der)
    if isinstance(token, str):
        raise TokenError(token)
    now = time.time() if now is None else now
    if token.run_id != run_id:
        raise TokenError(f"the join token is for run {token.run_id!r}, not {run_id!r}")
    if token.expires <= now:
        raise TokenError(f"the join token {token.token_id} expired {now - token.expires:.0f} s ago: ask the "
                         "run's operator for a new one")
    if token.token_id in revoked:
        raise TokenError(f"the join token {token.token_id} was revoked by the seed")
    if token.peer_id is not None and token.peer_id != peer_id:
        raise TokenError(f"the join token is for peer {token.peer_id}, not {peer_id}: mint one for this node's "
                         "peer id, or one without --peer-id")
    if stage is not None and token.stages is not None and stage not in token.stages:
        raise TokenError(f"the join token allows stages {list(token.stages)}, not stage {stage}")
    return token


class Membership:
    """The run's admission policy, for the transport (``admit``) and the peer table (``accepts``).

    Open run: every owner of a live signed heartbeat is a member. Private run: only those whose heartbeat
    carries a valid token (or is the seed's own). ``revoked`` is the seed's latest revocation list.
    """

    def __init__(self, run_id: str, private: bool, seed_public_der: bytes, peers: PeerTable,
                 refresh: Callable[[], Awaitable[None]]):
        self.run_id, self.private, self.seed_public_der = run_id, private, seed_public_der
        self.seed_id = peer_id_from_public_key(seed_public_der)
        self.peers = peers
        self.revoked: frozenset[str] = frozenset()
        self._refresh = refresh  # async () -> None: re-read the stage records
        self._refreshing: asyncio.Task | None = None
        self._last_refresh = 0.0

    def accepts(self, entry: StageEntry, stage: int) -> bool:
        """Whether a stage record's entry counts (the peer table's policy)."""
        if not self.private or entry.peer_id == self.seed_id:
            return True
        try:
            check_token(entry.beat.token, self.seed_public_der, self.run_id, entry.peer_id,
                        None if entry.beat.leaving else stage, self.revoked)
        except TokenError:
            return False
        return True

    async def admit(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is a member. An unknown caller makes us re-read the records (a new member's first
        request can beat its heartbeat to our table), at most once per MEMBER_REFRESH_S whoever asks."""
        if self.peers.is_member(peer_id):
            return True
        if time.monotonic() - self._last_refresh >= MEMBER_REFRESH_S and self._refreshing is None:
            self._last_refresh = time.monotonic()
            self._refreshing = asyncio.ensure_future(self._refresh())
        if self._refreshing is not None:
            task = self._refreshing
            try:
                await asyncio.shield(task)
            except Exception:
                pass
            finally:
                if self._refreshing is task and task.done():
                    self._refreshing = None
        return self.peers.is_member(peer_id)


REVOCATIONS_FILE = "revoked.json"


def read_revocations(node_dir: Path) -> frozenset[str]:
    """The token ids revoked so far in the seed's ``node_dir`` (an absent or unreadable file: none)."""
    try:
        ids = json.loads((node_dir / REVOCATIONS_FILE).read_text())["revoked"]
    except (OSError, ValueError, KeyError, TypeError):
        return frozenset()
    return frozenset(i for i in ids if isinstance(i, str))


def revoke_tokens(node_dir: Path, token_ids: Sequence[str]) -> frozenset[str]:
    """Add ``token_ids`` to the seed's revocation file (atomically); the running seed publishes it within
    seconds. Returns every id revoked so far."""
    bad = [i for i in token_ids if len(i) != 16 or not all(c in "0123456789abcdef" for c in i)]
    if bad:
        raise TokenError(f"{bad[0]!r} is not a token id (16 hex digits, as `swarmd token mint` prints)")
    ids = read_revocations(node_dir) | set(token_ids)
    if len(ids) > MAX_REVOCATIONS:
        raise TokenError(f"at most {MAX_REVOCATIONS} tokens can be revoked in one run; start a new run id instead")
    node_dir.mkdir(parents=True, exist_ok=True)
    tmp = node_dir / (REVOCATIONS_FILE + ".tmp")
    tmp.write_text(json.dumps({"revoked": sorted(ids)}))
    tmp.rename(node_dir / REVOCATIONS_FILE)
    return ids
