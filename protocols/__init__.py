"""swarmd.protocols: the wire protocol (errors, limits, tensor codecs, message schemas, framing, RPC names)."""

from swarmd.protocols.errors import REJECT_REASONS, ProtocolError
from swarmd.protocols.limits import DEFAULT_LIMITS, Limits
from swarmd.protocols.codecs import EncodedTensor, decode_tensor, encode_tensor
from swarmd.protocols.messages import KINDS, FieldSpec, KindSpec, validate_fields
from swarmd.protocols.wire import (
    PROTOCOL_VERSION,
    Message,
    RemoteError,
    decode_message,
    decode_reply,
    encode_message,
    error_message,
    raise_for_error,
    read_frame,
    write_frame,
)
from swarmd.protocols.rpc import ALL_RPCS, BACKWARD, FORWARD, INFO, METRIC_LABELS, RPCS, SPEC, STATE_CHUNK, STATE_MANIFEST, metric_label

__all__ = [
    "ALL_RPCS",
    "BACKWARD",
    "DEFAULT_LIMITS",
    "FORWARD",
    "INFO",
    "KINDS",
    "METRIC_LABELS",
    "PROTOCOL_VERSION",
    "REJECT_REASONS",
    "RPCS",
    "SPEC",
    "STATE_MANIFEST", "STATE_CHUNK",
    "EncodedTensor",
    "FieldSpec",
    "KindSpec",
    "Limits",
    "Message",
    "ProtocolError",
    "RemoteError",
    "decode_message",
    "decode_reply",
    "decode_tensor",
    "encode_message",
    "encode_tensor",
    "error_message",
    "metric_label",
    "raise_for_error",
    "read_frame",
    "validate_fields",
    "write_frame",
]
