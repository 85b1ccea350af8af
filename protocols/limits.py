"""Explicit limits on everything a peer may send. Handlers check these before touching state.

``Limits`` holds every node-wide bound with its default (README.md, "Limits", lists them); the bounds that
depend on the run (a microbatch's shape, an outer chunk's size, activation magnitude) come from its spec,
through ``RunShape`` and ``request_frame_caps``.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarmd.protocols import rpc

KiB = 1 << 10
MiB = 1 << 20
FLOAT_BYTES = 4  # the widest float a peer may send (float32); every codec's payload is at most this per element
TOKEN_BYTES = 8  # int64 target token ids


@dataclass(frozen=True)
class Limits:
    """Hard bounds on one node's inputs. The defaults suit models up to a few hundred M parameters."""

    # one message
    max_message_bytes: int = 256 * MiB  # one framed message (header + payloads), whatever its kind
    max_header_bytes: int = 64 * KiB  # the msgpack header of a message
    max_tensor_elements: int = 1 << 26  # elements of one tensor (64M)
    max_tensors_per_message: int = 64
    max_dims: int = 8
    max_small_request_bytes: int = 4 * KiB  # a request without tensors: pair, commit, info, spec, eval_result, state
    batch_margin: float = 0.25  # a forward may carry up to microbatch_size * (1 + batch_margin) samples
    max_record_bytes: int = 16 * KiB  # one DHT record value
    # work held on this node
    max_inflight_per_peer: int = 16  # microbatches one upstream peer may keep on this node
    max_held_microbatches: int = 64  # microbatches held for their backward, all senders together
    max_open_streams: int = 256  # inbound RPC streams served at once
    max_concurrent_decodes: int = 8  # frames of 1 MiB or more being read and decoded at once
    decode_wait_s: float = 5.0  # how long such a frame waits for a decode slot before it is refused as busy
    max_state_uploads: int = 2  # state download sessions a donor serves at once (one per joiner)
    # deadlines
    idle_stream_s: float = 5.0  # a request's length prefix must arrive this soon after its stream opens
    min_frame_s: float = 10.0  # every frame body gets at least this long ...
    min_bytes_per_s: float = 128 * KiB  # ... and longer ones as long as this rate needs
    # request rates (a token bucket per peer)
    peer_requests_per_s: float = 500.0  # well above a fast pipeline's or a large outer exchange's peak
    peer_request_burst: int = 1000
    max_rate_limited_peers: int = 4096  # peers whose bucket is remembered (the least recently seen go first)
    # dial-back (`swarmd doctor`), open to non-members: each one starts a throwaway p2pd per address
    dialback_max_addrs: int = 4  # addresses dialed per request (the rest are answered "skipped")
    dialback_dial_s: float = 5.0  # one address: start the dialer, dial, handshake
    dialback_peer_interval_s: float = 30.0  # one dial-back per caller this often ...
    dialback_per_minute: int = 6  # ... and this many per minute, all callers together (one at a time)

    def frame_deadline_s(self, nbytes: int) -> float:
        """How long a frame body of ``nbytes`` may take to arrive (or a reply of that size to be taken)."""
        return max(self.min_frame_s, nbytes / self.min_bytes_per_s)

    def max_batch(self, microbatch_size: int) -> int:
        """The largest batch a forward of a run with ``microbatch_size`` may carry."""
        return max(microbatch_size, int(microbatch_size * (1 + self.batch_margin)))


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class RunShape:
    """What a run's spec says about the size of its tensors on the wire."""

    microbatch_size: int
    seq_len: int
    dim: int  # hidden size: activations and their gradients are [batch, seq, dim]
    chunk_elements: int  # elements of each of the two tensors of an outer-step chunk


def request_frame_caps(limits: Limits, shape: RunShape | None = None) -> dict[str, int]:
    """The most bytes the request frame of each RPC (``rpc.ALL_RPCS``) may announce: more is "oversize",
    refused before the body is read. Requests without tensors get ``max_small_request_bytes``; forward,
    backward and outer-chunk frames fit ``shape``'s largest legitimate tensors (float32, the widest codec
    output) plus a header, or ``max_message_bytes`` while the run is not known."""
    caps = {name: limits.max_small_request_bytes for name in rpc.ALL_RPCS}
    if shape is None:
        caps.update({name: limits.max_message_bytes for name in (rpc.FORWARD, rpc.BACKWARD, rpc.OUTER_CHUNK)})
        return caps
    envelope = 4 + limits.max_header_bytes  # header length + header
    tokens = limits.max_batch(shape.microbatch_size) * shape.seq_len
    hidden = tokens * shape.dim * FLOAT_BYTES
    caps[rpc.FORWARD] = envelope + hidden + tokens * TOKEN_BYTES  # activations, targets
    caps[rpc.BACKWARD] = envelope + hidden  # the gradient of the activations we sent
    caps[rpc.OUTER_CHUNK] = envelope + 2 * shape.chunk_elements * FLOAT_BYTES  # phi, theta - phi
    return {name: min(cap, limits.max_message_bytes) for name, cap in caps.items()}
