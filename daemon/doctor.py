"""``swarmd doctor [MULTIADDR]``: a preflight for a volunteer's machine, one line per check.

Each check ends ok, warn or FAIL, and a warn or FAIL says what to do. The checks themselves are plain
functions over plain values (``check_*``, ``classify_dialback``): the probes that read the machine and the
network feed them. Without a peer only the local checks run; with one the doctor also starts its own p2p
host the way a node would (same --host, --port, --announce, NAT traversal), fetches and verifies the run's
spec, compares versions and clocks with the peer, and asks it to dial this machine back (rpc.DIALBACK).
"""

from __future__ import annotations

import asyncio
import math
import resource
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from swarmd.daemon.metrics import NodeMetrics
from swarmd.daemon.p2p_host import NetworkStartError, create_p2p, nat_options, peer_id_of
from swarmd.daemon.spec import RunSpec, SpecError, verify_spec_record
from swarmd.daemon.transport import Transport
from swarmd.daemon.versions import decode_versions, software_versions
from swarmd.protocols import rpc
from swarmd.protocols.limits import DEFAULT_LIMITS
from swarmd.protocols.messages import MAX_DIALBACK_MADDRS
from swarmd.protocols.wire import PROTOCOL_VERSION, RemoteError, encode_message

OK, WARN, FAIL = "ok", "warn", "FAIL"
GiB = 1 << 30
MIN_OPEN_FILES = 1024  # below this p2pd runs out of sockets with a few dozen peers
GOOD_OPEN_FILES = 4096
MIN_FREE_DISK = 1 * GiB  # without the run's spec: room for a small model's checkpoints and logs
CHECKPOINT_BYTES_PER_PARAM = 20  # float32 weights, two Adam moments, the outer phi and delta
GPU_BYTES_PER_PARAM = 24  # weights, gradients, two Adam moments, outer phi and delta, in float32
GPU_OVERHEAD = 1 * GiB  # the CUDA context, the allocator's slack, one microbatch's transient tensors
# Heartbeats live 3 x 2 s in the DHT, and peers judge their expiry by their own clocks: a skew of seconds
# makes a live node look gone (or a gone one linger).
CLOCK_OK_S = 0.5
CLOCK_FAIL_S = 2.0
RPC_TIMEOUT_S = 15.0
DIALBACK_TIMEOUT_S = 60.0
DIALBACK_RETRY_S = DEFAULT_LIMITS.dialback_peer_interval_s + 1  # the asked node's pace per caller
NTP_FIX = "sync this machine's clock: `timedatectl set-ntp true` (systemd-timesyncd) or install chrony"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f" | fix: {self.fix}" if self.fix and self.status != OK else ""
        return f"{self.status:<4}  {self.name}: {self.detail}{fix}"


# ---- pure checks ---------------------------------------------------------------------------------


def check_open_files(soft: int, hard: int) -> Check:
    unlimited = soft == resource.RLIM_INFINITY
    if unlimited or soft >= GOOD_OPEN_FILES:
        return Check("open files", OK, f"limit {'unlimited' if unlimited else soft}")
    raise_to = GOOD_OPEN_FILES * 16 if hard == resource.RLIM_INFINITY else min(hard, GOOD_OPEN_FILES * 16)
    fix = (f"`ulimit -n {raise_to}` in the shell that starts swarmd (LimitNOFILE={raise_to} in a systemd unit)"
           if raise_to >= GOOD_OPEN_FILES else
           f"raise the hard limit (now {hard}): LimitNOFILE=65536 in a systemd unit, or nofile in "
           "/etc/security/limits.conf")
    status = FAIL if soft < MIN_OPEN_FILES else WARN
    return Check("open files", status, f"limit {soft} (hard {hard}); p2pd needs a socket per peer connection", fix)


