// Quantized GEMV / GEMM and the fused routed-expert (MoE) step on flashport's compact CPU weights.
//
// Torch references: backends/reference.py (linear, grouped_linear, moe) on flashport.quant's dequantization;
// cpu_quant.py's torch paths run them when this extension is not built. Dequantization here is BIT-EXACT with
// quant.formats (one fp32 rounding of (q - zp) * scale and q * scale); the dot products accumulate in another
// order than torch's matmul: TOLERANCE-BOUND (tests/test_torch_fast.py).
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

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
// AVX-512 row kernels: R weight rows (R = 4 for one activation row with long rows, see gemv; else 1) against T
// activation rows, one instantiation per (R, T) so the accumulators stay in registers. They dequantize 16 weights
// in registers and FMA them with the activations. With R > 1 each weight row stream is prefetched PREFETCH bytes
// ahead (one stream, R = 1, is followed well by the hardware prefetcher: software prefetch measured no gain).
//
// Memory limit: a decode GEMV reads every weight byte once; what kept the former one-row kernels from it was (a) an
// activation row too long for L1 (K = 16384: 64 KB of fp32 re-read from L2 for every weight row; four weight rows
// per pass share each x load), (b) too few independent FMA chains (a chain's latency bounded a one-row pass), (c)
// the hardware prefetcher falling behind on a slow consumer. Measured per core: docs/performance.md, Round 4.
//
// Exactness against the reference (quant.formats' dequantization + torch's fp32 matmul): TOLERANCE-BOUND, |y - ref|
// <= 1e-5 * (|x| @ |W|.T) + 1e-6 (test_linear_formats): int8 takes the row scale out of the sum, int4 the group
// scale and zero point, FP8 the block scale; bf16 multiplies the exact weights. int4 and FP8 sum each output
// (row r, activation t) in an order that depends on K only, never on R or T: a decode row equals the same row
// inside a batch of up to MAX_ROWS bit for bit (test_decode_rows_bit_identical_to_a_batch_row); bf16 / int8 use
// more chains for one row than for a batch (not bit-identical across T, same tolerance).
// The row kernels are noinline: inlined into gemv's lambda with every (R, T) instantiation, the one-row int4 kernel
// ran 1.4x slower than the same code compiled alone.
constexpr int64_t PREFETCH = 2048;  // bytes ahead on each weight row stream (1-4 KB measured alike; none: -25%)
constexpr int64_t LONG_ROW = 4096;  // K above which one decode row takes four weight rows per pass (x: 16 KB of L1)

static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + PREFETCH, _MM_HINT_T0); }
static inline __m512 load_bf16(const uint16_t* w) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))), 16));
}
static inline __m512 load_i8(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}

// bf16 / int8 (per-row scale sc[r], applied to the sum): U accumulator chains per (r, t), at least 8 in all.
template <int R, int T, bool BF16>
__attribute__((noinline)) static void rows_dense(const void* wp, int64_t ldw, const float* sc, const float* x, int64_t ldx, int64_t K,
                              float* y, int64_t ldy) {
  constexpr int U = R * T >= 4 ? 2 : 4;
  const uint16_t* w16 = static_cast<const uint16_t*>(wp);
  const int8_t* w8 = static_cast<const int8_t*>(wp);
  __m512 a[U][R][T];
  for (int u = 0; u < U; u++)
    for (int r = 0; r < R; r++)
      for (int t = 0; t < T; t++) a[u][r][t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    constexpr int64_t STEP = 16 * U * (BF16 ? 2 : 1);  // bytes of a row per step: one prefetch per 64-byte line
    if (R > 1 && (STEP >= 64 || !(k & 32)))
      for (int r = 0; r < R; r++)
        for (int64_t o = 0; o < std::max<int64_t>(STEP, 64); o += 64)
          prefetch(BF16 ? static_cast<const void*>(w16 + r * ldw + k + o / 2) : w8 + r * ldw + k + o);
    for (int u = 0; u < U; u++)
      for (int r = 0; r < R; r++) {
        const int64_t kk = k + 16 * u;
        const __m512 v = BF16 ? load_bf16(w16 + r * ldw + kk) : load_i8(w8 + r * ldw + kk);
        for (int t = 0; t < T; t++) a[u][r][t] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + t * ldx + kk), a[u][r][t]);
      }
  }
  for (int r = 0; r < R; r++)
    for (int t = 0; t < T; t++) {
      for (int u = 1; u < U; u++) a[0][r][t] = _mm512_add_ps(a[0][r][t], a[u][r][t]);
      float s = _mm512_reduce_add_ps(a[0][r][t]);
      for (int64_t kk = k; kk < K; kk++)
        s += (BF16 ? bf16_bits_to_f32(w16[r * ldw + kk]) : float(w8[r * ldw + kk])) * x[t * ldx + kk];
      y[t * ldy + r] = BF16 ? s : s * sc[r];
    }
}

