"""Start a hivemind P2P (the node's p2pd) with its unix sockets in this process's temp folder, check the
multiaddrs it is given, and turn p2pd's start-up failures into errors that say what to check.

hivemind names p2pd's control sockets ``/tmp/hivemind-*`` whatever TMPDIR says, and a p2pd killed with its
node (SIGKILL, OOM, a pulled plug) leaves them there for good. Placing them under ``tempfile.gettempdir()``
keeps the default (``/tmp``) for users and lets a test or a demo that gives its nodes a private TMPDIR remove
everything its nodes leave. Each P2P's sockets also carry a token of their own, so a P2P that failed to start
(p2pd exits when no bootstrap peer answers, and hivemind then keeps its socket) removes exactly its own files.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.multiaddr.exceptions import StringParseError

_TOKEN_BYTES = 4  # token_hex: 8 characters
# the longest socket name: "hivemind-" + token + "-" + "p2pclient-" + 11-char token + ".sock"; a unix socket
# path must fit in 108 bytes
_SOCKET_NAME_BYTES = 40 + 2 * _TOKEN_BYTES + 1
_SUN_PATH_BYTES = 107
PROBE_TIMEOUT_S = 3.0  # telling "nothing listens there" from "another peer listens there" after a failed start
_GO_LOG_TIME = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ")
MADDR_FORM = "/ip4/<address>/tcp/<port>/p2p/<peer id>"


class AddressError(ValueError):
    """A multiaddr swarmd cannot use; the message says what is wrong and what to do."""


class NetworkStartError(ConnectionError):
    """p2pd could not start or reach any bootstrap peer; the message says what is wrong and what to check."""


def peer_id_of(maddr: str) -> str:
    """The peer id at the end of a peer's multiaddr (``/ip4/<address>/tcp/<port>/p2p/<peer id>``).

    The id is required: a joiner trusts the spec that this peer signed, and p2pd refuses bootstrap
    addresses without one. Raises AddressError when ``maddr`` does not parse or names no peer."""
    parts = list(_parse(maddr).items())
    if not parts or parts[-1][0].name != "p2p":
        raise AddressError(f"{maddr} has no /p2p/<peer id> part, so swarmd cannot tell which peer to trust: "
                           f"give the full address the seed printed, {MADDR_FORM}")
    if len(parts) == 1:
        raise AddressError(f"{maddr} says which peer but not where it listens: give its full address, {MADDR_FORM}")
    return parts[-1][1]


def check_peer_id(peer_id: str) -> str:
    """``peer_id`` if it is a well-formed libp2p peer id (e.g. ``12D3KooW...`` or ``Qm...``); else AddressError."""
    try:
        Multiaddr(f"/p2p/{peer_id}")
    except (StringParseError, ValueError):
        raise AddressError(f"{peer_id!r} is not a peer id: copy it from the seed's output (12D3KooW... or Qm...)") from None
    return peer_id


def check_announce_maddr(maddr: str) -> str:
    """``maddr`` if p2pd can announce it (it parses and names an explicit TCP port); else AddressError."""
    parsed = _parse(maddr, form="/ip4/<public address>/tcp/<port>")
    if "tcp" not in parsed or parsed.value_for_protocol("tcp") == "0":
        raise AddressError(f"{maddr} has no explicit TCP port: announce the address and port peers reach this "
                           "node at, e.g. /ip4/203.0.113.7/tcp/31337")
    return maddr


def _parse(maddr: str, form: str = MADDR_FORM) -> Multiaddr:
    try:
        return Multiaddr(maddr)
    except StringParseError as e:
        reason = f"{e.protocol}: {e.message}" if e.protocol else e.message
        raise AddressError(f"{maddr!r} is not a valid multiaddr ({reason}): write it as {form}") from None
    except ValueError as e:
        raise AddressError(f"{maddr!r} is not a valid multiaddr ({e}): write it as {form}") from None


def nat_options(enabled: bool, initial_peers: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """``P2P.create`` arguments for NAT traversal: all on, or all off (tests, the demo, loopback hosts).

    On: UPnP/NAT-PMP port mapping; AutoNAT, which serves other peers' reachability probes and lets p2pd learn
    whether peers can dial it; circuit relays, so this node can relay for others and dial relayed peers; and
    auto-relay, which makes a node that AutoNAT finds unreachable reserve a slot on a relay and announce a
    ``/p2p-circuit`` address. Auto-relay tries the bootstrap peers first (a seed is usually publicly
    reachable and serves as a relay), then peers near it in p2pd's DHT."""
    if not enabled:
        return {"nat_port_map": False, "auto_nat": False, "use_relay": False, "use_auto_relay": False}
    return {"nat_port_map": True, "auto_nat": True, "use_relay": True, "use_auto_relay": True,
            "trusted_relays": list(initial_peers) or None}