def check_port(name: str, option: str, host: str, port: int, error: str | None) -> Check:
    """``error``: why binding ``host:port`` failed (None: it is free). Port 0 means any free port."""
    if port == 0:
        hint = " (a fixed --port is easier to forward on a router)" if option == "--port" else ""
        return Check(name, OK, f"any free port ({option} 0){hint}")
    if error is None:
        return Check(name, OK, f"{host}:{port} is free")
    return Check(name, FAIL, f"cannot listen on {host}:{port} ({error})",
                 f"stop what uses port {port} (a swarmd node already running? `ss -ltnp 'sport = :{port}'` shows "
                 f"it) or give another {option}")


def check_disk(path: Path, free_bytes: int, needed_bytes: int, why: str) -> Check:
    detail = f"{free_bytes / GiB:.1f} GiB free in {path} ({why} {needed_bytes / GiB:.1f} GiB)"
    if free_bytes >= 2 * needed_bytes:
        return Check("disk", OK, detail)
    fix = f"free space in {path}, or give --node-dir on a disk with at least {2 * needed_bytes / GiB:.1f} GiB free"
    return Check("disk", FAIL if free_bytes < needed_bytes else WARN, detail, fix)


def stage_parameters(spec: RunSpec) -> int:
    """A close estimate of the largest stage's parameter count: its share of the transformer layers plus
    the embedding or the output head."""
    m = spec.model
    per_layer = 4 * m.dim * m.dim + 3 * m.dim * m.ffn_hidden
    return math.ceil(m.n_layers / spec.pipeline.stages) * per_layer + m.vocab_size * m.dim


def activation_bytes(spec: RunSpec) -> int:
    """An estimate of the activations the largest stage keeps for backward: the graphs of ``kept_graphs``
    microbatches in flight and of the one it computes, each (34 dim + 5 heads seq) x 2 bytes per token and
    layer (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer Models"; the
    demo's float32 model saves about that much: tests/test_doctor.py)."""
    m, p = spec.model, spec.pipeline
    per_layer = p.microbatch_size * p.seq_len * (34 * m.dim + 5 * m.n_heads * p.seq_len) * 2
    return (p.kept_graphs + 1) * math.ceil(m.n_layers / p.stages) * per_layer


def disk_needed(spec: RunSpec | None) -> tuple[int, str]:
    """(bytes, why) the node directory needs: two checkpoints of the largest stage (a checkpoint is written
    beside the old one, then renamed over it), at least MIN_FREE_DISK."""
    if spec is None:
        return MIN_FREE_DISK, "a node needs at least"
    need = 2 * CHECKPOINT_BYTES_PER_PARAM * stage_parameters(spec)
    return max(MIN_FREE_DISK, need), f"run {spec.run_id!r} needs about"


@dataclass(frozen=True)
class GpuProbe:
    """What torch sees: CUDA devices as (name, total bytes, free bytes), and triton's version or import error."""

    devices: list[tuple[str, int, int]] = field(default_factory=list)
    torch_cuda: str | None = None  # torch.version.cuda (None: a CPU-only build of torch)
    triton: str | None = None  # triton.__version__ when it imports
    triton_error: str | None = None


def check_gpu(probe: GpuProbe, device: str, spec: RunSpec | None) -> list[Check]:
    """CUDA, the chosen GPU's memory, triton. On a machine without CUDA that trains on the CPU: skipped."""
    wants_cuda = device.startswith("cuda")
    if not probe.devices:
        if not wants_cuda:
            why = "a CPU-only torch" if probe.torch_cuda is None else "no CUDA device visible"
            return [Check("cuda", OK, f"skipped: {why}; this node trains on the CPU"),
                    Check("triton", OK, "skipped: its kernels run on CUDA only")]
        fix = ("install a CUDA build of torch (README, \"Join from another machine\")" if probe.torch_cuda is None
               else "check the NVIDIA driver (`nvidia-smi`) and CUDA_VISIBLE_DEVICES")
        return [Check("cuda", FAIL, f"--device {device} but torch sees no CUDA device"
                      + (" (a CPU-only torch build)" if probe.torch_cuda is None else ""), fix + ", or use --device cpu")]
    index = int(device.split(":")[1]) if wants_cuda and ":" in device else 0
    names = ", ".join(f"{i}: {name}" for i, (name, _, _) in enumerate(probe.devices))
    checks = [Check("cuda", OK, f"CUDA {probe.torch_cuda}, {len(probe.devices)} device(s) ({names})")]
    if index >= len(probe.devices):
        return [Check("cuda", FAIL, f"--device {device} but there are only {len(probe.devices)} device(s)",
                      f"use --device cuda:0 .. cuda:{len(probe.devices) - 1}")]
    name, total, free = probe.devices[index]
    detail = f"cuda:{index} {name}: {total / GiB:.1f} GiB, {free / GiB:.1f} GiB free"
    if not wants_cuda:
        checks.append(Check("gpu memory", OK, f"{detail}; not used with --device {device} (pass --device cuda)"))
    elif spec is None:
        checks.append(Check("gpu memory", OK, detail))
    else:
        activations = activation_bytes(spec)
        need = GPU_BYTES_PER_PARAM * stage_parameters(spec) + activations + GPU_OVERHEAD
        detail += (f"; run {spec.run_id!r} needs about {need / GiB:.1f} GiB "
                   f"({activations / GiB:.1f} of it activations of {spec.pipeline.kept_graphs + 1} microbatches)")
        checks.append(Check("gpu memory", OK if free >= need else FAIL, detail,
                            "free the GPU (`nvidia-smi` lists its processes) or pick another with --device cuda:N; "
                            "a lower pipeline.kept_graphs in the run spec needs less (its backward re-runs forwards)"))
    if probe.triton is not None:
        checks.append(Check("triton", OK, f"triton {probe.triton} (fused kernels on CUDA)"))
    else:
        checks.append(Check("triton", WARN, f"triton does not import ({probe.triton_error}): the kernels fall back "
                                            "to plain torch, slower", "pip install triton (Linux x86_64)"))
    return checks


def check_spec(spec: RunSpec | None, signer: str | None, error: str | None) -> Check:
    if spec is not None:
        return Check("run spec", OK, f"run {spec.run_id!r}, signed by seed {signer}, verified and readable here")
    return Check("run spec", FAIL, f"the run's spec is not usable here ({error})",
                 "install the swarmd version the run uses (see the versions line), or give --seed-id when the "
                 "peer is not the seed")


def check_versions(local: dict[str, str], peer: dict[str, str], peer_protocol: int | None) -> list[Check]:
    """The wire protocol must match; swarmd and hivemind should; torch should share its major.minor."""
    checks = []
    if peer_protocol is not None and peer_protocol != PROTOCOL_VERSION:
        checks.append(Check("protocol", FAIL, f"this swarmd speaks wire protocol {PROTOCOL_VERSION}, the peer "
                                              f"{peer_protocol}",
                            f"install swarmd {peer.get('swarmd', 'as the run uses')} (README, \"Join from another "
                            "machine\")"))
    if not peer:
        checks.append(Check("versions", WARN, f"the peer does not report its versions (here: {_versions(local)})",
                            "ask the operator which swarmd version the run uses"))
        return checks
    differ = []
    for name in ("swarmd", "hivemind"):
        if local.get(name) != peer.get(name):
            differ.append(f"{name} {local.get(name)} here, {peer.get(name)} on the peer")
    if _minor(local.get("torch")) != _minor(peer.get("torch")):
        differ.append(f"torch {local.get('torch')} here, {peer.get('torch')} on the peer")
    if not differ:
        return checks + [Check("versions", OK, f"{_versions(local)}, as the peer")]
    pins = " ".join(f"{n}=={_public(peer[n])}" for n in ("swarmd", "hivemind", "torch")
                    if n in peer and local.get(n) != peer[n] and n != "swarmd")
    fix = "install the peer's versions" + (f": pip install {pins}" if pins else "")
    if local.get("swarmd") != peer.get("swarmd"):
        fix += f"; swarmd {peer.get('swarmd')} from the run's release (README, \"Join from another machine\")"
    return checks + [Check("versions", WARN, "; ".join(differ), fix)]