// int4, group g (a multiple of 32), MatMulNBits layout: s * (sum q*x - z * sum x) per group, i.e. the scale and
// the zero point taken out of the group's sum. xd holds x deinterleaved per 32 columns (16 even, then 16 odd), zero
// padded to nb * g columns, so the low and high nibbles of 16 bytes meet 16 contiguous activations each; xs[t * ldx
// + b] is the sum of row t's activations in group b. Each (r, t) is summed in the same order whatever R and T.
// (A 16-entry table of the dequantized codes looked up by vpermps measured slower on this CPU: 10 vs 19 GB/s.)
template <int R, int T>
__attribute__((noinline)) static void rows_i4(const uint8_t* B, int64_t ldb, const float* sc, int64_t ldsc, const uint8_t* zp,
                           int64_t ldzp, int64_t g, int64_t nb, const float* xd, const float* xs, int64_t ldx, float* y,
                           int64_t ldy) {
  __m512 a[R][T];
  float zx[R][T];  // sum over groups of s * z * sum(x in group)
  const __m512i low = _mm512_set1_epi32(15);
  for (int r = 0; r < R; r++)
    for (int t = 0; t < T; t++) { a[r][t] = _mm512_setzero_ps(); zx[r][t] = 0.f; }
  for (int64_t b = 0; b < nb; b++) {
    __m512 p0[R][T], p1[R][T];
    for (int r = 0; r < R; r++)
      for (int t = 0; t < T; t++) p0[r][t] = p1[r][t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < g; j += 32) {
      const int64_t off = (b * g + j) / 2;
      if (R > 1 && (off & 63) == 0)
        for (int r = 0; r < R; r++) prefetch(B + r * ldb + off);
      for (int r = 0; r < R; r++) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(B + r * ldb + off)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        for (int t = 0; t < T; t++) {
          const float* xx = xd + t * ldx + b * g + j;
          p0[r][t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xx), p0[r][t]);
          p1[r][t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xx + 16), p1[r][t]);
        }
      }
    }
    for (int r = 0; r < R; r++) {
      const float sb = sc[r * ldsc + b];
      const float z = float(zp ? ((zp[r * ldzp + b / 2] >> ((b & 1) * 4)) & 15) : INT4_ZERO_POINT);
      const __m512 s = _mm512_set1_ps(sb);
      for (int t = 0; t < T; t++) {
        a[r][t] = _mm512_fmadd_ps(_mm512_add_ps(p0[r][t], p1[r][t]), s, a[r][t]);
        zx[r][t] += sb * z * xs[t * ldx + b];
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int t = 0; t < T; t++) y[t * ldy + r] = _mm512_reduce_add_ps(a[r][t]) - zx[r][t];
}

// fp8 e4m3 -> fp16 bits (sign << 8, exponent and mantissa << 7: the same number times 2^-8, subnormals included)
// -> fp32 by the F16C conversion, which is exact; the 2^8 joins the block scale. The GEMVs are bound by this
// conversion, so it takes 3 integer ops: t = code << 7 puts exponent and mantissa in place and the sign at bit 14;
// t + (t & 0x4000) carries that bit into bit 15 and clears bit 14 (the same bits as (s << 8) | (em << 7)).
static inline __m512 load_e4m3_x256(const uint8_t* w) {
  const __m256i t = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))), 7);
  return _mm512_cvtph_ps(_mm256_add_epi16(t, _mm256_and_si256(t, _mm256_set1_epi16(0x4000))));
}

// 32 codes at once, the same bits as two load_e4m3_x256 in one op fewer per 16: the code sign-extended to 16 bits
// and shifted left by 7 has exponent and mantissa in place and the sign in bits 15 and 14; clearing bit 14 leaves
// (s << 15) | (em << 7). The shift and the mask run on 32 codes per instruction.
static inline void load_e4m3_x512(const uint8_t* w, __m512& lo, __m512& hi) {
  const __m512i t = _mm512_and_si512(
      _mm512_slli_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))), 7),
      _mm512_set1_epi16(short(0xBF80)));
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(t));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(t, 1));
}

// FP8 with 128x128 block scales; the R rows share one scale block row (sc). Per scale block two chains of 16-wide
// partial sums, joined and scaled into the row's accumulator; the block's tail columns (K % 32) summed in scalar.
template <int R, int T>
__attribute__((noinline)) static void rows_fp8(const uint8_t* w, int64_t ldw, const float* sc, const float* x, int64_t ldx, int64_t K,
                            float* y, int64_t ldy) {
  __m512 a[R][T];
  float tail[R][T];
  for (int r = 0; r < R; r++)
    for (int t = 0; t < T; t++) { a[r][t] = _mm512_setzero_ps(); tail[r][t] = 0.f; }
  for (int64_t kb = 0; kb < K; kb += FP8_BLOCK) {
    const int64_t ke = std::min(K, kb + FP8_BLOCK);
    __m512 p0[R][T], p1[R][T];
    for (int r = 0; r < R; r++)
      for (int t = 0; t < T; t++) p0[r][t] = p1[r][t] = _mm512_setzero_ps();
    int64_t k = kb;
    for (; k + 32 <= ke; k += 32) {
      if (R > 1 && (k & 63) == 0)
        for (int r = 0; r < R; r++) prefetch(w + r * ldw + k);
      for (int r = 0; r < R; r++) {
        __m512 w0, w1;
        load_e4m3_x512(w + r * ldw + k, w0, w1);
        for (int t = 0; t < T; t++) {
          p0[r][t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * ldx + k), p0[r][t]);
          p1[r][t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * ldx + k + 16), p1[r][t]);
        }
      }
    }
    const float s = sc[kb / FP8_BLOCK];
    const __m512 s256 = _mm512_set1_ps(s * 256.f);
    for (int r = 0; r < R; r++)
      for (int t = 0; t < T; t++) {
        a[r][t] = _mm512_fmadd_ps(_mm512_add_ps(p0[r][t], p1[r][t]), s256, a[r][t]);
        for (int64_t kk = k; kk < ke; kk++) tail[r][t] += E4M3[w[r * ldw + kk]] * s * x[t * ldx + kk];
      }
  }
  for (int r = 0; r < R; r++)
    for (int t = 0; t < T; t++) y[t * ldy + r] = _mm512_reduce_add_ps(a[r][t]) + tail[r][t];
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

