"""A shaped test network for benchmarks: one network namespace per peer on a private bridge.

Topology (all names carry a per-run tag, nothing is created in the root namespace):

    <tag>br   : namespace holding bridge ``br0`` and the bridge end ``v<i>`` of every veth pair
    <tag>p<i> : one namespace per peer, with ``eth0`` = 10.77.<i // 200>.<i % 200 + 2>/16 and ``lo``

Shaping, per direction of every link:

- rate: ``tc tbf`` on the egress of both veth ends (``eth0`` in the peer: its upload; ``v<i>`` in the
  bridge namespace: its download). The burst is large enough (64 KiB) for tbf to pass TCP's GSO
  super-packets whole instead of cutting them into MTU-sized packets, which keeps the packet rate
  (and the delay holder's work, below) low.
- delay: this kernel is built without ``sch_netem`` (``CONFIG_NET_SCH_NETEM`` is not set; there is no
  module directory either, and no ``sch_fq`` for a BPF earliest-departure-time scheme, and no
  ``nft queue``), so the one-way delay is injected with an ``iptables -t mangle -A PREROUTING -i eth0
  -j NFQUEUE`` rule in every peer namespace: each packet that arrives at a peer is handed to a
  userspace holder (``DelayHolder`` below, raw nfnetlink over a netlink socket, no compiled
  dependency) that gives the kernel its ACCEPT verdict ``delay_ms`` after arrival. Data are delayed
  at the receiver, ACKs at the sender, so a round trip costs ``2 * delay_ms``. The holder asks for
  metadata only (``NFQNL_COPY_META``: no payload is copied) with GSO packets unsegmented
  (``NFQA_CFG_F_GSO``), releases packets in arrival order with one batch verdict, and runs under
  ``SCHED_FIFO`` so busy benchmark processes on a small machine do not make it late.

``ShapedNetwork`` builds and tears down the whole thing (also on errors and Ctrl-C through
``atexit`` and signal handlers in the caller); ``measure_link`` checks what the network really does
(TCP connect time, small-message echo RTT, bulk throughput) before anyone trusts numbers measured on it.

    python bench/netns.py verify [--peers 2] [--rate-mbit 100] [--delay-ms 25]
    python bench/netns.py cleanup          # remove namespaces left by a killed run (swb* only)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

NS_PREFIX = "swb"
SUBNET_PREFIX_LEN = 16


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def peer_ip(i: int) -> str:
    return f"10.77.{i // 200}.{i % 200 + 2}"


def netem_available() -> bool:
    """True if this kernel accepts a netem qdisc (tried on the loopback of a throwaway namespace)."""
    ns = f"{NS_PREFIX}probe{os.getpid()}"
    if run(["ip", "netns", "add", ns], check=False).returncode != 0:
        return False
    try:
        return run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                   check=False).returncode == 0
    finally:
        run(["ip", "netns", "del", ns], check=False)


def iptables_binary() -> str:
    for name in ("iptables-legacy", "iptables"):
        if shutil.which(name):
            return name
    raise RuntimeError("iptables is needed for the NFQUEUE delay (Debian: apt-get install iptables)")


# ---------------------------------------------------------------------------------------------------
# The delay holder: NFQUEUE over raw nfnetlink


NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_ACCEPT = 1
CLONE_NEWNET = 0x40000000


def _nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _nfq_msg(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, family: int = socket.AF_UNSPEC) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, 0, 0) + body


def _check_acks(sock: socket.socket) -> None:
    data = sock.recv(65536)
    offset = 0
    while offset < len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, offset + 16)
            if err:
                raise OSError(-err, f"nfqueue config: {os.strerror(-err)}")
        offset += (length + 3) & ~3


def open_queue(queue: int, maxlen: int = 65536) -> socket.socket:
    """A netlink socket bound to NFQUEUE ``queue`` in the caller's network namespace (metadata copy, GSO)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root)
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    sock.bind((0, 0))
    config = [
        _nla(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)),
        _nla(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
        _nla(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen)),
        _nla(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO)) + _nla(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO)),
    ]
    for attrs in config:
        sock.send(_nfq_msg(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK))
        _check_acks(sock)
    sock.setblocking(False)
    return sock


def _packet_ids(data: bytes) -> list[int]:
    ids, offset = [], 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            a, end = offset + 20, offset + length
            while a + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, a + 4)[0])
                    break
                a += (alen + 3) & ~3
        offset += (length + 3) & ~3
    return ids


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


