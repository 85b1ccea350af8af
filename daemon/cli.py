"""The ``swarmd`` command: seed a run, join one, watch one, or run the local demo."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import signal
import sys
from pathlib import Path

# hivemind reads its log level at import time; keep its INFO chatter out of the progress output
os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")

import torch
from swarmd.daemon.p2p_host import AddressError, check_announce_maddr, check_peer_id, peer_id_of, reachability
from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec, SpecError

DESCRIPTION = """\
swarmd: peer-to-peer volunteer training. A seed starts a run; volunteers join it with one command;
microbatches travel through randomized pipelines across the volunteers' machines.

  swarmd demo                         a local swarm (seed + 4 volunteers) training a small model
  swarmd seed RUN.toml                start a run and print the join command for volunteers
  swarmd join MULTIADDR               join a run and serve + train the stage that needs help most
  swarmd status MULTIADDR             print a run's stages, peers, steps and loss
  swarmd token mint|revoke            join tokens of a private run (on the seed's machine)
  swarmd doctor [MULTIADDR]           check this machine before joining: ports, limits, disk, GPU, and
                                      with a peer: dial-back reachability, clock and versions
"""


def _node_arguments(parser: argparse.ArgumentParser) -> None:
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="0.0.0.0",
                     help="address to listen on (default 0.0.0.0; 127.0.0.1 keeps the node on this machine)")
    net.add_argument("--port", type=int, default=0, help="TCP port for libp2p (default: any free port)")
    net.add_argument("--announce", action="append", default=[], metavar="MULTIADDR",
                     help="public multiaddr to announce, e.g. /ip4/203.0.113.7/tcp/31337 (repeatable)")
    net.add_argument("--no-nat-traversal", action="store_true",
                     help="disable NAT port mapping, AutoNAT, relays and auto-relay (always off when --host is "
                          "loopback)")
    node = parser.add_argument_group("node")
    node.add_argument("--node-dir", type=Path, default=None,
                      help="where the node keeps its identity key and ready.json (default ~/.swarmd/<command>)")
    node.add_argument("--stage", type=int, default=None,
                      help="start on this pipeline stage (default: this node's checkpoint's stage, else the stage "
                           "with the least total throughput)")
    node.add_argument("--state-wait", type=float, default=120.0, metavar="S",
                      help="how long to wait for a replica of a stage that trained but has none left, when this "
                           "node has no checkpoint of it (default 120)")
    node.add_argument("--no-rebalance", action="store_true",
                      help="stay on the first stage; never move to the stage that limits the swarm")
    node.add_argument("--device", default="cpu", help="torch device for compute, e.g. cpu or cuda:0 (default cpu)")
    node.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    node.add_argument("--metrics-host", default="0.0.0.0", help="address of the /metrics endpoint (default 0.0.0.0)")
    node.add_argument("--metrics-port", type=int, default=9100,
                      help="port of /metrics, the status page (/) and /status.json (default 9100; 0: any free "
                           "port; -1: off)")
    node.add_argument("--swarm-metrics", action="store_true",
                      help="also export swarm-wide gauges (swarmd_swarm_*) read from the run's records (the seed "
                           "always does)")
    node.add_argument("--max-steps", type=int, default=0, help="stop after this node took this many inner steps (default: never)")
    node.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (default: never)")
    node.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines (default 5)")
    node.add_argument("--log-level", default="warning", help="python log level for swarmd (default warning)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarmd", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seed = commands.add_parser("seed", help="start a run: publish its signed spec and print the join command",
                               description="Start a run from RUN.toml (default: the embedded demo run).")
    seed.add_argument("spec", nargs="?", type=Path, default=DEFAULT_SPEC_PATH,
                      help=f"the run spec (default: the embedded {DEFAULT_SPEC_PATH.name})")
    seed.add_argument("--no-train", action="store_true", help="only coordinate (DHT, spec); serve no stage")
    _node_arguments(seed)

    join = commands.add_parser("join", help="join a run and train",
                               description="Join the run that MULTIADDR's peer belongs to: fetch and verify the "
                                           "spec, pick a stage, download its weights, then serve and train.")
    join.add_argument("peers", nargs="+", metavar="MULTIADDR",
                      help="one or more peers of the run, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3Koo...")
    join.add_argument("--token", default=None, metavar="TOKEN",
                      help="join token of a private run (the operator mints it with `swarmd token mint`)")
    join.add_argument("--seed-id", action="append", default=[], metavar="PEER_ID",
                      help="trust specs signed by this peer (the seed), when joining through another peer")
    _node_arguments(join)

    status = commands.add_parser("status", help="print a run's stages, peers, steps and loss",
                                 description="Join the DHT as a client and print the swarm.")
    status.add_argument("peers", nargs="+", metavar="MULTIADDR", help="one or more peers of the run")
    status.add_argument("--seed-id", action="append", default=[], metavar="PEER_ID",
                        help="trust specs signed by this peer, when asking another peer")
    status.add_argument("--watch", type=float, default=0.0, help="refresh every this many seconds (default: once)")
    status.add_argument("--json", action="store_true",
                        help="print the status page's JSON document (one line per refresh; no node, no history)")

    token = commands.add_parser("token", help="mint or revoke join tokens of a private run (on the seed's machine)",
                                description="Join tokens let volunteers into a run whose spec says "
                                            "[run] access = \"private\". They are signed with the seed's key "
                                            "(its --node-dir) and checked by every member.")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    mint = token_commands.add_parser("mint", help="print a new join token")
    mint.add_argument("--spec", type=Path, default=DEFAULT_SPEC_PATH, help="the run spec the seed runs (default: embedded)")
    mint.add_argument("--node-dir", type=Path, default=None, help="the seed's node dir (default ~/.swarmd/seed)")
    mint.add_argument("--ttl", default="7d", help="how long the token is valid: 90s, 30m, 12h or 7d (default 7d)")
    mint.add_argument("--peer-id", default=None, help="only this peer may use the token (default: anyone holding it)")
    mint.add_argument("--stages", default=None, help="comma-separated stages it may serve, e.g. 0,1 (default: any)")
    revoke = token_commands.add_parser("revoke", help="revoke tokens by id; the running seed publishes the list")
    revoke.add_argument("ids", nargs="+", metavar="TOKEN_ID", help="token ids, as `swarmd token mint` printed them")
    revoke.add_argument("--node-dir", type=Path, default=None, help="the seed's node dir (default ~/.swarmd/seed)")

    doctor = commands.add_parser(
        "doctor", help="check this machine before joining (one line per check, with a fix for each failure)",
        description="Check the ports, the open-file limit, free disk in the node directory, CUDA, GPU memory and "
                    "triton. Given a peer of the run, also fetch and verify its spec, compare versions and clocks "
                    "with the peer, and ask it to dial this machine back: reachable, relayed or unreachable. "
                    "Give the network options the node will run with. Exit 0 when nothing FAILs, 1 otherwise.")
    doctor.add_argument("peer", nargs="?", default=None, metavar="MULTIADDR",
                        help="a peer of the run, e.g. the seed's join address (default: local checks only)")
    doctor.add_argument("--seed-id", action="append", default=[], metavar="PEER_ID",
                        help="trust specs signed by this peer, when asking another peer than the seed")
    doctor.add_argument("--host", default="0.0.0.0", help="address the node will listen on (default 0.0.0.0)")
    doctor.add_argument("--port", type=int, default=0, help="TCP port the node will use (default: any free port)")
    doctor.add_argument("--announce", action="append", default=[], metavar="MULTIADDR",
                        help="public multiaddr the node will announce (repeatable)")
    doctor.add_argument("--no-nat-traversal", action="store_true", help="check as a node with NAT traversal off")
    doctor.add_argument("--node-dir", type=Path, default=None, help="the node's directory (default ~/.swarmd/join)")
    doctor.add_argument("--metrics-host", default="0.0.0.0", help="address of the /metrics endpoint (default 0.0.0.0)")
    doctor.add_argument("--metrics-port", type=int, default=9100, help="the node's metrics port (default 9100; -1: off)")
    doctor.add_argument("--device", default="cpu", help="torch device the node will train on (default cpu)")
    doctor.add_argument("--relay-wait", type=float, default=240.0, metavar="S",
                        help="when the peer cannot dial this machine, wait this long for a relay address (default "
                             "240: auto-relay gathers candidates for up to 3 minutes)")

    demo = commands.add_parser("demo", help="run a local swarm on 127.0.0.1 (seed + volunteers) and watch it train",
                               description="Start a seed and volunteers as separate processes on 127.0.0.1 "
                                           "training the embedded default run, print their progress, and stop "
                                           "them all when the volunteers reach --steps.")
    demo.add_argument("--volunteers", type=int, default=4, help="training volunteers (default 4: 2 stages x 2)")
    demo.add_argument("--steps", type=int, default=150, help="inner steps per volunteer (default 150)")
    demo.add_argument("--spec", type=Path, default=DEFAULT_SPEC_PATH, help="run spec (default: embedded)")
    demo.add_argument("--dir", type=Path, default=None, help="folder for the nodes' files (default: a temp folder)")
    demo.add_argument("--threads", type=int, default=1, help="torch threads per volunteer (default 1)")
    demo.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default 900)")
    return parser


def _node_options(args: argparse.Namespace, command: str, **extra):
    from swarmd.daemon.node import NodeOptions

    return NodeOptions(
        node_dir=args.node_dir or Path.home() / ".swarmd" / command,
        host=args.host, port=args.port, announce=tuple(args.announce),
        stage=args.stage, rebalance=not args.no_rebalance, device=args.device, threads=args.threads,
        metrics_host=args.metrics_host, metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        max_steps=args.max_steps, duration_s=args.duration, state_wait_s=args.state_wait, progress_s=args.progress_every,
        nat_traversal=not args.no_nat_traversal, swarm_metrics=args.swarm_metrics, **extra,
    )


async def _run_node(options) -> int:
    from swarmd.daemon.node import Node

    node = await Node.create(options)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:  # the first one stops cleanly, a second hurries the stop
        (node.hurry if node.stop_event.is_set() else node.stop_event).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        _print_banner(node)
        await node.run()
    finally:
        print("stopping...", flush=True)
        print(node.summary(), flush=True)
        await node.close()
        print("stopped", flush=True)
    return 0


def _print_banner(node) -> None:
    spec = node.spec
    public = [m for m in node.maddrs if "/ip4/127." not in m] or node.maddrs
    print(f"swarmd {node.peer_id}: run {spec.run_id!r}, {spec.pipeline.stages} stage(s), "
          f"role {'seed' if node.options.seed_spec else 'volunteer'}, "
          f"stage {node.stage if node.stage is not None else '-'}", flush=True)
    if node.worker is not None:
        asked, used = spec.optimizer.precision, node.worker.precision
        note = f" ({asked} was asked: it needs a CUDA device with bf16 support)" if used != asked else ""
        print(f"compute on {node.worker.device} in {used}{note}", flush=True)
    print(f"listening on {' '.join(node.maddrs)}", flush=True)
    print(f"reachability: {reachability(node.maddrs, node.nat_traversal)[1]}", flush=True)
    if node.metrics_server is not None:
        base = f"http://{node.options.metrics_host}:{node.metrics_server.port}"
        print(f"metrics on {base}/metrics, status page on {base}/", flush=True)
    if node.options.seed_spec is not None:
        print("volunteers join with:", flush=True)
        print(f"  swarmd join {public[0]}", flush=True)


class UsageError(ValueError):
    """An option value swarmd cannot use; the message says which and what to give instead."""


# numeric node options: (option, attribute, lowest, highest); checked before anything starts
_NODE_RANGES = (
    ("--port", "port", 0, 65535),
    ("--metrics-port", "metrics_port", -1, 65535),
    ("--stage", "stage", 0, math.inf),
    ("--threads", "threads", 0, math.inf),
    ("--state-wait", "state_wait", 0, math.inf),
    ("--max-steps", "max_steps", 0, math.inf),
    ("--duration", "duration", 0, math.inf),
    ("--progress-every", "progress_every", 0.1, math.inf),
)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse option values and multiaddrs swarmd cannot use before it starts anything (p2pd included).

    Raises UsageError, or AddressError for a multiaddr or peer id; each says what is wrong and what to do."""
    if args.command in ("seed", "join"):
        _check_node_arguments(args)
    if args.command == "status":
        _check_ranges(args, (("--watch", "watch", 0, math.inf),))
    if args.command in ("join", "status"):
        for maddr in args.peers:
            peer_id_of(maddr)
        for peer_id in args.seed_id:
            check_peer_id(peer_id)
    if args.command == "doctor":
        _check_ranges(args, (("--port", "port", 0, 65535), ("--metrics-port", "metrics_port", -1, 65535),
                             ("--relay-wait", "relay_wait", 0, math.inf)))
        _check_network_arguments(args)
        if args.peer is not None:
            peer_id_of(args.peer)
        for peer_id in args.seed_id:
            check_peer_id(peer_id)


def _check_ranges(args: argparse.Namespace, ranges: tuple[tuple[str, str, float, float], ...]) -> None:
    for option, attribute, low, high in ranges:
        value = getattr(args, attribute)
        if value is not None and not low <= value <= high:  # "not" so that nan fails too
            allowed = f"{low} or more" if high == math.inf else f"{low}..{high}"
            raise UsageError(f"{option} {value} is out of range: use {allowed}")


def _check_node_arguments(args: argparse.Namespace) -> None:
    _check_ranges(args, _NODE_RANGES)
    _check_network_arguments(args)
    if not isinstance(logging.getLevelName(args.log_level.upper()), int):
        raise UsageError(f"--log-level {args.log_level!r} is not a log level: use debug, info, warning or error")


def _check_network_arguments(args: argparse.Namespace) -> None:
    """--host, --announce and --device, as a node (or the doctor checking for one) takes them."""
    try:
        ipaddress.IPv4Address(args.host)
    except ValueError:
        raise UsageError(f"--host {args.host!r} is not an IPv4 address: give one of this machine's, e.g. 0.0.0.0 "
                         "(all interfaces) or 127.0.0.1 (this machine only)") from None
    for maddr in args.announce:
        check_announce_maddr(maddr)
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a torch device: use cpu, cuda or cuda:<index>") from None


def _fail(command: str, error: Exception) -> int:
    """Report ``error`` as one line on stderr, the way argparse reports usage errors, and return exit code 2."""
    print(f"swarmd {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _run_token(args: argparse.Namespace) -> int:
    """`swarmd token mint|revoke`: sign a token with the seed's key, or add ids to its revocation list."""
    from swarmd.daemon.identity import NodeIdentity
    from swarmd.daemon.membership import TokenError, mint_token, revoke_tokens

    node_dir = args.node_dir or Path.home() / ".swarmd" / "seed"
    if args.token_command == "revoke":
        ids = revoke_tokens(node_dir, args.ids)
        print(f"revoked {', '.join(args.ids)} ({len(ids)} revoked in all); the running seed publishes the list "
              f"within seconds ({node_dir / 'revoked.json'})")
        return 0
    text = args.ttl.strip()
    try:
        ttl = float(text[:-1]) * _TTL_UNITS[text[-1]]
        stages = None if args.stages is None else [int(s) for s in args.stages.split(",")]
    except (KeyError, ValueError, IndexError):
        raise TokenError(f"--ttl {args.ttl!r} or --stages {args.stages!r} is not understood: use e.g. --ttl 12h "
                         "--stages 0,1") from None
    if not ttl > 0 or (stages is not None and min(stages) < 0):
        raise TokenError("--ttl must be positive and --stages non-negative")
    if not (node_dir / "identity.key").exists():
        raise TokenError(f"{node_dir} holds no seed identity: run this on the seed's machine with its --node-dir")
    spec = RunSpec.load(args.spec)
    if spec.access != "private":
        print(f"note: run {spec.run_id!r} is open (its spec has no access = \"private\"): anyone may join it",
              file=sys.stderr)
    token, grant = mint_token(NodeIdentity.load_or_create(node_dir), spec.run_id, ttl, args.peer_id, stages)
    print(f"token id {grant.token_id} for run {spec.run_id!r}, valid {args.ttl}"
          + (f", peer {grant.peer_id}" if grant.peer_id else "") + (f", stages {list(grant.stages)}" if grant.stages else ""),
          file=sys.stderr)
    print(token)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
    except (UsageError, AddressError) as e:
        return _fail(args.command, e)
    if args.command == "demo":
        from swarmd.daemon.demo import run_demo

        return run_demo(args)
    logging.basicConfig(level=getattr(args, "log_level", "warning").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop
    from swarmd.daemon.checkpoint import CheckpointError
    from swarmd.daemon.membership import TokenError
    from swarmd.daemon.state_sync import StateSyncError

    try:
        if args.command == "seed":
            spec = RunSpec.load(args.spec)
            return uvloop.run(_run_node(_node_options(args, "seed", seed_spec=spec, train=not args.no_train)))
        if args.command == "join":
            options = _node_options(args, "join", initial_peers=tuple(args.peers), seed_ids=tuple(args.seed_id),
                                    token=args.token)
            return uvloop.run(_run_node(options))
        if args.command == "token":
            return _run_token(args)
        if args.command == "doctor":
            from swarmd.daemon.doctor import DoctorOptions, run_doctor

            return uvloop.run(run_doctor(DoctorOptions(
                peer=args.peer, seed_ids=tuple(args.seed_id), host=args.host, port=args.port,
                announce=tuple(args.announce), nat_traversal=not args.no_nat_traversal,
                node_dir=args.node_dir or Path.home() / ".swarmd" / "join", metrics_host=args.metrics_host,
                metrics_port=args.metrics_port, device=args.device, relay_wait_s=args.relay_wait,
            )))
        if args.command == "status":
            from swarmd.daemon.status import run_status

            return uvloop.run(run_status(args.peers, args.seed_id, args.watch, as_json=args.json))
    except (SpecError, TokenError, CheckpointError, StateSyncError, ConnectionError, OSError) as e:
        return _fail(args.command, e)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
