"""Explicit limits on everything a peer may send. Handlers check these before touching state."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Hard bounds on one node's inputs. The defaults suit models up to a few hundred M parameters."""

    max_message_bytes: int = 256 * MiB  # one framed message (header + payloads)
    max_header_bytes: int = 64 * 1024  # the msgpack header of a message
    max_tensor_elements: int = 1 << 26  # elements of one tensor (64M)
    max_tensors_per_message: int = 64
    max_dims: int = 8
    max_inflight_per_peer: int = 16  # microbatches one upstream peer may keep on this node
    max_record_bytes: int = 16 * 1024  # one DHT record value


DEFAULT_LIMITS = Limits()
