"""Fast CPU implementations of the contract ops: same signatures and semantics as backends/reference.py.

Decode on the CPU spends its time in two places (docs/performance.md): the per-op cost of eager torch on tiny
tensors (mHC's 20 Sinkhorn iterations on a [T, 4, 4] matrix are ~120 ops per call, twice per layer), and the
bytes of weights read. The ops here remove the first: each is one call into the C++ kernels of cpu_quant (or a
few large torch ops), and the weight ops run on cpu_quant's compact weights (bf16-exact / int8 / int4).

Exactness against the reference, per op (tested in tests/test_torch_fast.py):
  rope           BIT-EXACT (same elementwise fp32 ops, no FMA contraction)
  compress_pool  the reference itself (rarely called in decode)
  rms_norm, hc_pre, hc_post, hc_head, attention (C++: per row for T <= 8, online softmax over key tiles above),
                 linear, grouped_linear, moe
                 TOLERANCE-BOUND: fp32 with another summation order (and libm's exp); 1e-5 relative
  indexer_topk   the scores are tolerance-bound, so an entry within ~1e-6 of the k-th score may be chosen
                 differently; exact ties follow the reference's rule (reference.topk_indices); with
                 n <= k (all visible entries chosen) it is exact
The fused sequences (contract.FUSED: hc_pre_norm, hc_post_pre_norm, attn_project, attn_output, gated_moe,
compress_project) are BIT-IDENTICAL to the ops above run one by one (one C++ call running the same kernels; the
router gives model.Gate's weights and picks bit for bit; tested with torch.equal), so tolerance-bound against the
reference exactly as those ops are; each returns None (the model then runs the ops one by one) off the fast path.
Off the CPU (cuda, npu...) or without the C++ extension every op runs a torch path (the reference, or the
vectorised torch code below), so the backend works everywhere.

Use: `FastTorchBackend()` (a TorchBackend whose ops come from here), or take the functions one by one.
"""

from __future__ import annotations

import os
import time
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_quant, reference
from .contract import FUSED, OPS, QuantWeight
from .torch_backend import TorchBackend


def _fast(*tensors: Tensor):
    """The C++ module when every tensor is fp32 on the CPU and the extension built, else None."""
    for t in tensors:  # a plain loop: this runs ~200 times per decode step
        if t.dtype != torch.float32 or not t.is_cpu:
            return None
    return cpu_quant.ext()


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    mod = _fast(x) if weight is None else _fast(x, weight)
    return mod.rms_norm(x, weight, eps) if mod else reference.rms_norm(x, weight, eps)


def rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    mod = _fast(x, cos, sin)
    return mod.rope(x, cos, sin, inverse) if mod else reference.rope(x, cos, sin, inverse)


compress_pool = reference.compress_pool


def hc_head(streams: Tensor, fn: Tensor, base: Tensor, scale: Tensor, eps: float, norm_eps: float) -> Tensor:
    """One C++ call per chunk (the final collapse of the streams; tolerance-bound)."""
    mod = _fast(streams, fn, base, scale)
    return mod.hc_head(streams, fn, base, scale, eps, norm_eps) if mod else reference.hc_head(
        streams, fn, base, scale, eps, norm_eps)


PREFILL_BLOCK = 64  # query rows per block of the prefill attention