@dataclass
class _Queue:
    ns: str
    sock: socket.socket
    held: deque = field(default_factory=deque)  # (release time, packet id), in arrival order
    packets: int = 0
    max_held: int = 0


def delay_holder_main(namespaces: list[str], delay_ms: float, queue: int) -> None:
    """Hold every packet queued in each namespace for ``delay_ms``, then accept it. Runs until SIGTERM/stdin EOF."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    except OSError as e:
        print(f"delay holder: no SCHED_FIFO ({e}); delays may stretch under load", file=sys.stderr)
    own = "/proc/self/ns/net"
    home = os.open(own, os.O_RDONLY)
    queues = []
    libc = ctypes.CDLL(None, use_errno=True)
    for ns in namespaces:
        _setns(f"/var/run/netns/{ns}")
        queues.append(_Queue(ns, open_queue(queue)))
    if libc.setns(home, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns back home")
    os.close(home)
    delay = delay_ms / 1000.0
    by_fd = {q.sock.fileno(): q for q in queues}
    poller = select.epoll()
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    poller.register(sys.stdin.fileno(), select.EPOLLIN | select.EPOLLHUP)
    print("READY", flush=True)
    late_max = 0.0
    late_sum = 0.0
    released = 0
    late_hist = [0] * 201  # lateness in 0.5 ms buckets (last: >= 100 ms)
    while not stop:
        now = time.monotonic()
        nxt = min((q.held[0][0] for q in queues if q.held), default=now + 0.5)
        for fd, _ in poller.poll(max(0.0, nxt - now)):
            if fd == sys.stdin.fileno():
                stop.append(1)
                break
            q = by_fd[fd]
            while True:
                try:
                    data = q.sock.recv(1 << 20)
                except BlockingIOError:
                    break
                t = time.monotonic() + delay
                for pid in _packet_ids(data):
                    q.held.append((t, pid))
                q.packets += 1 if data else 0
            q.max_held = max(q.max_held, len(q.held))
        now = time.monotonic()
        for q in queues:
            last = None
            while q.held and q.held[0][0] <= now:
                t, last = q.held.popleft()
                lateness = now - t
                late_sum += lateness
                late_max = max(late_max, lateness)
                late_hist[min(int(lateness * 2000), 200)] += 1
                released += 1
            if last is not None:
                attrs = _nla(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))
                try:
                    q.sock.send(_nfq_msg(NFQNL_MSG_VERDICT_BATCH, queue, attrs))
                except OSError as e:
                    print(f"delay holder: verdict in {q.ns} failed: {e}", file=sys.stderr)
    for q in queues:  # let whatever is still held through, then unbind by closing
        if q.held:
            last = q.held[-1][1]
            q.sock.send(_nfq_msg(NFQNL_MSG_VERDICT_BATCH, queue, _nla(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))))
        q.sock.close()
    p99, seen = 0.0, 0
    for bucket, count in enumerate(late_hist):
        seen += count
        if seen >= 0.99 * released:
            p99 = (bucket + 1) / 2
            break
    stats = {"released": released, "late_mean_ms": 1000 * late_sum / max(released, 1), "late_max_ms": 1000 * late_max,
             "late_p99_ms": p99,
             "max_held": max((q.max_held for q in queues), default=0)}
    print("STATS " + json.dumps(stats), flush=True)


# ---------------------------------------------------------------------------------------------------
# The network


class ShapedNetwork:
    """``n`` peer namespaces on one bridge; ``rate_mbit`` per direction per peer, ``delay_ms`` one way.

    ``rate_mbit=None`` and ``delay_ms=0`` give an unshaped namespace network. Use as a context manager
    or call ``setup()`` / ``teardown()``; teardown is idempotent and never raises.
    """

    def __init__(self, n: int, rate_mbit: float | None = 100.0, delay_ms: float = 25.0, tag: str | None = None):
        self.n = n
        self.rate_mbit = rate_mbit
        self.delay_ms = delay_ms
        self.tag = tag or f"{NS_PREFIX}{os.getpid() % 100000}"
        self.bridge_ns = f"{self.tag}br"
        self.peer_ns = [f"{self.tag}p{i}" for i in range(n)]
        self.holder: subprocess.Popen | None = None
        self.holder_stats: dict | None = None
        self._created: list[str] = []

    def ip(self, i: int) -> str:
        return peer_ip(i)

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.peer_ns[i]]

    def __enter__(self):
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _add_ns(self, ns: str) -> None:
        run(["ip", "netns", "add", ns])
        self._created.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _tbf(self, ns: str, dev: str) -> None:
        # limit: one 100 ms queue at the shaped rate (bufferbloat as on a home uplink), burst 64 KiB
        rate = self.rate_mbit
        limit = max(int(rate * 1e6 / 8 * 0.1), 200_000)
        run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
             "rate", f"{rate}mbit", "burst", "65536", "limit", str(limit)])

    def setup(self) -> None:
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise

    def _setup(self) -> None:
        self._add_ns(self.bridge_ns)
        br = ["ip", "-n", self.bridge_ns]
        run([*br, "link", "add", "br0", "type", "bridge"])
        run([*br, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.peer_ns):
            self._add_ns(ns)
            run([*br, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns])
            run([*br, "link", "set", f"v{i}", "master", "br0", "up"])
            run(["ip", "-n", ns, "addr", "add", f"{peer_ip(i)}/{SUBNET_PREFIX_LEN}", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            if self.rate_mbit:
                self._tbf(ns, "eth0")
                self._tbf(self.bridge_ns, f"v{i}")
        if self.delay_ms > 0:
            ipt = iptables_binary()
            self.holder = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "_holder", "--delay-ms", str(self.delay_ms), *self.peer_ns],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            line = self.holder.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"delay holder failed to start: {line!r}")
            for ns in self.peer_ns:
                run(["ip", "netns", "exec", ns, ipt, "-t", "mangle", "-A", "PREROUTING", "-i", "eth0",
                     "-j", "NFQUEUE", "--queue-num", "0"])

    def teardown(self) -> None:
        if self.holder is not None:
            try:
                out, _ = self.holder.communicate(timeout=5)  # closes its stdin: the holder's cue to stop
                for line in out.splitlines():
                    if line.startswith("STATS "):
                        self.holder_stats = json.loads(line[6:])
            except Exception:  # noqa: BLE001  (teardown never raises)
                self.holder.kill()
                self.holder.wait()
            self.holder = None
        for ns in reversed(self._created):  # deleting a namespace removes its veths, bridge, qdiscs and rules
            kill_namespace_processes(ns)
            run(["ip", "netns", "del", ns], check=False)
        self._created.clear()


def kill_namespace_processes(ns: str) -> None:
    """SIGKILL what still runs in ``ns`` (only processes inside this benchmark's own namespace)."""
    pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def leftover_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(NS_PREFIX)]


