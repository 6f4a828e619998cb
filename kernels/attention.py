"""V4 sparse decode attention: shared-KV MQA (K = V) over selected rows, with sinks.

For each query b and head h:
    logits_j = scale * q[b, h] . kv[idx[b, j]]          (j with idx[b, j] >= 0)
    p = softmax([logits..., sinks[h]])[:-1]             (the sink joins the denominator)
    out[b, h] = sum_j p_j * kv[idx[b, j]]
Indices of -1 are skipped. If every index is -1 the output is 0 (all mass on the sink).
If additionally the sink is -inf, the output is 0 as well (no NaN).

Exactness: TOLERANCE-BOUND, rtol 1e-5 / atol 1e-5 on fp32 O(1) data. The kernel is a
flash-decoding online softmax (running max/denominator initialised from the sink, fp32
``tl.dot`` with ``input_precision="ieee"``); the reference is one softmax in torch.

``kv`` is one [S, D] pool shared by the batch: ``idx`` rows address it directly (a paged
cache's global pool, or one sequence's cache for several query positions).
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, cdiv, next_pow2, triton_usable

if HAS_TRITON:
    import triton
    import triton.language as tl


def sparse_attn_decode_ref(q, kv, idx, sinks, scale: float):
    """q [H, D] or [B, H, D]; kv [S, D]; idx [n] or [B, n]; sinks [H] -> q's shape."""
    single = q.dim() == 2
    qb = q[None] if single else q
    ib = (idx[None] if single else idx).long()
    valid = ib >= 0                                               # [B, n]
    rows = kv.float()[ib.clamp(min=0)]                            # [B, n, D]
    logits = torch.einsum("bhd,bnd->bhn", qb.float(), rows) * scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    sink = sinks.float()[None, :, None].expand(qb.shape[0], -1, 1)
    full = torch.cat([logits, sink], -1)
    m = full.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(full - m)
    den = e.sum(-1, keepdim=True)
    p = (e / torch.where(den == 0, torch.ones_like(den), den))[..., :-1]
    out = torch.einsum("bhn,bnd->bhd", p, rows).to(q.dtype)
    return out[0] if single else out


if HAS_TRITON:
    @triton.jit
    def _sparse_attn_kernel(q_ptr, kv_ptr, idx_ptr, sink_ptr, out_ptr, H, D, n, scale,
                            s_qb, s_qh, s_kv, s_ib, s_ob, s_oh,
                            BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = hs < H
        ds = tl.arange(0, BLOCK_D)
        dmask = ds < D
        q = tl.load(q_ptr + b * s_qb + hs[:, None] * s_qh + ds[None, :],
                    mask=hmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        # running max / denominator start at the sink: exp(sink - sink) = 1, acc = 0
        m_i = tl.load(sink_ptr + hs, mask=hmask, other=0.0).to(tl.float32)
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
        acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
        for j0 in range(0, n, BLOCK_N):
            js = j0 + tl.arange(0, BLOCK_N)
            ix = tl.load(idx_ptr + b * s_ib + js, mask=js < n, other=-1).to(tl.int64)
            valid = ix >= 0
            rows = tl.load(kv_ptr + tl.where(valid, ix, 0)[:, None] * s_kv + ds[None, :],
                           mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(rows), input_precision=PRECISION) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p, rows, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + b * s_ob + hs[:, None] * s_oh + ds[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])


def sparse_attn_decode(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor,
                       sinks: torch.Tensor, scale: float, *, precision: str = "ieee"):
    """q [H, D] with idx [n], or batched q [B, H, D] with idx [B, n]; kv [S, D] (K = V);
    sinks float32 [H]; returns q's shape and dtype."""
    if not triton_usable(q):
        return sparse_attn_decode_ref(q, kv, idx, sinks, scale)
    single = q.dim() == 2
    qb = (q[None] if single else q).contiguous()
    ib = (idx[None] if single else idx).contiguous()
    kv = kv.contiguous()
    B, H, D = qb.shape
    n = ib.shape[1]
    out = torch.empty_like(qb)
    BLOCK_H = 16  # the tl.dot minimum; more heads per program would spill at D=512
    BLOCK_D = max(16, next_pow2(D))
    BLOCK_N = 16 if BLOCK_D >= 512 else 32
    if B and H:
        _sparse_attn_kernel[(B, cdiv(H, BLOCK_H))](
            qb, kv, ib, sinks.contiguous(), out, H, D, n, float(scale),
            qb.stride(0), qb.stride(1), kv.stride(0), ib.stride(0),
            out.stride(0), out.stride(1),
            BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=precision,
            num_warps=8 if BLOCK_D >= 256 else 4)
    return out[0] if single else out
