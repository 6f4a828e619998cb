"""Routed-expert MoE: sort by expert, fused grouped GEMM, clamped SwiGLU, combine.

Exactness: TOLERANCE-BOUND, same as ``quant_gemm`` (dequantization bit-exact; fp32
accumulation in another order than torch.matmul: ``|out - ref| <= 1e-5 * (|x| @ |W|^T)
+ 1e-6`` per GEMM). ``moe_ffn`` vs ``moe_ffn_ref``: rtol/atol 1e-4 on O(1) data.

Pipeline (``moe_ffn``; ``moe_ffn_ref`` is the plain-torch per-expert loop):
  tokens -> ``moe_sort`` (stable sort of the T*k assignments by expert id)
  -> gather x rows -> grouped GEMM with w1 (gate) and w3 (up)
  -> clamped SwiGLU: silu(min(gate, limit)) * clamp(up, -limit, limit)
  -> grouped GEMM with w2 (down) -> weighted combine back to token order.
The kernel path combines deterministically (scatter back to [T, k, H], weighted sum
over k in slot order) instead of ``index_add`` (atomics on CUDA); the reference uses
``index_add_``. An expert with zero tokens is simply a tile-less group.
Weights: a ``QuantWeight`` stacked [E, ...] (int4 | int8 | mxfp4 | float) or a float
tensor [E, N, K] (nn.Linear layout: w1, w3 [E, I, H]; w2 [E, H, I]).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ._common import triton_usable
from .quant_gemm import QuantWeight, grouped_qgemm, tile_map

Weight = Union[QuantWeight, torch.Tensor]


def _as_qw(w: Weight) -> QuantWeight:
    return w if isinstance(w, QuantWeight) else QuantWeight("float", w)


def moe_sort(topk_ids: torch.Tensor, n_experts: Optional[int] = None,
             return_order: bool = False):
    """topk_ids [T, k] -> (sorted_token_idx int64 [T*k], expert_offsets int32 [E+1]).

    Assignments are sorted stably by expert id, so within an expert tokens keep their
    order. ``return_order=True`` also returns ``order`` (int64 [T*k], indices into the
    flattened [T*k] assignments, e.g. for ``topk_weights.flatten()[order]``).
    ``n_experts`` defaults to max id + 1 (pass it: that costs a host sync)."""
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1).to(torch.int64)
    if n_experts is None:
        n_experts = int(flat.max().item()) + 1 if flat.numel() else 1
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=n_experts)
    offsets = torch.zeros(n_experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    sorted_token_idx = order // k
    return (sorted_token_idx, offsets, order) if return_order else (sorted_token_idx, offsets)


def moe_grouped_gemm_ref(x_sorted, expert_offsets, w: Weight) -> torch.Tensor:
    w = _as_qw(w)
    offs = expert_offsets.tolist()
    out = torch.zeros(x_sorted.shape[0], w.N, dtype=torch.float32, device=x_sorted.device)
    for e in range(len(offs) - 1):
        if offs[e + 1] > offs[e]:
            W = w.expert(e).dequantize(x_sorted.shape[1])
            out[offs[e]:offs[e + 1]] = x_sorted[offs[e]:offs[e + 1]].float() @ W.T
    return out


def moe_grouped_gemm(x_sorted: torch.Tensor, expert_offsets: torch.Tensor, w: Weight, *,
                     precision: str = "ieee", tiles=None) -> torch.Tensor:
    """x_sorted [T, K] (rows grouped by expert), expert_offsets int32 [E+1],
    w stacked [E, ...] -> float32 [T, N]. Row t uses expert e with
    offsets[e] <= t < offsets[e+1]. No host sync on the Triton path."""
    if not triton_usable(x_sorted):
        return moe_grouped_gemm_ref(x_sorted, expert_offsets, w)
    return grouped_qgemm(x_sorted, expert_offsets, _as_qw(w), precision=precision, tiles=tiles)


def swiglu_clamped(gate: torch.Tensor, up: torch.Tensor, limit: Optional[float]):
    """V4 SwiGLU: gate clamped at most ``limit``, up clamped to [-limit, limit]."""
    gate, up = gate.float(), up.float()
    if limit is not None and limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def moe_ffn_ref(x, topk_ids, topk_weights, w1: Weight, w3: Weight, w2: Weight,
                swiglu_limit: Optional[float] = 10.0) -> torch.Tensor:
    """Plain-torch routed-expert step. x [T, H]; topk_ids/topk_weights [T, k];
    returns float32 [T, H] = sum_j topk_weights[t, j] * expert_{ids[t, j]}(x[t])."""
    w1, w3, w2 = _as_qw(w1), _as_qw(w3), _as_qw(w2)
    T, H = x.shape
    tok, offs, order = moe_sort(topk_ids, w1.qweight.shape[0], return_order=True)
    xs = x.float()[tok]
    wts = topk_weights.reshape(-1).float()[order]
    g = moe_grouped_gemm_ref(xs, offs, w1)
    u = moe_grouped_gemm_ref(xs, offs, w3)
    y = moe_grouped_gemm_ref(swiglu_clamped(g, u, swiglu_limit), offs, w2)
    return torch.zeros(T, H, dtype=torch.float32, device=x.device).index_add_(
        0, tok, y * wts[:, None])


def moe_ffn(x, topk_ids, topk_weights, w1: Weight, w3: Weight, w2: Weight,
            swiglu_limit: Optional[float] = 10.0, *, precision: str = "ieee"):
    """Kernel path of ``moe_ffn_ref`` (falls back to it off-CUDA without interpreter)."""
    if not triton_usable(x):
        return moe_ffn_ref(x, topk_ids, topk_weights, w1, w3, w2, swiglu_limit)
    w1, w3, w2 = _as_qw(w1), _as_qw(w3), _as_qw(w2)
    T, k = topk_ids.shape
    tok, offs, order = moe_sort(topk_ids, w1.qweight.shape[0], return_order=True)
    xs = x[tok]
    tiles = tile_map(offs, xs.shape[0])
    g = grouped_qgemm(xs, offs, w1, precision=precision, tiles=tiles)
    u = grouped_qgemm(xs, offs, w3, precision=precision, tiles=tiles)
    y = grouped_qgemm(swiglu_clamped(g, u, swiglu_limit), offs, w2, precision=precision,
                      tiles=tiles)
    y_flat = torch.empty_like(y)
    y_flat[order] = y                                       # back to [T*k] slot order
    wts = topk_weights.float().reshape(T, k, 1)
    return (y_flat.view(T, k, -1) * wts).sum(1)