# ---------------------------------------------------------------------------------------------------
# Measuring a link


_SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
print("LISTEN", flush=True)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    mode = c.recv(1)
    if mode == b"q":
        break
    if mode == b"e":  # echo single bytes until the peer hangs up
        while (b := c.recv(1)):
            c.sendall(b)
    elif mode == b"b":  # bulk: read until EOF, report the time of each received megabyte
        marks, total, t0 = [], 0, time.monotonic()
        while (b := c.recv(1 << 20)):
            total += len(b)
            while len(marks) < total >> 20:
                marks.append(time.monotonic() - t0)
        c.sendall((" ".join(f"{m:.6f}" for m in marks) + "\n").encode())
    c.close()
"""


def _bulk_rate(marks: list[float], skip_mb: int) -> float:
    """Steady-state Mbit/s from per-megabyte arrival times, skipping the first ``skip_mb`` (slow start)."""
    if len(marks) <= skip_mb + 1:
        return float("nan")
    return (len(marks) - 1 - skip_mb) * (1 << 20) * 8 / 1e6 / (marks[-1] - marks[skip_mb])


def measure_link(net: ShapedNetwork, src: int, dst: int, bulk_mb: int = 20, port: int = 5201) -> dict:
    """TCP connect time (median of 7), echo RTT (median of 20) and bulk throughput from peer ``src`` to peer ``dst``."""
    server = subprocess.Popen([*net.exec_prefix(dst), sys.executable, "-c", _SERVER, net.ip(dst), str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "LISTEN"
        client = subprocess.run(
            [*net.exec_prefix(src), sys.executable, "-c", _CLIENT, net.ip(dst), str(port), str(bulk_mb)],
            capture_output=True, text=True, timeout=120, check=True)
        result = json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        server.kill()
        server.wait()
    marks = result.pop("marks")
    result["bulk_mb"] = bulk_mb
    result["bulk_mbit_total"] = bulk_mb * (1 << 20) * 8 / 1e6 / result["bulk_s"]
    result["bulk_mbit_steady"] = _bulk_rate(marks, skip_mb=max(2, bulk_mb // 4))
    return result


_CLIENT = r"""
import json, socket, statistics, sys, time
host, port, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def conn():
    t = time.monotonic(); c = socket.create_connection((host, port)); dt = time.monotonic() - t
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); return c, dt
connects = []
for _ in range(5):
    c, dt = conn(); connects.append(dt); c.close()
