"""Stage state sync: a joiner downloads its stage's whole state from live replicas, as a stream of chunks.

The state (weights, inner AdamW state and step, outer phi, delta and step) of a 100M-parameter stage is over
a gigabyte: it never travels as one message. A donor takes one consistent snapshot at an inner-step boundary
(on its compute lane), announces its layout and one digest per chunk in a manifest, and serves chunks out of
it while it keeps training. A joiner opens sessions with up to ``max_donors`` replicas and stripes the chunks
across them; each chunk is checked against the layout and against the digest its donor announced. A donor
that dies or stalls loses its chunks to the others; one that sends a bad chunk is also banned and counted.

Replicas of a stage are close but not equal (NoLoCo keeps them near each other, it never makes them equal),
so a multi-donor download is a per-chunk mix of its donors' snapshots: a state as near to each of them as
they are to each other. Steps (inner and outer) are the lead donor's: the first, most advanced one.

A snapshot is shared by the sessions that open within ``SNAPSHOT_SHARE_S`` of it (joiners that arrive
together, or a joiner's sessions with several donors); a joiner that comes later gets a fresh one, so that it
never starts from weights and outer state older than that (a DiLoCo joiner's phi must be its group's). A donor
holds at most ``MAX_SNAPSHOTS`` snapshots (each dropped when its last session goes idle) and at most
``max_uploads`` sessions (Limits.max_state_uploads); beyond either it answers ``busy`` and the joiner asks
another replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch
from swarmd.daemon.compute import ComputeLane
from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.transport import Transport
from swarmd.protocols import rpc
from swarmd.protocols.codecs import DTYPE_NAMES, DTYPES, encode_tensor
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.protocols.wire import Message, RemoteError, encode_message
from swarmd.swarm.routing import BanList
from swarmd.swarm.state_layout import (
    CHUNK_BYTES, Entry, LayoutError, StateSnapshot, chunk_digest, check_layout, check_parts, plan_chunks,
    prepare_target, read_chunk, state_bytes, write_chunk,
)
from swarmd.swarm.stage import StageWorker

logger = logging.getLogger(__name__)

MANIFEST_TIMEOUT_S = 60.0  # a donor's first manifest waits for its snapshot and digests
CHUNK_TIMEOUT_S = 30.0  # one chunk: a donor that makes no progress this long loses its chunks to the others
SESSION_IDLE_S = 30.0  # a donor forgets a session after this long without a chunk request
SNAPSHOT_SHARE_S = 10.0  # a new session shares a snapshot at most this old, else it gets a fresh one
MAX_SNAPSHOTS = 2  # snapshots a donor holds at once (a fresh one while late sessions still read the older)
MAX_DONORS = 2  # replicas a joiner downloads from at once
REQUESTS_IN_FLIGHT = 2  # chunk requests a joiner keeps open per donor, and the most a donor answers at once per session
PROGRESS_EVERY_S = 5.0
# a donor that has not read our joining entry yet answers "unauthorized": members re-read the records at most once
# a second, and our entry may need a heartbeat period to reach them
UNAUTHORIZED_RETRIES = 6
UNAUTHORIZED_RETRY_S = 1.0
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 1 << 10, 64 << 20  # what a joiner accepts from a donor's manifest

SnapshotSource = Callable[[], StateSnapshot]  # run on the lane: a consistent copy of the stage state


class StateSyncError(RuntimeError):
    """No donor could provide the stage's state."""


# ---- the donor side --------------------------------------------------------------------------------


@dataclass
class _Session:
    peer_id: str
    last_active: float
    serving: int = 0  # chunk requests being answered now


@dataclass
class _Served:
    """The snapshot a donor serves, its chunk plan and digests, and the sessions using it."""

    snapshot: StateSnapshot
    plan: list
    digests: list[bytes]
    taken_at: float  # time.monotonic() when the snapshot was taken
    sessions: dict[bytes, _Session] = field(default_factory=dict)


def _manifest_fields(stage: int, session: bytes, served: _Served, chunk_bytes: int) -> dict:
    snap = served.snapshot
    fields = {
        "stage": stage, "session": session, "inner_step": snap.inner_step, "chunk_bytes": chunk_bytes,
        "names": [e.name for e in snap.entries], "shapes": [list(e.shape) for e in snap.entries],
        "dtypes": [DTYPE_NAMES[e.dtype] for e in snap.entries], "digests": served.digests,
    }
    if snap.outer_step is not None:
        fields["outer_step"] = snap.outer_step
    return fields


