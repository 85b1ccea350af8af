"""Optional Triton: availability checks without importing triton at package import time."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_installed() -> bool:
    """True when the triton package can be imported (it is never imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1, which lets Triton kernels run on CPU tensors (slowly, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Pick "torch" or "triton" for ``tensor``: auto means Triton on CUDA tensors when installed.

    Forcing "triton" on a CPU tensor needs TRITON_INTERPRET=1 in the environment before the kernel
    modules are first imported (triton.jit reads it at decoration time).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_installed() else "torch"
    if backend == "triton":
        if not triton_installed():
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if not tensor.is_cuda and not interpreter_enabled():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend
