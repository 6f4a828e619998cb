"""Fast CPU linear / grouped linear / MoE for every weight format, plus the small fused kernels of torch_fast.

Why a C++ extension: decode on the CPU is bound by two things, the bytes of weights read per token and the
per-op cost of eager torch (a few microseconds per tiny op: mHC's Sinkhorn alone is ~120 ops per call). Measured
on the 2-core Xeon of the project machines (docs/performance.md):
  * torch's fp32 GEMV reads ~30 GB/s; torch's bf16 GEMV is no faster per byte; torch 2.13's
    `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` are slower than fp32 there;
  * ONNX Runtime's MatMulNBits reaches the memory limit for int4, but one InferenceSession.run costs tens of
    microseconds: more than a whole flash-mini expert GEMV.
So this module builds (once, cached by torch.utils.cpp_extension under ~/.cache/torch_extensions) a small
C++ extension with: one GEMV kernel that dequantizes a row chunk of the weight into an L1 buffer and takes the
dot products with the activations (bf16, int8 and int4 group-wise in ONNX Runtime's MatMulNBits layout, sym or
asym), a fused MoE over the routed experts, and the fused mHC / RMSNorm / RoPE kernels used by torch_fast.
If the build fails (no compiler, no ninja), everything falls back to vectorised torch code, with one warning.

Compact exact storage: `upload` keeps int8/int4 weights packed (the kernel dequantizes in registers), and any
other weight whose values are all bf16 numbers (every weight of a release checkpoint: FP8 e4m3 with UE8M0
block scales and MXFP4 experts are bf16-exact) as bf16, which halves the bytes read against fp32 and changes
no weight value. Other weights stay fp32.

Exactness: dequantization is BIT-EXACT with quant.formats (the same single fp32 rounding of (q - zp) * scale
and q * scale; bf16 -> fp32 is exact). The dot products accumulate in fp32 in a different order than torch's
matmul: TOLERANCE-BOUND, |y - y_ref| <= 1e-5 * (|x| @ |W|.T) + 1e-6 (tests/test_torch_fast.py).
Rows > GEMV_MAX_ROWS (prefill) dequantize the weight to fp32 and call torch's matmul (same tolerance).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings

import torch
from torch import Tensor

from ..quant.formats import FORMATS, dequantize_channel, dequantize_int4, get_format
from ..quant.release import FP8_BLOCK, dequantize_fp8_block, scale_to_float
from .contract import QuantWeight

log = logging.getLogger("flashport.backends")

GEMV_MAX_ROWS = 8  # up to this many activation rows, weights stream once through the GEMV kernel

FMT_F32, FMT_BF16, FMT_I8, FMT_I4, FMT_FP8 = 0, 1, 2, 3, 4

_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using at::Tensor;

// A weight in its compact CPU layout (see cpu_quant.py): fmt 0 fp32 [N,K], 1 bf16 [N,K], 2 int8 [N,K] + scale [N],
// 3 int4 MatMulNBits B uint8 [N, nb, group/2] + scales fp32 [N, nb] (+ zero points uint8 [N, ceil(nb/2)]),
// 4 fp8 e4m3 codes uint8 [N, K] + scales fp32 [ceil(N/128), ceil(K/128)].
struct QW {
  int64_t fmt, N, K, group;
  Tensor w, scale, zp;
};

static constexpr int64_t CHUNK = 512;   // K elements dequantized at a time (a multiple of every int4 group)
static constexpr int64_t MAX_ROWS = 8;  // activation rows served by the GEMV kernel
static constexpr int64_t PARALLEL_MIN = 1 << 20;  // multiply-adds below which a kernel stays on one thread

static inline float bf16_bits_to_f32(uint16_t b) {
  uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f;
}

// e4m3 code -> fp32 (exact), for the scalar paths
static float E4M3[256];
static bool e4m3_init = [] {
  for (int b = 0; b < 256; b++) {
    const int e = (b >> 3) & 15, m = b & 7;
    float v = e ? std::ldexp(1.f + m / 8.f, e - 7) : std::ldexp(m / 8.f, -6);
    if ((b & 0x7F) == 0x7F) v = NAN;
    E4M3[b] = (b & 0x80) ? -v : v;
  }
  return true;
}();

// Weight row n, columns [k0, k0 + CHUNK) -> fp32 buf (bit-exact with quant.formats' dequantize). int4 writes whole
// groups, so buf may be filled a little past K (padding codes); callers only read up to K.
static inline const float* dequant_row(const QW& q, int64_t n, int64_t k0, int64_t k1, float* buf) {
  const int64_t K = q.K;
  switch (q.fmt) {
    case 0: return q.w.data_ptr<float>() + n * K + k0;
    case 1: {
      const uint16_t* w = reinterpret_cast<const uint16_t*>(q.w.data_ptr()) + n * K;
      #pragma omp simd
      for (int64_t k = k0; k < k1; k++) buf[k - k0] = bf16_bits_to_f32(w[k]);
      return buf;
    }
    case 2: {
      const int8_t* w = q.w.data_ptr<int8_t>() + n * K;
      const float s = q.scale.data_ptr<float>()[n];
      #pragma omp simd
      for (int64_t k = k0; k < k1; k++) buf[k - k0] = float(w[k]) * s;
      return buf;
    }
    case 4: {  // fp8 e4m3 with one scale per 128x128 block: q.float() * scale, exact for power-of-two scales
      const uint8_t* w = q.w.data_ptr<uint8_t>() + n * K;
      const float* sc = q.scale.data_ptr<float>() + (n / 128) * q.scale.size(1);
      for (int64_t k = k0; k < k1; k++) buf[k - k0] = E4M3[w[k]] * sc[k / 128];
      return buf;
    }
    default: {
      const int64_t g = q.group, nb = q.w.size(1);
      const uint8_t* B = q.w.data_ptr<uint8_t>() + n * nb * (g / 2);
      const float* sc = q.scale.data_ptr<float>() + n * nb;
      const uint8_t* zp = q.zp.defined() ? q.zp.data_ptr<uint8_t>() + n * q.zp.size(1) : nullptr;
      for (int64_t b = k0 / g; b * g < k1; b++) {
        const float s = sc[b];
        const int z = zp ? ((zp[b / 2] >> ((b & 1) * 4)) & 15) : 8;
        const uint8_t* src = B + b * (g / 2);
        float* dst = buf + (b * g - k0);
        #pragma omp simd
        for (int64_t j = 0; j < g / 2; j++) {
          dst[2 * j] = float(int(src[j] & 15) - z) * s;
          dst[2 * j + 1] = float(int(src[j] >> 4) - z) * s;
        }
      }
      return buf;
    }
  }
}

static inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  #pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

#ifdef __AVX512F__
#include <immintrin.h>
// AVX-512 row kernels, one instantiation per row count T (accumulators stay in registers) with U independent
// accumulator sets to hide the FMA latency. They dequantize 16 weights in registers and FMA them with every
// activation row; int8 takes the row scale out of the sum and int4 the group scale and zero point
// (s * (sum q*x - z * sum x)): another rounding order than the reference's, same tolerance.
static inline __m512 load_bf16(const uint16_t* w) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))), 16));
}
static inline __m512 load_i8(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}

template <int T, bool BF16>
static inline void row_dense(const void* wp, float scale, const float* x, int64_t ldx, int64_t K, float* acc) {
  constexpr int U = T == 1 ? 4 : (T == 2 ? 2 : 1);
  __m512 a[U][T];
  for (int u = 0; u < U; u++)
    for (int t = 0; t < T; t++) a[u][t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U)
    for (int u = 0; u < U; u++) {
      const int64_t kk = k + 16 * u;
      const __m512 wv = BF16 ? load_bf16(static_cast<const uint16_t*>(wp) + kk) : load_i8(static_cast<const int8_t*>(wp) + kk);
      for (int t = 0; t < T; t++) a[u][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * ldx + kk), a[u][t]);
    }
  for (int t = 0; t < T; t++) {
    for (int u = 1; u < U; u++) a[0][t] = _mm512_add_ps(a[0][t], a[u][t]);
    float s = _mm512_reduce_add_ps(a[0][t]);
    for (int64_t kk = k; kk < K; kk++)
      s += (BF16 ? bf16_bits_to_f32(static_cast<const uint16_t*>(wp)[kk]) : float(static_cast<const int8_t*>(wp)[kk])) * x[t * ldx + kk];
    acc[t] = BF16 ? s : s * scale;
  }
}

// int4, group g (a multiple of 32): xd holds x deinterleaved per 32 columns (16 even, then 16 odd), zero padded to
// nb * g columns, so the low and high nibbles of 16 bytes meet 16 contiguous activations each; xs[t * ldx + b] is
// the sum of row t's activations in group b.
template <int T>
static inline void row_i4(const uint8_t* B, const float* sc, const uint8_t* zp, int64_t g, int64_t nb, const float* xd,
                          const float* xs, int64_t ldx, float* acc) {
  __m512 a[T];
  float zx[T];  // sum over groups of s * z * sum(x in group)
  const __m512i low = _mm512_set1_epi32(15);
  for (int t = 0; t < T; t++) { a[t] = _mm512_setzero_ps(); zx[t] = 0.f; }
  for (int64_t b = 0; b < nb; b++) {
    const float z = float(zp ? ((zp[b / 2] >> ((b & 1) * 4)) & 15) : 8);
    __m512 p0[T], p1[T];
    for (int t = 0; t < T; t++) p0[t] = p1[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < g; j += 32) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(B + (b * g + j) / 2)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
      for (int t = 0; t < T; t++) {
        const float* xx = xd + t * ldx + b * g + j;
        p0[t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xx), p0[t]);
        p1[t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xx + 16), p1[t]);
      }
    }
    const __m512 s = _mm512_set1_ps(sc[b]);
    for (int t = 0; t < T; t++) {
      a[t] = _mm512_fmadd_ps(_mm512_add_ps(p0[t], p1[t]), s, a[t]);
      zx[t] += sc[b] * z * xs[t * ldx + b];
    }
  }
  for (int t = 0; t < T; t++) acc[t] = _mm512_reduce_add_ps(a[t]) - zx[t];
}

// fp8 e4m3 -> fp16 bits (sign << 8, exponent and mantissa << 7: the same number times 2^-8, subnormals included)
// -> fp32 by the F16C conversion, which is exact; the 2^8 joins the block scale.
static inline __m512 load_e4m3_x256(const uint8_t* w) {
  const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x80)), 8),
                                    _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x7F)), 7));
  return _mm512_cvtph_ps(h);
}

template <int T>
static inline void row_fp8(const uint8_t* w, const float* sc, const float* x, int64_t ldx, int64_t K, float* acc) {
  __m512 a[T];
  float tail[T];
  for (int t = 0; t < T; t++) { a[t] = _mm512_setzero_ps(); tail[t] = 0.f; }
  for (int64_t kb = 0; kb < K; kb += 128) {
    const int64_t ke = std::min(K, kb + 128);
    __m512 p0[T], p1[T];
    for (int t = 0; t < T; t++) p0[t] = p1[t] = _mm512_setzero_ps();
    int64_t k = kb;
    for (; k + 32 <= ke; k += 32) {
      const __m512 w0 = load_e4m3_x256(w + k), w1 = load_e4m3_x256(w + k + 16);
      for (int t = 0; t < T; t++) {
        p0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * ldx + k), p0[t]);
        p1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * ldx + k + 16), p1[t]);
      }
    }
    const float s = sc[kb / 128];
    const __m512 s256 = _mm512_set1_ps(s * 256.f);
    for (int t = 0; t < T; t++) {
      a[t] = _mm512_fmadd_ps(_mm512_add_ps(p0[t], p1[t]), s256, a[t]);
      for (int64_t kk = k; kk < ke; kk++) tail[t] += E4M3[w[kk]] * s * x[t * ldx + kk];
    }
  }
  for (int t = 0; t < T; t++) acc[t] = _mm512_reduce_add_ps(a[t]) + tail[t];
}

#define FLASHPORT_DISPATCH_T(T_, CALL)                                                            \
  switch (T_) {                                                                                   \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8);       \
  }
#define FLASHPORT_AVX512 1
#endif

// y[t, n] = sum_k x[t, xoff(n) + k] * W[n, k] for t < T <= MAX_ROWS. rows_per_group > 0: grouped projection, row n
// reads x's group n / rows_per_group (x rows hold G*K values).
static void gemv(const QW& q, const float* x, int64_t T, int64_t ldx, float* y, int64_t ldy, int64_t rows_per_group) {
  const int64_t K = q.K;
#ifdef FLASHPORT_AVX512
  Tensor xd_t;  // int4: activations deinterleaved per 32 columns and zero padded (see row_i4)
  const float* xd = nullptr;
  int64_t ldxd = 0;
  const bool i4_fast = q.fmt == 3 && q.group % 32 == 0 && rows_per_group == 0;
  if (i4_fast) {
    const int64_t Kp = q.w.size(1) * q.group;
    const int64_t nb = q.w.size(1);
    xd_t = at::zeros({T, Kp + nb}, at::kFloat);  // deinterleaved activations, then the per-group sums
    float* d = xd_t.data_ptr<float>();
    for (int64_t t = 0; t < T; t++) {
      for (int64_t k = 0; k < K; k++) d[t * (Kp + nb) + (k & ~int64_t(31)) + ((k & 1) << 4) + ((k & 31) >> 1)] = x[t * ldx + k];
      for (int64_t b = 0; b < nb; b++) {
        float s = 0.f;
        for (int64_t k = b * q.group; k < std::min(K, (b + 1) * q.group); k++) s += x[t * ldx + k];
        d[t * (Kp + nb) + Kp + b] = s;
      }
    }
    xd = d;
    ldxd = Kp + nb;
  }
#endif
  // Threads only for big weights: each parallel region costs a wake-up of the other threads, which on a loaded
  // machine can cost more than a small expert's whole GEMV (~10 us single-threaded).
  const int64_t grain = q.N * K * T >= PARALLEL_MIN ? std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)) : q.N;
  at::parallel_for(0, q.N, grain, [&](int64_t n0, int64_t n1) {
    alignas(64) float buf[CHUNK + 256];
    for (int64_t n = n0; n < n1; n++) {
      float acc[MAX_ROWS] = {0};
      const int64_t xoff = rows_per_group > 0 ? (n / rows_per_group) * K : 0;
#ifdef FLASHPORT_AVX512
      if (q.fmt == 1) {
        const uint16_t* w = reinterpret_cast<const uint16_t*>(q.w.data_ptr()) + n * K;
#define CALL(TT) row_dense<TT, true>(w, 1.f, x + xoff, ldx, K, acc)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
      } else if (q.fmt == 2) {
        const int8_t* w = q.w.data_ptr<int8_t>() + n * K;
        const float s = q.scale.data_ptr<float>()[n];
#define CALL(TT) row_dense<TT, false>(w, s, x + xoff, ldx, K, acc)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
      } else if (q.fmt == 4) {
        const uint8_t* w = q.w.data_ptr<uint8_t>() + n * K;
        const float* sc = q.scale.data_ptr<float>() + (n / 128) * q.scale.size(1);
#define CALL(TT) row_fp8<TT>(w, sc, x + xoff, ldx, K, acc)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
      } else if (i4_fast) {
        const int64_t nb = q.w.size(1);
        const uint8_t* B = q.w.data_ptr<uint8_t>() + n * nb * (q.group / 2);
        const float* sc = q.scale.data_ptr<float>() + n * nb;
        const uint8_t* zp = q.zp.defined() ? q.zp.data_ptr<uint8_t>() + n * q.zp.size(1) : nullptr;
        const float* xs = xd + (ldxd - nb);
#define CALL(TT) row_i4<TT>(B, sc, zp, q.group, nb, xd, xs, ldxd, acc)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
      } else
#endif
      for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
        const int64_t k1 = std::min(K, k0 + CHUNK);
        const float* wr = dequant_row(q, n, k0, k1, buf);
        for (int64_t t = 0; t < T; t++) acc[t] += dot(wr, x + t * ldx + xoff + k0, k1 - k0);
      }
      for (int64_t t = 0; t < T; t++) y[t * ldy + n] = acc[t];
    }
  });
}

Tensor dequantize(const QW& q) {
  if (q.fmt == 0) return q.w;
  Tensor out = at::empty({q.N, q.K}, at::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, q.N, std::max<int64_t>(1, PARALLEL_MIN / std::max<int64_t>(q.K, 1)), [&](int64_t n0, int64_t n1) {
    alignas(64) float buf[CHUNK + 256];
    for (int64_t n = n0; n < n1; n++) {
#ifdef FLASHPORT_AVX512
      if (q.fmt == 4) {  // vectorised e4m3 -> fp32; (v * 2^-8) * (s * 2^8) is exactly v * s rounded once
        const uint8_t* w = q.w.data_ptr<uint8_t>() + n * q.K;
        const float* sc = q.scale.data_ptr<float>() + (n / 128) * q.scale.size(1);
        float* dst = o + n * q.K;
        int64_t k = 0;
        for (; k + 16 <= q.K; k += 16)
          _mm512_storeu_ps(dst + k, _mm512_mul_ps(load_e4m3_x256(w + k), _mm512_set1_ps(sc[k / 128] * 256.f)));
        for (; k < q.K; k++) dst[k] = E4M3[w[k]] * sc[k / 128];
        continue;
      }
#endif
      for (int64_t k0 = 0; k0 < q.K; k0 += CHUNK) {
        const int64_t k1 = std::min(q.K, k0 + CHUNK);
        std::memcpy(o + n * q.K + k0, dequant_row(q, n, k0, k1, buf), (k1 - k0) * sizeof(float));
      }
    }
  });
  return out;
}

// x [T, K] -> [T, N]
Tensor linear(const Tensor& x_, const QW& q) {
  Tensor x = x_.contiguous();
  const int64_t T = x.size(0);
  if (T > MAX_ROWS || q.fmt == 0) return at::mm(x, dequantize(q).t());
  Tensor y = at::empty({T, q.N}, at::kFloat);
  gemv(q, x.data_ptr<float>(), T, q.K, y.data_ptr<float>(), q.N, 0);
  return y;
}

// x [T, G, I], W [G*R, I] -> [T, G, R]
Tensor grouped_linear(const Tensor& x_, const QW& q) {
  Tensor x = x_.contiguous();
  const int64_t T = x.size(0), G = x.size(1), R = q.N / G;
  if (T > MAX_ROWS || q.fmt == 0) {
    Tensor w = dequantize(q).view({G, R, q.K});
    return at::bmm(x.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1).contiguous();  // [T, G, R]
  }
  Tensor y = at::empty({T, G, R}, at::kFloat);
  gemv(q, x.data_ptr<float>(), T, G * q.K, y.data_ptr<float>(), q.N, R);
  return y;
}

// Routed-expert step, the reference's math: experts in ascending id order, each over all of its tokens,
// out += weight * w2(silu(min(w1 x, limit)) * clamp(w3 x, -limit, limit)).
// ids: the distinct expert ids of idx (ascending); w1/w3/w2[i] belong to ids[i].
Tensor moe(const Tensor& x_, const Tensor& weights_, const Tensor& idx_, const std::vector<int64_t>& ids,
           const std::vector<QW>& w1, const std::vector<QW>& w3, const std::vector<QW>& w2, double limit_) {
  Tensor x = x_.contiguous(), weights = weights_.contiguous().to(at::kFloat), idx = idx_.contiguous().to(at::kLong);
  const int64_t T = x.size(0), D = x.size(1), k = idx.size(1);
  const float limit = float(limit_);
  Tensor out = at::zeros({T, D}, at::kFloat);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();
  for (size_t e = 0; e < ids.size(); e++) {
    std::vector<int64_t> rows;
    std::vector<float> gate_w;
    for (int64_t t = 0; t < T; t++)
      for (int64_t s = 0; s < k; s++)
        if (ip[t * k + s] == ids[e]) { rows.push_back(t); gate_w.push_back(wp[t * k + s]); }
    if (rows.empty()) continue;
    const int64_t n = rows.size();
    Tensor rows_t = at::from_blob(rows.data(), {n}, at::kLong).clone();
    Tensor xe = x.index_select(0, rows_t);  // [n, D]
    Tensor g = linear(xe, w1[e]), u = linear(xe, w3[e]);  // [n, I]
    float* gp = g.data_ptr<float>();
    const float* up = u.data_ptr<float>();
    const int64_t I = g.size(1);
    for (int64_t i = 0; i < n * I; i++) {
      const float a = std::min(gp[i], limit);
      const float b = std::min(std::max(up[i], -limit), limit);
      gp[i] = a / (1.f + std::exp(-a)) * b;
    }
    Tensor ye = linear(g, w2[e]);  // [n, D]
    const float* yp = ye.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (int64_t r = 0; r < n; r++) {
      const float c = gate_w[r];
      float* dst = op + rows[r] * D;
      const float* src = yp + r * D;
      #pragma omp simd
      for (int64_t d = 0; d < D; d++) dst[d] += src[d] * c;
    }
  }
  return out;
}

// ---- small fused ops (torch_fast) ----------------------------------------------------------------------------
static inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

// rows of x [R, D] -> weight * x / sqrt(mean(x^2) + eps)
Tensor rms_norm(const Tensor& x_, const c10::optional<Tensor>& weight, double eps) {
  Tensor x = x_.contiguous();
  const int64_t D = x.size(-1), R = D ? x.numel() / D : 0;
  Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* w = weight.has_value() && weight->defined() ? weight->contiguous().data_ptr<float>() : nullptr;
  at::parallel_for(0, R, std::max<int64_t>(1, PARALLEL_MIN / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const float* a = xp + r * D;
      float* o = op + r * D;
      const float inv = 1.f / std::sqrt(dot(a, a, D) / float(D) + float(eps));
      if (w) {
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) o[d] = w[d] * (a[d] * inv);
      } else {
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) o[d] = a[d] * inv;
      }
    }
  });
  return out;
}

// interleaved RoPE on the last 2*cos.size(1) channels; x [T, M, Dh] (M rows per position), cos/sin [T, r/2]
Tensor rope(const Tensor& x_, const Tensor& cos_, const Tensor& sin_, bool inverse) {
  Tensor x = x_.contiguous(), cs = cos_.contiguous(), sn = sin_.contiguous();
  const int64_t T = x.size(0), Dh = x.size(-1), half = cs.size(1), r = 2 * half;
  const int64_t M = T ? x.numel() / (T * Dh) : 0;
  Tensor out = x.clone();
  const float* cp = cs.data_ptr<float>();
  const float* sp = sn.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sgn = inverse ? -1.f : 1.f;
  at::parallel_for(0, T * M, std::max<int64_t>(1, PARALLEL_MIN / std::max<int64_t>(Dh, 1)), [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; a++) {
      const int64_t t = a / M;
      float* v = op + a * Dh + (Dh - r);
      for (int64_t i = 0; i < half; i++) {
        const float c = cp[t * half + i], s = sgn * sp[t * half + i];
        const float x1 = v[2 * i], x2 = v[2 * i + 1];
        v[2 * i] = x1 * c - x2 * s;
        v[2 * i + 1] = x2 * c + x1 * s;
      }
    }
  });
  return out;
}

// mHC before a sub-block: streams [T, N, D], fn [(2+N)*N, N*D] -> (x [T, D], post [T, N], comb [T, N, N]); the
// mixes rms_norm(streams) @ fn.T come from one matmul (prefill) or per-token dot products (decode), then
// sigmoid / softmax / Sinkhorn / the stream mix run per token in registers.
std::vector<Tensor> hc_pre(const Tensor& streams_, const Tensor& fn_, const Tensor& base_, const Tensor& scale_,
                           int64_t iters, double eps_, double norm_eps) {
  Tensor streams = streams_.contiguous(), fn = fn_.contiguous(), base = base_.contiguous(), scale = scale_.contiguous();
  const int64_t T = streams.size(0), N = streams.size(1), D = streams.size(2), M = (2 + N) * N;
  TORCH_CHECK(N <= 16, "hc_mult above 16 is not supported by the fused kernel");
  Tensor mix;
  if (T > MAX_ROWS) {
    mix = at::mm(rms_norm(streams.view({T, N * D}), c10::nullopt, norm_eps), fn.t()).contiguous();
  } else {
    mix = at::empty({T, M}, at::kFloat);
    const float* sp = streams.data_ptr<float>();
    const float* fp = fn.data_ptr<float>();
    float* mp = mix.data_ptr<float>();
    for (int64_t t = 0; t < T; t++) {
      const float* a = sp + t * N * D;
      const float inv = 1.f / std::sqrt(dot(a, a, N * D) / float(N * D) + float(norm_eps));
      for (int64_t j = 0; j < M; j++) mp[t * M + j] = dot(fp + j * N * D, a, N * D) * inv;
    }
  }
  Tensor x = at::empty({T, D}, at::kFloat), post = at::empty({T, N}, at::kFloat), comb = at::empty({T, N, N}, at::kFloat);
  const float* mp = mix.data_ptr<float>();
  const float* sp = streams.data_ptr<float>();
  const float* bp = base.data_ptr<float>();
  const float* sc = scale.data_ptr<float>();
  const float eps = float(eps_);
  float* xp = x.data_ptr<float>();
  float* pp = post.data_ptr<float>();
  float* cp = comb.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, PARALLEL_MIN / (N * D)), [&](int64_t t0, int64_t t1) {
    float pre[16], c[16 * 16];
    for (int64_t t = t0; t < t1; t++) {
      const float* m = mp + t * (2 + N) * N;
      for (int64_t i = 0; i < N; i++) {
        pre[i] = sigmoid(m[i] * sc[0] + bp[i]) + eps;
        pp[t * N + i] = 2.f * sigmoid(m[N + i] * sc[1] + bp[N + i]);
      }
      for (int64_t i = 0; i < N; i++) {  // row softmax
        float mx = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < N; j++) { c[i * N + j] = m[2 * N + i * N + j] * sc[2] + bp[2 * N + i * N + j]; mx = std::max(mx, c[i * N + j]); }
        for (int64_t j = 0; j < N; j++) { c[i * N + j] = std::exp(c[i * N + j] - mx); sum += c[i * N + j]; }
        for (int64_t j = 0; j < N; j++) c[i * N + j] = c[i * N + j] / sum + eps;
      }
      auto cols = [&]() {
        for (int64_t j = 0; j < N; j++) {
          float s = 0.f;
          for (int64_t i = 0; i < N; i++) s += c[i * N + j];
          for (int64_t i = 0; i < N; i++) c[i * N + j] /= s + eps;
        }
      };
      cols();
      for (int64_t it = 0; it < iters - 1; it++) {
        for (int64_t i = 0; i < N; i++) {
          float s = 0.f;
          for (int64_t j = 0; j < N; j++) s += c[i * N + j];
          for (int64_t j = 0; j < N; j++) c[i * N + j] /= s + eps;
        }
        cols();
      }
      std::memcpy(cp + t * N * N, c, N * N * sizeof(float));
      float* xo = xp + t * D;
      const float* st = sp + t * N * D;
      #pragma omp simd
      for (int64_t d = 0; d < D; d++) xo[d] = pre[0] * st[d];
      for (int64_t i = 1; i < N; i++) {
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) xo[d] += pre[i] * st[i * D + d];
      }
    }
  });
  return {x, post, comb};
}

// mHC after a sub-block: out [T, D], streams [T, N, D], post [T, N], comb [T, N, N] -> [T, N, D]
Tensor hc_post(const Tensor& out_, const Tensor& streams_, const Tensor& post_, const Tensor& comb_) {
  Tensor o = out_.contiguous(), streams = streams_.contiguous(), post = post_.contiguous(), comb = comb_.contiguous();
  const int64_t T = streams.size(0), N = streams.size(1), D = streams.size(2);
  Tensor res = at::empty({T, N, D}, at::kFloat);
  const float* opp = o.data_ptr<float>();
  const float* sp = streams.data_ptr<float>();
  const float* pp = post.data_ptr<float>();
  const float* cp = comb.data_ptr<float>();
  float* rp = res.data_ptr<float>();
  at::parallel_for(0, T * N, std::max<int64_t>(1, PARALLEL_MIN / std::max<int64_t>(D * N, 1)), [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; a++) {
      const int64_t t = a / N, kk = a % N;
      float* r = rp + a * D;
      const float p = pp[a];
      const float* src = opp + t * D;
      #pragma omp simd
      for (int64_t d = 0; d < D; d++) r[d] = p * src[d];
      for (int64_t j = 0; j < N; j++) {
        const float c = cp[(t * N + j) * N + kk];
        const float* s = sp + (t * N + j) * D;
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) r[d] += c * s[d];
      }
    }
  });
  return res;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<QW>(m, "QW")
      .def(pybind11::init<>())
      .def(pybind11::init([](int64_t fmt, int64_t N, int64_t K, int64_t group, Tensor w, c10::optional<Tensor> scale,
                             c10::optional<Tensor> zp) {
        QW q{fmt, N, K, group, w, scale.value_or(Tensor()), zp.value_or(Tensor())};
        return q;
      }))
      .def_readonly("fmt", &QW::fmt).def_readonly("N", &QW::N).def_readonly("K", &QW::K);
  m.def("dequantize", &dequantize);
  m.def("linear", &linear);
  m.def("grouped_linear", &grouped_linear);
  m.def("moe", &moe);
  m.def("rms_norm", &rms_norm);
  m.def("rope", &rope);
  m.def("hc_pre", &hc_pre);
  m.def("hc_post", &hc_post);
}
"""

