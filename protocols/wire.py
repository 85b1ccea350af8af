"""Message framing: one message <-> bytes, and length-prefixed frames on asyncio streams.

A message on the wire is::

    uint32 big-endian header length | msgpack header | payload 0 | payload 1 | ...

with the header ``{"v": 1, "kind": str, "fields": map, "tensors": [meta, ...], "sizes": [int, ...]}``.
``decode_message`` checks every limit before it allocates anything sized by the peer, and every
failure is a ProtocolError carrying one of REJECT_REASONS.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from swarmd.kernels import QuantizedBlocks
from swarmd.protocols.codecs import EncodedTensor, decode_tensor
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import DEFAULT_LIMITS, Limits
from swarmd.protocols.messages import (
    KINDS,
    MAX_ERROR_CHARS,
    MAX_STATE_TENSORS,
    header_cap,
    kind_spec,
    validate_fields,
)

PROTOCOL_VERSION = 1

_HEADER_LEN = struct.Struct(">I")  # in-message header length
_FRAME_LEN = struct.Struct(">Q")  # stream frame length prefix
_HEADER_KEYS = frozenset({"v", "kind", "fields", "tensors", "sizes"})
# Explicit msgpack container bounds: no schema needs more, so a hostile header cannot ask for more.
_MAX_MAP_ITEMS = 64


class RemoteError(Exception):
    """The peer answered with an "error" message: it rejected our request (not: it sent garbage)."""

    def __init__(self, reason: str, message: str):
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"peer rejected the request ({self.reason}): {self.message}"


@dataclass
class Message:
    """A decoded, validated message: its kind, its fields (normalised) and its tensors."""

    kind: str
    fields: dict[str, Any]
    tensors: list[torch.Tensor | QuantizedBlocks] = field(default_factory=list)  # blocks: see decode_message


def encode_message(kind: str, fields: dict[str, Any], tensors: Sequence[EncodedTensor] = ()) -> bytes:
    """Serialise a message. Raises ValueError if it breaks its own schema (a bug on this side)."""
    try:
        clean = validate_fields(kind, fields, len(tensors))
    except ProtocolError as e:
        # Not a ProtocolError: a handler catching those must not answer "you sent garbage" for our bug.
        raise ValueError(f"refusing to encode an invalid {kind!r} message: {e}") from None
    header = {
        "v": PROTOCOL_VERSION,
        "kind": kind,
        "fields": clean,
        "tensors": [t.meta for t in tensors],
        "sizes": [len(t.payload) for t in tensors],
    }
    packed = msgpack.packb(header, use_bin_type=True)
    return b"".join([_HEADER_LEN.pack(len(packed)), packed, *(bytes(t.payload) for t in tensors)])


def error_message(err: ProtocolError) -> bytes:
    """The "error" reply that tells a peer why its message was rejected."""
    text = str(err.args[0]) if err.args else ""
    return encode_message("error", {"reason": err.reason, "message": text[:MAX_ERROR_CHARS]})


def raise_for_error(message: Message) -> Message:
    """Raise RemoteError if ``message`` is an "error" reply; otherwise return it unchanged."""
    if message.kind == "error":
        raise RemoteError(message.fields["reason"], message.fields["message"])
    return message


def _unpack_header(raw: memoryview, cap: int, limits: Limits) -> Any:
    """msgpack-decode a header with every container bounded; any failure is "malformed"."""
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=cap,
            max_bin_len=cap,
            max_array_len=max(MAX_STATE_TENSORS, limits.max_tensors_per_message, limits.max_dims),
            max_map_len=_MAX_MAP_ITEMS,
            max_ext_len=0,  # no ext types (timestamps included) in this protocol
        )
    except Exception as e:  # msgpack raises ValueError, TypeError, ExtraData, StackError, ...
        raise ProtocolError("malformed", f"header is not valid msgpack: {type(e).__name__}") from None


def _check_sizes(sizes: Any, n_tensors: int, body_len: int) -> list[int]:
    """The payload sizes: one non-negative int per tensor, summing to exactly the bytes that follow."""
    if not isinstance(sizes, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise ProtocolError("malformed", "header sizes must be a list of ints")
    if len(sizes) != n_tensors:
        raise ProtocolError("malformed", f"{len(sizes)} payload sizes for {n_tensors} tensors")
    if any(s < 0 for s in sizes) or sum(sizes) != body_len:
        raise ProtocolError("malformed", f"payload sizes do not add up to the {body_len} bytes after the header")
    return sizes


def _decode_one(meta: Any, payload: memoryview, limits: Limits, index: int, device: torch.device | str,
                keep_blocks: bool) -> torch.Tensor | QuantizedBlocks:
    try:
        return decode_tensor(meta, payload, limits, device=device, keep_blocks=keep_blocks)
    except ProtocolError:
        raise
    except Exception as e:
        # The codec layer should answer every bad meta with a ProtocolError; if a hostile meta slips past
        # it (e.g. an unhashable dtype), still answer "malformed" rather than crash the handler.
        raise ProtocolError("malformed", f"tensor {index} cannot be decoded: {type(e).__name__}") from None


def decode_message(
    data: bytes | bytearray | memoryview,
    limits: Limits = DEFAULT_LIMITS,
    expected_kinds: Collection[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    keep_blocks: bool = False,
) -> Message:
    """Parse and validate one message. Raises ProtocolError with the reason of the first failure.

    Its tensors are decoded on ``device``: the payload bytes are copied there and
    decompressed there. With ``keep_blocks``, float32 tensors of a blockwise codec stay ``QuantizedBlocks``
    (see ``decode_tensor``).

    Checks, in order: total size, header size, msgpack validity, version, kind (and membership in
    ``expected_kinds`` when given), the kind's header cap, fields and tensor count against the
    schema, payload sizes against the data length, then each tensor through the codec layer.
    """
    candidates = tuple(KINDS) if expected_kinds is None else tuple(expected_kinds)
    for k in candidates:
        if k not in KINDS:
            raise ValueError(f"expected_kinds names unknown kind {k!r}")  # caller bug, not peer input
    view = memoryview(data).cast("B")
    if len(view) > limits.max_message_bytes:
        raise ProtocolError("oversize", f"message of {len(view)} bytes exceeds {limits.max_message_bytes}")
    if len(view) < _HEADER_LEN.size:
        raise ProtocolError("malformed", f"message of {len(view)} bytes has no header length")
    (header_len,) = _HEADER_LEN.unpack_from(view)
    # Bound by the largest cap any acceptable kind has; the kind's own cap is checked once it is known.
    cap = max(header_cap(k, limits) for k in candidates) if candidates else limits.max_header_bytes
    if header_len > cap:
        raise ProtocolError("oversize", f"header of {header_len} bytes exceeds {cap}")
    body_start = _HEADER_LEN.size + header_len
    if body_start > len(view):
        raise ProtocolError("malformed", f"header of {header_len} bytes runs past the {len(view)}-byte message")
    header = _unpack_header(view[_HEADER_LEN.size : body_start], cap, limits)

    if not isinstance(header, dict):
        raise ProtocolError("malformed", "header is not a map")
    version = header.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("malformed", "header has no integer version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {version} is not {PROTOCOL_VERSION}")
    if set(header) != _HEADER_KEYS:
        raise ProtocolError("malformed", "header keys are not exactly v, kind, fields, tensors, sizes")
    kind = header["kind"]
    kind_spec(kind)  # "malformed" if unknown
    if kind not in candidates:
        raise ProtocolError("malformed", f"unexpected message kind {kind!r}")
    if header_len > header_cap(kind, limits):
        raise ProtocolError("oversize", f"{kind} header of {header_len} bytes exceeds {header_cap(kind, limits)}")
    metas = header["tensors"]
    if not isinstance(metas, list):
        raise ProtocolError("malformed", "header tensors must be a list")
    fields = validate_fields(kind, header["fields"], len(metas), limits)
    sizes = _check_sizes(header["sizes"], len(metas), len(view) - body_start)

    tensors = []
    offset = body_start
    for i, (meta, size) in enumerate(zip(metas, sizes)):
        tensors.append(_decode_one(meta, view[offset : offset + size], limits, i, device, keep_blocks))
        offset += size
    return Message(kind, fields, tensors)


def decode_reply(
    data: bytes | bytearray | memoryview,
    limits: Limits = DEFAULT_LIMITS,
    expected_kinds: Collection[str] | None = None,
) -> Message:
    """Decode a reply, also accepting "error": raises RemoteError for it, ProtocolError for garbage."""
    kinds = None if expected_kinds is None else {*expected_kinds, "error"}
    return raise_for_error(decode_message(data, limits, kinds))


async def write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write one frame (8-byte big-endian length, then ``data``) and wait for the buffer to drain."""
    writer.write(_FRAME_LEN.pack(len(data)))
    writer.write(data)
    await writer.drain()


