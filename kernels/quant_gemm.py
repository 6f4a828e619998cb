"""Weight-only quantized GEMMs (W4A16 group-wise int4, W8A16 per-channel int8, MXFP4).

Exactness: TOLERANCE-BOUND.
  * Dequantization is BIT-EXACT: every weight tile is dequantized in the kernel with
    the same single fp32 rounding as ``dequant_*_ref`` ((q - zp) * scale, q * scale,
    e2m1 * 2**(e-127)); MXFP4 dequantization is exact (no rounding at all).
  * The GEMM accumulates in fp32 (``tl.dot`` with ``input_precision="ieee"``, i.e. no
    TF32) in a different summation order than ``torch.matmul``; the documented bound is
    ``|out - ref| <= 1e-5 * (|x| @ |W|^T) + 1e-6`` elementwise (K up to a few thousand).
  * ``precision="tf32"`` uses tensor cores on CUDA (faster; about 1e-3 relative); the
    interpreter ignores it, so it is only checked by ``bench_gpu.py``.

Batch invariance (bit for bit): the M tile is always BLOCK_M=16 rows (padded with
masks), BLOCK_K/BLOCK_N/SPLIT_K are chosen from (N, K, device) only, never from M, and
each output element is a chain of fp32 FMAs over k in a fixed order (the fp32 ieee
``tl.dot`` lowers to sequential FMAs on CUDA; the interpreter uses one numpy matmul per
fixed-shape tile). Split-K partials are summed in a fixed order. So row i of a batch is
bit-identical to that row alone. (Not true for ``precision="tf32"`` in principle.)

Layouts
  int4  (ONNX Runtime MatMulNBits): qweight uint8 [N, n_blocks, block/2]; element k of
        row n lives in byte k//2 of the flattened row, low nibble = even k; scales fp32
        [N, n_blocks]; zero_points uint8 [N, ceil(n_blocks/2)] (two per byte, low nibble
        first) or None (zp = 8). K may be < n_blocks*block (zero padding).
  int8  qweight int8 [N, K], scales fp32 [N].
  mxfp4 packed int8/uint8 [N, K/2] (low nibble = even k, e2m1 codes), scales
        float8_e8m0fnu or uint8 [N, ceil(K/32)] (value 2**(e-127); e=255 is NaN).
  float weights [N, K] in any float dtype (no quantization; used by the MoE path).
The same kernel serves the dense GEMMs (one "expert") and the MoE grouped GEMM.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

# absolute: `python -m pytest` in a checkout puts the repo root on sys.path, and transformers' probe for the HF
# "kernels" package then imports this folder as a top-level `kernels`, where `..quant` would not resolve
from flashport.quant.formats import dequantize_channel, dequantize_int4
from flashport.quant.release import E2M1_VALUES, dequantize_mxfp4
from ._common import HAS_TRITON, cdiv, interpreting, triton_usable

if HAS_TRITON:
    import triton
    import triton.language as tl

_FMT_ID = {"int4": 0, "int8": 1, "mxfp4": 2, "float": 3}
BLOCK_M = 16  # fixed: see "Batch invariance" above


# ----------------------------------------------------------------------------- refs
# The dequantizations are flashport.quant's (the one torch implementation of each format); these names keep the
# kernels' reference API (leading expert dims, block_size checked against the layout).
def dequant_int4_ref(qweight, scales, zero_points=None, block_size=32, K=None):
    """MatMulNBits int4 -> float32 [..., N, K] (leading dims, e.g. experts, kept): quant.formats.dequantize_int4."""
    assert qweight.shape[-1] * 2 == block_size, "qweight last dim must be block_size/2"
    return dequantize_int4(qweight, scales, zero_points, K)


def dequant_int8_ref(qweight, scales):
    """int8 [..., N, K] x scales [..., N] -> float32: quant.formats.dequantize_channel."""
    return dequantize_channel(qweight, scales)


def dequant_mxfp4_ref(packed, scales):
    """MXFP4 -> float32 [..., N, K]: quant.release.dequantize_mxfp4 (scales e8m0 or uint8, last block may be partial)."""
    return dequantize_mxfp4(packed, scales)


def int4_gemm_ref(x, qweight, scales, zero_points=None, block_size=32):
    return x.float() @ dequant_int4_ref(qweight, scales, zero_points, block_size, x.shape[-1]).T


def int8_gemm_ref(x, qweight, scales):
    return x.float() @ dequant_int8_ref(qweight, scales).T


def mxfp4_gemm_ref(x, packed, scales):
    return x.float() @ dequant_mxfp4_ref(packed, scales).T


# ------------------------------------------------------------------ weight container
@dataclass
class QuantWeight:
    """A (possibly expert-stacked) quantized weight: shapes as in the module docstring,
    with an optional leading expert dim E. ``fmt`` is int4 | int8 | mxfp4 | float."""
    fmt: str
    qweight: torch.Tensor
    scales: Optional[torch.Tensor] = None
    zero_points: Optional[torch.Tensor] = None
    block_size: int = 32

    @property
    def N(self) -> int:
        return self.qweight.shape[-3] if self.fmt == "int4" else self.qweight.shape[-2]

    @property
    def K(self) -> int:
        """Stored K (for int4: n_blocks*block_size, the padded K)."""
        if self.fmt == "int4":
            return self.qweight.shape[-2] * self.block_size
        return self.qweight.shape[-1] * (2 if self.fmt == "mxfp4" else 1)

    @property
    def stacked(self) -> bool:
        return self.qweight.dim() == (4 if self.fmt == "int4" else 3)

    def dequantize(self, K: Optional[int] = None) -> torch.Tensor:
        if self.fmt == "int4":
            w = dequant_int4_ref(self.qweight, self.scales, self.zero_points, self.block_size)
        elif self.fmt == "int8":
            w = dequant_int8_ref(self.qweight, self.scales)
        elif self.fmt == "mxfp4":
            w = dequant_mxfp4_ref(self.qweight, self.scales)
        elif self.fmt == "float":
            w = self.qweight.float()
        else:
            raise ValueError(f"unknown weight format {self.fmt!r}")
        return w if K is None else w[..., :K]

    def expert(self, e: int) -> "QuantWeight":
        pick = lambda t: None if t is None else t[e]  # noqa: E731
        return QuantWeight(self.fmt, self.qweight[e], pick(self.scales),
                           pick(self.zero_points), self.block_size)


# ---------------------------------------------------------------------------- kernel
if HAS_TRITON:
    @triton.jit
    def _qgemm_kernel(x_ptr, w_ptr, s_ptr, zp_ptr, lut_ptr, out_ptr,
                      tile_e_ptr, tile_row_ptr, offs_ptr,
                      N, K, E, T, stride_xm,
                      w_se, w_sn, s_se, s_sn, z_se, z_sn,
                      FMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, PRECISION: tl.constexpr):
        """out[r, n] = sum_k x[r, k] * W_e[n, k] for the rows r of one M tile, all
        belonging to expert e (tiles never straddle experts). Grid: (tiles, N/BLOCK_N,
        SPLIT_K); tiles past the last real one exit at once."""
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        e = tl.load(tile_e_ptr + pid_t)
        if e < E:
            row0 = tl.load(tile_row_ptr + pid_t)
            row_end = tl.load(offs_ptr + e + 1)
            rows = row0 + tl.arange(0, BLOCK_M)
            rmask = rows < row_end
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            cmask = cols < N
            e64 = e.to(tl.int64)
            n2 = cols[None, :]
            w_base = w_ptr + e64 * w_se + n2 * w_sn
            s_base = s_ptr + e64 * s_se + n2 * s_sn
            n_chunks = tl.cdiv(K, BLOCK_K)
            per = tl.cdiv(n_chunks, SPLIT_K)
            c_end = tl.minimum(n_chunks, (pid_k + 1) * per)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for c in range(pid_k * per, c_end):
                ks = c * BLOCK_K + tl.arange(0, BLOCK_K)
                kmask = ks < K
                xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                             mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
                k2 = ks[:, None]
                wmask = kmask[:, None] & cmask[None, :]
                if FMT == 0:  # int4, MatMulNBits
                    b = tl.load(w_base + k2 // 2, mask=wmask, other=0).to(tl.int32)
                    q = (b >> ((k2 % 2) * 4)) & 0xF
                    g = k2 // GROUP
                    if HAS_ZP:
                        zb = tl.load(zp_ptr + e64 * z_se + n2 * z_sn + g // 2,
                                     mask=wmask, other=0).to(tl.int32)
                        zp = (zb >> ((g % 2) * 4)) & 0xF
                    else:
                        zp = 8
                    s = tl.load(s_base + g, mask=wmask, other=0.0)
                    w = (q - zp).to(tl.float32) * s
                elif FMT == 1:  # int8, per output channel
                    q = tl.load(w_base + k2, mask=wmask, other=0)
                    s = tl.load(s_base, mask=cmask[None, :], other=0.0)
                    w = q.to(tl.float32) * s
                elif FMT == 2:  # mxfp4: e2m1 table * 2**(e-127)
                    b = tl.load(w_base + k2 // 2, mask=wmask, other=0).to(tl.int32) & 0xFF
                    v = tl.load(lut_ptr + ((b >> ((k2 % 2) * 4)) & 0xF))
                    eb = tl.load(s_base + k2 // 32, mask=wmask, other=127).to(tl.int32) & 0xFF
                    bits = tl.where(eb == 0, 0x400000, eb << 23)
                    bits = tl.where(eb == 255, 0x7FC00000, bits)
                    w = v * bits.to(tl.float32, bitcast=True)
                else:  # plain float weights
                    w = tl.load(w_base + k2, mask=wmask, other=0.0).to(tl.float32)
                w = tl.where(wmask, w, 0.0)
                acc = tl.dot(xt, w, acc, input_precision=PRECISION)
            out_ptrs = (out_ptr + pid_k.to(tl.int64) * T * N
                        + rows[:, None].to(tl.int64) * N + cols[None, :])
            tl.store(out_ptrs, acc, mask=rmask[:, None] & cmask[None, :])


_LUT_CACHE: dict = {}


def _lut(device) -> torch.Tensor:
    key = str(device)
    if key not in _LUT_CACHE:
        _LUT_CACHE[key] = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return _LUT_CACHE[key]


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(N: int, K: int, device, dense: bool = True) -> dict:
    """Launch config from (N, K, device) only -- never from M (batch invariance).
    Split-K fills the GPU on decode-sized dense GEMMs; the MoE path uses split_k=1."""
    cfg = dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, SPLIT_K=1)
    if dense and torch.device(device).type == "cuda" and not interpreting():
        sms = _sm_count(torch.device(device))
        n_tiles = cdiv(N, cfg["BLOCK_N"])
        split = 1
        while n_tiles * split < 2 * sms and split * 2 <= max(1, K // (4 * cfg["BLOCK_K"])):
            split *= 2
        cfg["SPLIT_K"] = split
    return cfg


def tile_map(expert_offsets: torch.Tensor, T: int, block_m: int = BLOCK_M):
    """Device-side schedule of BLOCK_M row tiles over experts (no host sync).
    Returns (tile_expert int32 [max_tiles], tile_row int32 [max_tiles]); tiles past the
    end get expert id E and are skipped by the kernel."""
    offs = expert_offsets.to(torch.int64)
    E = offs.numel() - 1
    tiles = (offs[1:] - offs[:-1] + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = cdiv(T, block_m) + E - 1  # sum_e ceil(c_e / B) <= ceil(T / B) + E - 1
    t = torch.arange(max(max_tiles, 1), device=offs.device)
    e = torch.searchsorted(tile_end, t, right=True)
    ec = e.clamp(max=E - 1)
    row = offs[ec] + (t - (tile_end[ec] - tiles[ec])) * block_m
    return e.to(torch.int32), row.to(torch.int32)


def grouped_qgemm(x: torch.Tensor, expert_offsets: torch.Tensor, w: QuantWeight,
                  split_k: Optional[int] = None, precision: str = "ieee",
                  dense: bool = False, tiles: Optional[tuple] = None) -> torch.Tensor:
    """Launch the kernel: x [T, K] rows grouped by expert (offsets [E+1]), w stacked
    [E, ...]. Returns float32 [T, N]. ``tiles``: a precomputed ``tile_map(offsets, T)``
    (reuse it across the GEMMs of one MoE step)."""
    assert w.stacked, "grouped_qgemm wants expert-stacked weights"
    x = x.contiguous()
    T, K = x.shape
    E, N = w.qweight.shape[0], w.N
    assert K <= w.K, f"x has K={K} but weights hold K={w.K}"
    if w.fmt != "int4":
        assert K == w.K, f"x has K={K} but weights hold K={w.K}"
    cfg = pick_config(N, K, x.device, dense=dense)
    if split_k is not None:
        cfg["SPLIT_K"] = split_k
    S = cfg["SPLIT_K"]
    out = torch.empty((S, T, N) if S > 1 else (T, N), dtype=torch.float32, device=x.device)
    if T == 0 or N == 0:
        return out.zero_()[0] if S > 1 else out.zero_()
    qw = w.qweight.contiguous()
    if w.fmt == "mxfp4":
        qw = qw.view(torch.uint8)
    sc = (w.scales if w.scales is not None else qw).contiguous()
    if w.fmt == "mxfp4" and sc.dtype != torch.uint8:
        sc = sc.view(torch.uint8)
    if w.fmt in ("int4", "int8"):
        sc = sc.float()
    zp = w.zero_points.contiguous() if w.zero_points is not None else sc
    tile_e, tile_row = tiles if tiles is not None else tile_map(expert_offsets.to(x.device), T)
    w_sn = qw.shape[-2] * qw.shape[-1] if w.fmt == "int4" else qw.shape[-1]
    s_sn = sc.shape[-1] if sc.dim() == 3 else 1
    grid = (tile_e.numel(), cdiv(N, cfg["BLOCK_N"]), S)
    _qgemm_kernel[grid](
        x, qw, sc, zp, _lut(x.device), out, tile_e, tile_row,
        expert_offsets.to(device=x.device, dtype=torch.int32),
        N, K, E, T, x.stride(0),
        qw[0].numel(), w_sn, sc[0].numel(), s_sn,
        zp[0].numel(), zp.shape[-1] if zp.dim() == 3 else 1,
        FMT=_FMT_ID[w.fmt], GROUP=w.block_size, HAS_ZP=w.zero_points is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        SPLIT_K=S, PRECISION=precision, num_warps=cfg["num_warps"])
    if S > 1:  # fixed-order reduction of the split-K partials
        acc = out[0].clone()
        for i in range(1, S):
            acc += out[i]
        out = acc
    return out


def _dense(x, w: QuantWeight, split_k, precision):
    x2 = x.reshape(-1, x.shape[-1])
    stacked = QuantWeight(w.fmt, w.qweight[None],
                          None if w.scales is None else w.scales[None],
                          None if w.zero_points is None else w.zero_points[None],
                          w.block_size)
    offs = torch.tensor([0, x2.shape[0]], dtype=torch.int32, device=x.device)
    out = grouped_qgemm(x2, offs, stacked, split_k=split_k, precision=precision, dense=True)
    return out.reshape(*x.shape[:-1], w.N)


# --------------------------------------------------------------------------- public
def int4_gemm(x, qweight, scales, zero_points=None, block_size=32, *,
              split_k: Optional[int] = None, precision: str = "ieee") -> torch.Tensor:
    """x [M, K] float -> [M, N] float32 (MatMulNBits int4 weights)."""
    if not triton_usable(x):
        return int4_gemm_ref(x, qweight, scales, zero_points, block_size)
    return _dense(x, QuantWeight("int4", qweight, scales, zero_points, block_size),
                  split_k, precision)


def int8_gemm(x, qweight, scales, *, split_k: Optional[int] = None,
              precision: str = "ieee") -> torch.Tensor:
    """x [M, K] float -> [M, N] float32 (per-channel int8 weights, W8A16)."""
    if not triton_usable(x):
        return int8_gemm_ref(x, qweight, scales)
    return _dense(x, QuantWeight("int8", qweight, scales), split_k, precision)


def mxfp4_gemm(x, packed, scales, *, split_k: Optional[int] = None,
               precision: str = "ieee") -> torch.Tensor:
    """x [M, K] float -> [M, N] float32 (MXFP4: e2m1 codes, one UE8M0 scale per 32)."""
    if not triton_usable(x):
        return mxfp4_gemm_ref(x, packed, scales)
    return _dense(x, QuantWeight("mxfp4", packed, scales, block_size=32), split_k, precision)