#if defined(FLASHPORT_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// ---- Opt-in int8 activations (QW::act_i8, cpu_quant.upload(..., decode_activations="int8")) -----------------------
// The activation row is quantized once per GEMV, per block of QBLOCK = 32 columns (llama.cpp's Q8_0, ONNX Runtime's
// MatMulNBits accuracy_level 4 with block 32): symmetric, s_b = max|x_b| / 127, q = round-to-nearest-even(x / s_b)
// in [-127, 127], s_b fp32. The weight's integer codes meet q in VPDPBUSD (64 unsigned x signed byte products per
// instruction, four summed into each int32 lane), each block's int32 dot product is converted to fp32 and scaled
// once: y = sum_b s_b * w_scale * dot_b. The codes are used as stored (no weight value changes); the error is the
// activations' rounding only: |y - y_ref| <= sum_b s_b / 2 * sum_{k in b} |W[n, k]| (half a quantization step per
// activation) plus fp32 rounding, i.e. at most 1/254 of (max_b |x_b|) @ |W| per block, about 2-4e-3 of |y| on
// random inputs (tests/test_torch_fast.py, test_int8_activations_*). NOT bit-exact, NOT within the fp32 paths' 1e-5.
//   int8 weights (per-row scale): VPDPBUSD wants one unsigned operand: the weight byte XOR 0x80 is w + 128 (unsigned),
//     so sum (w + 128) q = sum w q + 128 sum q; the second term is a property of the activation block alone, taken
//     out once per activation row (corr below) and not per weight row.
//   int4 weights (MatMulNBits: two codes per byte, low nibble = even column, group g in {32, 64, 128}): the codes
//     (0..15) are the unsigned operand as they are; s_w (code - z) q sums to s_w (sum code q - z sum q): for a
//     symmetric format (z = 8) -z sum q starts the block's int32 accumulator, for zero points it is taken out per
//     row after the loop. The activations are laid out per 128 columns as the 64 even then the 64 odd columns
//     (16 of each per block of 32), so the low and high nibbles of 64 weight bytes meet 64 contiguous q each.
//   MXFP4 (the release's experts): see rows_mx_q8.
//   NaN / inf activations: the block's scale becomes NaN / inf, so the outputs they reach are not finite (as the
//     fp32 path's).
constexpr int64_t QBLOCK = 32;
constexpr int64_t Q8_LONG_ROW = 4096;  // K above which one decode row takes four weight rows per pass (see gemv)  // K above which one decode row takes four weight rows per pass (see gemv)

// The quantized activations of one GEMV: T rows x G segments (grouped_linear's groups; else G = 1) of K columns,
// each segment zero padded to Kp columns (a multiple of 128). Thread-local buffers: no allocation per call.
struct ActI8 {
  int64_t Kp = 0, nseg = 0;
  std::vector<int8_t> q;     // [nseg, Kp] int8 weights: in column order; int4: even / odd per 128 columns (above)
  std::vector<float> lane;   // [nseg, Kp / 4] the scale s_b of each int32 lane of a dot product (16 lanes cover
                             // 64 columns for int8 weights, 128 for int4)
  std::vector<int32_t> c;    // int4: [nseg, Kp / 8] accumulator start per 128 columns: -z sum(q_b) in lane 4b
  std::vector<float> bs;     // [nseg, Kp / 32] s_b
  std::vector<int32_t> bq;   // [nseg, Kp / 32] sum(q_b)
  std::vector<float> corr;   // int8: [nseg] 128 sum_b s_b sum(q_b)
};

// Quantizes x (T rows of G segments of K columns, rows ldx apart) into a (i4: the even / odd layout of int4 and
// MXFP4, symmetric zero point z, 0 for asymmetric weights; lane_mul: a power of two the lane scales carry, exactly)
static void quantize_act(const float* x, int64_t T, int64_t ldx, int64_t G, int64_t K, bool i4, int z, float lane_mul,
                         ActI8& a) {
  const int64_t Kp = (K + 127) / 128 * 128, nseg = T * G, nbk = Kp / QBLOCK;
  a.Kp = Kp;
  a.nseg = nseg;
  a.q.assign(nseg * Kp, 0);
  a.lane.resize(nseg * Kp / 4);
  a.bs.resize(nseg * nbk);
  a.bq.resize(nseg * nbk);
  a.corr.resize(nseg);
  if (i4) a.c.assign(nseg * Kp / 8, 0);
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
  for (int64_t sg = 0; sg < nseg; sg++) {
    const float* xs = x + (sg / G) * ldx + (sg % G) * K;
    int8_t* qs = a.q.data() + sg * Kp;
    float* bs = a.bs.data() + sg * nbk;
    int32_t* bq = a.bq.data() + sg * nbk;
    double corr = 0.0;
    for (int64_t b = 0; b < nbk; b++) {
      const int64_t k0 = b * QBLOCK, n = std::max<int64_t>(0, std::min(QBLOCK, K - k0));
      const __mmask16 m0 = n >= 16 ? 0xFFFF : __mmask16((1u << n) - 1), m1 = n >= 32 ? 0xFFFF : n > 16 ? __mmask16((1u << (n - 16)) - 1) : 0;
      __m512 v0 = _mm512_maskz_loadu_ps(m0, xs + k0), v1 = _mm512_maskz_loadu_ps(m1, xs + k0 + 16);
      const bool bad = _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float s = bad ? NAN : amax / 127.f;
      const __m512 inv = _mm512_set1_ps(amax > 0.f && !bad ? 127.f / amax : 0.f);
      if (i4) {  // even columns of the block, then odd
        const __m512 e = _mm512_permutex2var_ps(v0, ev, v1), o = _mm512_permutex2var_ps(v0, od, v1);
        v0 = e;
        v1 = o;
      }
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
      const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      int8_t* d0;
      int8_t* d1;
      if (i4) {  // block b of its 128-column chunk: even bytes at 16 (b % 4), odd at 64 + 16 (b % 4)
        d0 = qs + (b / 4) * 128 + (b % 4) * 16;
        d1 = d0 + 64;
      } else {
        d0 = qs + k0;
        d1 = d0 + 16;
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d0), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d1), _mm512_cvtsepi32_epi8(q1));
      bs[b] = s;
      bq[b] = sum;
      corr += double(s) * sum;
      // lane scales: int8 weights: 16 lanes per 64 columns, 8 per block; int4: 16 lanes per 128 columns, 4 per block
      float* ln = a.lane.data() + sg * (Kp / 4);
      if (i4) {
        for (int j = 0; j < 4; j++) ln[(b / 4) * 16 + (b % 4) * 4 + j] = s * lane_mul;
        a.c[sg * (Kp / 8) + (b / 4) * 16 + (b % 4) * 4] = -z * sum;
      } else {
        for (int j = 0; j < 8; j++) ln[b * 8 + j] = s;
      }
    }
    a.corr[sg] = float(128.0 * corr);
  }
}

