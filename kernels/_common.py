"""Shared helpers for the Triton kernels: path selection and small utilities."""
from __future__ import annotations

import os

import torch

try:  # triton is an optional dependency (flashport[triton])
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAS_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs without triton
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    The variable must be set before the kernel modules are imported: triton.jit
    decides at decoration time whether a kernel is interpreted."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(t: torch.Tensor) -> bool:
    """Whether the Triton path should run for tensor ``t``: on a CUDA tensor, or on
    any tensor when the Triton interpreter is on. Otherwise wrappers call ``*_ref``."""
    return HAS_TRITON and (t.is_cuda or interpreting())


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fp_options(t: torch.Tensor) -> dict:
    """Launch options for kernels claimed bit-exact with an elementwise reference:
    no mul+add -> fma contraction (the reference rounds each op)."""
    return {"enable_fp_fusion": False}