def attention(q: Tensor, keys: Tensor, bias: Tensor, sink: Tensor, scale: float) -> Tensor:
    """Decode (T <= GEMV_MAX_ROWS): one C++ call (the reference's math per query row and head, no tensor but the
    output allocated; tolerance-bound; one row with bias 0, every decode step of V4: `decode_attention`, split-K
    online softmax over segments of 1024 keys, 4 heads per read of a key tile, the same bits at any thread
    count, 1e-5 relative), or without it one fused SDPA call where the sink is an extra key of zeros
    (it adds nothing to the output) whose logit is the head's sink (through the mask).

    Prefill: one C++ call with an online softmax over tiles of keys (`flash_attention` in
    kernels/cpu/fused_ops.cpp: no [T, S] logits, tiles hidden from a block of queries skipped; tolerance-bound,
    1e-5 relative); without it the reference's math per block of PREFILL_BLOCK queries over only the keys that
    block can see (a column whose bias is -inf for every query of the block contributes exactly 0): V4's masks are
    sparse (a sliding window of W raw keys, the top-k of the compressed entries), so a block reads ~W + k keys."""
    T, H, Dh = q.shape
    mod = _fast(q, keys, bias, sink)
    if T > cpu_quant.GEMV_MAX_ROWS and mod is not None:
        return mod.flash_attention(q, keys, bias, sink, scale)
    if T > cpu_quant.GEMV_MAX_ROWS:  # torch's CPU SDPA with a float mask was measured 4x slower here
        seen = bias > float("-inf")  # [T, S]
        out = []
        for r0 in range(0, T, PREFILL_BLOCK):
            rows = slice(r0, r0 + PREFILL_BLOCK)
            cols = seen[rows].any(0).nonzero()[:, 0]  # [S'] the keys some query of the block sees
            out.append(reference.attention(q[rows], keys[cols], bias[rows, cols], sink, scale))
        return torch.cat(out)
    if mod is not None and T == 1 and not bias.any():  # one row that sees every key (HCA, gathered top-k)
        return mod.decode_attention(q, keys, sink, scale, _split_threads() > 1)
    if mod is not None:
        return mod.attention(q, keys, bias, sink, scale, _split_threads() > 1)
    return sdpa_attention(q, keys, bias, sink, scale)


def sdpa_attention(q: Tensor, keys: Tensor, bias: Tensor, sink: Tensor, scale: float) -> Tensor:
    """The reference's attention as one torch SDPA call (the decode path without the C++ kernels;
    tolerance-bound): q [T, H, Dh], keys [S, Dh], bias [T, S], sink [H] -> [T, H, Dh]."""
    T, H, Dh = q.shape
    keys_ext = torch.cat([keys, keys.new_zeros(1, Dh)])  # [S+1, Dh]
    mask = torch.cat([bias[None].expand(H, -1, -1), sink.view(H, 1, 1).expand(-1, T, 1)], dim=-1)  # [H, T, S+1]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys_ext[None, None], keys_ext[None, None],
                                         attn_mask=mask[None], scale=scale, enable_gqa=True)  # [1, H, T, Dh]
    return out[0].transpose(0, 1)


SCORE_ELEMENTS = 1 << 22  # the indexer's [rows, Hi, n] head scores are built at most this many at a time


