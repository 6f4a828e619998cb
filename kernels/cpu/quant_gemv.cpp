// Quantized GEMV / GEMM and the fused routed-expert (MoE) step on flashport's compact CPU weights.
//
// Torch references: backends/reference.py (linear, grouped_linear, moe) on flashport.quant's dequantization;
// cpu_quant.py's torch paths run them when this extension is not built. Dequantization here is BIT-EXACT with
// quant.formats (one fp32 rounding of (q - zp) * scale and q * scale); the dot products accumulate in another
// order than torch's matmul: TOLERANCE-BOUND (tests/test_torch_fast.py).
#include "common.h"

namespace flashport {

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

// MXFP4 (quant.release): e2m1 code -> value (sign bit 8: -0 for code 8), UE8M0 byte -> 2^(b - 127), 0xFF -> NaN.
// Every product of the two is a float32 number (2 significant bits, at least 2^-128): one exact multiplication.
static float E2M1[16];
static float E8M0[256];
static bool mxfp4_init = [] {
  const float mag[8] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  for (int c = 0; c < 16; c++) E2M1[c] = (c & 8) ? -mag[c & 7] : mag[c & 7];
  for (int b = 0; b < 256; b++) E8M0[b] = b == 255 ? NAN : std::ldexp(1.f, b - 127);
  return true;
}();

static inline float mxfp4_value(const uint8_t* w, const uint8_t* sc, int64_t k) {
  return E2M1[(w[k >> 1] >> ((k & 1) * 4)) & 15] * E8M0[sc[k / MXFP4_BLOCK]];
}

// Weight row n, columns [k0, k0 + CHUNK) -> fp32 buf (bit-exact with quant.formats' dequantize). int4 writes whole
// groups, so buf may be filled a little past K (padding codes); callers only read up to K.
static inline const float* dequant_row(const QW& q, int64_t n, int64_t k0, int64_t k1, float* buf) {
  const int64_t K = q.K;
  switch (q.fmt) {
    case FMT_F32: return q.w.data_ptr<float>() + n * K + k0;
    case FMT_BF16: {
      const uint16_t* w = reinterpret_cast<const uint16_t*>(q.w.data_ptr()) + n * K;
      #pragma omp simd
      for (int64_t k = k0; k < k1; k++) buf[k - k0] = bf16_bits_to_f32(w[k]);
      return buf;
    }
    case FMT_I8: {
      const int8_t* w = q.w.data_ptr<int8_t>() + n * K;
      const float s = q.scale.data_ptr<float>()[n];
      #pragma omp simd
      for (int64_t k = k0; k < k1; k++) buf[k - k0] = float(w[k]) * s;
      return buf;
    }
    case FMT_FP8: {  // fp8 e4m3 with one scale per FP8_BLOCK^2 block: q.float() * scale, exact for power-of-two scales
      const uint8_t* w = q.w.data_ptr<uint8_t>() + n * K;
      const float* sc = q.scale.data_ptr<float>() + (n / FP8_BLOCK) * q.scale.size(1);
      for (int64_t k = k0; k < k1; k++) buf[k - k0] = E4M3[w[k]] * sc[k / FP8_BLOCK];
      return buf;
    }
    case FMT_MXFP4: {  // e2m1 value * block scale, as quant.release.dequantize_mxfp4 (bit-exact)
      const int64_t nb = q.scale.size(1);
      const uint8_t* w = q.w.data_ptr<uint8_t>() + n * nb * (MXFP4_BLOCK / 2);
      const uint8_t* sc = q.scale.data_ptr<uint8_t>() + n * nb;
      for (int64_t k = k0; k < k1; k++) buf[k - k0] = mxfp4_value(w, sc, k);
      return buf;
    }
    default: {  // FMT_I4
      const int64_t g = q.group, nb = q.w.size(1);
      const uint8_t* B = q.w.data_ptr<uint8_t>() + n * nb * (g / 2);
      const float* sc = q.scale.data_ptr<float>() + n * nb;
      const uint8_t* zp = q.zp.defined() ? q.zp.data_ptr<uint8_t>() + n * q.zp.size(1) : nullptr;
      for (int64_t b = k0 / g; b * g < k1; b++) {
        const float s = sc[b];
        const int z = zp ? ((zp[b / 2] >> ((b & 1) * 4)) & 15) : INT4_ZERO_POINT;
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
    const float z = float(zp ? ((zp[b / 2] >> ((b & 1) * 4)) & 15) : INT4_ZERO_POINT);
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
// -> fp32 by the F16C conversion, which is exact; the 2^8 joins the block scale. The GEMVs are bound by this
// conversion, so it takes 3 integer ops: t = code << 7 puts exponent and mantissa in place and the sign at bit 14;
// t + (t & 0x4000) carries that bit into bit 15 and clears bit 14 (the same bits as (s << 8) | (em << 7)).
static inline __m512 load_e4m3_x256(const uint8_t* w) {
  const __m256i t = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))), 7);
  return _mm512_cvtph_ps(_mm256_add_epi16(t, _mm256_and_si256(t, _mm256_set1_epi16(0x4000))));
}

template <int T>
static inline void row_fp8(const uint8_t* w, const float* sc, const float* x, int64_t ldx, int64_t K, float* acc) {
  __m512 a[T];
  float tail[T];
  for (int t = 0; t < T; t++) { a[t] = _mm512_setzero_ps(); tail[t] = 0.f; }
  for (int64_t kb = 0; kb < K; kb += FP8_BLOCK) {
    const int64_t ke = std::min(K, kb + FP8_BLOCK);
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
    const float s = sc[kb / FP8_BLOCK];
    const __m512 s256 = _mm512_set1_ps(s * 256.f);
    for (int t = 0; t < T; t++) {
      a[t] = _mm512_fmadd_ps(_mm512_add_ps(p0[t], p1[t]), s256, a[t]);
      for (int64_t kk = k; kk < ke; kk++) tail[t] += E4M3[w[kk]] * s * x[t * ldx + kk];
    }
  }
  for (int t = 0; t < T; t++) acc[t] = _mm512_reduce_add_ps(a[t]) + tail[t];
}

// One activation row (decode) against R = 4 weight rows of the same 128-row scale block: each row's sum is formed
// exactly as row_fp8<1> forms it (same partial sums, same order, same reduction), so the result is bit-identical;
// the x loads and the loop overhead are shared, which matters for small K (an expert's K = 128 down projection
// spent more time per row in the prologue and the reduction than in its 4 vector steps). Used for K <= 512 only:
// with long rows four concurrent weight streams measured slower than one (4096x4096: 1.15 vs 0.85 ms).
static inline void rows4_fp8(const uint8_t* w, int64_t ldw, const float* sc, const float* x, int64_t K, float* out) {
  constexpr int R = 4;
  __m512 a[R];
  float tail[R];
  for (int r = 0; r < R; r++) { a[r] = _mm512_setzero_ps(); tail[r] = 0.f; }
  for (int64_t kb = 0; kb < K; kb += FP8_BLOCK) {
    const int64_t ke = std::min(K, kb + FP8_BLOCK);
    __m512 p0[R], p1[R];
    for (int r = 0; r < R; r++) p0[r] = p1[r] = _mm512_setzero_ps();
    int64_t k = kb;
    for (; k + 32 <= ke; k += 32) {
      const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
      for (int r = 0; r < R; r++) {
        p0[r] = _mm512_fmadd_ps(load_e4m3_x256(w + r * ldw + k), x0, p0[r]);
        p1[r] = _mm512_fmadd_ps(load_e4m3_x256(w + r * ldw + k + 16), x1, p1[r]);
      }
    }
    const float s = sc[kb / FP8_BLOCK];
    const __m512 s256 = _mm512_set1_ps(s * 256.f);
    for (int r = 0; r < R; r++) {
      a[r] = _mm512_fmadd_ps(_mm512_add_ps(p0[r], p1[r]), s256, a[r]);
      for (int64_t kk = k; kk < ke; kk++) tail[r] += E4M3[w[r * ldw + kk]] * s * x[kk];
    }
  }
  for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(a[r]) + tail[r];
}

// MXFP4: the 16 bytes of one 32-weight scale block -> two vectors of e2m1 values in k order (low and high nibbles
// split, interleaved back, looked up in a 16-entry register table: exact).
static inline void load_e2m1_x32(const uint8_t* w, const __m512 lut, __m512& v0, __m512& v1) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i m = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  v0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), lut);
  v1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)), lut);
}

