"""Weight formats as data: pack / unpack / repack / reference dequantize, shapes and bits per weight.

Every format turns an fp32 weight [N, K] (out_features x in_features, ``y = x @ W.T``) into a dict
of plain tensors with a fixed key set (safetensors-serializable, no pickles), and back.

    fmt = get_format("int4-g32-asym")
    packed = fmt.pack(w, name="layers.3.ffn.experts.7.w1.weight")   # dict[str, Tensor]
    w_hat = fmt.dequantize(packed)                                   # float32 [N, K]
    fmt.packed_shapes(N, K)                                          # {key: TensorSpec(shape, dtype)}
    fmt.bits_per_weight(N, K)                                        # incl. scales / zero points
    fmt.kind, fmt.group, fmt.symmetric                               # "int4", 32, False

This module is flashport's one vocabulary of weight formats: backends, kernels, the exporter and the
planner ask it for names (``WEIGHT_FORMATS``, ``INT4_FORMATS``, ``CHANNEL_FORMATS``), group sizes and
symmetry (attributes of each format), the stored tensors of a logical shape (``tensor_specs``), their
bytes (``tensor_nbytes``) and the torch dequantization (``dequantize``, ``dequantize_int4``); nothing
else parses a format's name. "fp32" (and "int64", for integer tables) are stored as themselves, any rank.

Exactness: ``pack`` is lossy for every format except "bf16" on bf16-representable input (and fp8 /
mxfp4 on input that is already on their grid). ``dequantize`` is the reference: for "mxfp4" and
"fp8-e4m3-block128-ue8m0" it is bit-exact (power-of-two scales; the result is also exactly a bf16
number), for the others it is one fp32 rounding of ``code * scale`` (``(q - zp) * scale`` for int4).
``repack(unpack(p)) == p`` bit for bit for every format. Re-quantizing a dequantized tensor gives
the same bytes for "mxfp4" and "fp8-e4m3-block128-ue8m0".

Error bounds (exact arithmetic): the int formats round to nearest with a scale rounded *up*, so no
value clips and ``|w - w_hat| <= scale/2`` per element (plus one fp32 rounding of the product).
All-zero groups store scale 0 (codes at the zero point) and dequantize to 0. Values at the fp32
limits are handled: scales never underflow to 0 for a nonzero group (they round up to at least
2**-149), and dequantized results are saturated to +-fp32 max instead of overflowing to Inf.
NaN/Inf inputs raise ValueError naming the tensor.

int4 layout (ONNX Runtime com.microsoft MatMulNBits, bits=4, verified against onnxruntime in
tests/test_quant_formats.py): ``B`` uint8 [N, n_blocks, block/2] with n_blocks = ceil(K/block) and K
zero-padded; element k of a row sits at byte k//2 of that row's flattened blocks, LOW nibble first.
``scales`` float32 [N, n_blocks]; ``zero_points`` uint8 [N, ceil(n_blocks/2)], two 4-bit zero points
per byte, low nibble first (asymmetric only; symmetric uses MatMulNBits' implicit zero point 8).
MatMulNBits wants scales and zero_points flattened (``[N*n_blocks]``, ``[N*ceil(n_blocks/2)]``):
flattening happens at export (``to_matmulnbits``). Padded formats (int4, mxfp4) also carry
``shape`` = int64 [N, K] so ``dequantize`` returns exactly [N, K]; it is metadata, not a kernel input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .release import (
    E8M0, FP8_BLOCK, FP8_E4M3_MAX, MXFP4_BLOCK, check_finite, dequantize_fp8_block, dequantize_mxfp4, pack_fp4,
    quantize_fp8_block, quantize_mxfp4, round_up_scale, unpack_fp4,
)

F32_MAX = torch.finfo(torch.float32).max
INT4_ZERO_POINT = 8  # symmetric int4's implicit zero point (MatMulNBits' default)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _check_weight(w: Tensor, name: str) -> Tensor:
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point weight, got {w.dtype}")
    w = w.float()
    check_finite(w, name)
    return w


def _saturate(x: Tensor) -> Tensor:
    return x.clamp(-F32_MAX, F32_MAX)  # +-Inf from an overflowing product -> +-fp32 max


def dequantize_channel(codes: Tensor, scale: Tensor) -> Tensor:
    """Per-output-channel dequantization (int8, w8a8, fp8-e4m3-channel): codes [..., N, K] (int8 or
    float8_e4m3fn), scale [..., N] -> float32 ``code * scale`` rounded once, not saturated."""
    return codes.float() * scale.float()[..., None]


def _shape_of(packed: dict, default: tuple[int, int]) -> tuple[int, int]:
    s = packed.get("shape")
    return default if s is None else (int(s[0]), int(s[1]))


class WeightFormat:
    """Base class. Subclasses set ``name`` and implement pack/unpack/repack/dequantize/packed_shapes."""

    name: str = ""
    meta_keys: tuple[str, ...] = ()  # keys that are metadata (excluded from bits_per_weight)
    kind: str = ""          # the code type: "bf16" | "fp8" | "mxfp4" | "int4" | "int8"
    group: int | None = None  # weights along K that share one scale; None: one scale per output row, or none
    symmetric: bool = True    # False: codes carry a zero point (int4 "-asym")

    def pack(self, w: Tensor, name: str = "weight") -> dict[str, Tensor]:
        raise NotImplementedError

    def unpack(self, packed: dict[str, Tensor]) -> dict[str, Tensor]:
        """Packed dict -> integer codes (one per weight, uint8/int8/int16 view) plus scales/zero points."""
        raise NotImplementedError

    def repack(self, unpacked: dict[str, Tensor]) -> dict[str, Tensor]:
        """Inverse of unpack, bit for bit."""
        raise NotImplementedError

    def dequantize(self, packed: dict[str, Tensor]) -> Tensor:
        """Reference dequantization -> float32 [N, K]."""
        raise NotImplementedError

    def packed_shapes(self, N: int, K: int) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def bits_per_weight(self, N: int = 4096, K: int = 4096) -> float:
        """Storage bits per weight for an [N, K] matrix, scales/zero points/padding included."""
        nbytes = sum(s.nbytes for k, s in self.packed_shapes(N, K).items() if k not in self.meta_keys)
        return 8.0 * nbytes / (N * K)

    @property
    def bits(self) -> float:
        """Nominal bits per weight (bits_per_weight at N = K = 4096)."""
        return self.bits_per_weight()

    def __repr__(self) -> str:
        return f"<WeightFormat {self.name} ~{self.bits:.4g} bits/weight>"


# ---------------------------------------------------------------- bf16
class BF16Format(WeightFormat):
    """{"weight": bfloat16 [N, K]}. fp32 -> bf16 rounds to nearest even (lossy; exact for bf16 input);
    finite values beyond bf16 max saturate to +-bf16 max instead of becoming Inf."""

    name, kind = "bf16", "bf16"

    def pack(self, w, name="weight"):
        w = _check_weight(w, name)
        m = torch.finfo(torch.bfloat16).max
        return {"weight": w.clamp(-m, m).to(torch.bfloat16)}

    def unpack(self, packed):
        return {"codes": packed["weight"].view(torch.int16)}

    def repack(self, unpacked):
        return {"weight": unpacked["codes"].view(torch.bfloat16)}

    def dequantize(self, packed):
        return packed["weight"].float()  # exact

    def packed_shapes(self, N, K):
        return {"weight": TensorSpec((N, K), torch.bfloat16)}


# ---------------------------------------------------------------- fp8 e4m3
class FP8BlockFormat(WeightFormat):
    """Release FP8: {"weight": float8_e4m3fn [N, K], "scale": [ceil(N/128), ceil(K/128)]} with float32
    scales ("fp8-e4m3-block128") or UE8M0 float8_e8m0fnu scales ("fp8-e4m3-block128-ue8m0")."""

    kind = "fp8"

    def __init__(self, scale_fmt: str, block: int = FP8_BLOCK):
        self.scale_fmt, self.block, self.group = scale_fmt, (block, block), block  # block: (rows, cols) per scale
        self.name = f"fp8-e4m3-block{block}" + ("-ue8m0" if scale_fmt == "ue8m0" else "")
        self.scale_dtype = E8M0 if scale_fmt == "ue8m0" else torch.float32

    def pack(self, w, name="weight"):
        q, s = quantize_fp8_block(_check_weight(w, name), self.block, self.scale_fmt, name)
        return {"weight": q, "scale": s}

    def unpack(self, packed):
        return {"codes": packed["weight"].view(torch.uint8), "scale": packed["scale"]}

    def repack(self, unpacked):
        return {"weight": unpacked["codes"].view(torch.float8_e4m3fn), "scale": unpacked["scale"]}

    def dequantize(self, packed):
        return _saturate(dequantize_fp8_block(packed["weight"], packed["scale"], self.block))

    def packed_shapes(self, N, K):
        bn, bk = self.block
        return {"weight": TensorSpec((N, K), torch.float8_e4m3fn),
                "scale": TensorSpec((-(-N // bn), -(-K // bk)), self.scale_dtype)}


class FP8ChannelFormat(WeightFormat):
    """{"weight": float8_e4m3fn [N, K], "scale": float32 [N]}: one scale per output channel,
    amax/448 rounded up (no clipping); e4m3 round-to-nearest-even. Lossy."""

    name, kind = "fp8-e4m3-channel", "fp8"

    def pack(self, w, name="weight"):
        w = _check_weight(w, name)
        q, s = quantize_fp8_block(w, (1, max(w.shape[1], 1)), "fp32", name)
        return {"weight": q, "scale": s[:, 0].contiguous()}

    def unpack(self, packed):
        return {"codes": packed["weight"].view(torch.uint8), "scale": packed["scale"]}

    def repack(self, unpacked):
        return {"weight": unpacked["codes"].view(torch.float8_e4m3fn), "scale": unpacked["scale"]}

    def dequantize(self, packed):
        return _saturate(dequantize_channel(packed["weight"], packed["scale"]))

    def packed_shapes(self, N, K):
        return {"weight": TensorSpec((N, K), torch.float8_e4m3fn), "scale": TensorSpec((N,), torch.float32)}


# ---------------------------------------------------------------- mxfp4
class MXFP4Format(WeightFormat):
    """Release experts: {"weight": int8 [N, Kp/2], "scale": float8_e8m0fnu [N, Kp/32], "shape": int64 [2]},
    Kp = K rounded up to 32 (zero padded). See release.quantize_mxfp4 for the scale rule."""

    name, kind, group = "mxfp4", "mxfp4", MXFP4_BLOCK
    meta_keys = ("shape",)

    def pack(self, w, name="weight"):
        w = _check_weight(w, name)
        N, K = w.shape
        q, s = quantize_mxfp4(torch.nn.functional.pad(w, (0, -K % MXFP4_BLOCK)), name)
        return {"weight": q, "scale": s, "shape": torch.tensor([N, K], dtype=torch.int64)}

    def unpack(self, packed):
        out = {"codes": unpack_fp4(packed["weight"]), "scale": packed["scale"]}
        return out | ({"shape": packed["shape"]} if "shape" in packed else {})

    def repack(self, unpacked):
        out = {"weight": pack_fp4(unpacked["codes"]), "scale": unpacked["scale"]}
        return out | ({"shape": unpacked["shape"]} if "shape" in unpacked else {})

    def dequantize(self, packed):
        w = dequantize_mxfp4(packed["weight"], packed["scale"])
        N, K = _shape_of(packed, tuple(w.shape))
        return w[:N, :K]

    def packed_shapes(self, N, K):
        nb = -(-K // MXFP4_BLOCK)
        return {"weight": TensorSpec((N, nb * MXFP4_BLOCK // 2), torch.int8),
                "scale": TensorSpec((N, nb), E8M0), "shape": TensorSpec((2,), torch.int64)}


# ---------------------------------------------------------------- int4 blocks (MatMulNBits)
class Int4BlockFormat(WeightFormat):
    """int4 per (1 x block) group along K, ONNX Runtime MatMulNBits layout (see module docstring).
    Symmetric: scale = amax/7 (rounded up), codes round(w/scale)+8 in [1, 15], zero point 8.
    Asymmetric: range [min(w,0), max(w,0)], scale = range/15 (rounded up), zp = round(-min/scale),
    codes clamp(round(w/scale)+zp, 0, 15). Dequant: (q - zp) * scale. Lossy, |err| <= scale/2."""

    meta_keys = ("shape",)
    kind = "int4"

    def __init__(self, block: int, asym: bool):
        if block < 16 or block & (block - 1):
            raise ValueError(f"MatMulNBits block_size must be a power of two >= 16, got {block}")
        self.block, self.asym = block, asym
        self.group, self.symmetric = block, not asym
        self.name = f"int4-g{block}" + ("-asym" if asym else "")

    def _nb(self, K):
        return -(-K // self.block)

    def pack(self, w, name="weight"):
        w = _check_weight(w, name)
        N, K = w.shape
        nb = self._nb(K)
        wb = torch.nn.functional.pad(w, (0, nb * self.block - K)).reshape(N, nb, self.block).double()
        if self.asym:
            lo, hi = wb.amin(-1).clamp(max=0), wb.amax(-1).clamp(min=0)
            scale = round_up_scale(hi - lo, 15.0)
            s = scale.double().clamp(min=torch.finfo(torch.float64).tiny)
            zp = torch.where(scale > 0, torch.round(-lo / s), 0).clamp(0, 15)
            q = torch.round(wb / s[..., None] + zp[..., None]).clamp(0, 15)
        else:
            scale = round_up_scale(wb.abs().amax(-1), 7.0)
            s = scale.double().clamp(min=torch.finfo(torch.float64).tiny)
            zp = torch.full_like(s, float(INT4_ZERO_POINT))
            q = (torch.round(wb / s[..., None]) + INT4_ZERO_POINT).clamp(1, 15)
        out = {"B": self._pack_b(q.to(torch.uint8)), "scales": scale}
        if self.asym:
            out["zero_points"] = self._pack_zp(zp.to(torch.uint8))
        return out | {"shape": torch.tensor([N, K], dtype=torch.int64)}

    @staticmethod
    def _pack_b(codes):  # [N, nb, block] -> [N, nb, block/2], low nibble = even k
        return codes[..., 0::2] | (codes[..., 1::2] << 4)

    @staticmethod
    def _pack_zp(zp):  # [N, nb] -> [N, ceil(nb/2)], low nibble first, odd tail padded with 0
        zp = torch.nn.functional.pad(zp, (0, zp.shape[1] % 2))
        return zp[:, 0::2] | (zp[:, 1::2] << 4)

    def unpack(self, packed):
        B = packed["B"]
        N, nb, half = B.shape
        out = {"codes": unpack_fp4(B).reshape(N, nb * half * 2), "scales": packed["scales"]}
        if self.asym:
            out["zero_points"] = unpack_fp4(packed["zero_points"])[:, :nb]
        return out | ({"shape": packed["shape"]} if "shape" in packed else {})

    def repack(self, unpacked):
        codes = unpacked["codes"].to(torch.uint8)
        N, nb = unpacked["scales"].shape
        out = {"B": self._pack_b(codes.reshape(N, nb, self.block)), "scales": unpacked["scales"]}
        if self.asym:
            out["zero_points"] = self._pack_zp(unpacked["zero_points"].to(torch.uint8))
        return out | ({"shape": unpacked["shape"]} if "shape" in unpacked else {})

    def dequantize(self, packed):
        w = _saturate(dequantize_int4(packed["B"], packed["scales"], packed.get("zero_points") if self.asym else None))
        N, K = _shape_of(packed, tuple(w.shape))
        return w[:, :K]

    def packed_shapes(self, N, K):
        nb = self._nb(K)
        out = {"B": TensorSpec((N, nb, self.block // 2), torch.uint8), "scales": TensorSpec((N, nb), torch.float32)}
        if self.asym:
            out["zero_points"] = TensorSpec((N, -(-nb // 2)), torch.uint8)
        return out | {"shape": TensorSpec((2,), torch.int64)}


def dequantize_int4(B: Tensor, scales: Tensor, zero_points: Tensor | None = None, K: int | None = None) -> Tensor:
    """The int4 dequantization (MatMulNBits layout), the one torch implementation every path uses.

    B uint8 [..., N, nb, g/2], scales float [..., N, nb], zero_points uint8 [..., N, ceil(nb/2)] or None
    (symmetric: the implicit zero point INT4_ZERO_POINT = 8) -> float32 [..., N, nb*g] (leading dims, e.g.
    stacked experts, kept), cut to [..., :K] when K is given. Each weight is ``(q - zp) * scale`` rounded
    once to fp32, not saturated (``Int4BlockFormat.dequantize`` saturates to +-fp32 max)."""
    *lead, N, nb, half = B.shape
    q = unpack_fp4(B).float().reshape(*lead, N, nb, 2 * half)  # nibbles, low first (the fp4 byte layout)
    zp = float(INT4_ZERO_POINT) if zero_points is None else unpack_fp4(zero_points)[..., :nb].float()[..., None]
    w = ((q - zp) * scales.float()[..., None]).reshape(*lead, N, nb * 2 * half)
    return w if K is None else w[..., :K]


def to_matmulnbits(packed: dict[str, Tensor], block: int) -> tuple[dict[str, Tensor], dict[str, int]]:
    """An int4 packed dict -> (MatMulNBits inputs with scales/zero_points flattened, node attributes)."""
    N, K = _shape_of(packed, (packed["B"].shape[0], packed["B"].shape[1] * block))
    inputs = {"B": packed["B"], "scales": packed["scales"].reshape(-1)}
    if "zero_points" in packed:
        inputs["zero_points"] = packed["zero_points"].reshape(-1)
    return inputs, {"K": K, "N": N, "bits": 4, "block_size": block}


# ---------------------------------------------------------------- int8 per channel (W8A16, W8A8)
class Int8ChannelFormat(WeightFormat):
    """{"weight": int8 [N, K], "scale": float32 [N]}: symmetric per output channel, scale = amax/127
    rounded up, codes round(w/scale) in [-127, 127]. Lossy, |err| <= scale/2. "int8" is the W8A16
    use (dequantize, matmul in float); "w8a8" is the same storage used with ``w8a8_matmul``."""

    kind = "int8"

    def __init__(self, name: str):
        self.name = name

    def pack(self, w, name="weight"):
        w = _check_weight(w, name)
        scale = round_up_scale(w.abs().amax(-1) if w.shape[1] else w.new_zeros(w.shape[0]), 127.0)
        s = scale.double().clamp(min=torch.finfo(torch.float64).tiny)
        return {"weight": torch.round(w.double() / s[:, None]).clamp(-127, 127).to(torch.int8), "scale": scale}

    def unpack(self, packed):
        return {"codes": packed["weight"], "scale": packed["scale"]}

    def repack(self, unpacked):
        return {"weight": unpacked["codes"].to(torch.int8), "scale": unpacked["scale"]}

    def dequantize(self, packed):
        return _saturate(dequantize_channel(packed["weight"], packed["scale"]))

    def packed_shapes(self, N, K):
        return {"weight": TensorSpec((N, K), torch.int8), "scale": TensorSpec((N,), torch.float32)}


def w8a8_matmul(x: Tensor, packed: dict[str, Tensor]) -> Tensor:
    """Reference W8A8 linear: x [..., K] float -> [..., N] float32 with the "w8a8" packed weight.
    Activations are quantized per token (row) dynamically to int8 symmetric (amax/127, rounded up),
    the product accumulates exactly in integers (int64 here; int32 suffices for K < 133,000), then is
    rescaled by x_scale * w_scale. Tolerance-bound vs the fp32 matmul (activation and weight rounding),
    not bit-exact: expect relative error around 1e-2 on Gaussian data."""
    x = x.float()
    check_finite(x, "x")
    sx = round_up_scale(x.abs().amax(-1), 127.0)
    xq = torch.round(x.double() / sx.double().clamp(min=1e-300)[..., None]).clamp(-127, 127).to(torch.int64)
    acc = xq @ packed["weight"].to(torch.int64).T
    return _saturate((acc.double() * (sx.double()[..., None] * packed["scale"].double())).float())


# ---------------------------------------------------------------- registry
FORMATS: dict[str, WeightFormat] = {f.name: f for f in [
    BF16Format(),
    FP8BlockFormat("fp32"), FP8BlockFormat("ue8m0"), FP8ChannelFormat(),
    MXFP4Format(),
    Int8ChannelFormat("int8"), Int8ChannelFormat("w8a8"),
    *(Int4BlockFormat(g, asym) for asym in (False, True) for g in (32, 64, 128)),
]}
"""The quantized formats (each with pack / unpack / repack / dequantize), by name."""

PLAIN_FORMATS: dict[str, torch.dtype] = {"fp32": torch.float32, "int64": torch.int64}
"""Formats stored as the tensor itself ({"weight": tensor}), any rank: "fp32" weights, "int64" tables."""

WEIGHT_FORMATS: tuple[str, ...] = ("fp32", *FORMATS)
"""Every format a linear weight may be stored in (backends.contract re-exports it for plugin authors)."""

INT4_FORMATS: tuple[str, ...] = tuple(n for n, f in FORMATS.items() if f.kind == "int4")
"""The int4 group-wise formats (MatMulNBits layout)."""

CHANNEL_FORMATS: tuple[str, ...] = tuple(n for n, f in FORMATS.items() if f.kind in ("fp8", "int8") and f.group is None)
"""Formats stored as codes [N, K] plus one float32 scale per output row: {"weight", "scale" [N]}."""


def get_format(name: str | WeightFormat) -> WeightFormat:
    """The quantized format called ``name`` (a WeightFormat passes through). Unknown names (and the plain
    "fp32" / "int64", which have no packing) raise ValueError listing the known ones."""
    if isinstance(name, WeightFormat):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; known: {', '.join(FORMATS)}") from None


def tensor_specs(fmt: str, shape) -> dict[str, TensorSpec]:
    """The tensors one tensor of logical ``shape`` is stored as in ``fmt``: {key: TensorSpec(shape, dtype)}.
    Plain formats ("fp32", "int64") take any rank; quantized ones need a 2-D [N, K]. Raises ValueError for an
    unknown format or a shape the format cannot hold."""
    shape = tuple(int(d) for d in shape)
    if fmt in PLAIN_FORMATS:
        return {"weight": TensorSpec(shape, PLAIN_FORMATS[fmt])}
    f = get_format(fmt)
    if len(shape) != 2:
        raise ValueError(f"format {fmt} needs a 2-D tensor, got shape {shape}")
    return f.packed_shapes(*shape)


def tensor_nbytes(fmt: str, shape) -> int:
    """Stored bytes of one tensor of logical ``shape`` in ``fmt``: every key of ``tensor_specs`` (scales, zero
    points, padding and the int64 ``shape`` metadata included). Errors as ``tensor_specs``."""
    return sum(s.nbytes for s in tensor_specs(fmt, shape).values())


def dequantize(fmt: str, packed: dict[str, Tensor]) -> Tensor:
    """Stored tensors of ``fmt`` -> the tensor: float32 for every weight format (the format's reference
    ``dequantize``; "fp32" is the stored weight as float32), int64 for "int64". Unknown format: ValueError."""
    if fmt == "int64":
        return packed["weight"]
    if fmt == "fp32":
        return packed["weight"].float()
    return get_format(fmt).dequantize(packed)


def quantization_error(w: Tensor, fmt: str | WeightFormat) -> dict[str, float]:
    """Round-trip error of ``fmt`` on ``w``: max_abs, rmse, rel_rmse (= rmse / rms(w), 0 for w == 0)."""
    fmt = get_format(fmt)
    w = w.float()
    d = (fmt.dequantize(fmt.pack(w)).double() - w.double())
    rmse = d.pow(2).mean().sqrt().item() if d.numel() else 0.0
    rms = w.double().pow(2).mean().sqrt().item() if w.numel() else 0.0
    return {"max_abs": d.abs().max().item() if d.numel() else 0.0, "rmse": rmse, "rel_rmse": rmse / rms if rms else 0.0}
