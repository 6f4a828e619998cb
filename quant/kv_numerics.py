"""The numerics of KV entries (compressed attention entries and indexer keys): how they are rounded, packed and
unpacked. The model rounds each new entry with `round_kv` (sdk/model.py, Compressor); the KV tiers and the disk
store keep the packed bytes of `pack_kv` (flashport.kv). `unpack_kv(pack_kv(x))` is by construction the value
`round_kv(x)` the model uses, so a restored entry is bit-identical to the live one.

dtypes (`KV_DTYPES`):

    release  the release's numerics. The DeepSeek-V4 inference code (inference/model.py, Compressor and
             Attention: ``act_quant(kv[..., :-rd], 64, scale_fmt, scale_dtype, True)``; kernel.py, act_quant_kernel
             with round_scale) keeps the non-RoPE dims as FP8 e4m3 in blocks of 64 values, each block with one
             power-of-two scale (UE8M0: s = 2**ceil(log2(max(amax, 1e-4) / 448))), and the trailing RoPE dims in
             BF16 (the KV tensor's dtype). Packed: `q` float8_e4m3fn [n, d - r], `e` uint8 [n, ceil((d - r) / 64)]
             (the UE8M0 exponent byte k + 127) and `rope` bfloat16 [n, r]. V4-Flash's 512-dim entry: 448 + 7 + 128
             = 583 bytes. The release keeps the indexer's keys in FP4 after a Hadamard rotation; that changes the
             indexer's own numerics (not implemented here, see DESIGN.md section 1) and the keys use this
             FP8 + BF16 layout instead.
    bf16     every dim in bfloat16 (`v` bfloat16 [n, d]).
    fp32     no rounding (`v` float32 [n, d]).

The release code quantizes BF16 activations; here the input is the fp32 entry. Dequantized values are exact in
fp32 (an e4m3 value times a power of two) and in BF16, so fp32 holds the release's values without rounding.
"""

from __future__ import annotations

import math

import numpy
import torch
from torch import Tensor

KV_DTYPES = ("release", "bf16", "fp32")
FP8_BLOCK = 64        # values per UE8M0 scale (the release's act_quant block for the KV)
FP8_MAX = 448.0       # largest finite float8 e4m3fn
AMAX_FLOOR = 1e-4     # the release's lower bound on a block's amax (an all-zero block keeps a finite scale)


def check_kv_dtype(dtype: str) -> str:
    if dtype not in KV_DTYPES:
        raise ValueError(f"KV dtype must be one of {', '.join(KV_DTYPES)}, not {dtype!r}")
    return dtype


def kv_entry_bytes(dim: int, rope_dims: int, dtype: str) -> int:
    """Bytes of one packed entry of `dim` values whose last `rope_dims` are the RoPE dims."""
    check_kv_dtype(dtype)
    if dtype == "fp32":
        return 4 * dim
    if dtype == "bf16":
        return 2 * dim
    nope = dim - rope_dims
    return nope + math.ceil(nope / FP8_BLOCK) + 2 * rope_dims


def _ue8m0_exponent(amax: Tensor) -> Tensor:
    """k = ceil(log2(max(amax, 1e-4) / 448)) exactly (frexp, no log rounding), int32."""
    x = amax.clamp_min(AMAX_FLOOR) * (1.0 / FP8_MAX)
    mant, exp = torch.frexp(x)  # x = mant * 2**exp, mant in [0.5, 1)
    return (exp - (mant == 0.5).to(exp.dtype)).to(torch.int32)


def pack_kv(x: Tensor, dtype: str, rope_dims: int) -> dict[str, Tensor]:
    """x [n, d] float32 -> the packed parts of `dtype` (see the module docstring). CPU or device tensors."""
    check_kv_dtype(dtype)
    x = x.float()
    if dtype == "fp32":
        return {"v": x.contiguous()}
    if dtype == "bf16":
        return {"v": x.to(torch.bfloat16)}
    n, d = x.shape
    nope_dims = d - rope_dims
    nb = math.ceil(nope_dims / FP8_BLOCK)
    nope = x[:, :nope_dims]
    if nb * FP8_BLOCK != nope_dims:  # a partial last block: zeros do not change its amax
        nope = torch.nn.functional.pad(nope, (0, nb * FP8_BLOCK - nope_dims))
    blocks = nope.reshape(n, nb, FP8_BLOCK)
    k = _ue8m0_exponent(blocks.abs().amax(-1))  # [n, nb]
    scale = torch.ldexp(torch.ones_like(k, dtype=torch.float32), k)[..., None]  # exact powers of two
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(n, nb * FP8_BLOCK)
    return {"q": q[:, :nope_dims].contiguous(), "e": (k + 127).to(torch.uint8),
            "rope": x[:, nope_dims:].to(torch.bfloat16)}


