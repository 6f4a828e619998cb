"""The DeepSeek-V4 release weight formats: FP8 e4m3 with 128x128 block scales, and MXFP4.

Release layout (DESIGN.md section 2):
  * non-expert linears: ``weight`` float8_e4m3fn [N, K] plus ``scale`` [ceil(N/128), ceil(K/128)],
    either float32 or UE8M0 (``float8_e8m0fnu``, power-of-two exponent bytes, 2**(b-127)).
  * routed experts (``expert_dtype: "fp4"``): ``weight`` int8 [N, K/2] holding two e2m1 nibbles per
    byte along K (LOW nibble = even k, HIGH nibble = odd k, as transformers' ``Fp8Dequantize``
    reads it) plus ``scale`` float8_e8m0fnu [N, K/32], one per 1x32 block.

Exactness (``dequantize(quantize(w))`` is always *lossy* w.r.t. the fp32 input; these are
statements about the dequantize direction and about re-quantization):
  * ``dequantize_mxfp4`` is bit-exact in fp32 and also in bf16: e2m1 values are multiples of 0.5
    with 2 significant bits, scales are powers of two >= 2**-127, so every product is a float32
    *and* a bfloat16 number (bf16 keeps fp32's exponent range, subnormals down to 2**-133).
  * ``dequantize_fp8_block`` with UE8M0 scales is bit-exact in fp32 (e4m3 has 4 significant bits,
    multiples of 2**-9, times 2**e stays >= 2**-136 > 2**-149) and in bf16 whenever the scale is
    >= 2**-124 (always the case for real weights; smaller scales may flush to bf16 subnormals/0).
  * With float32 scales the product q*scale is rounded once to fp32 (and again to bf16 if cast).
  * Re-quantizing a dequantized MXFP4 or UE8M0-FP8 tensor reproduces the same bytes and scales.

NaN/Inf inputs raise ValueError naming the tensor. fp32 extremes are handled: tiny blocks get the
smallest scale (values below the grid flush to zero), huge blocks get scales up to 2**127.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
MXFP4_BLOCK = 32
FP8_BLOCK = 128  # the release's FP8 scale block: 128 x 128 weights
F32_MAX = torch.finfo(torch.float32).max
E8M0 = torch.float8_e8m0fnu
# Thresholds between consecutive e2m1 magnitudes 0,.5,1,1.5,2,3,4,6 (midpoints). A tie goes to the
# even code (even mantissa bit): midpoint i (between codes i and i+1) rounds down when i is even.
_E2M1_MID = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def check_finite(t: Tensor, name: str) -> None:
    """Raise ValueError naming the tensor if it holds NaN or +-Inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: {bad} non-finite value(s) (NaN/Inf) in tensor of shape {tuple(t.shape)}")


# ---------------------------------------------------------------- UE8M0 (power-of-two scales)
def e8m0_to_float(t: Tensor) -> Tensor:
    """UE8M0 scales -> float32. Accepts float8_e8m0fnu or uint8 exponent bytes (2**(b-127)). Exact;
    byte 0xFF (NaN in e8m0) maps to NaN."""
    b = t.view(torch.uint8) if t.dtype == E8M0 else t
    if b.dtype != torch.uint8:
        raise TypeError(f"expected float8_e8m0fnu or uint8 scales, got {t.dtype}")
    out = torch.ldexp(torch.ones_like(b, dtype=torch.float32), b.to(torch.int32) - 127)
    return torch.where(b == 255, torch.nan, out)


def _e8m0_exponent(x: Tensor) -> Tensor:
    """Smallest e with 2**e >= x (x > 0, float64 exact via frexp); int32."""
    m, e = torch.frexp(x.double())
    return torch.where(m == 0.5, e - 1, e).to(torch.int32)


def float_to_e8m0(t: Tensor) -> Tensor:
    """Float -> float8_e8m0fnu. Exact for powers of two in [2**-127, 2**127]; other values round UP
    to the next power of two; <= 2**-127 (incl. 0) saturates to 2**-127, > 2**127 to 2**127."""
    check_finite(t, "e8m0 input")
    e = torch.where(t > 0, _e8m0_exponent(t.abs().clamp_min(1e-300)), -127).clamp(-127, 127)
    return (e + 127).to(torch.uint8).view(E8M0)


def scale_to_float(scale: Tensor) -> Tensor:
    """Block scales -> float32: UE8M0 (float8_e8m0fnu or uint8 exponent bytes) exactly, other floats cast."""
    return e8m0_to_float(scale) if scale.dtype in (E8M0, torch.uint8) else scale.float()


def _pow2_scale(amax: Tensor, qmax: float) -> Tensor:
    """int32 exponent e, smallest power of two with amax / 2**e <= qmax, clamped to [-127, 127]."""
    e = _e8m0_exponent(amax.double() / qmax)
    return torch.where(amax > 0, e, -127).clamp(-127, 127)