// Software prefetch for R > 1 contiguous weight rows of L bytes read side by side, 64 bytes of each per step: the
// line PREFETCH bytes ahead of the step in each row, carried on into the same row of the next pass (R rows further)
// once it passes the row's end, so that rows shorter than the distance prefetch the next pass and not lines of the
// current one. (One row per pass, R = 1, is left to the hardware prefetcher: software prefetch 1-8 KB ahead, into
// L1 or L2, measured no gain there.)
struct RowPrefetch {
  const char* base;
  int64_t off, L, jump;
  RowPrefetch(const void* row0, int64_t L_, int R)
      : base(static_cast<const char*>(row0)), off(PREFETCH), L(L_), jump(R * L_) {
    while (R > 1 && off >= L) { off -= L; base += jump; }
  }
  inline void step(int R) {  // prefetch this step's lines, then advance by 64 bytes
    for (int r = 0; r < R; r++) _mm_prefetch(base + r * L + off, _MM_HINT_T0);
    off += 64;
    if (off >= L) { off -= L; base += jump; }
  }
};

static inline __mmask64 byte_mask(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }

// The step loop of the int8-activation row kernels below: step(c, acc, full) for every 64-weight-byte step c of
// rows of row_bytes bytes, U accumulator sets taking the whole steps in turn (two sets hide the FMA latency when
// R * T is small), set 0 the partial last one (full = false: masked loads); then the sets folded and each
// (weight row, activation row) summed -> sum[r][t].
template <int R, int T, class Step>
__attribute__((always_inline)) static inline void run_steps(Step& step, int64_t row_bytes, float (&sum)[R][T]) {
  constexpr int U = R * T >= 4 ? 1 : 2;
  __m512 acc[U][R][T];
  for (int u = 0; u < U; u++)
    for (int r = 0; r < R; r++)
      for (int t = 0; t < T; t++) acc[u][r][t] = _mm512_setzero_ps();
  const int64_t nc = (row_bytes + 63) / 64;
  int64_t c = 0;
  for (; c + U <= row_bytes / 64; c += U)
    for (int u = 0; u < U; u++) step(c + u, acc[u], true);
  for (; c < nc; c++) step(c, acc[0], (c + 1) * 64 <= row_bytes);
  for (int r = 0; r < R; r++)
    for (int t = 0; t < T; t++) {
      for (int u = 1; u < U; u++) acc[0][r][t] = _mm512_add_ps(acc[0][r][t], acc[u][r][t]);
      sum[r][t] = _mm512_reduce_add_ps(acc[0][r][t]);
    }
}

// int8 weights (per-row scale sc[r]) x int8 activations: R weight rows against T activation rows (segment offsets
// seg[t] into a), 64 columns per step (run_steps).
template <int R, int T>
__attribute__((noinline)) static void rows_i8_q8(const int8_t* w, int64_t ldw, const float* sc, const ActI8& a,
                                                 const int64_t* seg, int64_t K, float* y, int64_t ldy) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int8_t* xq[T];
  const float* xs[T];
  for (int t = 0; t < T; t++) { xq[t] = a.q.data() + seg[t] * a.Kp; xs[t] = a.lane.data() + seg[t] * (a.Kp / 4); }
  RowPrefetch pf(w, ldw, R);
  auto step = [&](int64_t c, __m512 (&ac)[R][T], bool full) __attribute__((always_inline)) {
    if (R > 1) pf.step(R);
    const __mmask64 m = full ? ~__mmask64(0) : byte_mask(K - c * 64);
    __m512i wv[R];
    for (int r = 0; r < R; r++) {
      wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + r * ldw + c * 64), flip);
    }
    for (int t = 0; t < T; t++) {
      const __m512i xv = _mm512_loadu_si512(xq[t] + c * 64);
      const __m512 sv = _mm512_loadu_ps(xs[t] + c * 16);
      for (int r = 0; r < R; r++) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[r], xv);
        ac[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, ac[r][t]);
      }
    }
  };
  float sum[R][T];
  run_steps<R, T>(step, K, sum);
  for (int r = 0; r < R; r++)
    for (int t = 0; t < T; t++) y[t * ldy + r] = sc[r] * (sum[r][t] - a.corr[seg[t]]);
}

