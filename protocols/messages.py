"""Schemas of every message kind, as plain data, and the one validator that checks fields against them.

A schema says which fields a kind carries (type, required or optional, bounds) and how many tensors
come with it. ``validate_fields`` is pure: it returns a normalised copy of the fields or raises
ProtocolError; it never touches the input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from swarmd.protocols.errors import REJECT_REASONS, ProtocolError
from swarmd.protocols.limits import DEFAULT_LIMITS, Limits

INT64_MAX = (1 << 63) - 1
MAX_STAGE = 1023
MAX_PEER_ID_CHARS = 128
MAX_ROUTE_HOPS = 64
MAX_ERROR_CHARS = 2000
MAX_RUN_ID_CHARS = 128
MAX_SPEC_RECORD_BYTES = 64 * 1024
MAX_STATE_TENSORS = 4096
MAX_PARAM_NAME_CHARS = 256
MAX_STATE_HEADER_BYTES = 2 * 1024 * 1024  # a manifest of 4096 entries does not fit in the default 64 KiB
MAX_STATE_CHUNKS = 1 << 16
DIGEST_BYTES = 16
STATE_DTYPES = frozenset({"float32", "float16", "bfloat16"})
MB_ID_BYTES = 16
SESSION_BYTES = 16
MAX_OUTER_CHUNKS = 1 << 16
MAX_DIALBACK_MADDRS = 8
MAX_MADDR_CHARS = 256
MAX_VERSIONS = 8  # "name=version" strings in an info reply
MAX_VERSION_CHARS = 64
MAX_EVAL_LOSS = 1e4  # mean cross-entropy; ln(vocab) is ~10 for a 32k vocabulary


@dataclass(frozen=True)
class FieldSpec:
    """One field: its wire type ("int", "float", "str", "bytes", "list") and its bounds.

    ``lo``/``hi`` bound int and float values; ``max_len``/``exact_len`` bound str (chars),
    bytes and list lengths; ``item`` is the spec of each list item; ``choices`` restricts a str.
    """

    type: str
    required: bool = True
    nullable: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_exclusive: bool = False
    max_len: int | None = None
    exact_len: int | None = None
    item: FieldSpec | None = None
    choices: frozenset[str] | None = None


@dataclass(frozen=True)
class KindSpec:
    """One message kind: its fields and its tensors.

    The tensor count must lie in [min_tensors, max_tensors] and, when ``tensors_match`` names a list
    field, equal that list's length. ``tensor_cap`` replaces ``Limits.max_tensors_per_message`` for
    kinds that legitimately carry more (state transfer); ``max_header_bytes`` likewise replaces
    ``Limits.max_header_bytes``. None means "use the Limits value".
    """

    fields: Mapping[str, FieldSpec] = field(default_factory=lambda: MappingProxyType({}))
    min_tensors: int = 0
    max_tensors: int = 0
    tensors_match: str | None = None
    tensor_cap: int | None = None
    max_header_bytes: int | None = None


def _kind(fields: dict[str, FieldSpec] | None = None, **kw: Any) -> KindSpec:
    return KindSpec(fields=MappingProxyType(dict(fields or {})), **kw)


_MB_ID = FieldSpec("bytes", exact_len=MB_ID_BYTES)
_STAGE = FieldSpec("int", lo=0, hi=MAX_STAGE)
_COUNT = FieldSpec("int", lo=0, hi=INT64_MAX)
_SESSION = FieldSpec("bytes", exact_len=SESSION_BYTES)
_MADDR = FieldSpec("str", max_len=MAX_MADDR_CHARS)
_OUTER_CHUNK = {
    "session": _SESSION,
    "index": FieldSpec("int", lo=0, hi=MAX_OUTER_CHUNKS - 1),
    "count": FieldSpec("int", lo=1, hi=MAX_OUTER_CHUNKS),
    "numel": _COUNT,  # elements of the whole flat parameter vector
}

KINDS: Mapping[str, KindSpec] = MappingProxyType(
    {
        "forward": _kind(
            {
                "mb_id": _MB_ID,
                "stage": _STAGE,  # the stage this message is FOR
                "route": FieldSpec(
                    "list", max_len=MAX_ROUTE_HOPS, item=FieldSpec("str", max_len=MAX_PEER_ID_CHARS)
                ),
                "deadline_s": FieldSpec("float", lo=0.0, lo_exclusive=True, hi=3600.0),  # life left
                # 1: a held-out evaluation microbatch, forward only, never trained on
                "eval": FieldSpec("int", required=False, lo=0, hi=1),
            },
            min_tensors=2,  # activations, targets
            max_tensors=2,
        ),
        "backward": _kind(
            {"mb_id": _MB_ID, "stage": _STAGE, "loss": FieldSpec("float")},
            min_tensors=1,  # gradient w.r.t. the output of ``stage``
            max_tensors=1,
        ),
        # the last stage's loss on an evaluation microbatch, sent straight to its driver (route[0])
        "eval_result": _kind({"mb_id": _MB_ID, "loss": FieldSpec("float", lo=0.0, hi=MAX_EVAL_LOSS)}),
        "ack": _kind({"queue_depth": FieldSpec("int", required=False, lo=0, hi=INT64_MAX)}),
        "error": _kind(
            {
                "reason": FieldSpec("str", choices=frozenset(REJECT_REASONS)),
                "message": FieldSpec("str", max_len=MAX_ERROR_CHARS),
            }
        ),
        "info_request": _kind(),
        "info": _kind(
            {
                "run_id": FieldSpec("str", max_len=MAX_RUN_ID_CHARS),
                "peer_id": FieldSpec("str", max_len=MAX_PEER_ID_CHARS),
                "stage": FieldSpec("int", nullable=True, lo=0, hi=MAX_STAGE),
                "inner_step": _COUNT,
                "protocol": FieldSpec("int", lo=0, hi=INT64_MAX),
                # for `swarmd doctor`: the node's wall clock (unix seconds) and its software versions
                "wall_time": FieldSpec("float", required=False, lo=0.0, hi=1e11),
                "versions": FieldSpec("list", required=False, max_len=MAX_VERSIONS,
                                      item=FieldSpec("str", max_len=MAX_VERSION_CHARS)),
            }
        ),
        # the caller's announced addresses, which the asked node dials (the caller's peer id only)
        "dialback_request": _kind({"maddrs": FieldSpec("list", max_len=MAX_DIALBACK_MADDRS, item=_MADDR)}),
        # per address, in the request's order: "ok", or why the dial failed
        "dialback": _kind({"results": FieldSpec("list", max_len=MAX_DIALBACK_MADDRS,
                                                item=FieldSpec("str", max_len=MAX_ERROR_CHARS))}),
        "spec_request": _kind(),
        "spec": _kind({"record": FieldSpec("bytes", max_len=MAX_SPEC_RECORD_BYTES)}),
        # NoLoCo outer step: a proposal, chunks of (phi, theta - phi) both ways, the driver's verdict
        "pair_request": _kind({"session": _SESSION, "stage": _STAGE, "numel": _COUNT}),
        "outer_chunk": _kind(_OUTER_CHUNK, min_tensors=2, max_tensors=2),
        "outer_commit": _kind({"session": _SESSION, "verdict": FieldSpec("str", choices=frozenset({"accept", "reject"}))}),
        # stage state sync: a manifest (layout, steps, one digest per chunk), then chunks on request
        "state_manifest_request": _kind({"stage": _STAGE}),
        "state_manifest": _kind(
            {
                "stage": _STAGE,
                "session": _SESSION,
                "inner_step": _COUNT,
                "outer_step": FieldSpec("int", required=False, lo=0, hi=INT64_MAX),  # absent: no outer state
                "chunk_bytes": FieldSpec("int", lo=1, hi=1 << 30),
                "names": FieldSpec("list", max_len=MAX_STATE_TENSORS, item=FieldSpec("str", max_len=MAX_PARAM_NAME_CHARS)),
                "shapes": FieldSpec("list", max_len=MAX_STATE_TENSORS, item=FieldSpec(
                    "list", max_len=8, item=FieldSpec("int", lo=0, hi=DEFAULT_LIMITS.max_tensor_elements))),
                "dtypes": FieldSpec("list", max_len=MAX_STATE_TENSORS, item=FieldSpec("str", choices=STATE_DTYPES)),
                "digests": FieldSpec("list", max_len=MAX_STATE_CHUNKS, item=FieldSpec("bytes", exact_len=DIGEST_BYTES)),
            },
            max_header_bytes=MAX_STATE_HEADER_BYTES,
        ),
        "state_chunk_request": _kind({"session": _SESSION, "index": FieldSpec("int", lo=0, hi=MAX_STATE_CHUNKS - 1)}),
        "state_chunk": _kind(
            {"session": _SESSION, "index": FieldSpec("int", lo=0, hi=MAX_STATE_CHUNKS - 1)}, min_tensors=1, max_tensors=64
        ),
    }
)


def _short(value: Any, limit: int = 60) -> str:
    """repr() cut short: error texts must not echo a hostile peer's megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def kind_spec(kind: Any) -> KindSpec:
    """The schema of ``kind``; ProtocolError("malformed") for anything that is not a known kind name."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ProtocolError("malformed", f"unknown message kind {_short(kind)}")
    return KINDS[kind]


def tensor_cap(kind: str, limits: Limits = DEFAULT_LIMITS) -> int:
    """Most tensors a message of ``kind`` may carry under ``limits`` (more is "oversize")."""
    spec = kind_spec(kind)
    return spec.tensor_cap if spec.tensor_cap is not None else limits.max_tensors_per_message


def header_cap(kind: str, limits: Limits = DEFAULT_LIMITS) -> int:
    """Most header bytes a message of ``kind`` may use under ``limits`` (more is "oversize")."""
    spec = kind_spec(kind)
    return spec.max_header_bytes if spec.max_header_bytes is not None else limits.max_header_bytes


def _check_value(name: str, spec: FieldSpec, value: Any) -> Any:
    """Validate one value against its spec; returns it normalised (ints accepted as floats)."""
    if value is None:
        if spec.nullable:
            return None
        raise ProtocolError("malformed", f"field {name} must not be null")
    kind = spec.type
    # bool is an int subclass in Python; on the wire they are distinct types, so refuse the mix-up.
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError("malformed", f"field {name} must be an int, got {type(value).__name__}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError("malformed", f"field {name} must be a float, got {type(value).__name__}")
        try:
            value = float(value)
        except OverflowError:
            raise ProtocolError("malformed", f"field {name} is out of float range") from None
        if not math.isfinite(value):
            raise ProtocolError("malformed", f"field {name} must be finite, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str):
            raise ProtocolError("malformed", f"field {name} must be a str, got {type(value).__name__}")
    elif kind == "bytes":
        if not isinstance(value, bytes):
            raise ProtocolError("malformed", f"field {name} must be bytes, got {type(value).__name__}")
    elif kind == "list":
        if not isinstance(value, (list, tuple)):
            raise ProtocolError("malformed", f"field {name} must be a list, got {type(value).__name__}")
    else:  # a schema bug, not a peer's fault
        raise AssertionError(f"schema of field {name} has unknown type {kind!r}")

    if spec.lo is not None and (value < spec.lo or (spec.lo_exclusive and value == spec.lo)):
        raise ProtocolError("malformed", f"field {name}={_short(value)} is below its lower bound {spec.lo}")
    if spec.hi is not None and value > spec.hi:
        raise ProtocolError("malformed", f"field {name}={_short(value)} is above its upper bound {spec.hi}")
    if spec.exact_len is not None and len(value) != spec.exact_len:
        raise ProtocolError("malformed", f"field {name} must have length {spec.exact_len}, got {len(value)}")
    if spec.max_len is not None and len(value) > spec.max_len:
        raise ProtocolError("malformed", f"field {name} has length {len(value)} over {spec.max_len}")
    if spec.choices is not None and value not in spec.choices:
        raise ProtocolError("malformed", f"field {name}={_short(value)} is not one of the allowed values")
    if kind == "list":
        assert spec.item is not None, f"list field {name} has no item spec"
        return [_check_value(f"{name}[{i}]", spec.item, v) for i, v in enumerate(value)]
    return value


def validate_fields(
    kind: Any, fields: Any, n_tensors: int, limits: Limits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """Check ``fields`` and the tensor count of a message of ``kind`` against its schema.

    Returns a normalised copy of the fields. Raises ProtocolError: "malformed" for an unknown kind,
    unknown, missing or mistyped fields, out-of-bound values or a tensor count the schema does not
    allow; "oversize" for more tensors than the kind's cap under ``limits``.
    """
    spec = kind_spec(kind)
    if not isinstance(fields, Mapping):
        raise ProtocolError("malformed", f"fields of {kind} must be a map, got {type(fields).__name__}")
    unknown = [k for k in fields if k not in spec.fields]
    if unknown:
        raise ProtocolError("malformed", f"{kind} has unknown fields {_short(unknown)}")
    out: dict[str, Any] = {}
    for name, fspec in spec.fields.items():
        if name not in fields:
            if fspec.required:
                raise ProtocolError("malformed", f"{kind} is missing field {name}")
            continue
        out[name] = _check_value(name, fspec, fields[name])

    cap = tensor_cap(kind, limits)
    if n_tensors > cap:
        raise ProtocolError("oversize", f"{kind} carries {n_tensors} tensors, the cap is {cap}")
    if not spec.min_tensors <= n_tensors <= spec.max_tensors:
        raise ProtocolError(
            "malformed", f"{kind} needs {spec.min_tensors}..{spec.max_tensors} tensors, got {n_tensors}"
        )
    if spec.tensors_match is not None and n_tensors != len(out[spec.tensors_match]):
        raise ProtocolError(
            "malformed", f"{kind} carries {n_tensors} tensors for {len(out[spec.tensors_match])} {spec.tensors_match}"
        )
    return out