def indexer_topk(q: Tensor, keys: Tensor, weights: Tensor, visible: Tensor, k: int) -> Tensor:
    """The scores as one matmul [T*Hi, Di] x [Di, n] plus one bmm for the head weights (instead of the reference's
    einsum), or for T <= GEMV_MAX_ROWS (decode) one C++ call (`indexer_scores`: per entry, no [T, Hi, n] tensor);
    the selection with the reference's tie rule (reference.topk_indices over the same [T, n] rows)."""
    T, Hi, Di = q.shape
    n = keys.shape[0]
    if n <= k:  # everything visible is chosen: no scoring needed
        return visible.clone()
    mod = _fast(q, keys, weights) if T <= cpu_quant.GEMV_MAX_ROWS else None
    if mod is not None:  # decode: one C++ call for the scores, then the same selection
        scores = mod.indexer_scores(q, keys, weights * Di ** -0.5).masked_fill_(~visible, float("-inf"))
        return torch.zeros_like(visible).scatter_(1, reference.topk_indices(scores, k), True) & visible
    w = (weights * Di ** -0.5)[:, None, :]  # [T, 1, Hi]
    step = max(1, SCORE_ELEMENTS // (Hi * n))  # rows per block: a long prefill chunk would need GBs at once
    # in-place ReLU on the fresh matmul output: an out-of-place one costs ~5x the matmul at n = 32K (a second
    # multi-MB buffer, page-faulted in on every call)
    scores = torch.cat([torch.bmm(w[r:r + step], (q[r:r + step].reshape(-1, Di) @ keys.T).relu_().view(-1, Hi, n))
                        for r in range(0, T, step)])[:, 0]  # [T, n]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.zeros_like(visible).scatter_(1, reference.topk_indices(scores, k), True) & visible


def hc_pre(streams: Tensor, fn: Tensor, base: Tensor, scale: Tensor, iters: int, eps: float,
           norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """One C++ call: the mixes, then sigmoid / softmax / Sinkhorn / the stream mix per token in registers."""
    mod = _fast(streams, fn, base, scale)
    if mod is None:
        return reference.hc_pre(streams, fn, base, scale, iters, eps, norm_eps)
    x, post, comb = mod.hc_pre(streams, fn, base, scale, iters, eps, norm_eps)
    return x, post, comb


def hc_post(out: Tensor, streams: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    mod = _fast(out, streams, post, comb)
    return mod.hc_post(out, streams, post, comb) if mod else reference.hc_post(out, streams, post, comb)


SPLIT_MIN = 1 << 16  # multiply-adds of a decode GEMV from which it is split over the threads (a region: ~2 us)


def linear(x: Tensor, w) -> Tensor:
    """cpu_quant.linear; on more than one thread a decode GEMV of SPLIT_MIN multiply-adds or more runs split by
    rows (`_parts`) in one parallel region: the same kernel per row, the same bits (cpu_quant.linear threads only
    weights above its PARALLEL_MIN, 16x larger)."""
    if not isinstance(w, cpu_quant.CpuWeight):
        return reference.linear(x, w)
    if x.shape[0] <= cpu_quant.GEMV_MAX_ROWS and w.shape[0] * w.shape[1] >= SPLIT_MIN and w.native is not None:
        parts = _fast(x) and _parts(w)
        if parts and len(parts) > 1:
            return cpu_quant.ext().linear_parts(x, parts)
    return cpu_quant.linear(x, w)


def grouped_linear(x: Tensor, w) -> Tensor:
    return cpu_quant.grouped_linear(x, w) if isinstance(w, cpu_quant.CpuWeight) else reference.grouped_linear(x, w)


def moe(x: Tensor, weights: Tensor, idx: Tensor, experts, limit: float) -> Tensor:
    if idx.numel() and isinstance(experts[int(idx[0, 0])][0], cpu_quant.CpuWeight):
        return cpu_quant.moe(x, weights, idx, experts, limit)
    return reference.moe(x, weights, idx, experts, limit)


# -- fused sequences (contract.FUSED): one C++ call, or None when a tensor or weight is not on the fast path ---------
def _natives(*weights):
    """The C++ views of uploaded weights, or None when one is not a CpuWeight with its C++ view."""
    out = []
    for w in weights:
        if not isinstance(w, cpu_quant.CpuWeight) or w.native is None:
            return None
        out.append(w.native)
    return out


def hc_pre_norm(streams, fn, base, scale, iters, eps, norm_eps, weight, weight_eps):
    """hc_pre, then rms_norm(x, weight, weight_eps): (x, post, comb)."""
    mod = _fast(streams, fn, base, scale, weight)
    return mod and tuple(mod.hc_pre_norm(streams, fn, base, scale, iters, eps, norm_eps, weight, weight_eps))


def hc_post_pre_norm(out, streams, post, comb, fn, base, scale, iters, eps, norm_eps, weight, weight_eps):
    """hc_post, then hc_pre_norm of the new streams: (streams, x, post, comb)."""
    mod = _fast(out, streams, post, comb, fn, base, scale, weight)
    return mod and tuple(mod.hc_post_pre_norm(out, streams, post, comb, fn, base, scale, iters, eps, norm_eps, weight,
                                              weight_eps))


# Decode GEMVs split over the threads (the fused sequences, linear, the attention's heads): True / False always /
# never; None: while the machine is not oversubscribed (1-minute load average <= cores + 1, our own threads included,
# checked at most once a second). On an oversubscribed machine every parallel region waits for a descheduled thread: a
# flash-mini step at 2 threads measured 40-250 ms split and 28-42 ms not split at load 6, ~4 ms on a quiet one.
DECODE_SPLIT: bool | None = None
_LOAD = [float("-inf"), True]  # [when last checked (time.monotonic), whether the machine had room]


def _split_threads() -> int:
    """The threads decode GEMVs are split over now: torch's thread count, or 1 (see DECODE_SPLIT)."""
    n = torch.get_num_threads()
    if n == 1 or DECODE_SPLIT is False:
        return 1
    if DECODE_SPLIT is None:
        now = time.monotonic()
        if now - _LOAD[0] > 1.0:
            _LOAD[0], _LOAD[1] = now, os.getloadavg()[0] <= (os.cpu_count() or 1) + 1
        if not _LOAD[1]:
            return 1
    return n


_PARTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # CpuWeight -> {(parts, rows): its C++ parts}


def _parts(w, rows: int = 0) -> list:
    """The uploaded weight w as row ranges for the threads of a fused sequence (C++ `weight_parts`: views, built
    once per weight and thread count); [] when decode runs on one thread (`_split_threads`), where the sequence runs
    its GEMVs one by one as before. rows > 0: ranges of that many rows (a grouped projection's groups)."""
    n = _split_threads()
    if n == 1:
        return []
    cache = _PARTS.get(w)
    if cache is None:
        cache = _PARTS[w] = {}
    key = (n, rows)
    parts = cache.get(key)
    if parts is None:
        parts = cache[key] = cpu_quant.ext().weight_parts(w.native, n, rows)
    return parts


def attn_project(x, wq_a, q_norm, wq_b, wkv, kv_norm, cos, sin, heads, eps):
    """(qr, q, kv) = (q_norm(wq_a x), rope(rms_norm(wq_b qr as [T, H, Dh])), rope(kv_norm(wkv x))). On more than one
    thread, wq_a and wkv run split by rows in one parallel region and wq_b in a second (the same rows, the same
    kernels: the same bits as one thread)."""
    mod, w = _fast(x, q_norm, kv_norm, cos, sin), _natives(wq_a, wq_b, wkv)
    return mod and w and tuple(mod.attn_project(x, w[0], q_norm, w[1], w[2], kv_norm, cos, sin, heads, eps,
                                                _parts(wq_a), _parts(wq_b), _parts(wkv)))


def attn_output(q, keys, sink, scale, cos, sin, wo_a, groups, wo_b):
    """Decode (T <= GEMV_MAX_ROWS, every key visible): wo_b(wo_a(rope^-1(attention(q, keys, 0, sink)))). On more
    than one thread, wo_a's groups run in one parallel region and wo_b split by rows in a second (same bits)."""
    mod, w = _fast(q, keys, sink, cos, sin), _natives(wo_a, wo_b)
    if q.shape[0] > cpu_quant.GEMV_MAX_ROWS:
        return None
    return mod and w and mod.attn_output(q, keys, sink, scale, cos, sin, w[0], groups, w[1],
                                         _parts(wo_a, wo_a.shape[0] // groups), _parts(wo_b))


def compress_project(x, kv, gate, wkv, wgate):
    """(cat([kv, linear(x, wkv)]), cat([gate, linear(x, wgate)])): x [T, D], kv / gate [b, C] (the compressor's
    buffered rows) -> [b + T, C] each; the GEMVs write into the new rows (no cat), both in one parallel region."""
    mod, w = _fast(x, kv, gate), _natives(wkv, wgate)
    return mod and w and tuple(mod.compress_project(x, kv, gate, w[0], w[1], _split_threads() > 1))


def _expert_set(mod, view):
    """The C++ ExpertSet of an experts view (dispatch._ExpertHandles), built once and kept in view.cache (every
    expert uploaded); None when an expert is not in the C++ layout."""
    es = view.cache.get("cpu_quant")
    if es is None:
        hs = [view[e] for e in range(len(view))]
        natives = [_natives(*h) for h in hs]
        if any(n is None for n in natives):
            return None
        es = view.cache["cpu_quant"] = mod.ExpertSet(*([n[j] for n in natives] for j in range(3)))
    return es


def gated_moe(x, token_ids, gate_w, tid2eid, bias, k, route_scale, experts, shared, limit):
    """model.MoE in one call: the router (the top-k of scores + bias, or tid2eid[token_ids] on hash layers: exactly
    one of tid2eid / bias is given), the routed experts and the shared expert (weight 1), summed, the experts'
    GEMVs in two parallel regions over `_split_threads()` threads (the same bits on any). experts / shared:
    dispatch's expert views."""
    mod = _fast(x, gate_w) if bias is None else _fast(x, gate_w, bias)
    if mod is None:
        return None
    routed, sh = _expert_set(mod, experts), _expert_set(mod, shared)
    if routed is None or sh is None:
        return None
    idx = None if tid2eid is None else tid2eid[token_ids]
    return mod.gated_moe(x, gate_w, bias, idx, k, float(route_scale), routed, sh, float(limit), _split_threads())


class FastTorchBackend(TorchBackend):
    """TorchBackend with the ops of this module; on the CPU, weights are uploaded into cpu_quant's compact
    layout. Deterministic mode is TorchBackend's own (batch-invariant ops, dense fp32 weights).
    prefill_matmul: "fp32" (default: tolerance 1e-5) or "bf16" (opt-in, ~1e-3 relative) for the GEMMs of more than
    cpu_quant.GEMV_MAX_ROWS rows (cpu_quant's module docstring); `--backend-option prefill_matmul=bf16`.
    decode_activations: "fp32" (default: the exact-weight fp32 GEMV, tolerance 1e-5) or "int8" (opt-in: the decode
    GEMVs of int8 / int4 / MXFP4 weights, the fused MoE's included, quantize their activations to int8 per block of 32 and
    run VNNI dot products; ~5e-3 relative per linear, bound in cpu_quant's module docstring);
    `--backend-option decode_activations=int8`."""

    def __init__(self, device: str = "cpu", deterministic: bool = False, prefill_matmul: str = "fp32",
                 decode_activations: str = "fp32"):
        if prefill_matmul not in cpu_quant.PREFILL_MATMULS:
            raise ValueError(f"prefill_matmul must be one of {', '.join(cpu_quant.PREFILL_MATMULS)}, "
                             f"got {prefill_matmul!r}")
        if decode_activations not in cpu_quant.DECODE_ACTIVATIONS:
            raise ValueError(f"decode_activations must be one of {', '.join(cpu_quant.DECODE_ACTIVATIONS)}, "
                             f"got {decode_activations!r}")
        self.prefill_matmul, self.decode_activations = prefill_matmul, decode_activations
        super().__init__(device, deterministic)
        # deterministic: TorchBackend.__init__ has set its batch-invariant ops on the instance; they win over ours
        if not deterministic and self.torch_device.type == "cpu":
            cpu_quant.ext()  # build (or load the cached) kernels now, not inside the first forward
        else:  # the fused sequences would bypass the batch-invariant ops (or the device's own)
            for name in FUSED:
                setattr(self, name, None)

    def upload(self, w: QuantWeight):
        if self.torch_device.type == "cpu" and not self.deterministic:
            return cpu_quant.upload(w, self.prefill_matmul, self.decode_activations)
        return super().upload(w)


for _op in (*OPS, *FUSED):
    setattr(FastTorchBackend, _op, staticmethod(globals()[_op]))
