"""The codec layer: one tensor <-> (meta dict, payload bytes), with validation on decode.

``meta`` travels in the msgpack header of a message; ``payload`` travels as raw bytes after it.
Every decode checks the meta against explicit limits before allocating anything.

Quantized codecs (float tensors only) put ``block_size`` in the meta; their payload is the codes
(int8: one byte per element; int4: two elements per byte, low nibble first, stored as code + 8)
followed by one little-endian float32 scale per block. "int8" is stateless; "int8-ef" and
"int4-ef" take the caller's error-feedback ``residual`` and hand back the new one.

Encoding runs on the tensor's device and decoding on the receiver's (``device``), through swarmd.kernels;
only the payload bytes cross between a device and host memory, in ``to_host`` and ``to_device``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from swarmd.kernels import (
    QuantizedBlocks, all_finite, dequantize_int4, dequantize_int8, quantize_int4_ef, quantize_int8_ef,
)
from swarmd.kernels.blocks import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, codes_nbytes, num_blocks
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

CODECS: tuple[str, ...] = ("none", "fp16", "int8", "int8-ef", "int4-ef")
# Blockwise codecs: name -> (bits per code, takes an error-feedback residual).
QUANT_CODECS: dict[str, tuple[int, bool]] = {"int8": (8, False), "int8-ef": (8, True), "int4-ef": (4, True)}
SCALE_DTYPE = np.dtype("<f4")


@dataclass
class EncodedTensor:
    """A tensor ready for the wire. ``residual`` is the new error-feedback state (None for stateless codecs)."""

    meta: dict[str, Any]
    payload: bytes
    residual: torch.Tensor | None = None


# ---- the only two places where tensor bytes cross between a device and host memory ------------------------
#
# Everything before ``to_host`` (the finiteness check, quantization, the fp16 cast) runs on the tensor's own
# device, and everything after ``to_device`` (dequantization, the finiteness check) on the receiver's: on a
# GPU only the compressed bytes cross the PCIe bus, through pinned staging buffers; on the CPU the same calls
# run with the torch kernels. Byte order: little-endian, as on every platform torch runs on (the wire's too).


def to_host(tensors: list[torch.Tensor]) -> bytes:
    """The raw bytes of ``tensors`` (each made contiguous), one after the other: a payload for the wire."""
    flats = [t.detach().contiguous().view(-1).view(torch.uint8) for t in tensors]
    if not any(f.device.type == "cuda" for f in flats):
        return b"".join(f.numpy().tobytes() for f in flats)
    # One pinned buffer (torch's caching host allocator reuses it), filled by async copies, one sync.
    staging = torch.empty(sum(f.numel() for f in flats), dtype=torch.uint8, pin_memory=True)
    offset = 0
    for f in flats:
        staging[offset : offset + f.numel()].copy_(f, non_blocking=True)
        offset += f.numel()
    torch.cuda.current_stream(next(f.device for f in flats if f.device.type == "cuda")).synchronize()
    return staging.numpy().tobytes()


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A new tensor on ``device`` holding the (host, read-only) ``array`` received from the wire."""
    if device.type != "cuda":
        return torch.from_numpy(array.copy()).to(device)  # copy: the payload's buffer is not ours to keep
    staging = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype, pin_memory=True)
    staging.numpy()[...] = array
    return staging.to(device, non_blocking=True)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


def _raw_payload(t: torch.Tensor) -> bytes:
    return to_host([t])


def _from_raw(payload: bytes | memoryview, dtype: torch.dtype, shape: list[int], device: torch.device) -> torch.Tensor:
    if dtype == torch.bfloat16:  # numpy has no bfloat16: the wire holds its bit pattern
        return to_device(np.frombuffer(payload, dtype=np.int16), device).view(torch.bfloat16).reshape(shape)
    return to_device(np.frombuffer(payload, dtype=_NUMPY_DTYPES[dtype]), device).reshape(shape)


def encode_tensor(
    tensor: torch.Tensor,
    codec: str = "none",
    *,
    block_size: int = 256,
    residual: torch.Tensor | None = None,
) -> EncodedTensor:
    """Encode ``tensor`` with ``codec``, on its device (only the payload bytes leave it).
    Raises ValueError on an unknown codec or non-finite floats."""
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {tensor.dtype} cannot be sent")
    dtype_name = DTYPE_NAMES[tensor.dtype]
    if dtype_name in FLOAT_DTYPES and not all_finite(tensor):
        raise ValueError("refusing to send a tensor with NaN or Inf")
    meta: dict[str, Any] = {"dtype": dtype_name, "shape": list(tensor.shape), "codec": codec}
    if codec == "none":
        return EncodedTensor(meta, _raw_payload(tensor))
    if codec == "fp16":
        if dtype_name not in FLOAT_DTYPES:
            raise ValueError(f"codec fp16 needs a float tensor, got {dtype_name}")
        return EncodedTensor(meta, _raw_payload(tensor.to(torch.float16)))
    if codec in QUANT_CODECS:
        if dtype_name not in FLOAT_DTYPES:
            raise ValueError(f"codec {codec} needs a float tensor, got {dtype_name}")
        return _encode_blocks(tensor, codec, meta, block_size, residual)
    raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")