class StateDonor:
    """Serves this node's stage state to joiners: a manifest, then chunks, from a recent shared snapshot."""

    def __init__(self, transport: Transport, stage: int, lane: ComputeLane, snapshot: SnapshotSource,
                 metrics: NodeMetrics, max_uploads: int = DEFAULT_LIMITS.max_state_uploads,
                 idle_s: float = SESSION_IDLE_S, chunk_bytes: int = CHUNK_BYTES):
        self.transport, self.stage, self.lane, self.take_snapshot = transport, stage, lane, snapshot
        self.metrics, self.max_uploads, self.idle_s, self.chunk_bytes = metrics, max_uploads, idle_s, chunk_bytes
        self._snapshots: list[_Served] = []  # oldest first
        self._building = asyncio.Lock()
        self._janitor: asyncio.Task | None = None
        self.accepting = True

    async def register(self) -> None:
        await self.transport.serve(rpc.STATE_MANIFEST, "state_manifest", self._on_manifest,
                                   ("state_manifest_request",), channel="state")
        await self.transport.serve(rpc.STATE_CHUNK, "state_chunk", self._on_chunk,
                                   ("state_chunk_request",), channel="state")
        self._janitor = asyncio.create_task(self._expire_sessions())

    async def close(self) -> None:
        """Stop serving new sessions and drop the snapshot (the handlers go with the P2P or the next stage's)."""
        self.accepting = False
        if self._janitor is not None:
            self._janitor.cancel()
        self._snapshots = []

    @property
    def sessions(self) -> int:
        return sum(len(served.sessions) for served in self._snapshots)

    def _serving(self, session: bytes) -> _Served | None:
        return next((served for served in self._snapshots if session in served.sessions), None)

    async def _on_manifest(self, sender: str, message: Message) -> bytes:
        if message.fields["stage"] != self.stage or not self.accepting:
            raise ProtocolError("wrong_stage", f"this node serves stage {self.stage if self.accepting else 'none'}, "
                                               f"not {message.fields['stage']}")
        if self.sessions >= self.max_uploads:
            raise ProtocolError("busy", f"{self.max_uploads} state uploads are running here; ask another replica")
        async with self._building:
            self._prune(time.monotonic())
            newest = self._snapshots[-1] if self._snapshots else None
            if newest is None or time.monotonic() - newest.taken_at > SNAPSHOT_SHARE_S:
                if len(self._snapshots) >= MAX_SNAPSHOTS:
                    raise ProtocolError("busy", f"{MAX_SNAPSHOTS} older snapshots are being downloaded here; "
                                                "ask another replica")
                taken_at = time.monotonic()
                snapshot = await self.lane.run(self.take_snapshot)
                plan = plan_chunks(snapshot.entries, self.chunk_bytes)
                digests = await asyncio.to_thread(lambda: [chunk_digest(read_chunk(snapshot.tensors, c)) for c in plan])
                newest = _Served(snapshot, plan, digests, taken_at)
                self._snapshots.append(newest)
            served = newest
            if self.sessions >= self.max_uploads:
                raise ProtocolError("busy", f"{self.max_uploads} state uploads are running here; ask another replica")
            session = os.urandom(16)
            served.sessions[session] = _Session(sender, time.monotonic())
        return encode_message("state_manifest", _manifest_fields(self.stage, session, served, self.chunk_bytes))

    async def _on_chunk(self, sender: str, message: Message) -> bytes:
        session, index = message.fields["session"], message.fields["index"]
        served = self._serving(session)
        entry = None if served is None else served.sessions.get(session)
        if entry is None or entry.peer_id != sender:
            raise ProtocolError("unknown_peer", "no state session of yours is open here")
        if index >= len(served.plan):
            raise ProtocolError("malformed", f"chunk {index} of {len(served.plan)}")
        if entry.serving >= REQUESTS_IN_FLIGHT:  # each one holds a chunk's copy until it is sent
            raise ProtocolError("busy", f"{REQUESTS_IN_FLIGHT} chunk requests of this session are open here")
        entry.serving += 1
        entry.last_active = time.monotonic()
        try:
            parts = read_chunk(served.snapshot.tensors, served.plan[index])
            return await asyncio.to_thread(
                lambda: encode_message("state_chunk", {"session": session, "index": index},
                                       [encode_tensor(p, "none") for p in parts]))
        finally:
            entry.serving -= 1
            entry.last_active = time.monotonic()

    async def _expire_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_s / 3, 5.0))
            now = time.monotonic()
            for served in self._snapshots:
                for session, entry in list(served.sessions.items()):
                    if now - entry.last_active > self.idle_s:
                        del served.sessions[session]
            self._prune(now)

    def _prune(self, now: float) -> None:
        """Drop the snapshots without sessions (their memory goes back), but one still fresh enough to share."""
        self._snapshots = [served for served in self._snapshots
                           if served.sessions or now - served.taken_at <= SNAPSHOT_SHARE_S]