def _versions(versions: dict[str, str]) -> str:
    return ", ".join(f"{n} {versions.get(n, '?')}" for n in ("swarmd", "torch", "hivemind"))


def _minor(version: str | None) -> tuple[str, ...]:
    return tuple((version or "").split("+")[0].split(".")[:2])


def _public(version: str) -> str:
    return version.split("+")[0]  # "2.13.0+cpu" -> "2.13.0": the local tag names the index, not the release


def check_clock(skew_s: float, rtt_s: float, peer: str) -> Check:
    """``skew_s``: the peer's wall clock minus ours at the middle of a round trip of ``rtt_s``."""
    error = abs(skew_s) - rtt_s / 2  # the least the clocks can be apart, given the round trip
    detail = (f"{abs(skew_s):.2f} s {'behind' if skew_s > 0 else 'ahead of'} peer {peer[-8:]} "
              f"(round trip {rtt_s * 1000:.0f} ms)")
    if error < CLOCK_OK_S:
        return Check("clock", OK, detail)
    return Check("clock", FAIL if error >= CLOCK_FAIL_S else WARN, detail, NTP_FIX)


def classify_dialback(maddrs: list[str], results: list[str], peer: str, port: int,
                      nat_traversal: bool, waited_s: float = 0.0) -> Check:
    """The dial-back line: reachable (the peer dialed a direct address), relayed (only a /p2p-circuit one),
    or unreachable. ``results`` are the peer's answers, one per address of ``maddrs``."""
    outcome = list(zip(maddrs, results))
    direct = [m for m, r in outcome if r == "ok" and "/p2p-circuit" not in m]
    relayed = [m for m, r in outcome if r == "ok" and "/p2p-circuit" in m]
    failures = [r for _, r in outcome if r != "ok"]
    why = f" ({_short(failures[0])})" if failures else ""
    forward = (f"forward TCP port {port} on your router to this machine and --announce "
               f"/ip4/<your public IP>/tcp/{port}" if port else
               "give the node a fixed --port P, forward TCP port P on your router to this machine and --announce "
               "/ip4/<your public IP>/tcp/P")
    if direct:
        return Check("dial-back", OK, f"reachable: peer {peer[-8:]} dialed this node at {direct[0]}")
    if relayed:
        return Check("dial-back", WARN, f"relayed: peer {peer[-8:]} reached this node only through a relay "
                                        f"({relayed[0]}){why}; traffic takes a detour", f"{forward} for direct links")
    if not outcome:
        return Check("dial-back", FAIL, "unreachable: this node has no address peers could dial",
                     f"check --host and --announce; {forward}")
    relay = (f"no relay address appeared within {waited_s:.0f} s" if nat_traversal else
             "NAT traversal is off (--no-nat-traversal), so no relay can carry traffic")
    return Check("dial-back", FAIL, f"unreachable: peer {peer[-8:]} could not dial this node at "
                                    f"{', '.join(maddrs)}{why}; {relay}",
                 forward + ("" if nat_traversal else ", or drop --no-nat-traversal"))


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


# ---- probes --------------------------------------------------------------------------------------


