"""The torch reference of every backend-contract operation: plain fp32 math, the ground truth that every fast
path and every plugin is compared with (conformance kit, tests). Readable first, fast never."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return x if weight is None else weight * x


def rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Interleaved RoPE on the trailing 2*cos.shape[-1] channels of x [T, ..., Dh]; cos/sin [T, r/2].
    Channels (2i, 2i+1) rotate together; inverse=True rotates back (V4 applies it to the attention output)."""
    r = 2 * cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    sin = -sin if inverse else sin
    nope, rot = x[..., :-r], x[..., -r:]
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat([nope, rot], dim=-1)


def compress_pool(kv: Tensor, gate: Tensor) -> Tensor:
    """Compressor pooling: softmax over the slots of each window. kv, gate [W, slots, C] -> [W, C].
    Empty slots carry gate -inf (weight 0)."""
    return (kv * gate.softmax(dim=1)).sum(dim=1)


def attention(q: Tensor, keys: Tensor, bias: Tensor, sink: Tensor, scale: float) -> Tensor:
    """Shared-KV attention (K = V) with one learnable sink logit per head.

    q [T, H, Dh], keys [S, Dh], bias [T, S] (0 visible / -inf hidden), sink [H] -> [T, H, Dh]. The sink joins
    the softmax denominator only, so a head can attend to "nothing".
    """
    logits = torch.einsum("thd,sd->ths", q, keys) * scale + bias[:, None, :]
    logits = torch.cat([logits, sink.view(1, -1, 1).expand(q.shape[0], -1, 1)], dim=-1)
    probs = (logits - logits.amax(-1, keepdim=True)).softmax(-1)[..., :-1]
    return torch.einsum("ths,sd->thd", probs, keys)


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices [..., k] of the k largest entries of each row of scores [..., n] (k <= n), in no promised order.

    The tie rule of every selection the model makes (the indexer's top-k, the router's top-k): exactly the entries
    `torch.topk(row, k)` picks on the CPU, the call transformers' DeepseekV4 reference makes. Among equal scores at
    the k-th place, which win is decided by torch's CPU kernel (a partial sort or nth_element over (value, index)
    pairs, chosen by n and k), not by index order, and it depends on the whole row; callers therefore pass the
    same row as the reference (the indexer: every compressed entry that exists when the query runs, the ones it
    cannot see yet at -inf). torch.topk on another device breaks ties its own way: there the rows with a finite
    tie at the k-th place are selected again on the CPU (exact ties are rare unless heads are few, so this is cheap).
    """
    idx = scores.topk(k, dim=-1).indices
    if scores.device.type != "cpu" and k < scores.shape[-1]:
        top = scores.topk(k + 1, dim=-1).values  # descending
        tied = (top[..., k - 1] == top[..., k]) & torch.isfinite(top[..., k - 1])
        if bool(tied.any()):
            rows = tied.nonzero(as_tuple=True)
            idx[rows] = scores[rows].cpu().topk(k, dim=-1).indices.to(idx.device)
    return idx


def indexer_topk(q: Tensor, keys: Tensor, weights: Tensor, visible: Tensor, k: int) -> Tensor:
    """Lightning indexer: score = sum_h weights[t,h] * ReLU(q[t,h] . keys[n]) / sqrt(Di); keep the top-k visible.

    q [T, Hi, Di], keys [n, Di] (every compressed entry so far), weights [T, Hi], visible [T, n] bool
    -> chosen [T, n] bool. Ties (every head's ReLU at 0, common with few heads) are broken by `topk_indices` over
    the row of all n entries, invisible ones at -inf: as transformers' reference does, so a query's choice among
    tied entries can depend on how many entries exist when it runs (its prefill chunk), there as here.
    """
    scores = F.relu(torch.einsum("thd,nd->thn", q, keys)) * q.shape[-1] ** -0.5
    scores = (scores * weights[..., None]).sum(1).masked_fill(~visible, float("-inf"))  # [T, n]
    top = topk_indices(scores, min(k, keys.shape[0]))
    return torch.zeros_like(visible).scatter_(1, top, True) & visible


def sinkhorn(comb: Tensor, iters: int, eps: float) -> Tensor:
    """Project a positive [.., N, N] matrix towards doubly stochastic (columns first, then alternate)."""
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def hc_pre(streams: Tensor, fn: Tensor, base: Tensor, scale: Tensor, iters: int, eps: float,
           norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """mHC before a sub-block: streams [T, N, D] -> (block input [T, D], post [T, N], comb [T, N, N])."""
    n = streams.shape[1]
    mix = rms_norm(streams.flatten(1), None, norm_eps) @ fn.T  # [T, (2+N)*N]
    pre = torch.sigmoid(mix[:, :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mix[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = torch.softmax(mix[:, 2 * n:].view(-1, n, n) * scale[2] + base[2 * n:].view(n, n), dim=-1) + eps
    comb = sinkhorn(comb, iters, eps)
    return (pre[..., None] * streams).sum(1), post, comb


def hc_post(out: Tensor, streams: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """mHC after a sub-block: the output spread over the streams by post, plus the old streams mixed by comb
    (summed over comb's FIRST index: it is doubly stochastic but not symmetric)."""
    return post[..., None] * out[:, None, :] + torch.einsum("tjk,tjd->tkd", comb, streams)


def hc_head(streams: Tensor, fn: Tensor, base: Tensor, scale: Tensor, eps: float, norm_eps: float) -> Tensor:
    """Final collapse of the N streams: [T, N, D] -> [T, D]."""
    mix = rms_norm(streams.flatten(1), None, norm_eps) @ fn.T  # [T, N]
    pre = torch.sigmoid(mix * scale + base) + eps
    return (pre[..., None] * streams).sum(1)


def linear(x: Tensor, w: Tensor) -> Tensor:
    """x [T, K] @ w[N, K].T (w dequantized to fp32)."""
    return x @ w.T


def grouped_linear(x: Tensor, w: Tensor) -> Tensor:
    """Block-diagonal projection: x [T, G, I], w [G*R, I] (group g owns rows g*R..) -> [T, G, R]."""
    g = x.shape[1]
    return torch.einsum("tgi,gri->tgr", x, w.view(g, -1, w.shape[-1]))


def swiglu(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, limit: float) -> Tensor:
    """V4's clamped SwiGLU: gate clamped above at limit, up clamped to [-limit, limit]."""
    gate = (x @ w1.T).clamp(max=limit)
    up = (x @ w3.T).clamp(-limit, limit)
    return (F.silu(gate) * up) @ w2.T


def moe(x: Tensor, weights: Tensor, idx: Tensor, experts, limit: float) -> Tensor:
    """Routed-expert step: x [T, D], weights/idx [T, k], experts[e] = (w1, w3, w2) fp32 -> [T, D].
    Tokens are grouped by expert: each expert runs once over all of its tokens."""
    out = torch.zeros_like(x)
    for e in idx.unique().tolist():
        rows, slot = (idx == e).nonzero(as_tuple=True)
        w1, w3, w2 = experts[e]
        out.index_add_(0, rows, swiglu(x[rows], w1, w3, w2, limit) * weights[rows, slot, None])
    return out