def unpack_kv(parts: dict[str, Tensor], dtype: str, rope_dims: int, out: Tensor | None = None) -> Tensor:
    """The packed parts of `dtype` -> float32 [n, d], written into `out` when given (a float32 [n, d] tensor, e.g.
    rows of a restored sequence's entries: no temporaries the size of the result). Raises ValueError on parts
    that do not fit together (or with `out`)."""
    check_kv_dtype(dtype)
    if dtype != "release":
        v = parts["v"]
        if v.dtype != (torch.float32 if dtype == "fp32" else torch.bfloat16):
            raise ValueError(f"KV part of dtype {v.dtype} in a {dtype} entry")
        out = _out(out, v.shape[0], v.shape[1], v.device)
        _to_float(v, out)
        return out
    q, e, rope = parts["q"], parts["e"], parts["rope"]
    n, nope_dims = q.shape
    nb = math.ceil(nope_dims / FP8_BLOCK)
    if q.dtype != torch.float8_e4m3fn or e.dtype != torch.uint8 or rope.dtype != torch.bfloat16 or \
            tuple(e.shape) != (n, nb) or rope.shape[0] != n or rope.shape[1] != rope_dims:
        raise ValueError("release KV parts do not fit together")
    out = _out(out, n, nope_dims + rope_dims, q.device)
    full = nope_dims // FP8_BLOCK  # whole blocks of 64, then a partial last one: value * its block's scale
    if q.device.type == "cpu":
        # numpy, one thread: table lookups give the exact value of each code (torch's conversions are slow on
        # CPUs), and elementwise work this size gains nothing from torch's threads (it loses under contention)
        vals = out.numpy()[:, :nope_dims]
        # the lookup into a contiguous array (numpy's fast path: several times the speed of a strided one), then
        # the scaling writes the rows of `out`
        codes = numpy.take(_FP8_VALUES.numpy(), q.contiguous().view(torch.uint8).numpy(), mode="clip")
        scale = numpy.take(_SCALES.numpy(), e.contiguous().numpy(), mode="clip")
        w = full * FP8_BLOCK
        if full:
            numpy.multiply(codes[:, :w].reshape(n, full, FP8_BLOCK), scale[:, :full, None],
                           out=vals[:, :w].reshape(n, full, FP8_BLOCK))  # a view: the rows of out are strided
        if full < nb:
            numpy.multiply(codes[:, w:], scale[:, full:], out=vals[:, w:])
    else:
        vals = out[:, :nope_dims]
        vals.copy_(q)
        scale = torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device), e.to(torch.int32) - 127)
        if full:
            vals[:, :full * FP8_BLOCK].unflatten(1, (full, FP8_BLOCK)).mul_(scale[:, :full, None])
        if full < nb:
            vals[:, full * FP8_BLOCK:].mul_(scale[:, full:])
    _to_float(rope, out[:, nope_dims:])
    return out


def _out(out: Tensor | None, n: int, d: int, device) -> Tensor:
    if out is None:
        return torch.empty(n, d, dtype=torch.float32, device=device)
    if out.dtype != torch.float32 or tuple(out.shape) != (n, d):
        raise ValueError(f"unpack into a {out.dtype} tensor of {tuple(out.shape)}, not float32 of {(n, d)}")
    return out


def _to_float(v: Tensor, out: Tensor) -> None:
    """out[...] = v (float32 or bfloat16) as float32, exactly. On the CPU a BF16 value is its 16 bits shifted into
    the high half of a float32 (what the conversion is, without its slow strided path)."""
    if v.dtype == torch.bfloat16 and v.device.type == "cpu":
        bits = out.numpy().view(numpy.uint32)
        bits[...] = v.contiguous().view(torch.int16).numpy().view(numpy.uint16)
        bits <<= 16
    elif v.device.type == "cpu" and out.device.type == "cpu":
        out.numpy()[...] = v.numpy()
    else:
        out.copy_(v)


# float32 [256]: the value of each float8_e4m3fn code, and 2 ** (k - 127) of each UE8M0 exponent byte k, as the
# conversions above compute them
_FP8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
_SCALES = torch.ldexp(torch.ones(256), torch.arange(256, dtype=torch.int32) - 127)


def round_kv(x: Tensor, dtype: str, rope_dims: int) -> Tensor:
    """x [n, d] -> the values the KV keeps in `dtype` (float32): unpack_kv(pack_kv(x)), so what the model uses
    is exactly what a restore gives back."""
    if dtype == "fp32":
        return x
    return unpack_kv(pack_kv(x, dtype, rope_dims), dtype, rope_dims)