_ext_lock = threading.Lock()
_ext_state: dict = {}


def ext():
    """The compiled extension, built on first use (about 20-60 s once per machine, then cached); None when it
    cannot be built here (FLASHPORT_NO_CPP_EXT=1 disables it), and then every caller uses its torch path."""
    with _ext_lock:
        if "mod" in _ext_state:
            return _ext_state["mod"]
        mod = None
        if os.environ.get("FLASHPORT_NO_CPP_EXT") != "1":
            try:
                from torch.utils.cpp_extension import load_inline

                # the name carries the source and the CPU flags: -march=native code must never run on another CPU
                flags = _cpu_flags()
                tag = hashlib.sha1((_CPP + flags + torch.__version__).encode()).hexdigest()[:12]
                log.info("building flashport's CPU kernels (once per machine, cached)")
                mod = load_inline(f"flashport_cpu_{tag}", cpp_sources=_CPP, functions=None,
                                  extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
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
    """A weight uploaded for the fast CPU path: int8 / int4 stay packed, bf16-exact weights become bf16, the rest
    fp32. `native` is the C++ view (None without the extension)."""

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
        w = qw.dequantize().float().contiguous()
        return cls.from_dense(w)

    @classmethod
    def _fp8(cls, shape, codes: Tensor, scale: Tensor) -> "CpuWeight":
        return cls(FMT_FP8, shape, codes.contiguous().view(torch.uint8), scale_to_float(scale).float().contiguous())

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
        return dequantize_int4(self.w, self.scale, self.zp, self.shape[1])


def upload(w: QuantWeight) -> CpuWeight:
    return CpuWeight.from_quant(w)


def linear(x: Tensor, w: CpuWeight) -> Tensor:
    """x [T, K] @ W.T -> [T, N] (tolerance-bound, see the module docstring)."""
    if w.native is not None:
        return ext().linear(x.float(), w.native)
    return x @ (w.w.T if w.fmt == FMT_F32 else w.dequantize().T)


def grouped_linear(x: Tensor, w: CpuWeight) -> Tensor:
    """x [T, G, I], W [G*R, I] -> [T, G, R]."""
    if w.native is not None:
        return ext().grouped_linear(x.float(), w.native)
    g = x.shape[1]
    dw = w.w if w.fmt == FMT_F32 else w.dequantize()
    return torch.einsum("tgi,gri->tgr", x, dw.view(g, -1, dw.shape[-1]))


def moe(x: Tensor, weights: Tensor, idx: Tensor, experts, limit: float) -> Tensor:
    """The reference's routed-expert step (experts[e] = (w1, w3, w2) CpuWeights), fused in C++: one call per
    layer instead of ~10 torch ops per expert."""
    # the distinct experts, ascending like the reference (a decode step's few ids: cheaper in Python than unique)
    ids = sorted(set(idx.reshape(-1).tolist())) if idx.numel() <= 64 else idx.unique().tolist()
    handles = [experts[e] for e in ids]
    if ext() is None or any(h.native is None for hs in handles for h in hs):
        from . import reference

        dense = {e: tuple(h.dequantize() for h in hs) for e, hs in zip(ids, handles)}
        return reference.moe(x, weights, idx, dense, limit)
    return ext().moe(x.float(), weights, idx, ids, [h[0].native for h in handles], [h[1].native for h in handles],
                     [h[2].native for h in handles], float(limit))