# ---- the joiner side -------------------------------------------------------------------------------


@dataclass
class Manifest:
    """A donor's announced snapshot: layout, steps, one digest per chunk of ``plan_chunks(entries)``."""

    donor: str
    session: bytes
    entries: list[Entry]
    inner_step: int
    outer_step: int | None
    chunk_bytes: int
    digests: list[bytes]

    @property
    def plan(self) -> list:
        return plan_chunks(self.entries, self.chunk_bytes)


def parse_manifest(donor: str, fields: dict) -> Manifest:
    """A validated manifest; ProtocolError for one that is inconsistent in itself."""
    names, shapes, dtypes, chunk_bytes = fields["names"], fields["shapes"], fields["dtypes"], fields["chunk_bytes"]
    if not len(names) == len(shapes) == len(dtypes):
        raise ProtocolError("malformed", "manifest names, shapes and dtypes differ in length")
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ProtocolError("malformed", f"chunks of {chunk_bytes} bytes; allowed {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
    entries = [Entry(n, tuple(s), DTYPES[d]) for n, s, d in zip(names, shapes, dtypes)]
    manifest = Manifest(donor, fields["session"], entries, fields["inner_step"], fields.get("outer_step"),
                        chunk_bytes, fields["digests"])
    if len(manifest.digests) != len(manifest.plan):
        raise ProtocolError("malformed", f"{len(manifest.digests)} digests for {len(manifest.plan)} chunks")
    return manifest


@dataclass
class SyncResult:
    """What a download brought: the lead donor's steps and the outer buffers (None without outer state)."""

    inner_step: int
    outer_step: int | None
    outer: tuple[torch.Tensor, torch.Tensor] | None
    donors: list[str]
    seconds: float
    nbytes: int


class _Donor:
    """One open session on the joiner's side."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.peer_id = manifest.donor
        self.chunks = 0
        self.failed = False


class StateDownload:
    """One joiner's download of ``stage``'s state into ``worker`` (and fresh outer buffers when ``with_outer``)."""

    def __init__(self, transport: Transport, stage: int, worker: StageWorker, lane: ComputeLane, with_outer: bool,
                 metrics: NodeMetrics, bans: BanList, max_donors: int = MAX_DONORS,
                 chunk_timeout_s: float = CHUNK_TIMEOUT_S, say: Callable[[str], None] = lambda text: print(text, flush=True)):
        self.transport, self.stage, self.worker, self.lane = transport, stage, worker, lane
        self.with_outer, self.metrics, self.bans = with_outer, metrics, bans
        self.max_donors, self.chunk_timeout_s, self.say = max_donors, chunk_timeout_s, say
        self.tried: set[str] = set()
        self.errors: list[str] = []

    async def run(self, candidates: Callable[[], Awaitable[list[str]]]) -> SyncResult:
        """Download from the peers ``candidates()`` lists (most advanced first; re-asked when donors run out)."""
        start = time.monotonic()
        donors = await self._open_sessions(await candidates(), self.max_donors)
        if not donors:
            raise StateSyncError(f"no replica of stage {self.stage} could serve its state: " + self._why())
        lead = donors[0].manifest
        with_optimizer = check_layout(lead.entries, self.worker.model, self.worker.optimizer, self.with_outer)
        targets, outer = await self.lane.run(prepare_target, self.worker, with_optimizer, self.with_outer)
        plan = lead.plan
        total = state_bytes(lead.entries)
        self.say(f"state sync: stage {self.stage}, {total / 2**20:.0f} MiB in {len(plan)} chunks from "
                 f"{len(donors)} replica(s), lead {lead.donor} at step {lead.inner_step}")
        todo: deque[int] = deque(range(len(plan)))
        progress = _Progress(total, len(plan), self.say)
        used: list[_Donor] = []
        active = [d for d in donors if self._same_layout(d, lead)]
        while todo:
            if not active:
                more = [p for p in await candidates() if p not in self.tried]
                active = [d for d in await self._open_sessions(more, self.max_donors) if self._same_layout(d, lead)]
                if not active:
                    raise StateSyncError(f"stage {self.stage}: every donor failed with {len(todo)} of {len(plan)} "
                                         "chunks left: " + self._why())
            used += [d for d in active if d not in used]
            healthy = await asyncio.gather(*(self._pull(d, plan, todo, targets, lead.entries, progress) for d in active))
            active = [d for d, ok in zip(active, healthy) if ok]  # a failed donor's chunk went back to ``todo``
        used = [d.peer_id for d in used if d.chunks]
        seconds = time.monotonic() - start
        self.metrics.state_sync.observe(seconds)
        self.say(f"state sync: done, {total / 2**20:.0f} MiB in {seconds:.1f} s "
                 f"({total / 2**20 / max(seconds, 1e-9):.0f} MiB/s) from {len(used)} donor(s)")
        return SyncResult(lead.inner_step, lead.outer_step, outer, used, seconds, total)

    def _why(self) -> str:
        return "; ".join(self.errors[-4:]) or "no live replica"

    def _same_layout(self, donor: _Donor, lead: Manifest) -> bool:
        if donor.manifest.entries == lead.entries and donor.manifest.chunk_bytes == lead.chunk_bytes:
            return True
        self.errors.append(f"{donor.peer_id[-8:]}: a different state layout than the lead donor's")
        return False

    async def _open_sessions(self, peers: Sequence[str], limit: int) -> list[_Donor]:
        """Sessions with up to ``limit`` of ``peers`` (in their order: the first is the lead), asking several at
        once: each donor snapshots and digests its state before it answers."""
        opened: list[_Donor] = []
        queue = [p for p in peers if p not in self.tried and not self.bans.is_banned(p, time.time())]
        while queue and len(opened) < limit:
            batch, queue = queue[: limit - len(opened)], queue[limit - len(opened):]
            self.tried.update(batch)
            answers = await asyncio.gather(*(self._open_session(peer) for peer in batch))
            opened += [donor for donor in answers if donor is not None]
        return opened

    async def _open_session(self, peer: str) -> _Donor | None:
        try:
            reply = await self._ask_manifest(peer)
            manifest = parse_manifest(peer, reply.fields)
            check_layout(manifest.entries, self.worker.model, self.worker.optimizer, self.with_outer)
        except (ProtocolError, LayoutError) as e:
            self._reject(peer, "malformed" if isinstance(e, LayoutError) else e.reason, f"manifest: {e}")
            return None
        except RemoteError as e:
            self.errors.append(f"{peer[-8:]}: {e.reason}")
            return None
        except (asyncio.TimeoutError, ConnectionError, OSError, Exception) as e:  # unreachable, died
            self.errors.append(f"{peer[-8:]}: {type(e).__name__}: {e}")
            return None
        return _Donor(manifest)

    async def _ask_manifest(self, peer: str) -> Message:
        """The donor's manifest. "unauthorized" means it has not read our joining entry yet: ask again a few
        times, a pause apart, before giving up on it."""
        retries = 0
        while True:
            try:
                return await self.transport.call(
                    peer, rpc.STATE_MANIFEST, "state_manifest",
                    encode_message("state_manifest_request", {"stage": self.stage}),
                    timeout=MANIFEST_TIMEOUT_S, channel="state", expected_kinds=("state_manifest",))
            except RemoteError as e:
                retries += 1
                if e.reason != "unauthorized" or retries > UNAUTHORIZED_RETRIES:
                    raise
            await asyncio.sleep(UNAUTHORIZED_RETRY_S)

    def _reject(self, peer: str, reason: str, why: str) -> None:
        """A donor sent something wrong: ban it, count it, say why."""
        self.metrics.rejected.labels(reason).inc()
        self.bans.ban(peer, time.time())
        self.errors.append(f"{peer[-8:]}: {why}")
        logger.warning("state sync: dropped and banned donor %s: %s", peer[-8:], why)

    async def _pull(self, donor: _Donor, plan: list, todo: deque[int], targets: list[torch.Tensor],
                    entries: list[Entry], progress: _Progress) -> bool:
        """Fetch chunks from ``donor``, ``REQUESTS_IN_FLIGHT`` at a time (so its encoding, the transfer and our
        checks overlap), until none are left (True) or it fails (False)."""
        await asyncio.gather(*(self._pull_one_by_one(donor, plan, todo, targets, entries, progress)
                               for _ in range(REQUESTS_IN_FLIGHT)))
        return not donor.failed

    async def _pull_one_by_one(self, donor: _Donor, plan: list, todo: deque[int], targets: list[torch.Tensor],
                               entries: list[Entry], progress: _Progress) -> None:
        """One request stream to ``donor``. On a failure the chunk goes back to ``todo`` and the donor is marked
        failed; one that sent a bad chunk or stalled is also banned and counted, one that died only dropped."""
        while todo and not donor.failed:
            index = todo.popleft()
            try:
                reply = await self.transport.call(
                    donor.peer_id, rpc.STATE_CHUNK, "state_chunk",
                    encode_message("state_chunk_request", {"session": donor.manifest.session, "index": index}),
                    timeout=self.chunk_timeout_s, channel="state", expected_kinds=("state_chunk",))
                if reply.fields["index"] != index or reply.fields["session"] != donor.manifest.session:
                    raise ProtocolError("malformed", f"asked for chunk {index}, got {reply.fields['index']}")
                parts = reply.tensors
                await asyncio.to_thread(_verify_chunk, entries, plan[index], parts, donor.manifest.digests[index], index)
            except (ProtocolError, LayoutError) as e:
                todo.appendleft(index)
                if not donor.failed:
                    donor.failed = True
                    self._reject(donor.peer_id, e.reason if isinstance(e, ProtocolError) else "shape",
                                 f"chunk {index}: {e}")
                return
            except asyncio.TimeoutError:
                todo.appendleft(index)
                if not donor.failed:
                    donor.failed = True
                    self._reject(donor.peer_id, "stalled", f"chunk {index}: no progress in {self.chunk_timeout_s:.0f} s")
                return
            except (RemoteError, ConnectionError, OSError, Exception) as e:
                todo.appendleft(index)
                if not donor.failed:
                    donor.failed = True
                    self.errors.append(f"{donor.peer_id[-8:]}: chunk {index}: {type(e).__name__}: {e}")
                    logger.warning("state sync: donor %s failed on chunk %d (%s: %s); its chunks go to the others",
                                   donor.peer_id[-8:], index, type(e).__name__, e)
                return
            await self.lane.run(write_chunk, targets, plan[index], parts)
            donor.chunks += 1
            progress.add(sum(p.numel() * p.element_size() for p in parts))


def _verify_chunk(entries: list[Entry], chunk: list, parts: list[torch.Tensor], digest: bytes, index: int) -> None:
    """Off the event loop: the parts fit the chunk's slices and match the digest the donor announced."""
    check_parts(entries, chunk, parts)
    if chunk_digest(parts) != digest:
        raise ProtocolError("digest", f"chunk {index} does not match the digest its donor announced")


class _Progress:
    """A progress line every few seconds during a long download."""

    def __init__(self, total: int, chunks: int, say: Callable[[str], None]):
        self.total, self.chunks, self.say = total, chunks, say
        self.done = self.count = 0
        self.start = self.last = time.monotonic()

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        self.count += 1
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = self.done / 2**20 / max(now - self.start, 1e-9)
            self.say(f"state sync: {self.done / 2**20:.0f}/{self.total / 2**20:.0f} MiB "
                     f"({100 * self.done / max(self.total, 1):.0f}%), {rate:.0f} MiB/s")
