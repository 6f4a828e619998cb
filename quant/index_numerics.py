"""The lightning indexer's release numerics (`official_numerics`): a Hadamard rotation, then FP4 e2m1 with one
power-of-two scale per block of 32 values, on the indexer's queries and keys.

Source: the DeepSeek-V4 inference code (inference/model.py and kernel.py). The Indexer rotates its queries after
RoPE (``q = rotate_activation(q)``: a Walsh-Hadamard transform scaled by ``dim ** -0.5``) and simulates FP4 on
them (``fp4_act_quant(q, 32, True)``); its Compressor (``rotate=True``) does the same to every compressed key
after RMSNorm and RoPE, before it enters the indexer's KV cache. The scores are then ``einsum(q, k)``, ReLU,
weighted by ``weights_proj(x) * softmax_scale * n_heads ** -0.5`` and summed over heads, as in the fp32 path.
``fp4_quant_kernel`` per block of 32: ``amax = max(|x|, 6 * 2**-126)``, ``s = 2**ceil(log2(amax / 6))`` (UE8M0),
``y = e2m1(clamp(x / s, -6, 6)) * s`` with the cast to e2m1 rounding to nearest, ties to even.
transformers omits both (DESIGN.md section 1): the rotation is orthogonal (q . k unchanged in exact arithmetic),
so only the rounding differs.

The release code runs these on BF16 activations; here the inputs are the fp32 values (the same convention as
flashport.quant.kv_numerics).

Integer form: e2m1 values times 2 are the integers {0, 1, 2, 3, 4, 6, 8, 12}, so a quantized vector is
``codes [.., D] int8`` (in [-12, 12]) with ``value = code * 2**(e - 1)`` for its block's exponent ``e``; the dot
product of two quantized vectors is, per block, an exact int32 sum of int8 products times a power of two. That is
what the CPU kernel computes (kernels/cpu/indexer_fp4.cpp; `index_scores` below is its torch reference).
"""

from __future__ import annotations

import torch
from torch import Tensor

FP4_BLOCK = 32             # values per UE8M0 scale (the release's fp4_block_size)
E2M1_MAX = 6.0             # largest e2m1 value
FP4_AMAX_FLOOR = 6 * 2.0 ** -126  # fp4_quant_kernel's lower bound on a block's amax
CODE_OFFSET = 12           # codes + 12 fit uint8 [0, 24]: the VNNI kernel's unsigned operand


def check_dim(d: int) -> None:
    if d < FP4_BLOCK or d % FP4_BLOCK or d & (d - 1):
        raise ValueError(f"the indexer's release numerics need a power-of-two head dim >= {FP4_BLOCK}, not {d}")


def hadamard(x: Tensor) -> Tensor:
    """x [..., d] (d a power of two) -> x @ H_d / sqrt(d): the release's `rotate_activation` (orthonormal), as
    log2(d) butterflies of adds and subtracts (fast_hadamard_transform's algorithm; elementwise ops, no matmul)."""
    *lead, d = x.shape
    check_dim(d)
    y, h = x.reshape(-1, d), 1
    while h < d:  # pairs (i, i + h) within blocks of 2h: the Sylvester matrix's order
        y = y.view(-1, d // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2)
        h *= 2
    return y.reshape(*lead, d) * d ** -0.5


def fp4_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., d] float -> (codes int8 [..., d] in [-12, 12], exponents int32 [..., d / 32]):
    the release's fp4_act_quant, value = code * 2**(exponent - 1)."""
    *lead, d = x.shape
    check_dim(d)
    b = x.float().reshape(*lead, d // FP4_BLOCK, FP4_BLOCK)
    amax = b.abs().amax(-1).clamp_min(FP4_AMAX_FLOOR) * (1.0 / E2M1_MAX)
    mant, e = torch.frexp(amax)  # amax/6 = mant * 2**e, mant in [0.5, 1): ceil(log2) = e, or e - 1 at mant 0.5
    e = (e - (mant == 0.5).to(e.dtype)).to(torch.int32)
    y = (b / torch.ldexp(torch.ones_like(amax), e)[..., None]).clamp(-E2M1_MAX, E2M1_MAX)  # exact: a power of two
    v = y.abs()
    # nearest e2m1 value, ties to even (torch.round is half-to-even; each range's grid step is a power of two)
    c = torch.where(v < 2, torch.round(v * 2), torch.where(v < 4, 2 * torch.round(v), 4 * torch.round(v * 0.5)))
    codes = (c * torch.sign(y)).to(torch.int8).reshape(*lead, d)
    return codes, e


def fp4_dequantize(codes: Tensor, exps: Tensor) -> Tensor:
    """The float32 values of fp4_quantize's output."""
    *lead, d = codes.shape
    s = torch.ldexp(torch.ones(exps.shape, device=exps.device), exps.to(torch.int32) - 1)
    return (codes.float().reshape(*lead, d // FP4_BLOCK, FP4_BLOCK) * s[..., None]).reshape(*lead, d)


def fp4_round(x: Tensor) -> Tensor:
    """x -> the release's fp4_act_quant(x, 32, inplace=True) values (float32)."""
    return fp4_dequantize(*fp4_quantize(x))


def index_scores(q_codes: Tensor, q_exps: Tensor, weights: Tensor, k_codes: Tensor, k_exps: Tensor) -> Tensor:
    """The indexer's scores in release numerics, in the exact order of operations of the CPU kernel. With
    I[t, h, n, b] the exact integer dot product of the codes of block b, qs = 2**(qe - 1), ks = 2**(ke - 1):

      one block (D = 32):  s[t, n] = ks[n] * sum over h, in order, of (weights[t, h] * qs[t, h]) * ReLU(I)
      several blocks:      d[t, h, n] = sum over b, in order, of (I * qs[t, h, b]) * ks[n, b]
                           s[t, n]    = sum over h, in order, of weights[t, h] * ReLU(d[t, h, n])

    fp32, every multiply and add rounded on its own. A product of a small integer and powers of two is exact, so
    only the sums round, the same way in both implementations; the two forms are equal wherever nothing
    underflows (scaling by a power of two commutes with rounding), the first is cheaper.

    q_codes int8 [T, H, D], q_exps int [T, H, D/32], weights fp32 [T, H] (all scaling folded in), k_codes int8
    [n, D], k_exps int [n, D/32] -> scores fp32 [T, n]. Memory: a few [T, n] at a time.
    """
    T, H, D = q_codes.shape
    nb = D // FP4_BLOCK
    qs = torch.ldexp(torch.ones(q_exps.shape, device=q_exps.device), q_exps.to(torch.int32) - 1)  # [T, H, nb]
    ks = torch.ldexp(torch.ones(k_exps.shape, device=k_exps.device), k_exps.to(torch.int32) - 1)  # [n, nb]
    kf = k_codes.float()
    s = torch.zeros(T, k_codes.shape[0], device=k_codes.device)
    if nb == 1:
        wq = weights * qs[:, :, 0]  # exact
        for h in range(H):
            s = s + wq[:, h, None] * (q_codes[:, h].float() @ kf.T).clamp_min(0)  # exact integers (|I| <= 4608)
        return s * ks[None, :, 0]
    for h in range(H):
        d = torch.zeros_like(s)
        for b in range(nb):
            blk = slice(b * FP4_BLOCK, (b + 1) * FP4_BLOCK)
            i = q_codes[:, h, blk].float() @ kf[:, blk].T
            d = d + i * qs[:, h, b, None] * ks[None, :, b]
        s = s + weights[:, h, None] * d.clamp_min(0)
    return s
