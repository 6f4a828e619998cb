"""RMSNorm (weighted and unweighted) and V4's partial, interleaved RoPE.

Exactness
  * ``rmsnorm``: TOLERANCE-BOUND, rtol 1e-6 / atol 1e-6 on fp32 (the mean of squares is
    summed in another order than torch.mean; the rest is the same fp32 math:
    ``(x * rsqrt(mean(x^2) + eps)) * weight``, cast to x.dtype at the end). Triton's
    rsqrt on CUDA is approximate (~2 ulp); the bound covers it.
  * ``rope_interleaved``: BIT-EXACT with ``rope_interleaved_ref`` (pure elementwise fp32
    math, same operations; launched with ``enable_fp_fusion=False`` so no FMA contraction).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import HAS_TRITON, cdiv, fp_options, next_pow2, triton_usable

if HAS_TRITON:
    import triton
    import triton.language as tl


# ----------------------------------------------------------------------------- rmsnorm
def rmsnorm_ref(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def rmsnorm_unweighted_ref(x, eps: float = 1e-6):
    return rmsnorm_ref(x, None, eps)


if HAS_TRITON:
    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, D, stride_x, stride_o, eps,
                        HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        y = x * r
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6):
    """RMSNorm over the last dim in fp32; ``weight=None`` is the unweighted variant
    (V4's per-head q norm). Returns x.dtype."""
    if not triton_usable(x):
        return rmsnorm_ref(x, weight, eps)
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        BLOCK_D = next_pow2(D)
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, weight if weight is not None else x2, out, D, x2.stride(0), out.stride(0),
            float(eps), HAS_W=weight is not None, BLOCK_D=BLOCK_D,
            num_warps=min(16, max(1, BLOCK_D // 256)))
    return out.reshape(x.shape)


def rmsnorm_unweighted(x: torch.Tensor, eps: float = 1e-6):
    return rmsnorm(x, None, eps)


# ------------------------------------------------------------------------------- rope
def rope_interleaved_ref(x, cos, sin, rope_dim: int, inverse: bool = False):
    """x [P, ..., D]; cos/sin [P, rope_dim/2] (one row per position = x.shape[0]).
    Rotates the LAST rope_dim channels in interleaved pairs (2i, 2i+1); the first
    D - rope_dim channels pass through. ``inverse`` rotates by -angle."""
    D = x.shape[-1]
    P = x.shape[0]
    shape = (P,) + (1,) * (x.dim() - 2) + (rope_dim // 2,)
    c = cos.float().reshape(shape)
    s = sin.float().reshape(shape)
    if inverse:
        s = -s
    xr = x[..., D - rope_dim:].float()
    x0, x1 = xr[..., 0::2], xr[..., 1::2]
    o0 = x0 * c - x1 * s
    o1 = x1 * c + x0 * s
    out = x.clone()
    out[..., D - rope_dim:] = torch.stack([o0, o1], -1).flatten(-2).to(x.dtype)
    return out


if HAS_TRITON:
    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, D, R2,
                     stride_xp, stride_xh, stride_op, stride_oh, stride_cp,
                     SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_P: tl.constexpr):
        """One program: one position, BLOCK_H rows (heads). Rotates the rope pairs and
        copies the pass-through channels (done in BLOCK_P chunks)."""
        p = tl.program_id(0).to(tl.int64)
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = hs < H
        xrow = x_ptr + p * stride_xp + hs[:, None] * stride_xh
        orow = out_ptr + p * stride_op + hs[:, None] * stride_oh
        # pass-through channels [0, D - 2*R2)
        n_pass = D - 2 * R2
        for c0 in range(0, n_pass, BLOCK_P):
            cols = c0 + tl.arange(0, BLOCK_P)
            m = hmask[:, None] & (cols[None, :] < n_pass)
            tl.store(orow + cols[None, :], tl.load(xrow + cols[None, :], mask=m), mask=m)
        i = tl.arange(0, BLOCK_R)
        rm = i < R2
        m = hmask[:, None] & rm[None, :]
        c = tl.load(cos_ptr + p * stride_cp + i, mask=rm, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + p * stride_cp + i, mask=rm, other=0.0).to(tl.float32)[None, :]
        if SIGN < 0:
            s = -s
        e = n_pass + 2 * i[None, :]
        x0 = tl.load(xrow + e, mask=m, other=0.0).to(tl.float32)
        x1 = tl.load(xrow + e + 1, mask=m, other=0.0).to(tl.float32)
        o0 = x0 * c - x1 * s
        o1 = x1 * c + x0 * s
        tl.store(orow + e, o0.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(orow + e + 1, o1.to(out_ptr.dtype.element_ty), mask=m)


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     rope_dim: int, inverse: bool = False) -> torch.Tensor:
    """V4 partial interleaved RoPE (see ``rope_interleaved_ref``). Returns a new tensor
    of x's shape and dtype; inverse=True applies the inverse rotation (used by V4 on
    the attention output)."""
    assert rope_dim % 2 == 0 and rope_dim <= x.shape[-1]
    if not triton_usable(x):
        return rope_interleaved_ref(x, cos, sin, rope_dim, inverse)
    P, D = x.shape[0], x.shape[-1]
    x3 = x.reshape(P, -1, D)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    H = x3.shape[1]
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    cos2 = cos.reshape(P, rope_dim // 2).contiguous()
    sin2 = sin.reshape(P, rope_dim // 2).contiguous()
    if P and H:
        BLOCK_H = min(16, next_pow2(H))
        _rope_kernel[(P, cdiv(H, BLOCK_H))](
            x3, cos2, sin2, out, H, D, rope_dim // 2,
            x3.stride(0), x3.stride(1), out.stride(0), out.stride(1), cos2.stride(0),
            SIGN=-1 if inverse else 1, BLOCK_H=BLOCK_H,
            BLOCK_R=next_pow2(max(rope_dim // 2, 1)),
            BLOCK_P=min(256, next_pow2(max(D - rope_dim, 1))), num_warps=4,
            **fp_options(x))
    return out.reshape(x.shape)