def round_up_scale(amax: Tensor, qmax: float) -> Tensor:
    """fp32 scale ~ amax/qmax rounded so that amax / scale <= qmax holds (no clipping); 0 where amax == 0."""
    s = (amax.double() / qmax).float()
    low = s.double() * qmax < amax.double()
    return torch.where(low, torch.nextafter(s, torch.full_like(s, math.inf)), s)


# ---------------------------------------------------------------- FP8 e4m3, 128x128 blocks
def _expand_blocks(s: Tensor, shape: torch.Size, block: tuple[int, int]) -> Tensor:
    """Broadcast a [..., nb_n, nb_k] block grid to [..., N, K] (last blocks may be partial)."""
    bn, bk = block
    s = s.repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)
    return s[..., : shape[-2], : shape[-1]]


def _block_amax(w: Tensor, block: tuple[int, int]) -> Tensor:
    bn, bk = block
    *lead, N, K = w.shape
    nb_n, nb_k = -(-N // bn), -(-K // bk)
    a = torch.nn.functional.pad(w.abs(), (0, nb_k * bk - K, 0, nb_n * bn - N))
    return a.reshape(*lead, nb_n, bn, nb_k, bk).amax(dim=(-3, -1))


def quantize_fp8_block(w: Tensor, block=(FP8_BLOCK, FP8_BLOCK), scale_fmt: str = "ue8m0", name: str = "weight"):
    """fp32/bf16 [..., N, K] -> (q float8_e4m3fn [..., N, K], scale [..., ceil(N/bn), ceil(K/bk)]).

    scale_fmt "ue8m0": scale = smallest power of two 2**e such that amax/scale rounds (RNE) to a finite
    e4m3 value, i.e. amax/scale <= 464 (values in (448, 464] round to 448, no saturation). This is
    the "round the scale up so amax/scale <= 448" rule, minus one step where that step is free; it
    makes requantization of a dequantized tensor reproduce the same bytes (float8_e8m0fnu scales).
    scale_fmt "fp32": scale = amax/448 rounded up one ulp if needed, so amax/scale <= 448 (float32);
    all-zero blocks get scale 0. Values are rounded to nearest-even e4m3. Lossy.
    """
    if scale_fmt not in ("ue8m0", "fp32"):
        raise ValueError(f"scale_fmt must be 'ue8m0' or 'fp32', got {scale_fmt!r}")
    w = w.float()
    check_finite(w, name)
    amax = _block_amax(w, tuple(block))
    if scale_fmt == "ue8m0":
        e = _pow2_scale(amax, FP8_E4M3_MAX)
        # halve when amax still rounds (RNE) to <= 448 at the smaller scale: amax/2**(e-1) <= 464
        e = torch.where((amax.double() * torch.ldexp(torch.ones_like(amax, dtype=torch.float64), 1 - e) <= 464.0) & (e > -127), e - 1, e)
        scale, s = (e + 127).to(torch.uint8).view(E8M0), torch.ldexp(torch.ones_like(amax), e)
    else:
        scale = s = round_up_scale(amax, FP8_E4M3_MAX)
    sf = _expand_blocks(s, w.shape, tuple(block))
    x = torch.where(sf > 0, w / torch.where(sf > 0, sf, 1.0), 0.0)
    q = x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8_block(q: Tensor, scale: Tensor, block=(FP8_BLOCK, FP8_BLOCK)) -> Tensor:
    """(float8_e4m3fn [..., N, K], scale grid) -> float32 [..., N, K]: q.float() * scale per block.
    scale may be float32, float8_e8m0fnu or uint8 exponent bytes. Exact in fp32 for UE8M0 scales."""
    return q.float() * _expand_blocks(scale_to_float(scale), q.shape, tuple(block))


# ---------------------------------------------------------------- MXFP4 (e2m1 + UE8M0 per 1x32)
def e2m1_round(x: Tensor) -> Tensor:
    """Magnitudes (>= 0, fp32) -> e2m1 magnitude codes 0..7, round to nearest, ties to even code,
    saturating at 6.0."""
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for i, m in enumerate(_E2M1_MID):
        code += (x > m) if i % 2 == 0 else (x >= m)
    return code


def _e2m1_codes(w: Tensor, e: Tensor) -> Tensor:
    """w [..., nb, 32] with block exponents e [..., nb] -> signed e2m1 codes 0..15 (sign bit 8)."""
    x = w.abs() * torch.ldexp(torch.ones_like(w[..., :1]), -e[..., None])  # exact: power of two
    return e2m1_round(x) | (torch.signbit(w).to(torch.uint8) << 3)


def _e2m1_to_float(codes: Tensor) -> Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)[codes.long()]


