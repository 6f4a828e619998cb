// flashport's CPU kernels: what quant_gemv.cpp, fused_ops.cpp and bindings.cpp share.
//
// Built by flashport.backends.cpu_quant (torch.utils.cpp_extension, once per machine, cached). The constants
// that Python uses too are NOT written here: the build passes them as -D flags from one Python table
// (cpu_quant.KERNEL_CONSTANTS, whose format values come from flashport.quant), so they cannot drift apart.
#pragma once

// only the operators used (not all of ATen/ATen.h): the headers are most of the build time
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if !defined(FLASHPORT_MAX_ROWS) || !defined(FLASHPORT_FMT_I4) || !defined(FLASHPORT_FP8_BLOCK) || \
    !defined(FLASHPORT_INT4_ZERO_POINT) || !defined(FLASHPORT_INT4_MAX_GROUP) || !defined(FLASHPORT_FMT_MXFP4) || \
    !defined(FLASHPORT_MXFP4_BLOCK)
#error "flashport's kernel constants are missing: build through flashport.backends.cpu_quant.ext()"
#endif

namespace flashport {

using at::Tensor;

// -- from Python (cpu_quant.KERNEL_CONSTANTS) ------------------------------------------------------------------
constexpr int64_t MAX_ROWS = FLASHPORT_MAX_ROWS;  // activation rows served by the GEMV kernel (cpu_quant.GEMV_MAX_ROWS)
// CpuWeight.fmt: the compact CPU layouts (cpu_quant.FMT_*)
constexpr int64_t FMT_F32 = FLASHPORT_FMT_F32, FMT_BF16 = FLASHPORT_FMT_BF16, FMT_I8 = FLASHPORT_FMT_I8,
                  FMT_I4 = FLASHPORT_FMT_I4, FMT_FP8 = FLASHPORT_FMT_FP8, FMT_MXFP4 = FLASHPORT_FMT_MXFP4;
constexpr int64_t MXFP4_BLOCK = FLASHPORT_MXFP4_BLOCK;     // MXFP4 scale block along K (1 x 32), quant.release
constexpr int64_t FP8_BLOCK = FLASHPORT_FP8_BLOCK;         // FP8 scale block (rows and columns), quant.release
constexpr int INT4_ZERO_POINT = FLASHPORT_INT4_ZERO_POINT;  // symmetric int4's implicit zero point, quant.formats

// -- C++ only (tuning) -------------------------------------------------------------------------------------------
constexpr int64_t CHUNK = 512;  // K elements dequantized at a time
static_assert(CHUNK % FLASHPORT_INT4_MAX_GROUP == 0, "CHUNK must be a multiple of every int4 group (whole groups)");
static_assert(CHUNK % FLASHPORT_MXFP4_BLOCK == 0, "CHUNK must be a multiple of the MXFP4 block");
constexpr int64_t PARALLEL_MIN = 1 << 20;  // multiply-adds below which a kernel stays on one thread

// A weight in its compact CPU layout (cpu_quant.CpuWeight): FMT_F32 fp32 [N,K], FMT_BF16 bf16 [N,K], FMT_I8 int8
// [N,K] + scale [N], FMT_I4 int4 MatMulNBits B uint8 [N, nb, group/2] + scales fp32 [N, nb] (+ zero points uint8
// [N, ceil(nb/2)]), FMT_FP8 fp8 e4m3 codes uint8 [N, K] + scales fp32 [ceil(N/FP8_BLOCK), ceil(K/FP8_BLOCK)],
// FMT_MXFP4 (the release's expert layout, read in place) e2m1 nibbles uint8 [N, nb*MXFP4_BLOCK/2] (low nibble =
// even k) + UE8M0 exponent bytes uint8 [N, nb], nb = ceil(K/MXFP4_BLOCK).
// act_i8: decode GEMVs of int8 / int4 / MXFP4 weights quantize the activations to int8 (quant_gemv.cpp, opt-in).
struct QW {
  int64_t fmt, N, K, group;
  Tensor w, scale, zp;
  bool act_i8 = false;
};

// The routed (or shared) experts of one MoE layer, resolved once (built by torch_fast._expert_set): w1/w3/w2[e] of expert e
struct ExpertSet {
  std::vector<QW> w1, w3, w2;
  // gated_moe's cache: w2[e] split into w2_parts row ranges (one per thread), built on first use (fused_ops.cpp)
  mutable std::vector<std::vector<QW>> w2_split;
  mutable int64_t w2_parts = 0;
};

static inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  #pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

// quant_gemv.cpp: quantized GEMV / GEMM and the fused MoE (torch references: backends/reference.py linear,
// grouped_linear, moe on quant.formats' dequantization)
Tensor dequantize(const QW& q);
Tensor linear(const Tensor& x, const QW& q, bool bf16 = false);  // bf16: the opt-in prefill GEMM
Tensor grouped_linear(const Tensor& x, const QW& q);
Tensor moe(const Tensor& x, const Tensor& weights, const Tensor& idx, const std::vector<int64_t>& ids,
           const std::vector<QW>& w1, const std::vector<QW>& w3, const std::vector<QW>& w2, double limit, bool bf16 = false);
// T <= MAX_ROWS, no F32; rows_per_group > 0: grouped_linear's kernels
void gemv_into(const QW& q, const float* x, int64_t T, int64_t ldx, float* y, int64_t ldy, int64_t rows_per_group = 0);

// fused_ops.cpp: the final mHC collapse and the fused decode sequences (each the sequence of the kernels it names)
Tensor hc_head(const Tensor& streams, const Tensor& fn, const Tensor& base, const Tensor& scale, double eps,
               double norm_eps);
std::vector<Tensor> hc_pre_norm(const Tensor& streams, const Tensor& fn, const Tensor& base, const Tensor& scale,
                                int64_t iters, double eps, double norm_eps, const Tensor& weight, double weight_eps);
std::vector<Tensor> hc_post_pre_norm(const Tensor& out, const Tensor& streams, const Tensor& post, const Tensor& comb,
                                     const Tensor& fn, const Tensor& base, const Tensor& scale, int64_t iters,
                                     double eps, double norm_eps, const Tensor& weight, double weight_eps);
std::vector<Tensor> attn_project(const Tensor& x, const QW& wq_a, const Tensor& q_norm, const QW& wq_b, const QW& wkv,
                                 const Tensor& kv_norm, const Tensor& cos, const Tensor& sin, int64_t heads,
                                 double eps, const std::vector<QW>& wq_a_parts, const std::vector<QW>& wq_b_parts,
                                 const std::vector<QW>& wkv_parts);
Tensor attn_output(const Tensor& q, const Tensor& keys, const Tensor& sink, double scale, const Tensor& cos,
                   const Tensor& sin, const QW& wo_a, int64_t groups, const QW& wo_b,
                   const std::vector<QW>& wo_a_groups, const std::vector<QW>& wo_b_parts);
std::vector<QW> weight_parts(const QW& q, int64_t parts, int64_t rows);  // row ranges (views) for parallel GEMVs
Tensor linear_parts(const Tensor& x, const std::vector<QW>& parts);  // linear over weight_parts, one region
std::vector<Tensor> compress_project(const Tensor& x, const Tensor& kv, const Tensor& gate, const QW& wkv,
                                     const QW& wgate, bool split);
Tensor gated_moe(const Tensor& x, const Tensor& gate_w, const c10::optional<Tensor>& bias,
                 const c10::optional<Tensor>& idx, int64_t k, double route_scale, const ExpertSet& routed,
                 const ExpertSet& shared, double limit, int64_t threads);

// fused_ops.cpp: RMSNorm, RoPE, the mHC mixes and few-query sink attention (torch references: backends/reference.py)
Tensor rms_norm(const Tensor& x, const c10::optional<Tensor>& weight, double eps);
Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin, bool inverse);
std::vector<Tensor> hc_pre(const Tensor& streams, const Tensor& fn, const Tensor& base, const Tensor& scale,
                           int64_t iters, double eps, double norm_eps);