// int4 weights (MatMulNBits layout, group g in {32, 64, 128}) x int8 activations: R weight rows (ldb bytes apart,
// scales ldsc apart, zero points ldzp apart or none) against T activation rows, 128 columns (64 weight bytes) per
// step; the weight scale of each int32 lane times the activation's, then one FMA per step.
template <int R, int T>
__attribute__((noinline)) static void rows_i4_q8(const uint8_t* B, int64_t ldb, const float* sc, int64_t ldsc,
                                                 const uint8_t* zp, int64_t ldzp, int64_t g, int64_t nb,
                                                 const ActI8& a, const int64_t* seg, float* y, int64_t ldy) {
  const __m512i low = _mm512_set1_epi8(15);
  // lane l of a 128-column step covers block l / 4, i.e. group (l / 4) / (g / 32) of the step's groups
  const __m512i gidx = _mm512_srli_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                         g == 32 ? 0 : g == 64 ? 1 : 2);
  const int64_t gps = 128 / g;  // groups per step
  const int64_t row_bytes = nb * g / 2;
  const int8_t* xq[T];
  const int32_t* xc[T];
  const float* xs[T];
  for (int t = 0; t < T; t++) {
    xq[t] = a.q.data() + seg[t] * a.Kp;
    xc[t] = a.c.data() + seg[t] * (a.Kp / 8);
    xs[t] = a.lane.data() + seg[t] * (a.Kp / 4);
  }
  // full: 64 whole weight bytes and gps whole groups (else the row's last, partial step: masked loads)
  RowPrefetch pf(B, ldb, R);
  auto step = [&](int64_t c, __m512 (&ac)[R][T], bool full) __attribute__((always_inline)) {
    if (R > 1) pf.step(R);
    const __mmask64 m = full ? ~__mmask64(0) : byte_mask(row_bytes - c * 64);
    const int64_t g0 = c * gps;
    const __mmask8 gm = full ? __mmask8((1u << gps) - 1) : __mmask8((1u << std::min(gps, nb - g0)) - 1);
    __m512i lo[R], hi[R];
    __m512 ws[R];
    for (int r = 0; r < R; r++) {
      const __m512i v = _mm512_maskz_loadu_epi8(m, B + r * ldb + c * 64);
      lo[r] = _mm512_and_si512(v, low);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      ws[r] = _mm512_permutexvar_ps(gidx, _mm512_castps128_ps512(_mm_maskz_loadu_ps(gm, sc + r * ldsc + g0)));
    }
    for (int t = 0; t < T; t++) {
      const __m512i xe = _mm512_loadu_si512(xq[t] + c * 128), xo = _mm512_loadu_si512(xq[t] + c * 128 + 64);
      const __m512i c0 = _mm512_loadu_si512(xc[t] + c * 16);
      const __m512 sv = _mm512_loadu_ps(xs[t] + c * 16);
      for (int r = 0; r < R; r++) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c0, lo[r], xe), hi[r], xo);
        ac[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(ws[r], sv), ac[r][t]);
      }
    }
  };
  float sum[R][T];
  run_steps<R, T>(step, row_bytes, sum);
  for (int r = 0; r < R; r++)
    for (int t = 0; t < T; t++) {
      float s = sum[r][t];
      if (zp) {  // asymmetric: - sum_b s_w z_b s_b sum(q_b), per row (the accumulators started at 0)
        const float* bs = a.bs.data() + seg[t] * (a.Kp / QBLOCK);
        const int32_t* bq = a.bq.data() + seg[t] * (a.Kp / QBLOCK);
        const int64_t bpg = g / QBLOCK;
        for (int64_t gi = 0; gi < nb; gi++) {
          const int zz = (zp[r * ldzp + gi / 2] >> ((gi & 1) * 4)) & 15;
          float xz = 0.f;
          for (int64_t j = 0; j < bpg; j++) xz += bs[gi * bpg + j] * float(bq[gi * bpg + j]);
          s -= sc[r * ldsc + gi] * float(zz) * xz;
        }
      }
      y[t * ldy + r] = s;
    }
}

// MXFP4 (e2m1 nibbles, low = even column, one UE8M0 byte per block of 32) x int8 activations, the int4 layout: twice
// each e2m1 magnitude {0, 0.5, ..., 6} is an integer {0, 1, ..., 12}, looked up exactly per byte (VPSHUFB); the
// code's sign bit negates the activation it meets (q in [-127, 127]: exact), so VPDPBUSD sums |2 v| * (+-q); the
// lane scale is 2^(e - 127) (the exponent byte shifted into a float's exponent) times s_b / 2 (quantize_act's
// lane_mul). A scale byte of 0 (2^-127, a float subnormal) reads as 0 and 255 (NaN) as inf: the block's products
// are then 0 (below 1e-37 anyway) or not finite.
template <int R, int T>
__attribute__((noinline)) static void rows_mx_q8(const uint8_t* w, int64_t ldw, const uint8_t* sc, int64_t ldsc,
                                                 int64_t nb, const ActI8& a, const int64_t* seg, float* y,
                                                 int64_t ldy) {
  const __m512i low = _mm512_set1_epi8(15), sign = _mm512_set1_epi8(8);
  const __m512i mag = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, 1, 2, 3, 4, 6, 8, 12));
  const __m512i gidx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const int64_t row_bytes = nb * (MXFP4_BLOCK / 2);
  const int8_t* xq[T];
  const float* xs[T];
  for (int t = 0; t < T; t++) {
    xq[t] = a.q.data() + seg[t] * a.Kp;
    xs[t] = a.lane.data() + seg[t] * (a.Kp / 4);
  }
  RowPrefetch pf(w, ldw, R);
  auto step = [&](int64_t c, __m512 (&ac)[R][T], bool full) __attribute__((always_inline)) {
    if (R > 1) pf.step(R);
    const __mmask64 m = full ? ~__mmask64(0) : byte_mask(row_bytes - c * 64);
    const __mmask16 bm = full ? __mmask16(15) : __mmask16((1u << std::min<int64_t>(4, nb - c * 4)) - 1);
    __m512i lo[R], hi[R];
    __mmask64 nlo[R], nhi[R];
    __m512 ws[R];
    for (int r = 0; r < R; r++) {
      const __m512i v = _mm512_maskz_loadu_epi8(m, w + r * ldw + c * 64);
      const __m512i l = _mm512_and_si512(v, low), h = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      nlo[r] = _mm512_test_epi8_mask(l, sign);
      nhi[r] = _mm512_test_epi8_mask(h, sign);
      lo[r] = _mm512_shuffle_epi8(mag, l);
      hi[r] = _mm512_shuffle_epi8(mag, h);
      const __m512i e = _mm512_permutexvar_epi32(gidx, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(bm, sc + r * ldsc + c * 4)));
      ws[r] = _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
    }
    for (int t = 0; t < T; t++) {
      const __m512i xe = _mm512_loadu_si512(xq[t] + c * 128), xo = _mm512_loadu_si512(xq[t] + c * 128 + 64);
      const __m512 sv = _mm512_loadu_ps(xs[t] + c * 16);
      for (int r = 0; r < R; r++) {
        const __m512i z = _mm512_setzero_si512();
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo[r], _mm512_mask_sub_epi8(xe, nlo[r], z, xe)),
                                              hi[r], _mm512_mask_sub_epi8(xo, nhi[r], z, xo));
        ac[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(ws[r], sv), ac[r][t]);
      }
    }
  };
  float sum[R][T];
  run_steps<R, T>(step, row_bytes, sum);
  for (int r = 0; r < R; r++)
    for (int t = 0; t < T; t++) y[t * ldy + r] = sum[r][t];
}
#define FLASHPORT_AVX512_VNNI 1
#endif

