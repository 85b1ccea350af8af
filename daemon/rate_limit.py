"""Per-peer request rate limits: a token bucket per peer, in a table that stays bounded.

Pure: time is passed in (``now``, seconds on any monotonic clock), so tests drive it with plain numbers.
"""

from __future__ import annotations

from collections import OrderedDict


class PeerRateLimiter:
    """Each peer may make ``burst`` requests at once and ``rate`` per second after that.

    The table keeps at most ``max_peers`` buckets, least recently seen first. A bucket untouched for
    ``burst / rate`` seconds is full again, the same as a new one, so it is dropped; when the table is still
    full (a crowd of fresh ids), the least recently seen peer is forgotten and starts again with a full bucket.
    """

    def __init__(self, rate: float, burst: float, max_peers: int):
        if not (rate > 0 and burst >= 1 and max_peers >= 1):
            raise ValueError(f"need rate > 0, burst >= 1, max_peers >= 1; got {rate}, {burst}, {max_peers}")
        self.rate, self.burst, self.max_peers = rate, float(burst), max_peers
        self._refill_s = self.burst / rate
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (tokens, last seen)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, peer_id: str, now: float) -> bool:
        """Take one request's token from ``peer_id``'s bucket; False when it is empty (refuse the request)."""
        self._prune(now)
        tokens, last = self._buckets.pop(peer_id, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[peer_id] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)
        return allowed

    def _prune(self, now: float) -> None:
        while self._buckets:
            _, (_, last) = next(iter(self._buckets.items()))
            if now - last < self._refill_s:
                break
            self._buckets.popitem(last=False)