class StreamEnded(ProtocolError):
    """The stream closed before a whole frame arrived: the peer went away (it died, or dropped us). Not a
    hostile message: a server counts it as dropped, not rejected, and a caller as a peer gone. It is a
    "malformed" ProtocolError only for readers that do not tell the two apart."""

    def __init__(self, message: str):
        super().__init__("malformed", message)


async def read_frame_length(reader: asyncio.StreamReader, max_bytes: int, idle_s: float | None = None) -> int:
    """Read a frame's length prefix; a length over ``max_bytes`` is "oversize", before any of the body is read.

    With ``idle_s``, a prefix that has not arrived ``idle_s`` seconds from now is "stalled" (a stream opened
    and left idle, or trickled, costs the node a file descriptor and p2pd a stream). A stream that ends
    inside the prefix raises StreamEnded.
    """
    try:
        prefix = await asyncio.wait_for(reader.readexactly(_FRAME_LEN.size), idle_s)
    except asyncio.IncompleteReadError as e:
        raise StreamEnded(f"stream ended after {len(e.partial)} bytes of a frame length") from None
    except asyncio.TimeoutError:
        raise ProtocolError("stalled", f"no frame length within {idle_s:g} s") from None
    (length,) = _FRAME_LEN.unpack(prefix)
    if length > max_bytes:
        raise ProtocolError("oversize", f"frame of {length} bytes exceeds {max_bytes}")
    return length


