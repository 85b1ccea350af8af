"""swarmd.kernels: blockwise int8/int4 compression with error feedback and the fused NoLoCo update.

Each operation runs a Triton kernel on CUDA tensors and a torch fallback on CPU tensors; triton
is imported only when a Triton kernel is actually launched.
"""

from swarmd.kernels.blocks import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, QuantizedBlocks
from swarmd.kernels.dispatch import (
    Payload,
    dequantize_int4,
    dequantize_int8,
    dequantize_int8_accumulate,
    dequantize_int8_pair_average,
    noloco_outer_update_,
    quantize_int4_ef,
    quantize_int8_ef,
)
from swarmd.kernels.finite import all_finite

__all__ = [
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "Payload",
    "QuantizedBlocks",
    "all_finite",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_int8_accumulate",
    "dequantize_int8_pair_average",
    "noloco_outer_update_",
    "quantize_int4_ef",
    "quantize_int8_ef",
]