// MXFP4 row (0.5 byte per weight read): per 32-weight block the dot product of the e2m1 values with x, times the
// block's scale (a power of two) into the row's sum; the partial last block scalar. Another rounding order than
// the reference's dequantize-then-matmul: TOLERANCE-BOUND like the other formats.
template <int T>
static inline void row_mxfp4(const uint8_t* w, const uint8_t* sc, const float* x, int64_t ldx, int64_t K, float* acc) {
  const __m512 lut = _mm512_loadu_ps(E2M1);
  __m512 a[2][T];  // two accumulator sets (even / odd blocks) to hide the FMA latency
  float tail[T];
  for (int t = 0; t < T; t++) { a[0][t] = a[1][t] = _mm512_setzero_ps(); tail[t] = 0.f; }
  const int64_t full = K / MXFP4_BLOCK;
  for (int64_t b = 0; b < full; b++) {
    __m512 w0, w1;
    load_e2m1_x32(w + b * (MXFP4_BLOCK / 2), lut, w0, w1);
    const __m512 s = _mm512_set1_ps(E8M0[sc[b]]);
    for (int t = 0; t < T; t++) {
      const float* xx = x + t * ldx + b * MXFP4_BLOCK;
      const __m512 p = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xx + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xx)));
      a[b & 1][t] = _mm512_fmadd_ps(p, s, a[b & 1][t]);
    }
  }
  for (int64_t k = full * MXFP4_BLOCK; k < K; k++) {
    const float v = mxfp4_value(w, sc, k);
    for (int t = 0; t < T; t++) tail[t] += v * x[t * ldx + k];
  }
  for (int t = 0; t < T; t++) acc[t] = _mm512_reduce_add_ps(_mm512_add_ps(a[0][t], a[1][t])) + tail[t];
}