async def read_frame_body(reader: asyncio.StreamReader, length: int, deadline_s: float | None = None) -> bytes:
    """Read the ``length`` bytes of a frame body, within ``deadline_s`` seconds ("stalled" past it).
    A stream that ends inside the body raises StreamEnded."""
    try:
        return await asyncio.wait_for(reader.readexactly(length), deadline_s)
    except asyncio.IncompleteReadError as e:
        raise StreamEnded(f"stream ended after {len(e.partial)} of {length} frame bytes") from None
    except asyncio.TimeoutError:
        raise ProtocolError("stalled", f"{length}-byte frame not received within {deadline_s:g} s") from None


async def read_frame(reader: asyncio.StreamReader, max_bytes: int, limits: Limits | None = None) -> bytes:
    """Read one frame of at most ``max_bytes``.

    An announced length over ``max_bytes`` is "oversize", raised before any of the body is read;
    a stream that ends inside the prefix or the body raises StreamEnded. With ``limits``,
    the prefix must arrive within ``limits.idle_stream_s`` and the body within
    ``limits.frame_deadline_s(length)``, else "stalled".
    """
    length = await read_frame_length(reader, max_bytes, None if limits is None else limits.idle_stream_s)
    return await read_frame_body(reader, length, None if limits is None else limits.frame_deadline_s(length))