// int4 activations deinterleaved per 32 columns (see rows_i4), zero padded to Kp = nb * g columns, then the nb
// per-group sums: d is [T, Kp + nb]
static void deinterleave_i4(const float* x, int64_t T, int64_t ldx, int64_t K, int64_t g, int64_t nb, float* d) {
  const int64_t Kp = nb * g;
  for (int64_t t = 0; t < T; t++) {
    const float* xt = x + t * ldx;
    float* dt = d + t * (Kp + nb);
    int64_t k = 0;
#ifdef FLASHPORT_AVX512
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    for (; k + 32 <= K; k += 32) {
      const __m512 lo = _mm512_loadu_ps(xt + k), hi = _mm512_loadu_ps(xt + k + 16);
      _mm512_storeu_ps(dt + k, _mm512_permutex2var_ps(lo, ev, hi));
      _mm512_storeu_ps(dt + k + 16, _mm512_permutex2var_ps(lo, od, hi));
    }
#endif
    std::fill(dt + k, dt + Kp, 0.f);
    for (; k < K; k++) dt[(k & ~int64_t(31)) + ((k & 1) << 4) + ((k & 31) >> 1)] = xt[k];
    for (int64_t b = 0; b < nb; b++) {
      float s = 0.f;
      for (int64_t kk = b * g; kk < std::min(K, (b + 1) * g); kk++) s += xt[kk];
      dt[Kp + b] = s;
    }
  }
}