def _encode_blocks(
    tensor: torch.Tensor, codec: str, meta: dict[str, Any], block_size: int, residual: torch.Tensor | None
) -> EncodedTensor:
    bits, error_feedback = QUANT_CODECS[codec]
    if residual is not None and not error_feedback:
        raise ValueError(f"codec {codec} keeps no residual; use an -ef codec for error feedback")
    quantize = quantize_int8_ef if bits == 8 else quantize_int4_ef
    q, new_residual = quantize(tensor, residual, block_size=block_size)
    meta["block_size"] = block_size
    return EncodedTensor(meta, to_host([q.codes, q.scales]), new_residual if error_feedback else None)


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
    if any(d > limits.max_tensor_elements for d in shape):  # even beside a zero dim: torch cannot hold it
        raise ProtocolError("oversize", f"shape {shape!r} has a dim over {limits.max_tensor_elements} elements")
    numel = math.prod(shape)
    if numel > limits.max_tensor_elements:
        raise ProtocolError("oversize", f"tensor of {numel} elements exceeds {limits.max_tensor_elements}")
    if codec in QUANT_CODECS:
        _check_block_params(meta, codec, dtype_name)
    return DTYPES[dtype_name], shape, numel


def _check_block_params(meta: dict[str, Any], codec: str, dtype_name: str) -> None:
    """Raise ProtocolError("codec") unless a quantized codec's parameters are consistent."""
    if dtype_name not in FLOAT_DTYPES:
        raise ProtocolError("codec", f"codec {codec} on a non-float tensor")
    block_size = meta.get("block_size")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ProtocolError("codec", f"codec {codec} needs an integer block_size, got {block_size!r}")
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise ProtocolError("codec", f"block_size {block_size} outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")
    if QUANT_CODECS[codec][0] == 4 and block_size % 2:
        raise ProtocolError("codec", f"codec {codec} needs an even block_size, got {block_size}")


def decode_tensor(
    meta: Any, payload: bytes | memoryview, limits: Limits, *, device: torch.device | str = "cpu",
    keep_blocks: bool = False,
) -> torch.Tensor | QuantizedBlocks:
    """Decode and validate one tensor into a tensor on ``device``. Raises ProtocolError with
    a reason on any inconsistency.

    With ``keep_blocks``, a float32 tensor sent with a blockwise codec comes back as its ``QuantizedBlocks`` on
    ``device`` (codes and scales as received, checked so that every value decodes finite), not decoded: the
    NoLoCo update reads a partner's int8 payload as it is.
    """
    device = torch.device(device)
    dtype, shape, numel = check_meta(meta, limits)
    codec = meta["codec"]
    if codec in QUANT_CODECS:
        return _decode_blocks(meta, payload, dtype, shape, numel, device, keep_blocks and dtype == torch.float32)
    wire_dtype = torch.float16 if codec == "fp16" else dtype
    if codec == "fp16" and meta["dtype"] not in FLOAT_DTYPES:
        raise ProtocolError("codec", "codec fp16 on a non-float tensor")
    expected = numel * wire_dtype.itemsize
    if len(payload) != expected:
        raise ProtocolError("shape", f"payload is {len(payload)} bytes, shape {shape} needs {expected}")
    tensor = _from_raw(payload, wire_dtype, shape, device).to(dtype)
    if meta["dtype"] in FLOAT_DTYPES and not all_finite(tensor):
        raise ProtocolError("nonfinite", "tensor holds NaN or Inf")
    return tensor


_LARGEST_CODE = {8: 128, 4: 8}  # |code| a peer can send: int8 -128..127, a nibble -8..7
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _decode_blocks(
    meta: dict[str, Any], payload: bytes | memoryview, dtype: torch.dtype, shape: list[int], numel: int,
    device: torch.device, keep_blocks: bool,
) -> torch.Tensor | QuantizedBlocks:
    """Decode a quantized payload whose meta already passed check_meta (the scales are checked on the host:
    they are few, and came as bytes)."""
    codec, block_size = meta["codec"], meta["block_size"]
    bits = QUANT_CODECS[codec][0]
    n_codes, n_blocks = codes_nbytes(numel, bits), num_blocks(numel, block_size)
    expected = n_codes + n_blocks * SCALE_DTYPE.itemsize
    if len(payload) != expected:
        raise ProtocolError(
            "shape", f"payload is {len(payload)} bytes, shape {shape} with block_size {block_size} needs {expected}"
        )
    scales_np = np.frombuffer(payload, dtype=SCALE_DTYPE, count=n_blocks, offset=n_codes)
    if not np.isfinite(scales_np).all():
        raise ProtocolError("nonfinite", "block scales hold NaN or Inf")
    if (scales_np < 0).any():
        raise ProtocolError("codec", "negative block scale")
    codes = to_device(np.frombuffer(payload, dtype=np.int8 if bits == 8 else np.uint8, count=n_codes), device)
    q = QuantizedBlocks(codes, to_device(scales_np.astype(np.float32, copy=False), device), numel, block_size, bits)
    if keep_blocks:
        # Every value decodes finite iff no scale times the largest code overflows float32.
        if n_blocks and float(scales_np.max()) > _FLOAT32_MAX / _LARGEST_CODE[bits]:
            raise ProtocolError("nonfinite", "a block scale overflows float32 when decoded")
        return q
    decoded = dequantize_int8(q) if bits == 8 else dequantize_int4(q)
    tensor = decoded.view(shape).to(dtype)
    # Finite scales can still overflow: code * scale past float32, or a cast down to float16.
    if not all_finite(tensor):
        raise ProtocolError("nonfinite", "decoded tensor holds NaN or Inf")
    return tensor
