"""The codec layer: one tensor <-> (meta dict, payload bytes), with validation on decode.

``meta`` travels in the msgpack header of a message; ``payload`` travels as raw bytes after it.
Every decode checks the meta against explicit limits before allocating anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.limits import Limits

# Wire names of the dtypes a frame may carry.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16"})

CODECS: tuple[str, ...] = ("none", "fp16")


@dataclass
class EncodedTensor:
    """A tensor ready for the wire. ``residual`` is the new error-feedback state (None for stateless codecs)."""

    meta: dict[str, Any]
    payload: bytes
    residual: torch.Tensor | None = None


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the bit pattern
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _from_raw(payload: bytes | memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if dtype == torch.bfloat16:
        arr = np.frombuffer(payload, dtype=np.int16)
        return torch.from_numpy(arr.copy()).view(torch.bfloat16).reshape(shape)
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    arr = np.frombuffer(payload, dtype=np_dtype)
    return torch.from_numpy(arr.copy()).reshape(shape)


def encode_tensor(
    tensor: torch.Tensor,
    codec: str = "none",
    *,
    block_size: int = 256,
    residual: torch.Tensor | None = None,
) -> EncodedTensor:
    """Encode ``tensor`` with ``codec``. Raises ValueError on an unknown codec or non-finite floats."""
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {tensor.dtype} cannot be sent")
    dtype_name = DTYPE_NAMES[tensor.dtype]
    if dtype_name in FLOAT_DTYPES and not bool(torch.isfinite(tensor).all()):
        raise ValueError("refusing to send a tensor with NaN or Inf")
    meta: dict[str, Any] = {"dtype": dtype_name, "shape": list(tensor.shape), "codec": codec}
    if codec == "none":
        return EncodedTensor(meta, _raw_bytes(tensor))
    if codec == "fp16":
        if dtype_name not in FLOAT_DTYPES:
            raise ValueError(f"codec fp16 needs a float tensor, got {dtype_name}")
        return EncodedTensor(meta, _raw_bytes(tensor.to(torch.float16)))
    raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")


def check_meta(meta: Any, limits: Limits) -> tuple[torch.dtype, list[int], int]:
    """Validate the common part of a tensor meta. Returns (dtype, shape, numel)."""
    if not isinstance(meta, dict):
        raise ProtocolError("malformed", "tensor meta is not a map")
    dtype_name, shape, codec = meta.get("dtype"), meta.get("shape"), meta.get("codec")
    if not isinstance(codec, str):
        raise ProtocolError("malformed", "tensor meta has no codec")
    if codec not in CODECS:
        raise ProtocolError("codec", f"unknown codec {codec!r}")
    if dtype_name not in DTYPES:
        raise ProtocolError("dtype", f"dtype {dtype_name!r} is not allowed")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError("shape", f"shape {shape!r} is not a list of integers")
    if len(shape) > limits.max_dims or any(d < 0 for d in shape):
        raise ProtocolError("shape", f"shape {shape!r} has negative sizes or too many dims")
    numel = math.prod(shape)
    if numel > limits.max_tensor_elements:
        raise ProtocolError("oversize", f"tensor of {numel} elements exceeds {limits.max_tensor_elements}")
    return DTYPES[dtype_name], shape, numel


def decode_tensor(meta: Any, payload: bytes | memoryview, limits: Limits) -> torch.Tensor:
    """Decode and validate one tensor. Raises ProtocolError with a reason on any inconsistency."""
    dtype, shape, numel = check_meta(meta, limits)
    codec = meta["codec"]
    wire_dtype = torch.float16 if codec == "fp16" else dtype
    if codec == "fp16" and meta["dtype"] not in FLOAT_DTYPES:
        raise ProtocolError("codec", "codec fp16 on a non-float tensor")
    expected = numel * wire_dtype.itemsize
    if len(payload) != expected:
        raise ProtocolError("shape", f"payload is {len(payload)} bytes, shape {shape} needs {expected}")
    tensor = _from_raw(payload, wire_dtype, shape).to(dtype)
    if meta["dtype"] in FLOAT_DTYPES and not bool(torch.isfinite(tensor).all()):
        raise ProtocolError("nonfinite", "tensor holds NaN or Inf")
    return tensor