// y[t, n] = sum_k x[t, xoff(n) + k] * W[n, k] for t < T <= MAX_ROWS. rows_per_group > 0: grouped projection, row n
// reads x's group n / rows_per_group (x rows hold G*K values).
static void gemv(const QW& q, const float* x, int64_t T, int64_t ldx, float* y, int64_t ldy, int64_t rows_per_group) {
  const int64_t K = q.K;
#ifdef FLASHPORT_AVX512
  std::vector<float> xd_buf;  // int4: activations deinterleaved, then the group sums (rows_i4)
  const float* xd = nullptr;
  int64_t ldxd = 0;
  const bool i4_fast = q.fmt == FMT_I4 && q.group % 32 == 0 && rows_per_group == 0;
  if (i4_fast) {
    const int64_t nb = q.w.size(1);
    ldxd = nb * q.group + nb;
    xd_buf.resize(T * ldxd);
    deinterleave_i4(x, T, ldx, K, q.group, nb, xd_buf.data());
    xd = xd_buf.data();
  }
#endif
#ifdef FLASHPORT_AVX512_VNNI
  // the opt-in int8-activation path (QW::act_i8): int8, MXFP4, and int4 with groups of 32, 64 or 128
  const bool q8 = q.act_i8 && (q.fmt == FMT_I8 || q.fmt == FMT_MXFP4 ||
                                (q.fmt == FMT_I4 && (q.group == 32 || q.group == 64 || q.group == 128)));
  static thread_local ActI8 act_buf;
  ActI8& act = act_buf;  // this thread's buffers, read by the pool's threads below (a thread_local named in the
                         // lambda would be each worker's own, empty one)
  const int64_t G = rows_per_group > 0 ? q.N / rows_per_group : 1;
  if (q8)
    quantize_act(x, T, ldx, G, K, q.fmt != FMT_I8, q.fmt == FMT_I4 && !q.zp.defined() ? INT4_ZERO_POINT : 0,
                 q.fmt == FMT_MXFP4 ? 0.5f : 1.f, act);
#endif
  // Threads only for big weights: each parallel region costs a wake-up of the other threads, which on a loaded
  // machine can cost more than a small expert's whole GEMV (~10 us single-threaded). Chunks are multiples of 4 rows
  // (the decode kernels' row blocks).
  const int64_t grain = q.N * K * T >= PARALLEL_MIN ? std::max<int64_t>(4, 32768 / std::max<int64_t>(K, 1)) : q.N;
  at::parallel_for(0, (q.N + 3) / 4, (grain + 3) / 4, [&](int64_t c0, int64_t c1) {
    const int64_t n0 = c0 * 4, n1 = std::min(q.N, c1 * 4);
    alignas(64) float buf[CHUNK + 256];
    for (int64_t n = n0; n < n1; n++) {
      const int64_t xoff = rows_per_group > 0 ? (n / rows_per_group) * K : 0;
#ifdef FLASHPORT_AVX512_VNNI
      if (q8) {
        int64_t seg[MAX_ROWS];
        for (int64_t t = 0; t < T; t++) seg[t] = t * G + (rows_per_group > 0 ? n / rows_per_group : 0);
        // Four weight rows per pass for one activation row with long rows (x's codes, lane scales and zero-point
        // starts, up to 2 bytes per column, shared by the four rows), as the fp32 kernels; shorter rows one at a
        // time: four rows per pass ran 1.4x slower there (2048x4096 int4, one core, cold: 0.47 against 0.33 ms),
        // although faster on cached weights.
        const bool four4 = T == 1 && n + 3 < n1 && K > Q8_LONG_ROW &&
                           (rows_per_group == 0 || n / rows_per_group == (n + 3) / rows_per_group);
        if (q.fmt == FMT_MXFP4) {
          const int64_t nb = q.scale.size(1), ldw = nb * (MXFP4_BLOCK / 2);
          const uint8_t* w = q.w.data_ptr<uint8_t>() + n * ldw;
          const uint8_t* sc = q.scale.data_ptr<uint8_t>() + n * nb;
          if (four4) { rows_mx_q8<4, 1>(w, ldw, sc, nb, nb, act, seg, y + n, ldy); n += 3; continue; }
#define CALL(TT) rows_mx_q8<1, TT>(w, ldw, sc, nb, nb, act, seg, y + n, ldy)
          FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
          continue;
        }
        if (q.fmt == FMT_I8) {
          const int8_t* w = q.w.data_ptr<int8_t>() + n * K;
          const float* s = q.scale.data_ptr<float>() + n;
          if (four4) { rows_i8_q8<4, 1>(w, K, s, act, seg, K, y + n, ldy); n += 3; continue; }
#define CALL(TT) rows_i8_q8<1, TT>(w, K, s, act, seg, K, y + n, ldy)
          FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
          continue;
        }
        const int64_t nb = q.w.size(1), ldb = nb * (q.group / 2);
        const uint8_t* B = q.w.data_ptr<uint8_t>() + n * ldb;
        const float* sc = q.scale.data_ptr<float>() + n * nb;
        const int64_t ldzp = q.zp.defined() ? q.zp.size(1) : 0;
        const uint8_t* zp = q.zp.defined() ? q.zp.data_ptr<uint8_t>() + n * ldzp : nullptr;
        if (four4) { rows_i4_q8<4, 1>(B, ldb, sc, nb, zp, ldzp, q.group, nb, act, seg, y + n, ldy); n += 3; continue; }
#define CALL(TT) rows_i4_q8<1, TT>(B, ldb, sc, nb, zp, ldzp, q.group, nb, act, seg, y + n, ldy)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
        continue;
      }
#endif
#ifdef FLASHPORT_AVX512
      // Four weight rows per pass for one activation row (when they share the scale block and the group) if the
      // activation row does not fit in L1 next to the weights (K > LONG_ROW): then each x load serves four rows
      // (8192x16384, one core, cold: int8 10.4 -> 26 GB/s, int4 8.4 -> 13, FP8 8.2 -> 19). Shorter rows stream
      // one weight row at a time, which the hardware prefetcher follows best (2048x4096 int8: 31 GB/s against 18
      // with four rows). FP8 also takes four rows for K <= 512, where the per-row overhead dominates.
      const bool four = T == 1 && n + 3 < n1 && (K > LONG_ROW || (q.fmt == FMT_FP8 && K <= 512)) &&
                        (q.fmt != FMT_FP8 || n / FP8_BLOCK == (n + 3) / FP8_BLOCK) &&
                        (rows_per_group == 0 || n / rows_per_group == (n + 3) / rows_per_group);
      if (q.fmt == FMT_BF16) {
        const uint16_t* w = reinterpret_cast<const uint16_t*>(q.w.data_ptr()) + n * K;
        if (four) { rows_dense<4, 1, true>(w, K, nullptr, x + xoff, ldx, K, y + n, ldy); n += 3; continue; }
#define CALL(TT) rows_dense<1, TT, true>(w, K, nullptr, x + xoff, ldx, K, y + n, ldy)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
        continue;
      }
      if (q.fmt == FMT_I8) {
        const int8_t* w = q.w.data_ptr<int8_t>() + n * K;
        const float* s = q.scale.data_ptr<float>() + n;
        if (four) { rows_dense<4, 1, false>(w, K, s, x + xoff, ldx, K, y + n, ldy); n += 3; continue; }
#define CALL(TT) rows_dense<1, TT, false>(w, K, s, x + xoff, ldx, K, y + n, ldy)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
        continue;
      }
      if (q.fmt == FMT_FP8) {
        const uint8_t* w = q.w.data_ptr<uint8_t>() + n * K;
        const float* sc = q.scale.data_ptr<float>() + (n / FP8_BLOCK) * q.scale.size(1);
        if (four) { rows_fp8<4, 1>(w, K, sc, x + xoff, ldx, K, y + n, ldy); n += 3; continue; }
#define CALL(TT) rows_fp8<1, TT>(w, K, sc, x + xoff, ldx, K, y + n, ldy)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
        continue;
      }
      if (q.fmt == FMT_MXFP4) {
        const int64_t nb = q.scale.size(1);
        const uint8_t* w = q.w.data_ptr<uint8_t>() + n * nb * (MXFP4_BLOCK / 2);
        const uint8_t* sc = q.scale.data_ptr<uint8_t>() + n * nb;
        float acc[MAX_ROWS];
#define CALL(TT) row_mxfp4<TT>(w, sc, x + xoff, ldx, K, acc)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
        for (int64_t t = 0; t < T; t++) y[t * ldy + n] = acc[t];
        continue;
      }
      if (i4_fast) {
        const int64_t nb = q.w.size(1), ldb = nb * (q.group / 2);
        const uint8_t* B = q.w.data_ptr<uint8_t>() + n * ldb;
        const float* sc = q.scale.data_ptr<float>() + n * nb;
        const int64_t ldzp = q.zp.defined() ? q.zp.size(1) : 0;
        const uint8_t* zp = q.zp.defined() ? q.zp.data_ptr<uint8_t>() + n * ldzp : nullptr;
        const float* xs = xd + (ldxd - nb);
        if (four) { rows_i4<4, 1>(B, ldb, sc, nb, zp, ldzp, q.group, nb, xd, xs, ldxd, y + n, ldy); n += 3; continue; }
#define CALL(TT) rows_i4<1, TT>(B, ldb, sc, nb, zp, ldzp, q.group, nb, xd, xs, ldxd, y + n, ldy)
        FLASHPORT_DISPATCH_T(T, CALL)
#undef CALL
        continue;
      }
#endif
      float acc[MAX_ROWS] = {0};
      for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
        const int64_t k1 = std::min(K, k0 + CHUNK);
        const float* wr = dequant_row(q, n, k0, k1, buf);
        for (int64_t t = 0; t < T; t++) acc[t] += dot(wr, x + t * ldx + xoff + k0, k1 - k0);
      }
      for (int64_t t = 0; t < T; t++) y[t * ldy + n] = acc[t];
    }
  });
}

// x [M, K] fp32 @ w [N, K].T -> [M, N] fp32: the prefill GEMM (rows > MAX_ROWS). oneDNN through torch's own
// mkldnn::_linear_pointwise (the op torch.compile's CPU backend emits for a linear): fp32 FMAs, another summation
// order than torch's matmul (same tolerance), and 2.2x its MKL sgemm on the project's AMD CPU (one core, 512x512 @
// 512x1024: 210 vs 90 GFLOP/s). bf16 (opt-in, cpu_quant's prefill_matmul="bf16"): x and w rounded to bf16 (8
// mantissa bits), products and sums in fp32 by oneDNN's avx512_bf16 kernels: 4.5x the fp32 matmul, ~1e-3
// relative error (docs/performance.md, Round 4). Without the op (a torch built without oneDNN): at::mm.
static Tensor gemm(const Tensor& x, const Tensor& w, bool bf16) {
  static const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  const Tensor xx = bf16 ? x.to(at::kBFloat16) : x, ww = bf16 ? w.to(at::kBFloat16) : w;
  Tensor y;
  if (op) {
    torch::jit::Stack stack{xx, ww, c10::IValue(), c10::IValue(std::string("none")),
                            c10::IValue(c10::List<c10::optional<c10::Scalar>>()), c10::IValue()};
    op->callBoxed(&stack);
    y = stack[0].toTensor();
  } else {
    y = at::mm(xx, ww.t());
  }
  return bf16 ? y.to(at::kFloat) : y;
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

// x [T, K] -> [T, N]; bf16: the prefill GEMM in bf16 (see gemm)
Tensor linear(const Tensor& x_, const QW& q, bool bf16) {
  Tensor x = x_.contiguous();
  const int64_t T = x.size(0);
  if (T > MAX_ROWS) return gemm(x, dequantize(q), bf16);
  if (q.fmt == FMT_F32) return at::mm(x, q.w.t());
  Tensor y = at::empty({T, q.N}, at::kFloat);
  gemv(q, x.data_ptr<float>(), T, q.K, y.data_ptr<float>(), q.N, 0);
  return y;
}

// x [T, G, I], W [G*R, I] -> [T, G, R]
Tensor grouped_linear(const Tensor& x_, const QW& q) {
  Tensor x = x_.contiguous();
  const int64_t T = x.size(0), G = x.size(1), R = q.N / G;
  if (T > MAX_ROWS) {  // one prefill GEMM per group (oneDNN: see gemm)
    Tensor w = dequantize(q).view({G, R, q.K}), y = at::empty({T, G, R}, at::kFloat);
    for (int64_t g = 0; g < G; g++) y.select(1, g).copy_(gemm(x.select(1, g).contiguous(), w[g], false));
    return y;
  }
  if (q.fmt == FMT_F32) {
    Tensor w = q.w.view({G, R, q.K});
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
           const std::vector<QW>& w1, const std::vector<QW>& w3, const std::vector<QW>& w2, double limit_, bool bf16) {
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
      g = linear(xe, w1[e], bf16);
      u = linear(xe, w3[e], bf16);  // [n, I]
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
      ye = linear(g, w2[e], bf16);  // [n, D]
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

namespace flashport {

// For fused callers (fused_ops.cpp) that run several GEMVs in one parallel region: y[t*ldy + n] = x_t . W[n] for
// T <= MAX_ROWS rows of x (ldx apart), written in place, nothing allocated. The same kernels as `linear` (so the
// same bits), or with rows_per_group > 0 as `grouped_linear`'s (row n reads x's group n / rows_per_group); called
// inside a parallel region, gemv's own region runs on the calling thread.
void gemv_into(const QW& q, const float* x, int64_t T, int64_t ldx, float* y, int64_t ldy, int64_t rows_per_group) {
  TORCH_CHECK(T >= 1 && T <= MAX_ROWS && q.fmt != FMT_F32, "gemv_into: 1..MAX_ROWS activation rows, a compact weight");
  gemv(q, x, T, ldx, y, ldy, rows_per_group);
}

}  // namespace flashport