def reachability(maddrs: list[str], nat_traversal: bool) -> tuple[str, str]:
    """How peers can reach a node that announces ``maddrs``: (kind, one line to print).

    kind is "relayed" (a ``/p2p-circuit`` address: only through a relay), "local" (loopback only), "public"
    (a public address is announced; whether a firewall lets peers in is unknown until a peer dials it:
    `swarmd doctor` does), or "private" (private addresses only: reachable from the same network, and from
    elsewhere only once a relay address appears)."""
    relays = [m for m in maddrs if "/p2p-circuit" in m]
    if relays:
        via = relays[0].split("/p2p-circuit")[0].rsplit("/p2p/", 1)[-1]
        return "relayed", (f"reachable only through a relay (via {via}): peers cannot dial this node directly; "
                           "forward its TCP port and --announce it for direct links")
    ips = [_ip_of(m) for m in maddrs]
    ips = [ip for ip in ips if ip is not None]
    if ips and all(ip.is_loopback for ip in ips):
        return "local", "reachable from this machine only (loopback addresses)"
    public = [m for m, ip in zip(maddrs, ips) if ip.is_global]
    if public:
        return "public", (f"reachability unknown: announces the public address {public[0]}, not verified; "
                          "`swarmd doctor <peer multiaddr>` asks a peer to dial it")
    if nat_traversal:
        return "private", ("reachability unknown: only private addresses (behind NAT?); if peers cannot dial in, "
                           "a relay address appears within a few minutes")
    return "private", ("reachable from this network only (private addresses, NAT traversal off): forward a port "
                       "and --announce it, or drop --no-nat-traversal")


def _ip_of(maddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        parsed = Multiaddr(maddr)
        for proto in ("ip4", "ip6"):
            if proto in parsed:
                return ipaddress.ip_address(parsed.value_for_protocol(proto))
    except (StringParseError, ValueError):
        pass
    return None


def p2p_class(folder: str | None = None) -> type[P2P]:
    """A P2P subclass whose sockets live in ``folder`` (default: the temp folder; ``/tmp`` when that path
    would be too long for a unix socket) and carry a fresh token, so it can remove every socket it made."""
    folder = (folder or tempfile.gettempdir()).rstrip("/")
    if len(folder.encode()) + 1 + _SOCKET_NAME_BYTES > _SUN_PATH_BYTES:
        folder = "/tmp"
    prefix = f"{folder}/hivemind-{secrets.token_hex(_TOKEN_BYTES)}-"
    return type("FolderSocketP2P", (_OwnSocketsP2P,), {"_UNIX_SOCKET_PREFIX": f"/unix{prefix}", "created": None})


class _OwnSocketsP2P(P2P):
    """A P2P that removes all of its unix sockets when it shuts down, whichever way p2pd ended.

    ``create()`` builds the object itself and drops it when start-up fails; ``created`` keeps a handle so
    that ``create_p2p`` can stop that p2pd. Each subclass (one per ``p2p_class`` call) creates one P2P."""

    created: P2P | None

    def __init__(self) -> None:
        super().__init__()
        type(self).created = self

    async def shutdown(self) -> None:
        await super().shutdown()
        prefix = Path(self._UNIX_SOCKET_PREFIX.removeprefix("/unix"))
        for path in prefix.parent.glob(f"{prefix.name}*.sock"):
            path.unlink(missing_ok=True)


def bound_unix_sockets() -> set[str]:
    """Paths of the unix sockets some process has bound now (Linux's /proc/net/unix; empty elsewhere)."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {fields[7] for line in lines if len(fields := line.split()) >= 8}


def remove_dead_hivemind_sockets(since: float) -> int:
    """Remove ``/tmp/hivemind-*.sock`` files made at or after ``since`` (a time.time()) that no process has
    bound any more, and return how many. hivemind's own process-based DHT and averager (DiLoCo) name theirs
    there and leave some behind when they stop; a socket file nobody listens on is dead whoever made it."""
    bound = bound_unix_sockets()
    if not bound and not Path("/proc/net/unix").exists():
        return 0  # cannot tell live from dead here: leave everything
    removed = 0
    for path in Path("/tmp").glob("hivemind-*.sock"):
        try:
            if path.stat().st_mtime >= since and str(path) not in bound:
                path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


async def create_p2p(**kwargs: Any) -> P2P:
    """``P2P.create(**kwargs)`` with the sockets in the temp folder. On any failure p2pd is stopped and its
    sockets removed; a failure to start raises NetworkStartError saying what to check."""
    cls = p2p_class()
    try:
        return await cls.create(**kwargs)
    except BaseException as e:
        if cls.created is not None:
            await cls.created.shutdown()
        if isinstance(e, P2PDaemonError):
            raise NetworkStartError(await _start_failure(str(e), list(kwargs.get("initial_peers") or ()))) from None
        raise


async def _start_failure(error: str, initial_peers: list[str]) -> str:
    """What went wrong when p2pd did not start, and what to do about it (one line)."""
    reason = _GO_LOG_TIME.sub("", error.removeprefix("Daemon failed to start: ")).strip()
    if initial_peers and ("bootstrap" in reason or "failed to start in" in reason):
        listening = [m for m in initial_peers if await _tcp_listening(m)]
        if listening:
            where, _, peer = listening[0].rpartition("/p2p/")
            return (f"something answers at {where} but not as peer {peer}: check the /p2p/ part "
                    "(copy the whole join line the seed printed)")
        return (f"could not reach {', '.join(initial_peers)}: check the address and port, that the node is "
                "running, and that no firewall blocks it")
    if "multiaddr" in reason:
        return f"p2pd refused an address ({reason}): check --host, --port and --announce"
    return f"could not start p2pd ({reason}): check --host, --port and --announce"


async def _tcp_listening(maddr: str) -> bool:
    """Whether something accepts TCP connections where ``maddr`` points (a node under another peer id may)."""
    parsed = Multiaddr(maddr)
    host = next((parsed.value_for_protocol(p) for p in ("ip4", "ip6", "dns", "dns4", "dns6") if p in parsed), None)
    if host is None or "tcp" not in parsed:
        return False
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(parsed.value_for_protocol("tcp"))), PROBE_TIMEOUT_S
        )
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True
