"""V4 compressor gated pooling: out[w, c] = sum_j kv[w, j, c] * softmax_j(gate + bias)[w, j, c].

Exactness: TOLERANCE-BOUND, rtol 1e-5 / atol 1e-6 on fp32 (exp and the slot sums are
computed in another order / with another exp than torch.softmax; Triton's exp on CUDA
is ex2.approx-based, a few ulp).

-inf handling (CSA overlap: the lead passes -inf gates for empty slots):
  * -inf logits get weight exactly 0; finite slots are softmaxed among themselves.
  * A column whose logits are ALL -inf (an entirely empty pool; impossible in V4) returns
    0 for that column in both the kernel and the reference -- never NaN. If you want
    to detect that case, check ``torch.isinf(gate + bias).all(1)`` on your side.
  * NaN in the inputs propagates (NaN output), as in torch.softmax.
The softmax runs in fp32; the output has kv's dtype.
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, cdiv, next_pow2, triton_usable

if HAS_TRITON:
    import triton
    import triton.language as tl


def compress_pool_ref(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor):
    logits = gate.float() + position_bias.float()[None]
    m = logits.amax(1, keepdim=True)
    empty = m == float("-inf")                                   # all slots -inf
    p = torch.exp(logits - torch.where(empty, torch.zeros_like(m), m))
    p = p / torch.where(empty, torch.ones_like(m), p.sum(1, keepdim=True))
    return (kv.float() * p).sum(1).to(kv.dtype)


if HAS_TRITON:
    @triton.jit
    def _compress_pool_kernel(kv_ptr, g_ptr, b_ptr, out_ptr, R, C,
                              s_kw, s_kr, s_gw, s_gr, s_br, s_ow,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        w = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rs = tl.arange(0, BLOCK_R)
        m2 = (rs[:, None] < R) & (cols[None, :] < C)
        g = tl.load(g_ptr + w * s_gw + rs[:, None] * s_gr + cols[None, :], mask=m2,
                    other=float("-inf")).to(tl.float32)
        b = tl.load(b_ptr + rs[:, None] * s_br + cols[None, :], mask=m2, other=0.0)
        logits = g + b.to(tl.float32)
        mx = tl.max(logits, axis=0)
        empty = mx == float("-inf")
        p = tl.exp(logits - tl.where(empty, 0.0, mx)[None, :])
        p = p / tl.where(empty, 1.0, tl.sum(p, axis=0))[None, :]
        kv = tl.load(kv_ptr + w * s_kw + rs[:, None] * s_kr + cols[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        out = tl.sum(kv * p, axis=0)
        tl.store(out_ptr + w * s_ow + cols, out.to(out_ptr.dtype.element_ty),
                 mask=cols < C)


def compress_pool(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor):
    """kv, gate [W, r, C]; position_bias [r, C] -> [W, C] (kv.dtype)."""
    W, R, C = kv.shape
    assert gate.shape == kv.shape and position_bias.shape == (R, C)
    if not triton_usable(kv):
        return compress_pool_ref(kv, gate, position_bias)
    kv, gate, bias = kv.contiguous(), gate.contiguous(), position_bias.contiguous()
    out = torch.empty(W, C, dtype=kv.dtype, device=kv.device)
    if W and C:
        BLOCK_R = next_pow2(R)
        BLOCK_C = max(16, min(next_pow2(C), 8192 // BLOCK_R))
        _compress_pool_kernel[(W, cdiv(C, BLOCK_C))](
            kv, gate, bias, out, R, C, kv.stride(0), kv.stride(1), gate.stride(0),
            gate.stride(1), bias.stride(0), out.stride(0),
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4)
    return out