c, dt = conn(); connects.append(dt); c.sendall(b"e")
rtts = []
for _ in range(20):
    t = time.monotonic(); c.sendall(b"x"); c.recv(1); rtts.append(time.monotonic() - t)
c.close()
c, dt = conn(); connects.append(dt); c.sendall(b"b")
blob = b"\0" * (1 << 20)
t = time.monotonic()
for _ in range(mb):
    c.sendall(blob)
c.shutdown(socket.SHUT_WR)
reply = b""
while not reply.endswith(b"\n"):
    reply += c.recv(1 << 16)
bulk_s = time.monotonic() - t
c.close()
c, dt = conn(); c.sendall(b"q"); c.close()
print(json.dumps({"connect_ms": 1000 * statistics.median(connects), "echo_rtt_ms": 1000 * statistics.median(rtts),
                  "bulk_s": bulk_s, "marks": [float(x) for x in reply.split()]}))
"""


def check_link(m: dict, rate_mbit: float, delay_ms: float, tolerance: float = 0.2) -> list[str]:
    """Why the measured link ``m`` is off from the intended shape by more than ``tolerance`` (empty: fine).

    Throughput is compared with the rate less TCP/IP header overhead (1448 payload bytes per 1514 on the wire).
    """
    problems = []
    rtt = 2 * delay_ms
    for key in ("connect_ms", "echo_rtt_ms"):
        if abs(m[key] - rtt) > tolerance * rtt:
            problems.append(f"{key} {m[key]:.1f} ms, expected {rtt:.0f} ms +- {100 * tolerance:.0f}%")
    goodput = rate_mbit * 1448 / 1514
    if not abs(m["bulk_mbit_steady"] - goodput) <= tolerance * goodput:
        problems.append(f"steady throughput {m['bulk_mbit_steady']:.1f} Mbit/s, expected ~{goodput:.1f} "
                        f"+- {100 * tolerance:.0f}%")
    return problems


def format_link(m: dict) -> str:
    return (f"connect {m['connect_ms']:.1f} ms, echo RTT {m['echo_rtt_ms']:.1f} ms, {m['bulk_mb']} MiB bulk in "
            f"{m['bulk_s']:.2f} s = {m['bulk_mbit_total']:.1f} Mbit/s overall, {m['bulk_mbit_steady']:.1f} Mbit/s "
            "after slow start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="build a shaped network, measure a link both ways, tear it down")
    v.add_argument("--peers", type=int, default=2)
    v.add_argument("--rate-mbit", type=float, default=100.0)
    v.add_argument("--delay-ms", type=float, default=25.0)
    v.add_argument("--bulk-mb", type=int, default=20)
    sub.add_parser("cleanup", help=f"delete leftover {NS_PREFIX}* namespaces and what runs in them")
    h = sub.add_parser("_holder")
    h.add_argument("--delay-ms", type=float, required=True)
    h.add_argument("--queue", type=int, default=0)
    h.add_argument("namespaces", nargs="+")
    args = parser.parse_args()
    if args.cmd == "_holder":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent tears the network down on Ctrl-C
        delay_holder_main(args.namespaces, args.delay_ms, args.queue)
    elif args.cmd == "cleanup":
        for ns in leftover_namespaces():
            kill_namespace_processes(ns)
            run(["ip", "netns", "del", ns], check=False)
            print("deleted", ns)
    else:
        print("netem available:", netem_available())
        with ShapedNetwork(args.peers, args.rate_mbit, args.delay_ms) as net:
            for src, dst in ((0, 1), (1, 0)):
                m = measure_link(net, src, dst, args.bulk_mb)
                print(f"peer {src} -> peer {dst}: {format_link(m)}")
                for p in check_link(m, args.rate_mbit, args.delay_ms):
                    print("  OFF:", p)
        print("delay holder:", net.holder_stats)
        print("leftover namespaces:", leftover_namespaces())


if __name__ == "__main__":
    main()