def quantize_mxfp4(w: Tensor, name: str = "weight"):
    """fp32/bf16 [..., N, K] -> (packed int8 [..., N, K//2], scale float8_e8m0fnu [..., N, K//32]). Lossy.

    Scale choice, per 1x32 block: the better (lower squared error) of
      (a) the OCP MX rule, 2**(floor(log2 amax) - 2): finer grid, clips (6, 8)*scale to 6;
      (b) the smallest power of two >= amax/6: never clips, one step coarser.
    Neither wins everywhere on Gaussian data; picking per block beats both (see docs/quant-formats.md).
    Ties go to (a). The pick is canonical: a block's largest code is 4 or 6 (or its scale is 2**-127),
    because whenever (b) would leave it at <= 3 the candidate (a) is exactly half that scale on a grid
    that contains (b)'s, so (a) is at least as good. Hence re-quantizing a dequantized tensor
    reproduces the same bytes and scales. Rounding is to nearest, ties to even code; the sign of zero
    is kept (-0 -> code 8).
    """
    *lead, K = w.shape
    if K % MXFP4_BLOCK:
        raise ValueError(f"{name}: MXFP4 needs K % 32 == 0, got K={K} (pad K first; the registry's 'mxfp4' format does)")
    w = w.float()
    check_finite(w, name)
    wb = w.reshape(*lead, K // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = wb.abs().amax(-1)
    # (a) OCP: floor(log2 amax) - emax(e2m1)=2 ; (b) ceil(log2(amax/6))
    _, fe = torch.frexp(amax)
    ea = torch.where(amax > 0, fe.to(torch.int32) - 1 - 2, -127).clamp(-127, 127)
    eb = _pow2_scale(amax, FP4_E2M1_MAX)
    cands = []
    for e in (ea, eb):
        c = _e2m1_codes(wb, e)
        d = _e2m1_to_float(c).double() * torch.ldexp(torch.ones_like(amax, dtype=torch.float64), e)[..., None]
        err = torch.where(d.abs().amax(-1) > F32_MAX, math.inf, ((d - wb.double()) ** 2).sum(-1))  # never overflow
        cands.append((err, e, c))
    pick_b = cands[1][0] < cands[0][0]  # ties keep the OCP choice
    e = torch.where(pick_b, eb, ea)
    c = torch.where(pick_b[..., None], cands[1][2], cands[0][2])
    c = c.reshape(*lead, K)
    packed = (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)
    return packed, (e + 127).to(torch.uint8).view(E8M0)


def unpack_fp4(packed: Tensor) -> Tensor:
    """int8/uint8 [..., K/2] -> uint8 nibble codes [..., K] (low nibble = even k)."""
    u8 = packed.view(torch.uint8)
    return torch.stack([u8 & 0xF, u8 >> 4], dim=-1).reshape(*u8.shape[:-1], 2 * u8.shape[-1])


def pack_fp4(codes: Tensor) -> Tensor:
    """uint8 nibble codes [..., K] (K even) -> int8 [..., K/2]; inverse of unpack_fp4."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def dequantize_mxfp4(packed: Tensor, scale: Tensor) -> Tensor:
    """(int8/uint8 [..., N, K/2], scale [..., N, ceil(K/32)] e8m0 or uint8) -> float32 [..., N, K]. Bit-exact
    (and exactly representable in bf16). A last block may be partial (K not a multiple of 32)."""
    v = _e2m1_to_float(unpack_fp4(packed))
    s = scale_to_float(scale).repeat_interleave(MXFP4_BLOCK, dim=-1)
    if s.shape[:-1] == v.shape[:-1] and 0 <= s.shape[-1] - v.shape[-1] < MXFP4_BLOCK:
        s = s[..., :v.shape[-1]]
    if s.shape != v.shape:
        raise ValueError(f"MXFP4 scale {tuple(scale.shape)} does not match packed {tuple(packed.shape)} (1x32 blocks)")
    return v * s


# ---------------------------------------------------------------- checks of stored data (readers call these)
def _first(mask: Tensor) -> str:
    return str(tuple(int(i) for i in mask.nonzero()[0].tolist()))


def scale_problem(scale: Tensor) -> str | None:
    """Why a stored block-scale tensor cannot be used, or None. UE8M0 (float8_e8m0fnu or uint8 exponent bytes):
    byte 0xFF is NaN. Float scales: finite and >= 0 (0 is what `quantize_fp8_block` writes for an all-zero block)."""
    if scale.dtype in (E8M0, torch.uint8):
        bad = scale.view(torch.uint8) == 255
        if bool(bad.any()):
            return f"{int(bad.sum())} UE8M0 scale byte(s) 0xFF (NaN), first at index {_first(bad)}"
        return None
    if scale.dtype in (torch.float32, torch.bfloat16, torch.float16):
        s = scale.float()
        bad = ~torch.isfinite(s) | (s < 0)
        if bool(bad.any()):
            return (f"{int(bad.sum())} scale(s) not finite or negative, first {float(s[bad][0])} at index "
                    f"{_first(bad)}")
        return None
    return f"dtype {scale.dtype} is not a scale type (F8_E8M0, U8 or a float type)"


def fp8_problem(q: Tensor) -> str | None:
    """Why stored float8_e4m3fn codes cannot be used, or None: e4m3fn has no Inf, and S.1111.111 (0x7F, 0xFF) is
    NaN."""
    bad = (q.view(torch.uint8) & 0x7F) == 0x7F
    if bool(bad.any()):
        return f"{int(bad.sum())} FP8 e4m3 NaN code(s), first at index {_first(bad)}"
    return None
