"""RPC handler names, in one place, with their metric labels and the message kinds they exchange."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

FORWARD = "swarmd.forward"
BACKWARD = "swarmd.backward"
EVAL_RESULT = "swarmd.eval_result"
INFO = "swarmd.info"
SPEC = "swarmd.spec"
STATE_MANIFEST = "swarmd.state_manifest"
STATE_CHUNK = "swarmd.state_chunk"
PAIR = "swarmd.pair"
OUTER_CHUNK = "swarmd.outer_chunk"
OUTER_COMMIT = "swarmd.outer_commit"
DIALBACK = "swarmd.dialback"

ALL_RPCS: tuple[str, ...] = (
    FORWARD, BACKWARD, EVAL_RESULT, INFO, SPEC, STATE_MANIFEST, STATE_CHUNK, PAIR, OUTER_CHUNK, OUTER_COMMIT, DIALBACK,
)


@dataclass(frozen=True)
class RpcSpec:
    """One RPC: its metric label, the kind of its request and the kind of its (non-error) reply."""

    label: str
    request_kind: str
    reply_kind: str


RPCS: Mapping[str, RpcSpec] = MappingProxyType(
    {
        FORWARD: RpcSpec("forward", "forward", "ack"),
        BACKWARD: RpcSpec("backward", "backward", "ack"),
        EVAL_RESULT: RpcSpec("eval_result", "eval_result", "ack"),
        INFO: RpcSpec("info", "info_request", "info"),
        SPEC: RpcSpec("spec", "spec_request", "spec"),
        STATE_MANIFEST: RpcSpec("state_manifest", "state_manifest_request", "state_manifest"),
        STATE_CHUNK: RpcSpec("state_chunk", "state_chunk_request", "state_chunk"),
        PAIR: RpcSpec("pair", "pair_request", "ack"),
        OUTER_CHUNK: RpcSpec("outer_chunk", "outer_chunk", "ack"),
        OUTER_COMMIT: RpcSpec("outer_commit", "outer_commit", "ack"),
        # `swarmd doctor`: dial the caller back at its announced addresses (open to non-members)
        DIALBACK: RpcSpec("dialback", "dialback_request", "dialback"),
    }
)

# Short, fixed label values for per-RPC metrics.
METRIC_LABELS: Mapping[str, str] = MappingProxyType({name: spec.label for name, spec in RPCS.items()})


def metric_label(rpc: str) -> str:
    """The metric label of handler name ``rpc``; KeyError for a name that is not one of ALL_RPCS."""
    return RPCS[rpc].label
