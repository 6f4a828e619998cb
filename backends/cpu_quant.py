"""Fast CPU linear / grouped linear / MoE for every weight format, plus the small fused kernels of torch_fast.

Why a C++ extension: decode on the CPU is bound by two things, the bytes of weights read per token and the
per-op cost of eager torch (a few microseconds per tiny op: mHC's Sinkhorn alone is ~120 ops per call). Measured
on the 2-core Xeon of the project machines (docs/performance.md):
  * torch's fp32 GEMV reads ~30 GB/s; torch's bf16 GEMV is no faster per byte; torch 2.13's
    `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` are slower than fp32 there;
  * ONNX Runtime's MatMulNBits reaches the memory limit for int4, but one InferenceSession.run costs tens of
    microseconds: more than a whole flash-mini expert GEMV.
So this module builds (once per machine, cached: backends/cpu_build.py) a small C++ extension from the sources in
kernels/cpu/ (quant_gemv.cpp, fused_ops.cpp, bindings.cpp; common.h declares the constants shared with Python,
which come from KERNEL_CONSTANTS below) with: one GEMV kernel that dequantizes a row chunk of the weight into an
L1 buffer and takes the dot products with the activations (bf16, int8 and int4 group-wise in ONNX Runtime's
MatMulNBits layout, sym or asym), a fused MoE over the routed experts, and the fused mHC / RMSNorm / RoPE kernels
used by torch_fast.
If the build fails (no compiler, no ninja), everything falls back to vectorised torch code, with one warning.

Compact exact storage: `upload` keeps int8/int4 weights packed (the kernel dequantizes in registers), and a
release checkpoint's weights in the bytes it stores them in, read in place (no copy: the uploaded weight is a view
of the model's packed tensors, which are themselves views of the checkpoint's memory-mapped files): FP8 e4m3 with
128x128 block scales (1 byte per weight), MXFP4 experts (e2m1 nibbles with one UE8M0 byte per 1x32 block: 0.53
byte per weight) and bf16 weights (2 bytes). An fp32 weight becomes the most compact of FP8 block-128, bf16 and
fp32 that holds its values exactly (`from_dense`). No weight value changes.

Exactness: dequantization is BIT-EXACT with quant.formats (the same single fp32 rounding of (q - zp) * scale
and q * scale; bf16 -> fp32 is exact; MXFP4's e2m1 value times its power-of-two scale is exact). The dot products
accumulate in fp32 in a different order than torch's matmul: TOLERANCE-BOUND,
|y - y_ref| <= 1e-5 * (|x| @ |W|.T) + 1e-6 (tests/test_torch_fast.py).
Rows > GEMV_MAX_ROWS (prefill) dequantize the weight to fp32 and run oneDNN's fp32 GEMM (torch's
mkldnn::_linear_pointwise; same tolerance, 2.2x torch's matmul on the project's AMD CPU). Opt-in per upload,
`prefill_matmul="bf16"` (the torch backend's option): that GEMM in bf16 (activations and weights rounded to bf16,
fp32 sums; 4.5x the fp32 GEMM): NOT within 1e-5, measured ~1e-3 relative per linear (docs/performance.md, Round 4).
Decode rows (<= GEMV_MAX_ROWS) run the exact-weight fp32 kernels by default.

Opt-in per upload, `decode_activations="int8"` (the torch backend's option, `--backend-option
decode_activations=int8`): the decode GEMVs of int8, int4 (group 32, 64 or 128) and MXFP4 weights (the release's
experts), grouped projections and the fused MoE's experts included, quantize their activation rows once per GEMV to int8, per block of 32 columns,
symmetric with one fp32 scale per block (s_b = max|x_b| / 127, as llama.cpp's Q8_0 and ONNX Runtime's MatMulNBits
accuracy_level 4), and take the dot products with the stored integer codes in AVX-512 VNNI (VPDPBUSD; see
kernels/cpu/quant_gemv.cpp). NOT bit-exact: |y - y_ref| <= sum_b (s_b / 2) * sum_{k in b} |W[n, k]| + fp32
rounding (half a quantization step per activation), measured ~5e-3 of max|y| on random inputs
(tests/test_cpu_quant_int8_act.py). Other formats (FP8, bf16), prefill rows, a CPU without AVX-512 VNNI and the
torch paths without the extension keep the exact path.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..quant.formats import (
    FORMATS,
    INT4_FORMATS,
    INT4_ZERO_POINT,
    dequantize_channel,
    dequantize_int4,
    get_format,
)
from ..quant.release import FP8_BLOCK, MXFP4_BLOCK, dequantize_fp8_block, dequantize_mxfp4, scale_to_float
from . import cpu_build
from .contract import QuantWeight

log = logging.getLogger("flashport.backends")

GEMV_MAX_ROWS = 8  # up to this many activation rows, weights stream once through the GEMV kernel
PREFILL_MATMULS = ("fp32", "bf16")  # the GEMM of rows > GEMV_MAX_ROWS: fp32 (default, tolerance 1e-5) or bf16
DECODE_ACTIVATIONS = ("fp32", "int8")  # the GEMV of rows <= GEMV_MAX_ROWS: fp32 (default) or int8 activations

FMT_F32, FMT_BF16, FMT_I8, FMT_I4, FMT_FP8, FMT_MXFP4 = 0, 1, 2, 3, 4, 5

# The kernels' sources (kernels/cpu/ beside this package's backends/, in a checkout and in an installed wheel)
KERNEL_DIR = Path(__file__).resolve().parents[1] / "kernels" / "cpu"
KERNEL_SOURCES = ("quant_gemv.cpp", "fused_ops.cpp", "indexer_fp4.cpp", "bindings.cpp")

# Every constant the C++ shares with Python, passed as -D flags (kernels/cpu/common.h declares them from these and
# refuses to build without them): one definition each, here or in flashport.quant.
KERNEL_CONSTANTS = {
    "FLASHPORT_MAX_ROWS": GEMV_MAX_ROWS,
    "FLASHPORT_FMT_F32": FMT_F32, "FLASHPORT_FMT_BF16": FMT_BF16, "FLASHPORT_FMT_I8": FMT_I8,
    "FLASHPORT_FMT_I4": FMT_I4, "FLASHPORT_FMT_FP8": FMT_FP8, "FLASHPORT_FMT_MXFP4": FMT_MXFP4,
    "FLASHPORT_FP8_BLOCK": FP8_BLOCK, "FLASHPORT_MXFP4_BLOCK": MXFP4_BLOCK,
    "FLASHPORT_INT4_ZERO_POINT": INT4_ZERO_POINT,
    "FLASHPORT_INT4_MAX_GROUP": max(FORMATS[f].group for f in INT4_FORMATS),
}
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]  # no FMA contraction: rope stays bit-exact

_ext_lock = threading.Lock()
_ext_state: dict = {}


def ext():
    """The compiled extension, built on first use (about 30-60 s once per machine, said on stderr, then cached:
    see backends/cpu_build.py for the cache, the lock and Ctrl-C); None when it cannot be built here
    (FLASHPORT_NO_CPP_EXT=1 disables it), and then every caller uses its torch path."""
    with _ext_lock:
        if "mod" in _ext_state:
            return _ext_state["mod"]
        mod = None
        if os.environ.get("FLASHPORT_NO_CPP_EXT") != "1":
            try:
                mod = cpu_build.load_extension(
                    "flashport_cpu", [KERNEL_DIR / f for f in KERNEL_SOURCES],
                    extra_cflags=[*CFLAGS, *(f"-D{k}={v}" for k, v in KERNEL_CONSTANTS.items())],
                    extra_ldflags=["-fopenmp"], key_extra=_cpu_flags(), what="CPU kernels")
            except Exception as e:  # noqa: BLE001 - no compiler/ninja: the torch paths still work
                warnings.warn(f"flashport: CPU kernels unavailable ({e.__class__.__name__}: {str(e)[:200]}); "
                              "using the slower torch paths", RuntimeWarning, stacklevel=2)
        _ext_state["mod"] = mod
        return mod


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------------------
# Weights in their compact CPU layout
# ---------------------------------------------------------------------------------------------------------------
class CpuWeight:
    """A weight uploaded for the fast CPU path (the layouts of kernels/cpu/common.h's QW): int8 / int4 / FP8 / MXFP4
    / bf16 stay as packed, fp32 weights take the most compact exact layout. `native` is the C++ view (None without
    the extension)."""

    prefill_bf16 = False  # rows > GEMV_MAX_ROWS in bf16 (upload(..., prefill_matmul="bf16"))

    def __init__(self, fmt: int, shape: tuple[int, int], w: Tensor, scale: Tensor | None = None,
                 zp: Tensor | None = None, group: int = 0):
        self.fmt, self.shape, self.group = fmt, (int(shape[0]), int(shape[1])), group
        self.w, self.scale, self.zp = w, scale, zp
        mod = ext()
        self.native = mod.QW(fmt, self.shape[0], self.shape[1], group, w, scale, zp) if mod else None

    @classmethod
    def from_quant(cls, qw: QuantWeight) -> "CpuWeight":
        fmt = FORMATS.get(qw.fmt)
        kind = fmt.kind if fmt is not None else qw.fmt
        if kind == "int8":  # w8a8 runs as W8A16 here, like the reference's dequantize + fp32 matmul
            return cls(FMT_I8, qw.shape, qw.tensors["weight"].contiguous(), qw.tensors["scale"].float().contiguous())
        if kind == "int4":
            zp = qw.tensors.get("zero_points")
            return cls(FMT_I4, qw.shape, qw.tensors["B"].contiguous(), qw.tensors["scales"].float().contiguous(),
                       None if zp is None else zp.contiguous(), fmt.group)
        if kind == "fp8" and fmt.group == FP8_BLOCK:  # 128x128 blocks (the kernel's block)
            return cls._fp8(qw.shape, qw.tensors["weight"], qw.tensors["scale"])
        if kind == "mxfp4":  # the stored nibbles and UE8M0 bytes themselves (views: no copy)
            return cls(FMT_MXFP4, qw.shape, _bytes(qw.tensors["weight"]), _bytes(qw.tensors["scale"]),
                       group=MXFP4_BLOCK)
        if kind == "bf16":  # the stored bf16 tensor itself
            return cls(FMT_BF16, qw.shape, qw.tensors["weight"].contiguous())
        w = qw.dequantize().float().contiguous()
        return cls.from_dense(w)

    @classmethod
    def _fp8(cls, shape, codes: Tensor, scale: Tensor) -> "CpuWeight":
        return cls(FMT_FP8, shape, _bytes(codes), scale_to_float(scale).float().contiguous())

    @classmethod
    def from_dense(cls, w: Tensor) -> "CpuWeight":
        """fp32 [N, K] -> the most compact layout that loses nothing (checked value by value): FP8 e4m3 with
        power-of-two 128x128 block scales (1 byte per weight: every non-expert weight of a release checkpoint),
        else bf16 (2 bytes: also MXFP4 experts), else fp32."""
        if min(w.shape) >= 16 and w.abs().max() > 0:
            fp8 = get_format("fp8-e4m3-block128-ue8m0")
            try:
                packed = fp8.pack(w)
                if torch.equal(fp8.dequantize(packed), w):
                    return cls._fp8(tuple(w.shape), packed["weight"], packed["scale"])
            except ValueError:  # not finite: keep it as it is
                pass
        b = w.to(torch.bfloat16)
        if torch.equal(b.float(), w):
            return cls(FMT_BF16, tuple(w.shape), b.contiguous())
        return cls(FMT_F32, tuple(w.shape), w.contiguous())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.scale, self.zp) if t is not None)

    def dequantize(self) -> Tensor:
        """fp32 [N, K], bit-exact with quant.formats."""
        if self.native is not None:
            return ext().dequantize(self.native)
        if self.fmt == FMT_F32:
            return self.w
        if self.fmt == FMT_BF16:
            return self.w.float()
        if self.fmt == FMT_I8:
            return dequantize_channel(self.w, self.scale)
        if self.fmt == FMT_FP8:
            return dequantize_fp8_block(self.w.view(torch.float8_e4m3fn), self.scale)
        if self.fmt == FMT_MXFP4:
            return dequantize_mxfp4(self.w, self.scale)[:, :self.shape[1]]
        return dequantize_int4(self.w, self.scale, self.zp, self.shape[1])


def _bytes(t: Tensor) -> Tensor:
    """A 1-byte-per-element tensor as uint8, the same memory when it is contiguous (a view, not a copy)."""
    return t.contiguous().view(torch.uint8)


def upload(w: QuantWeight, prefill_matmul: str = "fp32", decode_activations: str = "fp32") -> CpuWeight:
    """w in its compact CPU layout; prefill_matmul ("fp32" | "bf16", PREFILL_MATMULS): the GEMM its rows >
    GEMV_MAX_ROWS run; decode_activations ("fp32" | "int8", DECODE_ACTIVATIONS): the activations of its GEMV rows
    (<= GEMV_MAX_ROWS) as they are, or quantized to int8 for int8 / int4 / MXFP4 weights (see the module docstring).
    Raises ValueError for another value."""
    if prefill_matmul not in PREFILL_MATMULS:
        raise ValueError(f"prefill_matmul must be one of {', '.join(PREFILL_MATMULS)}, got {prefill_matmul!r}")
    if decode_activations not in DECODE_ACTIVATIONS:
        raise ValueError(f"decode_activations must be one of {', '.join(DECODE_ACTIVATIONS)}, "
                         f"got {decode_activations!r}")
    cw = CpuWeight.from_quant(w)
    cw.prefill_bf16 = prefill_matmul == "bf16"
    if cw.native is not None:
        cw.native.act_i8 = decode_activations == "int8"
    return cw


def linear(x: Tensor, w: CpuWeight) -> Tensor:
    """x [T, K] @ W.T -> [T, N] (tolerance-bound, or the bf16 prefill GEMM: see the module docstring)."""
    if w.native is not None:  # .float() costs ~1 us
        return ext().linear(x if x.dtype is torch.float32 else x.float(), w.native, w.prefill_bf16)
    if w.prefill_bf16 and x.shape[0] > GEMV_MAX_ROWS:
        return (x.bfloat16() @ w.dequantize().bfloat16().T).float()
    return x @ (w.w.T if w.fmt == FMT_F32 else w.dequantize().T)


def grouped_linear(x: Tensor, w: CpuWeight) -> Tensor:
    """x [T, G, I], W [G*R, I] -> [T, G, R]."""
    if w.native is not None:
        return ext().grouped_linear(x if x.dtype is torch.float32 else x.float(), w.native)
    g = x.shape[1]
    dw = w.w if w.fmt == FMT_F32 else w.dequantize()
    return torch.einsum("tgi,gri->tgr", x, dw.view(g, -1, dw.shape[-1]))


def moe(x: Tensor, weights: Tensor, idx: Tensor, experts, limit: float) -> Tensor:
    """The reference's routed-expert step (experts[e] = (w1, w3, w2) CpuWeights), fused in C++: one call per
    layer instead of ~10 torch ops per expert."""
    # the distinct experts, ascending like the reference (a decode step's few ids: cheaper in Python than unique)
    ids = sorted(set(idx.reshape(-1).tolist())) if idx.numel() <= 64 else idx.unique().tolist()
    handles = [experts[e] for e in ids]
    w1, w3, w2 = ([h[j].native for h in handles] for j in range(3))
    mod = ext()
    if mod is None or None in w1 or None in w3 or None in w2:
        from . import reference

        dense = {e: tuple(h.dequantize() for h in hs) for e, hs in zip(ids, handles)}
        return reference.moe(x, weights, idx, dense, limit)
    return mod.moe(x if x.dtype is torch.float32 else x.float(), weights, idx, ids, w1, w3, w2, float(limit),
                   handles[0][0].prefill_bf16)