static_assert(MAX_ROWS == 8, "FLASHPORT_DISPATCH_T instantiates the row kernels for 1..8 activation rows");
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
  const bool i4_fast = q.fmt == FMT_I4 && q.group % 32 == 0 && rows_per_group == 0;
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
      if (q.fmt == FMT_FP8 && T == 1 && K <= 512 && n + 3 < n1 && n / FP8_BLOCK == (n + 3) / FP8_BLOCK &&
          (rows_per_group == 0 || n / rows_per_group == (n + 3) / rows_per_group)) {  // 4 rows at once
        float out4[4];
        rows4_fp8(q.w.data_ptr<uint8_t>() + n * K, K, q.scale.data_ptr<float>() + (n / FP8_BLOCK) * q.scale.size(1),
                  x + xoff, K, out4);
        for (int r = 0; r < 4; r++) y[n + r] = out4[r];
        n += 3;
        continue;
      }
      if (q.fmt == FMT_BF16) {
        const uint16_t* w = reinterpret_cast<const uint16_t*>(q.w.data_ptr()) + n * K;
#define CALL(TT) row_dense<TT, true>(w, 1.f, x + xoff, ldx, K, acc)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
      } else if (q.fmt == FMT_I8) {
        const int8_t* w = q.w.data_ptr<int8_t>() + n * K;
        const float s = q.scale.data_ptr<float>()[n];
#define CALL(TT) row_dense<TT, false>(w, s, x + xoff, ldx, K, acc)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
      } else if (q.fmt == FMT_FP8) {
        const uint8_t* w = q.w.data_ptr<uint8_t>() + n * K;
        const float* sc = q.scale.data_ptr<float>() + (n / FP8_BLOCK) * q.scale.size(1);
#define CALL(TT) row_fp8<TT>(w, sc, x + xoff, ldx, K, acc)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
      } else if (q.fmt == FMT_MXFP4) {
        const int64_t nb = q.scale.size(1);
        const uint8_t* w = q.w.data_ptr<uint8_t>() + n * nb * (MXFP4_BLOCK / 2);
        const uint8_t* sc = q.scale.data_ptr<uint8_t>() + n * nb;
#define CALL(TT) row_mxfp4<TT>(w, sc, x + xoff, ldx, K, acc)
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
  if (q.fmt == FMT_F32) return q.w;
  Tensor out = at::empty({q.N, q.K}, at::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, q.N, std::max<int64_t>(1, PARALLEL_MIN / std::max<int64_t>(q.K, 1)), [&](int64_t n0, int64_t n1) {
    alignas(64) float buf[CHUNK + 256];
    for (int64_t n = n0; n < n1; n++) {
#ifdef FLASHPORT_AVX512
      if (q.fmt == FMT_FP8) {  // vectorised e4m3 -> fp32; (v * 2^-8) * (s * 2^8) is exactly v * s rounded once
        const uint8_t* w = q.w.data_ptr<uint8_t>() + n * q.K;
        const float* sc = q.scale.data_ptr<float>() + (n / FP8_BLOCK) * q.scale.size(1);
        float* dst = o + n * q.K;
        int64_t k = 0;
        for (; k + 16 <= q.K; k += 16)
          _mm512_storeu_ps(dst + k, _mm512_mul_ps(load_e4m3_x256(w + k), _mm512_set1_ps(sc[k / FP8_BLOCK] * 256.f)));
        for (; k < q.K; k++) dst[k] = E4M3[w[k]] * sc[k / FP8_BLOCK];
        continue;
      }
      if (q.fmt == FMT_MXFP4) {  // vectorised: one exact product (e2m1 value * block scale) per weight
        const int64_t nb = q.scale.size(1), full = q.K / MXFP4_BLOCK;
        const uint8_t* w = q.w.data_ptr<uint8_t>() + n * nb * (MXFP4_BLOCK / 2);
        const uint8_t* sc = q.scale.data_ptr<uint8_t>() + n * nb;
        const __m512 lut = _mm512_loadu_ps(E2M1);
        float* dst = o + n * q.K;
        for (int64_t b = 0; b < full; b++) {
          __m512 v0, v1;
          load_e2m1_x32(w + b * (MXFP4_BLOCK / 2), lut, v0, v1);
          const __m512 s = _mm512_set1_ps(E8M0[sc[b]]);
          _mm512_storeu_ps(dst + b * MXFP4_BLOCK, _mm512_mul_ps(v0, s));
          _mm512_storeu_ps(dst + b * MXFP4_BLOCK + 16, _mm512_mul_ps(v1, s));
        }
        for (int64_t k = full * MXFP4_BLOCK; k < q.K; k++) dst[k] = mxfp4_value(w, sc, k);
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
  if (T > MAX_ROWS || q.fmt == FMT_F32) return at::mm(x, dequantize(q).t());
  Tensor y = at::empty({T, q.N}, at::kFloat);
  gemv(q, x.data_ptr<float>(), T, q.K, y.data_ptr<float>(), q.N, 0);
  return y;
}

// x [T, G, I], W [G*R, I] -> [T, G, R]
Tensor grouped_linear(const Tensor& x_, const QW& q) {
  Tensor x = x_.contiguous();
  const int64_t T = x.size(0), G = x.size(1), R = q.N / G;
  if (T > MAX_ROWS || q.fmt == FMT_F32) {
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
// An expert with at most MAX_ROWS tokens (every expert of a decode step) runs the GEMV kernel on plain buffers
// reused across experts: no tensor is allocated per expert (each costs about a microsecond, as much as a small
// expert's GEMV); more tokens go through linear() (the GEMM path). Same arithmetic either way.
Tensor moe(const Tensor& x_, const Tensor& weights_, const Tensor& idx_, const std::vector<int64_t>& ids,
           const std::vector<QW>& w1, const std::vector<QW>& w3, const std::vector<QW>& w2, double limit_) {
  Tensor x = x_.contiguous(), weights = weights_.contiguous().to(at::kFloat), idx = idx_.contiguous().to(at::kLong);
  const int64_t T = x.size(0), D = x.size(1), k = idx.size(1);
  const float limit = float(limit_);
  Tensor out = at::zeros({T, D}, at::kFloat);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::vector<int64_t> rows;
  std::vector<float> gate_w, xbuf, gbuf, ubuf, ybuf;
  for (size_t e = 0; e < ids.size(); e++) {
    rows.clear();
    gate_w.clear();
    for (int64_t t = 0; t < T; t++)
      for (int64_t s = 0; s < k; s++)
        if (ip[t * k + s] == ids[e]) { rows.push_back(t); gate_w.push_back(wp[t * k + s]); }
    if (rows.empty()) continue;
    const int64_t n = rows.size(), I = w1[e].N;
    const float *gp, *up, *yp;
    Tensor g, u, ye;  // the GEMM path's outputs
    float* gmut;
    if (n <= MAX_ROWS && w1[e].fmt != FMT_F32 && w3[e].fmt != FMT_F32 && w2[e].fmt != FMT_F32) {
      const float* xe = xp + rows[0] * D;
      if (n > 1) {  // gather the expert's rows (a single row is read in place)
        xbuf.resize(n * D);
        for (int64_t r = 0; r < n; r++) std::memcpy(xbuf.data() + r * D, xp + rows[r] * D, D * sizeof(float));
        xe = xbuf.data();
      }
      gbuf.resize(n * I);
      ubuf.resize(n * I);
      ybuf.resize(n * D);
      gemv(w1[e], xe, n, D, gbuf.data(), I, 0);
      gemv(w3[e], xe, n, D, ubuf.data(), I, 0);
      gmut = gbuf.data();
      up = ubuf.data();
    } else {
      Tensor rows_t = at::from_blob(rows.data(), {n}, at::kLong).clone();
      Tensor xe = x.index_select(0, rows_t);  // [n, D]
      g = linear(xe, w1[e]);
      u = linear(xe, w3[e]);  // [n, I]
      gmut = g.data_ptr<float>();
      up = u.data_ptr<float>();
    }
    for (int64_t i = 0; i < n * I; i++) {
      const float a = std::min(gmut[i], limit);
      const float b = std::min(std::max(up[i], -limit), limit);
      gmut[i] = a / (1.f + std::exp(-a)) * b;
    }
    gp = gmut;
    if (g.defined()) {
      ye = linear(g, w2[e]);  // [n, D]
      yp = ye.data_ptr<float>();
    } else {
      gemv(w2[e], gp, n, I, ybuf.data(), D, 0);
      yp = ybuf.data();
    }
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

}  // namespace flashport
