"""The lightning indexer's selection in the release's FP4 numerics (flashport.quant.index_numerics).

`Fp4Keys` keeps a sequence's indexer keys as FP4 codes in the layout of the CPU kernel (kernels/cpu/
indexer_fp4.cpp), append-only, in preallocated capacity grown geometrically. `select` scores a chunk's queries
against them and keeps each query's top-k: one C++ call on the CPU (scores in bounded tiles, never [T, H, n] nor
[T, n]), the torch reference elsewhere (`index_scores`, then `reference.topk_indices`).

Exactness: the C++ scores are bit-identical to `index_scores` (integer dot products, then the same fp32 operations
in the same order), so both paths pick the same entries. Ties: a query whose k-th and (k+1)-th best scores are
equal is re-selected from its full row of scores with `reference.topk_indices`, the model's tie rule (what
torch.topk picks on the CPU over the row of every entry, the ones the query cannot see at -inf).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quant.index_numerics import CODE_OFFSET, FP4_BLOCK, fp4_quantize, hadamard, index_scores
from . import cpu_quant, reference

GROUP = 16  # entries per interleaved group (indexer_fp4.cpp)
ALIGN = 2 * GROUP  # capacity granule: the D = 32 kernel reads groups in pairs


class Fp4Keys:
    """Append-only FP4 keys [n, D]: codes + 12 as uint8 [G, D/4, 16, 4] and scales 2**(e-1) fp32 [G, D/32, 16]
    (G groups of 16 entries), the kernel's layout. `n` rows are filled; capacity (a multiple of 32 entries) grows
    by doubling."""

    def __init__(self, dim: int, capacity: int = 256, device=None):
        self.dim, self.n = dim, 0
        self._alloc(max(ALIGN, -(-capacity // ALIGN) * ALIGN), device)

    def _alloc(self, cap: int, device=None):
        g, d = cap // GROUP, self.dim
        codes = torch.full((g, d // 4, GROUP, 4), CODE_OFFSET, dtype=torch.uint8, device=device)
        scales = torch.ones(g, d // FP4_BLOCK, GROUP, device=device)
        if self.n:
            old = (self.n + GROUP - 1) // GROUP
            codes[:old], scales[:old] = self.codes[:old], self.scales[:old]
        self.codes, self.scales, self.capacity = codes, scales, cap

    def clone(self) -> "Fp4Keys":
        """An independent copy (same rows and capacity)."""
        new = Fp4Keys.__new__(Fp4Keys)
        new.dim, new.n, new.capacity = self.dim, self.n, self.capacity
        new.codes, new.scales = self.codes.clone(), self.scales.clone()
        return new

    def append(self, codes: Tensor, exps: Tensor) -> None:
        """codes int8 [w, D], exps int [w, D/32] (index_numerics.fp4_quantize) for the next w entries."""
        w = codes.shape[0]
        if self.n + w > self.capacity:
            self._alloc(max(2 * self.capacity, -(-(self.n + w) // ALIGN) * ALIGN), self.codes.device)
        e = torch.arange(self.n, self.n + w, device=self.codes.device)
        g, lane = e // GROUP, e % GROUP
        c = (codes.to(torch.int16) + CODE_OFFSET).to(torch.uint8).view(w, self.dim // 4, 4)
        self.codes[g, :, lane] = c
        self.scales[g, :, lane] = torch.ldexp(torch.ones(exps.shape, device=exps.device), exps.to(torch.int32) - 1)
        self.n += w

    def rows(self, n: int | None = None) -> tuple[Tensor, Tensor]:
        """(codes int8 [n, D], exponents int32 [n, D/32]) in plain layout (the torch path and tests)."""
        n = self.n if n is None else n
        c = self.codes.permute(0, 2, 1, 3).reshape(-1, self.dim)[:n].to(torch.int16) - CODE_OFFSET
        s = self.scales.permute(0, 2, 1).reshape(-1, self.dim // FP4_BLOCK)[:n]
        return c.to(torch.int8), torch.frexp(s)[1].to(torch.int32)  # s = 2**(e-1) = 0.5 * 2**e


def _mod(*tensors: Tensor):
    return cpu_quant.ext() if all(t.is_cpu for t in tensors) else None


def rotate_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., D] fp32 -> fp4_quantize(hadamard(x)): (codes int8 [..., D], exponents int32 [..., D/32]); one C++
    call on the CPU, bit-identical to the torch ops."""
    mod = _mod(x)
    if mod is None or x.dtype != torch.float32:
        return fp4_quantize(hadamard(x))
    *lead, d = x.shape
    codes, exps = mod.fp4_rotate_quantize(x.reshape(-1, d).contiguous())
    return codes.view(*lead, d), exps.view(*lead, d // FP4_BLOCK)


def scores(q_codes: Tensor, q_exps: Tensor, weights: Tensor, keys: Fp4Keys, n: int) -> Tensor:
    """Scores [T, n] fp32 of every query against entries 0..n-1 (index_numerics.index_scores; the C++ kernel on
    the CPU, bit-identical). For tests and tied rows: the selection itself never builds them."""
    mod = _mod(q_codes, keys.codes)
    if mod is not None:
        qs = torch.ldexp(torch.ones(q_exps.shape), q_exps.to(torch.int32) - 1)
        return mod.indexer_fp4_scores(q_codes.contiguous(), qs, weights.float().contiguous(), keys.codes,
                                      keys.scales, n)
    kc, ke = keys.rows(n)
    return index_scores(q_codes, q_exps, weights.float(), kc, ke)


def select(q_codes: Tensor, q_exps: Tensor, weights: Tensor, keys: Fp4Keys, limits: Tensor, n: int,
           k: int) -> Tensor:
    """Each query's top-k entries -> idx int64 [T, k], -1 where a query sees fewer than k entries.

    q_codes int8 [T, H, D], q_exps int [T, H, D/32] (fp4_quantize of the rotated queries), weights fp32 [T, H]
    (weights_proj * H**-0.5 * D**-0.5), keys: the n entries that exist when the chunk runs, limits int64 [T]:
    query t sees entries 0..limits[t]-1. The result is the reference rule's set: `reference.topk_indices` over
    the row of all n entries, invisible ones at -inf (see the module docstring for ties)."""
    T = q_codes.shape[0]
    k = min(k, n)
    mod = _mod(q_codes, keys.codes)
    if mod is not None:
        qs = torch.ldexp(torch.ones(q_exps.shape), q_exps.to(torch.int32) - 1)
        idx, tied = mod.indexer_fp4_topk(q_codes.contiguous(), qs, weights.float().contiguous(), keys.codes,
                                         keys.scales, limits.contiguous(), k)
        rows = tied.nonzero().squeeze(1).tolist()
    else:
        idx, rows = torch.full((T, k), -1, dtype=torch.long, device=q_codes.device), list(range(T))
    for t in rows:  # the reference rule over the full row: rare with the kernel (exact ties at the k-th place)
        lim = int(limits[t])
        if lim <= k:
            idx[t] = torch.where(torch.arange(k, device=idx.device) < lim, torch.arange(k, device=idx.device), -1)
            continue
        row = scores(q_codes[t:t + 1], q_exps[t:t + 1], weights[t:t + 1], keys, n)  # [1, n]
        row[:, lim:] = float("-inf")
        top = reference.topk_indices(row, k)[0]
        idx[t] = torch.where(top < lim, top, -1)
    return idx
