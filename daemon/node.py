"""A swarmd node: one process, one event loop, one P2P daemon, one in-loop DHT node, one compute lane.

``Node.create`` runs the set-up in a fixed sequence: identity -> network -> spec -> stage choice -> stage
state (live donors, or this node's checkpoint) -> services. ``Node.run`` serves and trains until asked to
stop; a rebalancing move re-runs the last three steps for another stage. ``Node.close`` leaves cleanly
(withdraw, drain, checkpoint) and tears everything down, p2pd included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils.timed_storage import get_dht_time
from swarmd.daemon.checkpoint import CheckpointInfo, checkpoint_path, read_checkpoint_info, restore_checkpoint, write_checkpoint
from swarmd.daemon.compute import ComputeLane, ThroughputMeter
from swarmd.daemon.dialback import DialBack
from swarmd.daemon.diloco import DiLoCoService
from swarmd.daemon.heldout import run_corpus
from swarmd.daemon.host_metrics import p2pd_pid
from swarmd.daemon.identity import NodeIdentity
from swarmd.daemon.metrics import OUTER_RESULTS, MetricsServer, NodeMetrics, SwarmMetrics
from swarmd.daemon.boundaries import run_at_boundaries
from swarmd.daemon.outer_service import NoLoCoService
from swarmd.daemon.p2p_host import create_p2p, nat_options, peer_id_of, reachability
from swarmd.daemon.peers import PeerTable, announce
from swarmd.daemon.pipeline import PipelineService
from swarmd.daemon.membership import Membership, TokenError, check_token, read_revocations, token_bytes
from swarmd.daemon.records import (
    Heartbeat, decode_revocations, encode_revocations, owner_peer_id, record_signer, revoked_key, spec_key,
)
from swarmd.daemon.spec import RunSpec, SpecError, sign_spec, spec_signer_key, verify_spec_record
from swarmd.daemon.state_sync import StateDonor, StateDownload, StateSyncError
from swarmd.daemon.status_page import PAGE, History, NodeStatus, StatusBoard, status_document
from swarmd.daemon.swarm_view import swarm_view
from swarmd.daemon.transport import Transport
from swarmd.daemon.versions import encode_versions, software_versions
from swarmd.protocols import rpc
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.protocols.wire import PROTOCOL_VERSION, Message, encode_message
from swarmd.swarm.balancing import choose_move, choose_stage, stage_throughputs
from swarmd.swarm.catch_up import replica_ahead
from swarmd.swarm.data import CorpusSampler, stream_seed, validation_batches
from swarmd.swarm.model import build_stage
from swarmd.swarm.outer import OuterState, ParameterReplica
from swarmd.swarm.routing import BanList, PeerInfo
from swarmd.swarm.stage import StageWorker
from swarmd.swarm.state_layout import StateSnapshot, take_snapshot

logger = logging.getLogger(__name__)
VERSION = "0.1.0"
JOIN_READS = 3  # reads of our stage's record before concluding nobody serves it yet
JOIN_REREAD_S = 1.0
DRAIN_S = 5.0  # how long a leaving node lets held microbatches finish
WITHDRAW_TIMEOUT_S = 3.0
# A clean stop's last outer step must pair this long after the stop began at the latest, which leaves a 15 s
# stop room for the checkpoint. Replicas stopped together arrive up to a drain apart (one may wait DRAIN_S
# for a microbatch that cannot finish, the other none): the earlier one waits the longer.
LAST_MEETING_BY_S = 12.0
REVOCATIONS_TTL_S = 180.0  # the seed republishes its revocation list every 60 s
REACHABILITY_CHECK_S = 15.0  # how often a node re-reads its visible addresses (a relay one may appear)


@dataclass
class NodeOptions:
    """How to run this node (the run's own settings live in the RunSpec)."""

    node_dir: Path
    host: str = "0.0.0.0"
    port: int = 0
    announce: tuple[str, ...] = ()
    initial_peers: tuple[str, ...] = ()
    seed_ids: tuple[str, ...] = ()  # peers whose signature on the spec we trust, besides initial peers
    stage: int | None = None  # None: join the stage that limits the swarm's throughput
    rebalance: bool = True  # move to the stage that limits the swarm when that pays (if the spec enables it)
    train: bool = True
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 0  # 0: any free port; None: no metrics endpoint
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0: torch's default
    max_steps: int = 0  # stop after this node took this many inner steps (0: never)
    duration_s: float = 0.0  # stop after this many seconds (0: never)
    progress_s: float = 5.0
    heartbeat_s: float = 2.0
    state_wait_s: float = 120.0  # how long a joiner waits for a replica of a stage that trained and has none
    nat_traversal: bool = True  # port mapping, AutoNAT, relays, auto-relay; always off on loopback-only hosts
    token: str | None = None  # a private run's join token (from the seed's `swarmd token mint`)
    swarm_metrics: bool = False  # export swarm-wide gauges from the records (the seed always does)
    seed_spec: RunSpec | None = field(default=None, repr=False)  # set: this node is the seed

    @property
    def loopback_only(self) -> bool:
        return self.host.startswith("127.")


class Node:
    """One swarm member. Build it with ``await Node.create(options)``."""

    def __init__(self) -> None:  # use create()
        self.stop_event = asyncio.Event()
        self.hurry = asyncio.Event()  # a second stop signal: skip the last outer step
        self._stopping_since = 0.0  # time.monotonic() when close() began
        self._tasks: list[asyncio.Task] = []
        self.pipeline: PipelineService | None = None
        self.worker: StageWorker | None = None
        self.metrics_server: MetricsServer | None = None
        self.swarm_metrics: SwarmMetrics | None = None
        self.status = StatusBoard()  # the status page's JSON, built on the loop, read by the HTTP thread
        self.history = History()  # this node's recent loss and throughput, one point per progress line
        self.dht: DHTNode | None = None
        self.p2p: P2P | None = None
        self.lane: ComputeLane | None = None
        self.outer: NoLoCoService | DiLoCoService | None = None
        self.donor: StateDonor | None = None
        self.stage: int | None = None
        self.state_ready = False  # the stage's state is loaded and its services run: checkpoints may be written
        self.state_bans = BanList()  # donors that sent bad state
        self.stage_stop = asyncio.Event()
        self._stage_tasks: list[asyncio.Task] = []
        self._boundaries = 0
        self._outer_at = 0  # the inner step our last outer step's update was taken at (or our stage's state came)
        self._boundary_task: asyncio.Task | None = None  # run_at_boundaries for the stage we serve
        self._catch_up_due = False  # the stage's state came from no live replica: look again at the first boundary
        self._stage_change = asyncio.Lock()  # a rebalancing move and a catch-up never overlap
        self._first_step: int | None = None  # our inner step when run() started (None: not running yet)
        self.entered_at = time.monotonic()

    @classmethod
    async def create(cls, options: NodeOptions) -> Node:
        self = cls()
        try:
            await self._setup(options)
        except BaseException:
            await self.close()
            raise
        return self

    async def _setup(self, options: NodeOptions) -> None:
        """identity -> network -> spec -> records and membership -> stage choice -> stage state -> services."""
        self.options = options
        self.identity = NodeIdentity.load_or_create(options.node_dir)
        (options.node_dir / "ready.json").unlink(missing_ok=True)  # a previous run's: we are not serving yet
        self.peer_id = self.identity.peer_id
        if options.threads:
            torch.set_num_threads(options.threads)
        await self._start_p2p(options)
        self.metrics = NodeMetrics(p2pd_pid=p2pd_pid(self.p2p))
        self.transport = Transport(self.p2p, self.metrics, DEFAULT_LIMITS)
        if options.seed_spec is not None:
            self.spec = options.seed_spec
            self.spec_record = sign_spec(self.spec, self.identity)
        else:
            self.spec_record, self.spec = await self._fetch_spec(options)
        spec = self.spec
        self.transport.bound_to(spec)  # request size caps from the run's tensor shapes
        seed_key = spec_signer_key(self.spec_record)
        self.token = self._own_token(options, seed_key)
        # The DHT starts once the run is known: its validator enforces the run's record rules from the first store.
        self.signer = record_signer(spec.run_id, spec.pipeline.stages, self.identity)
        try:
            self.dht = await DHTNode.create(
                p2p=self.p2p, initial_peers=list(options.initial_peers),
                ensure_bootstrap_success=bool(options.initial_peers), record_validator=self.signer.validator,
            )
        except RuntimeError as e:  # hivemind: "DHTNode bootstrap failed: none of the initial_peers responded"
            raise ConnectionError(f"{e}: check that these are addresses of live swarmd nodes of the run") from None
        self.peers = PeerTable(spec.pipeline.stages)
        self.membership = Membership(spec.run_id, spec.access == "private", seed_key, self.peers,
                                     refresh=lambda: self.peers.refresh(self.dht, spec.run_id))
        self.peers.policy = self.membership.accepts
        self.transport.admit = self.membership.admit
        if options.seed_spec is not None:
            await self._publish_spec()
        await self._read_revocations()
        await self.peers.refresh(self.dht, spec.run_id)
        self.metrics.info.info({"version": VERSION, "run_id": spec.run_id, "peer_id": self.peer_id})
        self.metrics.num_stages.set(spec.pipeline.stages)
        self.metrics.stage.set(-1)
        if options.seed_spec is not None or options.swarm_metrics:
            self.swarm_metrics = SwarmMetrics(self.metrics.registry, spec.pipeline.stages)
        self._publish_status()
        await self.transport.serve(rpc.INFO, "info", self._on_info, ("info_request",), members_only=False)
        await self.transport.serve(rpc.SPEC, "spec", self._on_spec, ("spec_request",), members_only=False)
        await self.transport.serve(rpc.DIALBACK, "dialback", DialBack(DEFAULT_LIMITS).handle, ("dialback_request",),
                                   members_only=False)  # `swarmd doctor` of a would-be volunteer
        # Heartbeats start before the stage's state comes in: a joining entry makes us a member its donors serve.
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        if options.train:
            self.lane = ComputeLane()
            await self._enter_stage(self._choose_stage(options))
        if options.metrics_port is not None:
            self.metrics_server = MetricsServer(self.metrics, options.metrics_host, options.metrics_port,
                                                status_json=self.status.json, page=PAGE)

    def _own_token(self, options: NodeOptions, seed_key: bytes) -> bytes:
        """Our join token's bytes (b"": none needed), checked before anything is announced: a private run
        refuses a volunteer without a valid one, so say so now, in one line."""
        if self.spec.access != "private" or options.seed_spec is not None:
            return b""
        if not options.token:
            raise TokenError(f"run {self.spec.run_id!r} is private: ask its operator for a join token "
                             "(`swarmd token mint` on the seed) and pass it with --token")
        raw = token_bytes(options.token)
        check_token(raw, seed_key, self.spec.run_id, self.peer_id, options.stage, frozenset())
        return raw

    async def _start_p2p(self, options: NodeOptions) -> None:
        self.p2p = await create_p2p(
            initial_peers=list(options.initial_peers),
            host_maddrs=[f"/ip4/{options.host}/tcp/{options.port}"],
            announce_maddrs=list(options.announce) or None,
            identity_path=str(self.identity.path),
            check_if_identity_free=False,
            **nat_options(self.nat_traversal, options.initial_peers),
        )
        self.maddrs = [str(m) for m in await self.p2p.get_visible_maddrs()]

    @property
    def nat_traversal(self) -> bool:
        return self.options.nat_traversal and not self.options.loopback_only

    async def _reachability_loop(self) -> None:
        """Re-read our visible addresses: auto-relay adds a /p2p-circuit one once AutoNAT finds that peers
        cannot dial us (within a few minutes of the start). Heartbeats announce the new set; a change is printed."""
        said = reachability(self.maddrs, self.nat_traversal)[1]
        while True:
            await asyncio.sleep(REACHABILITY_CHECK_S)
            try:
                maddrs = [str(m) for m in await self.p2p.get_visible_maddrs(latest=True)]
            except Exception as e:  # p2pd busy or going away: try again next time
                logger.debug("reading our visible addresses failed: %s: %s", type(e).__name__, e)
                continue
            if set(maddrs) != set(self.maddrs):
                self.maddrs = maddrs
                if (line := reachability(maddrs, self.nat_traversal)[1]) != said:
                    said = line
                    print(f"reachability: {line} ({' '.join(maddrs)})", flush=True)

    def _own_checkpoint(self) -> CheckpointInfo | None:
        """This node's checkpoint of this run, if its node dir holds one (another run's is left alone)."""
        info = read_checkpoint_info(checkpoint_path(self.options.node_dir))
        return info if info is not None and info.run_id == self.spec.run_id else None

    def _choose_stage(self, options: NodeOptions) -> int:
        """--stage; else the stage of our own checkpoint (a returning node brings its stage back); else the
        stage that limits the swarm's throughput."""
        stages = self.spec.pipeline.stages
        if options.stage is not None:
            stage = options.stage
        elif (own := self._own_checkpoint()) is not None and own.stage < stages:
            stage = own.stage
        else:
            stage = choose_stage(self.peers.all(), stages)
        if not 0 <= stage < stages:
            raise SpecError(f"--stage {stage} is outside 0..{stages - 1}")
        return stage

    async def _enter_stage(self, stage: int) -> None:
        """Build the stage's worker, bring in its state (live donors or our checkpoint), start its services."""
        spec, options = self.spec, self.options
        self.stage = stage
        self.metrics.stage.set(stage)
        model = build_stage(spec.model, stage, spec.pipeline.stages, spec.seed).to(options.device)
        o = spec.optimizer
        self.worker = StageWorker(
            model, lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), grad_clip=o.grad_clip,
            microbatches_per_step=o.microbatches_per_step, device=options.device,
            weight_stashes=spec.pipeline.weight_stashes, kept_graphs=spec.pipeline.kept_graphs,
            precision=o.precision,
        )
        await self._announce_joining()
        self._catch_up_due = True  # until a live replica's state is downloaded
        adopted = await self._stage_state(stage)
        self.donor = StateDonor(self.transport, stage, self.lane, self._snapshot, self.metrics)
        await self.donor.register()
        sampler = eval_batches = None
        if stage == 0:
            train, val = run_corpus(spec)
            sampler = CorpusSampler(train, spec.pipeline.seq_len, spec.pipeline.microbatch_size,
                                    stream_seed(spec.seed, self.peer_id))
            eval_batches = validation_batches(val, spec.pipeline.seq_len, spec.pipeline.microbatch_size,
                                              spec.evaluation.batches)
        meter = ThroughputMeter(await self.lane.run(_measure_throughput, self.worker, spec))
        self.pipeline = PipelineService(
            spec=spec, stage=stage, peer_id=self.peer_id, worker=self.worker, lane=self.lane,
            transport=self.transport, peers=self.peers, metrics=self.metrics, limits=DEFAULT_LIMITS,
            sampler=sampler, eval_batches=eval_batches, meter=meter, rng=random.Random(),
        )
        self.metrics.throughput.set(meter.value)
        await self.pipeline.register()
        replica = ParameterReplica(self.worker.model, before_write=self.worker.before_weights_change)
        if spec.outer == "noloco":
            self.outer = NoLoCoService(
                run_id=spec.run_id, stage=stage, peer_id=self.peer_id, board_subkey=self.signer.subkey,
                config=spec.averaging,
                codec=spec.compression.averaging, block_size=spec.compression.block_size,
                transport=self.transport, dht=self.dht, lane=self.lane, replica=replica,
                metrics=self.metrics, limits=DEFAULT_LIMITS, rng=random.Random(),
            )
        elif spec.outer == "diloco":
            self.outer = DiLoCoService(
                run_id=spec.run_id, stage=stage, config=spec.averaging, initial_peers=self.maddrs, host=options.host,
                lane=self.lane, replica=replica, metrics=self.metrics,
            )
        if self.outer is not None:
            await self.outer.start(adopted)
        self.entered_at = time.monotonic()
        self.state_ready = True  # from here on a checkpoint of this stage may be written

    async def _stage_state(self, stage: int) -> OuterState | None:
        """Load the stage's state into ``self.worker``: from live replicas when one is further along than our
        own checkpoint, else from the checkpoint, else (a run that never trained) from scratch. Returns the
        outer state to adopt (None: start it from the weights)."""
        with_outer = self.spec.outer != "none"
        own = self._own_checkpoint()
        own = own if own is not None and own.stage == stage else None
        live = await self._stage_peers(stage)
        deadline = time.monotonic() + self.options.state_wait_s
        while not live and own is None and self._run_has_trained():
            if time.monotonic() > deadline:
                raise StateSyncError(
                    f"stage {stage} has trained (peers are at step {self._run_step()}) but no replica serves it and "
                    f"{checkpoint_path(self.options.node_dir)} holds none of it: start a node whose --node-dir has "
                    "this stage's checkpoint, or join another stage with --stage")
            print(f"stage {stage} has no live replica and this node has no checkpoint of it; waiting for one "
                  f"(up to {max(deadline - time.monotonic(), 0):.0f} s more)", flush=True)
            await asyncio.sleep(5.0)
            await self.peers.refresh(self.dht, self.spec.run_id)
            live = [p for p in self.peers.stage(stage) if p.peer_id != self.peer_id]
        best = max((p.inner_step for p in live), default=0)
        if live and best > 0 and (own is None or best > own.inner_step):
            ordered = [p.peer_id for p in sorted(live, key=lambda p: -p.inner_step)]

            async def candidates() -> list[str]:
                await self.peers.refresh(self.dht, self.spec.run_id)
                fresh = sorted(self.peers.stage(stage), key=lambda p: -p.inner_step)
                return ordered + [p.peer_id for p in fresh if p.peer_id not in ordered and p.peer_id != self.peer_id]

            download = StateDownload(self.transport, stage, self.worker, self.lane, with_outer, self.metrics,
                                     self.state_bans)
            try:
                result = await download.run(candidates)
            except StateSyncError as e:
                if own is None:
                    raise
                print(f"state sync failed ({e}); restoring {own.path} instead", flush=True)
            else:
                self.worker.inner_step = result.inner_step
                self._catch_up_due = False
                if result.outer is None:
                    return None
                print(f"adopted the outer state of {result.donors[0] if result.donors else '?'} "
                      f"(outer step {result.outer_step})", flush=True)
                return OuterState(phi=result.outer[0], delta=result.outer[1], outer_step=result.outer_step or 0)
        if own is not None:
            info, outer = await self.lane.run(restore_checkpoint, own.path, self.spec.run_id, stage, self.worker, with_outer)
            print(f"restored stage {stage} from {info.path} (step {info.inner_step}"
                  + (f", outer step {info.outer_step})" if info.outer_step is not None else ")"), flush=True)
            return None if outer is None else OuterState(phi=outer[0], delta=outer[1], outer_step=info.outer_step or 0)
        return None

    def _run_has_trained(self) -> bool:
        return self._run_step() > 0

    def _run_step(self) -> int:
        return max((p.inner_step for p in self.peers.all() if p.peer_id != self.peer_id), default=0)

    def _snapshot(self) -> StateSnapshot:
        """On the lane: this stage's state as one consistent host copy (for donors and checkpoints)."""
        return take_snapshot(self.worker, self.outer.state if self.outer is not None else None)

    async def _stage_peers(self, stage: int) -> list[PeerInfo]:
        """Live peers of ``stage`` other than us, for the state download. A node fresh in the DHT can read
        an empty record (its first lookups race its routing table filling in): an empty answer is re-read
        a few times, so a joiner of a running swarm does not start from scratch."""
        for attempt in range(JOIN_READS):
            if attempt:
                await asyncio.sleep(JOIN_REREAD_S)
                await self.peers.refresh(self.dht, self.spec.run_id)
            live = [p for p in self.peers.stage(stage) if p.peer_id != self.peer_id]
            if live:
                break
        return live

    # ---- spec ----------------------------------------------------------------------------------

    async def _publish_spec(self) -> None:
        assert self.dht is not None
        await self.dht.store(spec_key(self.spec.run_id), self.spec_record, get_dht_time() + 600,
                             subkey=self.signer.subkey)

    async def _read_revocations(self) -> None:
        """A private run: take the seed's latest revocation list (only the seed's own signed entry counts)."""
        if self.spec.access != "private":
            return
        if self.options.seed_spec is not None:
            self.membership.revoked = read_revocations(self.options.node_dir)
            return
        try:
            record = await self.dht.get(revoked_key(self.spec.run_id), latest=True)
        except Exception as e:
            logger.debug("reading the revocation list failed: %s", e)
            return
        for subkey, item in (record.value.items() if record is not None and isinstance(record.value, dict) else ()):
            if owner_peer_id(subkey) == self.membership.seed_id and (ids := decode_revocations(item.value)) is not None:
                self.membership.revoked = ids
        if self.token:
            try:
                check_token(self.token, self.membership.seed_public_der, self.spec.run_id, self.peer_id, None,
                            self.membership.revoked)
            except TokenError as e:
                raise TokenError(f"{e}; this node may not take part any more") from None

    async def _publish_revocations(self) -> None:
        ids = read_revocations(self.options.node_dir)
        self.membership.revoked = ids
        await self.dht.store(revoked_key(self.spec.run_id), encode_revocations(sorted(ids)),
                             get_dht_time() + REVOCATIONS_TTL_S, subkey=self.signer.subkey)

    async def _fetch_spec(self, options: NodeOptions) -> tuple[bytes, RunSpec]:
        """Ask the bootstrap peers for the signed spec; accept it only if the seed we trust signed it."""
        trusted = set(options.seed_ids)
        bootstrap = []
        for maddr in options.initial_peers:
            peer = peer_id_of(maddr)
            trusted.add(peer)
            bootstrap.append(peer)
        if not bootstrap:
            raise SpecError("joining needs at least one peer multiaddr")
        errors = []
        for peer in bootstrap:
            try:
                reply = await self.transport.call(
                    peer, rpc.SPEC, "spec", encode_message("spec_request", {}), timeout=15, expected_kinds=("spec",)
                )
                spec, signer = verify_spec_record(reply.fields["record"], trusted)
                print(f"run {spec.run_id!r}: spec signed by seed {signer}, verified", flush=True)
                return reply.fields["record"], spec
            except SpecError:
                raise
            except Exception as e:
                errors.append(f"{peer}: {type(e).__name__}: {e}")
        raise ConnectionError("could not fetch the run spec from any bootstrap peer (" + "; ".join(errors)
                              + "): check that these are addresses of swarmd nodes")

    async def _on_spec(self, sender: str, message: Message) -> bytes:
        return encode_message("spec", {"record": self.spec_record})

    async def _on_info(self, sender: str, message: Message) -> bytes:
        return encode_message("info", {
            "run_id": self.spec.run_id, "peer_id": self.peer_id, "stage": self.stage,
            "inner_step": self.worker.inner_step if self.worker else 0, "protocol": PROTOCOL_VERSION,
            "wall_time": time.time(), "versions": encode_versions(software_versions()),
        })

    # ---- running -------------------------------------------------------------------------------

    def write_ready_file(self) -> None:
        """node_dir/ready.json: how to reach this node, for launchers and operators."""
        info = {
            "peer_id": self.peer_id, "stage": self.stage, "maddrs": self.maddrs,
            "metrics_port": self.metrics_server.port if self.metrics_server else None, "run_id": self.spec.run_id,
        }
        path = self.options.node_dir / "ready.json"
        path.with_suffix(".tmp").write_text(json.dumps(info))
        path.with_suffix(".tmp").rename(path)

    async def run(self) -> None:
        """Serve (and train) until ``stop_event`` is set or a stop condition in the options is met."""
        self.write_ready_file()
        self._first_step = self.worker.inner_step if self.worker else 0
        self._tasks.append(asyncio.create_task(self._progress_loop()))
        if self.nat_traversal:
            self._tasks.append(asyncio.create_task(self._reachability_loop()))
        if self.options.seed_spec is not None:
            self._tasks.append(asyncio.create_task(self._republish_loop()))
        if self.options.duration_s > 0:
            self._tasks.append(asyncio.create_task(self._stop_after(self.options.duration_s)))
        if self.pipeline is not None:
            self._start_stage_tasks()
            if self.spec.balancing.enabled and self.options.rebalance:
                self._tasks.append(asyncio.create_task(self._rebalance_loop()))
        await self.stop_event.wait()

    def _start_stage_tasks(self) -> None:
        """The loops of the stage this node serves; a move stops them and starts the new stage's."""
        self.stage_stop = asyncio.Event()
        self._outer_at = self.worker.inner_step
        self._stage_tasks = [asyncio.create_task(self._sweep_loop())]
        if self.stage == 0:
            self._stage_tasks.append(asyncio.create_task(self.pipeline.drive(self.stage_stop)))
        noloco = self.outer if isinstance(self.outer, NoLoCoService) else None
        self._boundary_task = asyncio.create_task(run_at_boundaries(
            self._at_boundary, lambda: self.worker.inner_step, self.spec.averaging.inner_steps, self.stage_stop,
            pin=noloco.pin_boundary if noloco else None, partner_ready=noloco.partner_ready if noloco else None,
        ))
        self._stage_tasks.append(self._boundary_task)

    async def _stop_stage_tasks(self) -> None:
        self.stage_stop.set()
        for task in self._stage_tasks:
            task.cancel()
        await asyncio.gather(*self._stage_tasks, return_exceptions=True)
        self._stage_tasks = []

    async def _at_boundary(self) -> str:
        """Every H inner steps: the outer step (if the run averages), then every N boundaries a checkpoint.
        At the first boundary of a replica that started without a live replica's state, when another replica
        of the stage has got more than H steps ahead meanwhile (swarmd.swarm.catch_up), a catch-up instead."""
        if self._catch_up_due and self.outer is not None:
            self._catch_up_due = False
            await self.peers.refresh(self.dht, self.spec.run_id)
            others = [p for p in self.peers.stage(self.stage) if p.peer_id != self.peer_id]
            lead = replica_ahead(others, self.stage, self.worker.inner_step, self.spec.averaging.inner_steps)
            if lead is not None:  # re-entering the stage stops this loop: run it beside
                self._tasks.append(asyncio.create_task(self._catch_up(lead)))
                return "catch_up"
        started_at = self.worker.inner_step
        result = await self.outer.outer_step() if self.outer is not None else "none"
        # A paired step carries over the inner steps taken during it: they are still ours to hand over. A
        # step while stopping that found no partner ("missed") changed nothing: the last one tries again.
        if result != "missed":
            self._outer_at = started_at if result == "paired" else self.worker.inner_step
        self._boundaries += 1
        every = self.spec.checkpoint.every_outer_steps
        if every and self._boundaries % every == 0:
            await self.write_checkpoint()
        return result

    async def write_checkpoint(self) -> Path | None:
        """Snapshot the stage on the lane (between inner steps), write it off the lane, atomically."""
        if not self.state_ready or self.worker is None:
            return None  # a failed or unfinished start never overwrites an existing checkpoint
        path = checkpoint_path(self.options.node_dir)
        try:
            snapshot = await self.lane.run(self._snapshot)
            await asyncio.to_thread(write_checkpoint, path, self.spec.run_id, self.stage, snapshot)
        except Exception as e:
            self.metrics.checkpoints.labels("failed").inc()
            logger.warning("could not write the checkpoint %s: %s: %s", path, type(e).__name__, e)
            return None
        self.metrics.checkpoints.labels("written").inc()
        return path

    async def _stop_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.stop_event.set()

    def _heartbeat(self, leaving: bool = False) -> Heartbeat:
        """Our entry in the stage record: serving once the stage's services run, joining before."""
        serving = self.pipeline is not None and self.state_ready
        return Heartbeat(
            throughput=self.pipeline.meter.value if serving else 0.0, queue_depth=self.lane.depth if serving else 0,
            inner_step=self.worker.inner_step if serving else 0,
            samples=self.worker.samples_processed if serving else 0, maddrs=tuple(self.maddrs),
            leaving=leaving, joining=not serving and not leaving, token=self.token,
            loss=self.pipeline.stats.last_loss if serving else None,  # NaN until the first one: not announced
            outer_steps=self._outer_counts(),
        )

    def _outer_counts(self) -> tuple[int, int, int, int]:
        results = self.outer.results if self.outer is not None else {}
        return tuple(results.get(r, 0) for r in OUTER_RESULTS)

    def _publish_status(self) -> None:
        """Hand the status page a fresh document (on the loop: the HTTP thread gets finished bytes), and
        export the swarm-wide gauges from the same view of the records."""
        view = swarm_view([self.peers.serving(s) for s in range(self.spec.pipeline.stages)])
        if self.swarm_metrics is not None:
            self.swarm_metrics.update(view)
        serving = self.pipeline is not None and self.worker is not None
        stats = self.pipeline.stats if serving else None
        node = NodeStatus(
            peer_id=self.peer_id, role="seed" if self.options.seed_spec is not None else "volunteer",
            stage=self.stage, inner_step=self.worker.inner_step if self.worker is not None else 0,
            outer_step=getattr(getattr(self.outer, "state", None), "outer_step", None),  # None: not started
            loss=stats.last_loss if stats else None, eval_loss=stats.eval_loss if stats else None,
            throughput=self.pipeline.meter.value if serving else None,
        )
        self.status.publish(status_document(self.spec.run_id, view, node, self.history.points()))

    async def _announce_joining(self) -> None:
        """Store our joining entry before asking anyone for state: donors serve members only, and the heartbeat
        loop's first beat could come after our first request."""
        try:
            await announce(self.dht, self.spec.run_id, self.stage, self.signer.subkey, self._heartbeat(),
                           ttl=3 * self.options.heartbeat_s)
        except Exception as e:  # the heartbeat loop tries again; donors re-read the records on our first request
            logger.warning("could not announce our joining entry: %s: %s", type(e).__name__, e)

    async def _heartbeat_loop(self) -> None:
        """Announce ourselves (joining, then serving) every heartbeat_s, re-read the records, and in a private
        run the seed's revocation list (a node whose own token was revoked stops)."""
        while True:
            try:
                if self.stage is not None and (self.pipeline is None or self.pipeline.accepting):
                    await announce(self.dht, self.spec.run_id, self.stage, self.signer.subkey, self._heartbeat(),
                                   ttl=3 * self.options.heartbeat_s)
                await self._read_revocations()
                await self.peers.refresh(self.dht, self.spec.run_id)
                self.metrics.set_live_peers(self.peers.counts())
                self._publish_status()
            except TokenError as e:
                print(f"stopping: {e}", flush=True)
                self.stop_event.set()
                return
            except Exception as e:  # the DHT can hiccup; the next beat tries again
                logger.warning("heartbeat failed: %s: %s", type(e).__name__, e)
            if self.worker is not None and self.lane is not None and self._first_step is not None:
                self.metrics.queue_depth.set(self.lane.depth)
                taken = self.worker.inner_step - self._first_step
                if self.options.max_steps and taken >= self.options.max_steps:
                    print(f"took {taken} inner steps (now at step {self.worker.inner_step}), stopping", flush=True)
                    self.stop_event.set()
            await asyncio.sleep(self.options.heartbeat_s)

    async def _withdraw(self) -> None:
        """Stop taking work and outlive our heartbeat with a withdrawal, so peers route around us at once."""
        if self.stage is None or self.pipeline is None or self.dht is None:
            return
        self.pipeline.accepting = False  # also keeps the heartbeat loop from announcing us again
        try:
            await asyncio.wait_for(announce(self.dht, self.spec.run_id, self.stage, self.signer.subkey,
                                            self._heartbeat(leaving=True), ttl=3 * self.options.heartbeat_s + 1),
                                   WITHDRAW_TIMEOUT_S)
        except Exception as e:
            logger.info("could not withdraw our heartbeat: %s: %s", type(e).__name__, e)

    async def _rebalance_loop(self) -> None:
        """Now and then (randomized), move to the stage that limits the swarm when that raises its bottleneck
        by at least balancing.min_gain; never sooner than min_dwell_s after the last join or move."""
        b = self.spec.balancing
        rng = random.Random()
        while True:
            await asyncio.sleep(b.check_every_s * rng.uniform(0.5, 1.5))
            if self.pipeline is None or time.monotonic() - self.entered_at < b.min_dwell_s:
                continue
            target = await self._wanted_move()
            if target is None:
                continue
            # a second look on fresh records after a random pause: of peers that read the same records and
            # decided together, the later ones now see the first one's withdrawal
            await asyncio.sleep(rng.uniform(0.0, self.options.heartbeat_s))
            if self.pipeline is None or await self._wanted_move() != target:
                continue
            try:
                await self.move_to(target)
            except Exception as e:
                print(f"move to stage {target} failed ({type(e).__name__}: {e}); stopping", flush=True)
                self.stop_event.set()
                return

    async def _wanted_move(self) -> int | None:
        """The stage to move to on the DHT's current records (None: stay)."""
        await self.peers.refresh(self.dht, self.spec.run_id)
        others = [p for p in self.peers.all() if p.peer_id != self.peer_id]
        return choose_move(others, self.spec.pipeline.stages, self.stage, self.pipeline.meter.value,
                           self.spec.balancing.min_gain)

    async def move_to(self, stage: int) -> None:
        """Leave our stage (withdraw, drain, stop its services), then enter ``stage``: download its state and
        serve it. The old stage's microbatches still held here are dropped; their drivers reroute them."""
        async with self._stage_change:
            totals = ",".join(f"{t:.0f}" for t in stage_throughputs(self.peers.all(), self.spec.pipeline.stages))
            print(f"moving from stage {self.stage} to stage {stage} (throughput per stage {totals})", flush=True)
            await self._reenter(stage)
            self.metrics.stage_moves.inc()
            print(f"moved to stage {stage} at step {self.worker.inner_step}", flush=True)

    async def _catch_up(self, lead: PeerInfo) -> None:
        """Leave our stage and enter it again, which downloads the state of ``lead``, the replica that got
        ahead (see _at_boundary)."""
        async with self._stage_change:
            if self.pipeline is None:
                return
            print(f"replica {lead.peer_id[-8:]} of stage {self.stage} is at step {lead.inner_step}, "
                  f"{lead.inner_step - self.worker.inner_step} steps ahead of this one, which started without "
                  "the stage's state: re-entering the stage to adopt it", flush=True)
            try:
                await self._reenter(self.stage)
            except Exception as e:
                print(f"catching up failed ({type(e).__name__}: {e}); stopping", flush=True)
                self.stop_event.set()

    async def _reenter(self, stage: int) -> None:
        """Leave our stage and enter ``stage`` (ours again for a catch-up), then run its loops."""
        await self._leave_stage()
        await self._enter_stage(stage)
        self._first_step = self.worker.inner_step
        self.write_ready_file()
        self._start_stage_tasks()

    async def _leave_stage(self, drain_s: float = DRAIN_S) -> None:
        """Withdraw from the stage, stop driving, let held microbatches finish (up to ``drain_s``), close the
        stage's services. The worker stays until the next stage replaces it (for a final checkpoint)."""
        await self._withdraw()
        self.stage_stop.set()
        if self.pipeline is not None:
            left = await self.pipeline.drain(drain_s)
            if left:
                logger.info("left %d microbatch(es) unfinished; their drivers reroute them", left)
        await self._stop_stage_tasks()
        if self.donor is not None:
            await self.donor.close()
        if self.outer is not None:
            await self.outer.close()
        if self.pipeline is not None:
            await self.pipeline.close()
        self.pipeline = self.outer = self.donor = None
        self.state_ready = False

    async def _last_outer_step(self) -> None:
        """At a clean stop, hand the inner steps taken since our last outer step to a partner instead of
        leaving with them: one more NoLoCo step, if a replica of our stage that is stopping too, or at its
        boundary, pairs with us by LAST_MEETING_BY_S after the stop began. A run stopped as a whole
        (``swarmd demo``) then leaves each pair of replicas with its pair's average. Nobody comes: the weights
        stay as they are.
        A second stop signal (``hurry``) skips it."""
        noloco = self.outer if isinstance(self.outer, NoLoCoService) else None
        if noloco is None or self.worker is None or self.worker.inner_step == self._outer_at:
            return
        wait = LAST_MEETING_BY_S - (time.monotonic() - self._stopping_since)
        if wait < 1.0:
            print("stopping: no time left for a last outer step", flush=True)
            return
        print(f"stopping: a last outer step, if a partner of stage {self.stage} comes within {wait:.0f} s "
              "(stop again to skip it)", flush=True)
        step = asyncio.ensure_future(noloco.outer_step(pair_timeout_s=wait))
        await self._unless_hurried(step)
        if step.cancelled():
            result = "skipped"
        elif (error := step.exception()) is not None:  # a bug here must not cost the checkpoint
            logger.warning("last outer step failed: %s: %s", type(error).__name__, error)
            result = "failed"
        else:
            result = step.result()
        print(f"last outer step: {result}", flush=True)

    async def _call_off_unpaired_step(self) -> None:
        """At a clean stop, call off an outer step that is still looking for a partner: it would send the
        weights of its boundary and carry over every inner step since, unaveraged. The last outer step takes
        its place and hands over the weights as they are when it starts."""
        task = self._boundary_task
        if isinstance(self.outer, NoLoCoService) and self.outer.unpaired and task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def _unless_hurried(self, task: asyncio.Future) -> None:
        """Wait for ``task`` to end, or cancel it at a second stop signal (``hurry``)."""
        hurry = asyncio.ensure_future(self.hurry.wait())
        try:
            await asyncio.wait({task, hurry}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})

    async def _republish_loop(self) -> None:
        """The seed: the spec every 300 s; in a private run the revocation list at once when
        `swarmd token revoke` changed it, and every 60 s anyway."""
        last_spec = last_revocations = time.monotonic()
        published: frozenset[str] | None = None
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            try:
                if now - last_spec >= 300:
                    last_spec = now
                    await self._publish_spec()
                revoked = read_revocations(self.options.node_dir) if self.spec.access == "private" else None
                if revoked is not None and (revoked != published or now - last_revocations >= 60):
                    last_revocations, published = now, revoked
                    await self._publish_revocations()
            except Exception as e:
                logger.warning("republishing the seed's records failed: %s: %s", type(e).__name__, e)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if expired := self.pipeline.expire():
                logger.info("dropped %d microbatch(es) past their deadline", expired)

    async def _progress_loop(self) -> None:
        last_samples, last_time = 0, time.monotonic()
        while True:
            await asyncio.sleep(self.options.progress_s)
            now = time.monotonic()
            peers = ",".join(str(c) for c in self.peers.counts())
            if self.worker is None or self.pipeline is None:
                print(f"[{'seed' if self.worker is None else 'moving'}] run {self.spec.run_id} | "
                      f"peers per stage {peers}", flush=True)
                continue
            samples = self.worker.samples_processed
            rate = max(samples - last_samples, 0) / max(now - last_time, 1e-9)
            last_samples, last_time = samples, now
            loss, eval_loss = self.pipeline.stats.last_loss, self.pipeline.stats.eval_loss
            self.history.add(time.time(), loss, eval_loss, rate)
            self._publish_status()
            outer = f" | outer {self.outer.state.outer_step}" if self.outer is not None else ""
            held_out = f" | eval {eval_loss:.4f}" if eval_loss == eval_loss else ""  # NaN until the first pass
            print(
                f"[stage {self.stage}/{self.spec.pipeline.stages}] step {self.worker.inner_step}{outer} | "
                f"loss {loss:.4f}{held_out} | "
                f"{rate:.1f} samples/s | peers per stage {peers} | queue {self.lane.depth} | "
                f"held {len(self.pipeline.held)}",
                flush=True,
            )

    def summary(self) -> str:
        """One line on what this node did, printed at stop (the demo and the tests read it)."""
        if self.worker is None:
            return f"summary: run {self.spec.run_id} seed, served the spec"
        outer = ""
        if self.outer is not None:
            counts = self.outer.results
            outer = " outer " + " ".join(f"{r} {counts[r]}" for r in ("paired", "solo", "rejected", "failed"))
        stats = self.pipeline.stats.summary() if self.pipeline is not None else ""
        return (f"summary: stage {self.stage} inner steps {self.worker.inner_step} samples "
                f"{self.worker.samples_processed} {stats}{outer}")

    async def close(self) -> None:
        """Leave cleanly, then stop everything this node started, p2pd included. Safe to call more than once.

        Order: stop driving and starting outer steps (one that no partner has met yet is called off), withdraw
        our heartbeat, stop taking work and let held microbatches finish (briefly), let an outer step under way
        finish, stop the loops, take a last outer step if a partner comes (``_last_outer_step``), write the
        checkpoint, then leave the DHT and stop p2pd."""
        self._stopping_since = time.monotonic()
        self.stop_event.set()
        if self.pipeline is not None and self.state_ready:
            self.stage_stop.set()  # drivers start no new microbatches, run_at_boundaries no new outer step
            if isinstance(self.outer, NoLoCoService):
                self.outer.leaving = True
            await self._call_off_unpaired_step()
            await self._withdraw()
            await self.pipeline.drain(DRAIN_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.stage_stop.is_set() and self._boundary_task is not None and not self._boundary_task.done():
            await self._call_off_unpaired_step()  # one that was still preparing at the stop may be looking now
            # let an outer step under way finish (it may pair with a partner's last one): cut short, it could
            # leave its partner's weights averaged and ours not
            await self._unless_hurried(self._boundary_task)
        if self._stage_tasks:
            await self._stop_stage_tasks()
        if self.state_ready:
            await self._last_outer_step()
        for service in (self.donor, self.outer, self.pipeline):
            if service is not None:
                await service.close()
        if self.lane is not None and self.state_ready:
            await self.write_checkpoint()
        self.state_ready = False
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.dht is not None:
            await self.dht.shutdown()
            self.dht = None
        if self.p2p is not None:
            await self.p2p.shutdown()
            self.p2p = None
        if self.lane is not None:
            self.lane.close()
            self.lane = None


def _measure_throughput(worker: StageWorker, spec: RunSpec) -> float:
    """Samples/s of one forward+backward on a dummy microbatch, in the worker's precision: the first routing
    weight we announce."""
    p, model, device = spec.pipeline, worker.model, worker.device
    if model.is_first:
        inputs = torch.randint(0, spec.model.vocab_size, (p.microbatch_size, p.seq_len), device=device)
    else:
        inputs = torch.randn(p.microbatch_size, p.seq_len, spec.model.dim, device=device)
    best = 0.0
    for _ in range(2):  # the first run pays one-time costs
        start = time.perf_counter()
        with worker.autocast():
            loss = model(inputs).float().square().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # CUDA runs asynchronously: time the work, not its launch
        best = max(best, p.microbatch_size / (time.perf_counter() - start))
    model.zero_grad(set_to_none=True)
    return best
