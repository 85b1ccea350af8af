"""Protocol errors: every rejection carries one reason from a small fixed set (a metric label)."""

from __future__ import annotations

# Fixed label values for swarmd_rejected_messages_total{reason}. Keep this set small and stable.
REJECT_REASONS: tuple[str, ...] = (
    "malformed",  # not decodable: bad msgpack, missing or mistyped fields
    "version",  # unknown protocol version
    "oversize",  # message, header or tensor over an explicit limit
    "dtype",  # dtype not allowed or not the expected one
    "shape",  # shape inconsistent with the payload or not the expected one
    "nonfinite",  # NaN or Inf in a tensor
    "norm",  # finite but absurd: a tensor's norm far outside what the receiver accepts
    "codec",  # unknown codec or inconsistent codec parameters
    "unknown_microbatch",  # backward for a microbatch id this node does not hold
    "unknown_peer",  # a peer this node has no business with
    "busy",  # the per-peer in-flight limit is reached
    "wrong_stage",  # sent to a node that does not serve the requested stage
    "unauthorized",  # missing or invalid credentials
    "stalled",  # a peer that accepted a transfer and then made no progress
    "digest",  # a state chunk whose bytes do not match the digest its sender announced
)


class ProtocolError(Exception):
    """A message was rejected. ``reason`` is one of REJECT_REASONS; the text says what and why."""

    def __init__(self, reason: str, message: str):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"