def port_error(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (None: free). SO_REUSEADDR, as p2pd and the metrics server
    use, so that a port in TIME_WAIT counts as free and only a live listener counts as taken."""
    if port <= 0:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def free_disk(path: Path) -> tuple[Path, int]:
    """(the folder measured, its free bytes): ``path`` or its nearest existing parent."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path, shutil.disk_usage(path).free


def probe_gpu() -> GpuProbe:
    import torch

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append((torch.cuda.get_device_name(i), total, free))
    triton = triton_error = None
    if devices:
        try:
            import triton as triton_module

            triton = triton_module.__version__
        except Exception as e:  # ImportError, or a broken install failing on import
            triton_error = f"{type(e).__name__}: {e}"
    return GpuProbe(devices, torch.version.cuda, triton, triton_error)


@dataclass
class DoctorOptions:
    peer: str | None = None  # a peer of the run (its full multiaddr); None: local checks only
    seed_ids: tuple[str, ...] = ()
    host: str = "0.0.0.0"
    port: int = 0
    announce: tuple[str, ...] = ()
    nat_traversal: bool = True
    node_dir: Path = Path("~/.swarmd/join")
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9100  # -1: off
    device: str = "cpu"
    relay_wait_s: float = 240.0  # how long to wait for a relay address when no direct dial-back works


@dataclass
class _Remote:
    """What the peer told us."""

    spec: RunSpec | None = None
    signer: str | None = None
    spec_error: str | None = None
    checks: list[Check] = field(default_factory=list)


async def run_doctor(options: DoctorOptions, emit: Callable[[str], None] = print) -> int:
    """Run every check, printing one line each (through ``emit``); 0 when nothing FAILs, else 1."""
    checks: list[Check] = []

    def report(check: Check) -> None:
        checks.append(check)
        emit(check.line())

    port_busy = port_error(options.host, options.port)
    if options.peer is None:
        for check in _local_checks(options, port_busy, None):
            report(check)
        return exit_code(checks)
    emit(f"asking {options.peer} ...")
    # The doctor listens where the node would; on a busy port (the node itself may be running) it uses any
    # free one, and says so.
    port = 0 if port_busy else options.port
    try:
        p2p = await create_p2p(
            initial_peers=[options.peer], host_maddrs=[f"/ip4/{options.host}/tcp/{port}"],
            announce_maddrs=list(options.announce) or None,
            **nat_options(options.nat_traversal and not options.host.startswith("127."), [options.peer]),
        )
    except NetworkStartError as e:
        for check in _local_checks(options, port_busy, None):
            report(check)
        report(Check("peer", FAIL, str(e), "start the doctor with the join line's address of a running node"))
        return exit_code(checks)
    try:
        remote = await _ask_peer(p2p, options)
        for check in _local_checks(options, port_busy, remote.spec):
            report(check)
        report(check_spec(remote.spec, remote.signer, remote.spec_error))
        for check in remote.checks:
            report(check)
        dialback = await _dialback(p2p, options, port, emit)
        if port != options.port:  # the node's own port is taken (the node may be running): say what was tested
            dialback = replace(dialback, detail=f"{dialback.detail} (tested on a free port: {options.port} is busy)")
        report(dialback)
    finally:
        await p2p.shutdown()
    return exit_code(checks)


def _local_checks(options: DoctorOptions, port_busy: str | None, spec: RunSpec | None) -> list[Check]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    checks = [check_port("libp2p port", "--port", options.host, options.port, port_busy)]
    if options.metrics_port >= 0:
        checks.append(check_port("metrics port", "--metrics-port", options.metrics_host, options.metrics_port,
                                 port_error(options.metrics_host, options.metrics_port)))
    checks.append(check_open_files(soft, hard))
    path, free = free_disk(options.node_dir)
    checks.append(check_disk(path, free, *disk_needed(spec)))
    checks += check_gpu(probe_gpu(), options.device, spec)
    return checks


async def _ask_peer(p2p, options: DoctorOptions) -> _Remote:
    """The run's spec (verified as `swarmd join` does), the versions and the clock of the peer."""
    transport = Transport(p2p, NodeMetrics(), DEFAULT_LIMITS)
    peer = peer_id_of(options.peer)
    remote = _Remote()
    try:
        reply = await transport.call(peer, rpc.SPEC, "spec", encode_message("spec_request", {}),
                                     timeout=RPC_TIMEOUT_S, expected_kinds=("spec",))
        remote.spec, remote.signer = verify_spec_record(reply.fields["record"], {peer, *options.seed_ids})
    except SpecError as e:
        remote.spec_error = str(e)
    except Exception as e:  # whatever the peer did, it sent no spec we can use
        remote.spec_error = f"{type(e).__name__}: {e}"
    try:
        sent = time.time()
        reply = await transport.call(peer, rpc.INFO, "info", encode_message("info_request", {}),
                                     timeout=RPC_TIMEOUT_S, expected_kinds=("info",))
        received = time.time()
    except Exception as e:
        remote.checks.append(Check("versions", FAIL, f"the peer did not answer an info request ({type(e).__name__}: "
                                                     f"{e})", "check that the address is a swarmd node's"))
        return remote
    fields = reply.fields
    remote.checks += check_versions(software_versions(), decode_versions(fields.get("versions", [])),
                                    fields["protocol"])
    if "wall_time" in fields:
        remote.checks.append(check_clock(fields["wall_time"] - (sent + received) / 2, received - sent, peer))
    else:
        remote.checks.append(Check("clock", WARN, "the peer does not report its clock (an older swarmd)",
                                   "keep this machine's clock synced: " + NTP_FIX.split(": ", 1)[1]))
    return remote


async def _dialback(p2p, options: DoctorOptions, port: int, emit: Callable[[str], None]) -> Check:
    """Ask the peer to dial us back at our addresses; when none works and NAT traversal is on, wait for
    auto-relay to give us a /p2p-circuit address and ask again."""
    transport = Transport(p2p, NodeMetrics(), DEFAULT_LIMITS)
    peer = peer_id_of(options.peer)
    nat = options.nat_traversal and not options.host.startswith("127.")
    started = time.monotonic()
    maddrs = await _own_maddrs(p2p, options.peer)
    try:
        results = await _ask_dialback(transport, peer, maddrs)
    except Exception as e:
        return _dialback_error(e)
    check = classify_dialback(maddrs, results, peer, port, nat)
    if check.status != FAIL or not nat:
        return check
    emit(f"....  dial-back: no direct address answered; waiting up to {options.relay_wait_s:.0f} s for a relay "
         "address (auto-relay)")
    while time.monotonic() - started < options.relay_wait_s:
        await asyncio.sleep(2.0)
        relayed = [m for m in await _own_maddrs(p2p, options.peer, latest=True) if "/p2p-circuit" in m]
        if relayed:
            await asyncio.sleep(max(0.0, DIALBACK_RETRY_S - (time.monotonic() - started)))
            try:
                more = await _ask_dialback(transport, peer, relayed)
            except Exception as e:
                return _dialback_error(e)
            return classify_dialback(maddrs + relayed, results + more, peer, port, nat,
                                     time.monotonic() - started)
    return classify_dialback(maddrs, results, peer, port, nat, time.monotonic() - started)


async def _own_maddrs(p2p, peer_maddr: str, latest: bool = False) -> list[str]:
    """Our addresses to be dialed: loopback ones only when the peer is on this machine too; direct ones
    first (the asked node dials at most Limits.dialback_max_addrs)."""
    try:
        maddrs = [str(m) for m in await p2p.get_visible_maddrs(latest=latest)]
    except ValueError:  # no address yet
        return []
    if "/ip4/127." not in peer_maddr:
        maddrs = [m for m in maddrs if "/ip4/127." not in m and "/ip6/::1/" not in m]
    return sorted(maddrs, key=lambda m: "/p2p-circuit" in m)[:MAX_DIALBACK_MADDRS]


async def _ask_dialback(transport: Transport, peer: str, maddrs: list[str]) -> list[str]:
    reply = await transport.call(peer, rpc.DIALBACK, "dialback", encode_message("dialback_request", {"maddrs": maddrs}),
                                 timeout=DIALBACK_TIMEOUT_S, expected_kinds=("dialback",))
    results = list(reply.fields["results"])
    return results + ["failed: no answer"] * (len(maddrs) - len(results))


def _dialback_error(e: Exception) -> Check:
    if isinstance(e, RemoteError):
        return Check("dial-back", WARN, f"the peer would not dial back now ({e})", "run the doctor again in a minute")
    return Check("dial-back", WARN, f"the peer did not answer the dial-back request ({type(e).__name__}: {e}); it may "
                                    "run a swarmd without it", "ask the run's operator, or try another peer")
