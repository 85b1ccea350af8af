"""Dial-back: a node dials a caller at the caller's own announced addresses and says which ones answered.

`swarmd doctor` asks a peer of the run for this, to learn whether peers can reach the machine it runs on
directly, only through a relay, or not at all. The caller's existing connection proves nothing (it dialed
out), so each address is dialed from a fresh, throwaway p2pd that knows nothing but that one address.

The asked node is open to anyone here (a would-be volunteer is no member yet), so it is strict:
  - it dials only the caller's own peer id (libp2p's handshake fails against anyone else), at addresses of
    the plain forms ``/ip4|ip6|dns/<host>/tcp/<port>`` and ``<relay address>/p2p/<relay>/p2p-circuit``;
  - at most ``Limits.dialback_max_addrs`` addresses per request, each within ``dialback_dial_s``;
  - one dial-back at a time on the node, at most one per caller per ``dialback_peer_interval_s`` and
    ``dialback_per_minute`` in all; past those the request is refused as "busy".
"""

from __future__ import annotations

import asyncio
import logging
import time

from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.multiaddr.exceptions import StringParseError
from swarmd.daemon.p2p_host import create_p2p
from swarmd.daemon.rate_limit import PeerRateLimiter
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import DEFAULT_LIMITS, Limits
from swarmd.protocols.messages import MAX_ERROR_CHARS
from swarmd.protocols.wire import Message, encode_message

logger = logging.getLogger(__name__)

_HOSTS = ("ip4", "ip6", "dns", "dns4", "dns6")


def dial_target(maddr: str, caller: str) -> str:
    """The address to dial ``caller`` at, from an address it announced: ``maddr`` without its trailing
    ``/p2p/<caller>``. Raises ValueError, saying why, for any other peer id or any other form of address."""
    try:
        parts = list(Multiaddr(maddr).items())
    except (StringParseError, ValueError) as e:
        raise ValueError(f"not a multiaddr ({e})") from None
    if parts and parts[-1][0].name == "p2p":
        if parts[-1][1] != caller:
            raise ValueError("names another peer: only the caller's own addresses are dialed")
        parts = parts[:-1]
    names = [p.name for p, _ in parts]
    direct = len(names) == 2 and names[0] in _HOSTS and names[1] == "tcp"
    relayed = len(names) == 4 and names[0] in _HOSTS and names[1:] == ["tcp", "p2p", "p2p-circuit"]
    if not (direct or relayed) or parts[1][1] == "0":
        raise ValueError("not of the form /ip4/<address>/tcp/<port>, or a relay's address + /p2p-circuit")
    return "".join(f"/{p.name}" + (f"/{v}" if v is not None else "") for p, v in parts)


def dial_error(text: str) -> str:
    """The reason in p2pd's dial error, e.g. "dial tcp4 127.0.0.1:1: connect: connection refused" out of
    "Connect failed. msg=failed to dial: failed to dial <id>: all dials failed * [<address>] dial tcp4 ..."."""
    text = " ".join(text.split())
    return text.split("] ", 1)[1] if " * [" in text and "] " in text else text


class DialBack:
    """The asked node's side: the handler of rpc.DIALBACK."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._per_peer = PeerRateLimiter(1.0 / limits.dialback_peer_interval_s, 1, limits.max_rate_limited_peers)
        self._global = PeerRateLimiter(limits.dialback_per_minute / 60.0, limits.dialback_per_minute, 1)
        self._busy = False

    async def handle(self, caller: str, message: Message) -> bytes:
        if self._busy:
            raise ProtocolError("busy", "this node is dialing another peer back; retry in a minute")
        now, limits = time.monotonic(), self.limits
        if not self._per_peer.allow(caller, now):
            raise ProtocolError("busy", f"one dial-back per {limits.dialback_peer_interval_s:g} s per peer; retry later")
        if not self._global.allow("all", now):
            raise ProtocolError("busy", f"this node dials back {limits.dialback_per_minute} peers a minute at most; "
                                        "retry later")
        self._busy = True
        try:
            results = []
            for i, maddr in enumerate(message.fields["maddrs"]):
                if i >= limits.dialback_max_addrs:
                    results.append(f"skipped: at most {limits.dialback_max_addrs} addresses are dialed")
                    continue
                try:
                    target = dial_target(maddr, caller)
                except ValueError as e:
                    results.append(f"refused: {e}")
                    continue
                results.append(await self._dial(caller, target))
            return encode_message("dialback", {"results": results})
        finally:
            self._busy = False

    async def _dial(self, caller: str, target: str) -> str:
        """Dial ``caller`` at ``target`` alone from a fresh p2pd (no bootstrap, no NAT traversal, listening
        nowhere): "ok", or why not."""
        start = time.monotonic()
        dialer = None

        async def dial() -> None:
            nonlocal dialer
            dialer = await create_p2p(
                host_maddrs=[], no_listen=True, dht_mode="client", nat_port_map=False, auto_nat=False,
                use_relay="/p2p-circuit" in target, use_auto_relay=False, startup_timeout=self.limits.dialback_dial_s,
            )
            await dialer._client.connect(PeerID.from_base58(caller), [Multiaddr(target)])

        try:
            await asyncio.wait_for(dial(), self.limits.dialback_dial_s)
            return "ok"
        except asyncio.TimeoutError:
            return f"failed: no answer within {self.limits.dialback_dial_s:g} s"
        except Exception as e:  # p2pd's own words: connection refused, handshake failed, no route, ...
            return f"failed: {dial_error(str(e))}"[:MAX_ERROR_CHARS]
        finally:
            if dialer is not None:
                await dialer.shutdown()
            logger.info("dial-back of %s at %s took %.1f s", caller[-8:], target, time.monotonic() - start)