Tensor hc_post(const Tensor& out, const Tensor& streams, const Tensor& post, const Tensor& comb);
Tensor attention(const Tensor& q, const Tensor& keys, const Tensor& bias, const Tensor& sink, double scale,
                 bool split_heads = false);
Tensor flash_attention(const Tensor& q, const Tensor& keys, const Tensor& bias, const Tensor& sink, double scale);
Tensor decode_attention(const Tensor& q, const Tensor& keys, const Tensor& sink, double scale, bool split = false);
Tensor indexer_scores(const Tensor& q, const Tensor& keys, const Tensor& weights);

// indexer_fp4.cpp: the lightning indexer in the release's FP4 numerics (torch reference:
// quant/index_numerics.py index_scores, backends/indexer_fp4.py select)
Tensor indexer_fp4_scores(const Tensor& qc, const Tensor& qs, const Tensor& w, const Tensor& kc, const Tensor& ks,
                          int64_t n);
std::tuple<Tensor, Tensor> fp4_rotate_quantize(const Tensor& x);
std::tuple<Tensor, Tensor> indexer_fp4_topk(const Tensor& qc, const Tensor& qs, const Tensor& w, const Tensor& kc,
                                            const Tensor& ks, const Tensor& limits, int64_t k);

}  // namespace flashport
