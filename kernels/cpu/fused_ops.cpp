// Small fused ops for torch_fast: RMSNorm, interleaved RoPE and the mHC mixes (Sinkhorn included), each one call
// instead of tens of eager torch ops per decode step.
//
// Torch references: backends/reference.py (rms_norm, rope, hc_pre, hc_post), which torch_fast runs when this
// extension is not built. rope is BIT-EXACT with it (same elementwise fp32 ops, built with -ffp-contract=off);
// the others are TOLERANCE-BOUND (another summation order, libm's exp).
#include "common.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

// the few ATen operators the fused MoE gate calls (the same kernels as model.Gate's torch code)
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/div.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/softplus.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/topk.h>

namespace flashport {

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

constexpr int64_t HEADS_SPLIT_MIN = 1 << 16;  // split_heads: multiply-adds from which heads go to the threads

// Sink attention for a few queries (decode): q [T, H, Dh], keys [S, Dh] (K = V), bias [T, S], sink [H] -> [T, H, Dh].
// The reference's math per (t, h): logits = q . keys * scale + bias, softmax over [logits, sink], the probabilities
// of the keys times the keys; one pass over the keys per query row with the logits in a buffer, no tensors
// allocated but the output. TOLERANCE-BOUND (another summation order, libm's exp).
Tensor attention(const Tensor& q_, const Tensor& keys_, const Tensor& bias_, const Tensor& sink_, double scale_,
                 bool split_heads) {
  Tensor q = q_.contiguous(), keys = keys_.contiguous(), bias = bias_.contiguous(), sink = sink_.contiguous();
  const int64_t T = q.size(0), H = q.size(1), Dh = q.size(2), S = keys.size(0);
  TORCH_CHECK(keys.size(1) == Dh && bias.size(0) == T && bias.size(1) == S && sink.numel() == H,
              "attention: q [T, H, Dh], keys [S, Dh], bias [T, S], sink [H]");
  Tensor out = at::empty({T, H, Dh}, at::kFloat);
  const float *qp = q.data_ptr<float>(), *kp = keys.data_ptr<float>(), *bp = bias.data_ptr<float>(),
              *sp = sink.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = float(scale_);
  // split_heads: heads over the threads from HEADS_SPLIT_MIN multiply-adds (a decode step's few heads are worth one
  // region), else from PARALLEL_MIN; each (t, h) is computed alone: the same bits on any number of threads
  const int64_t min_work = split_heads ? HEADS_SPLIT_MIN : PARALLEL_MIN;
  at::parallel_for(0, T * H, std::max<int64_t>(1, min_work / std::max<int64_t>(2 * S * Dh, 1)),
                   [&](int64_t a0, int64_t a1) {
    std::vector<float> p(S);
    for (int64_t a = a0; a < a1; a++) {
      const int64_t t = a / H, h = a % H;
      const float* qa = qp + a * Dh;
      const float* b = bp + t * S;
      float m = sp[h];
      for (int64_t s = 0; s < S; s++) {
        p[s] = dot(qa, kp + s * Dh, Dh) * scale + b[s];
        m = std::max(m, p[s]);
      }
      float denom = std::exp(sp[h] - m);
      for (int64_t s = 0; s < S; s++) denom += (p[s] = std::exp(p[s] - m));
      const float inv = 1.f / denom;
      float* o = op + a * Dh;
      std::fill(o, o + Dh, 0.f);
      for (int64_t s = 0; s < S; s++) {
        const float w = p[s] * inv;
        if (w == 0.f) continue;  // a hidden key (bias -inf) adds exactly nothing
        const float* k = kp + s * Dh;
        #pragma omp simd
        for (int64_t d = 0; d < Dh; d++) o[d] += w * k[d];
      }
    }
  });
  return out;
}

// The lightning indexer's scores for a few queries (decode): q [T, Hi, Di], keys [n, Di], weights [T, Hi] (the head
// weights, the 1/sqrt(Di) already in) -> [T, n] = sum_h weights[t, h] * ReLU(q[t, h] . keys[s]); the reference's
// math (reference.indexer_topk) per (query, entry), no [T, Hi, n] tensor. TOLERANCE-BOUND (another summation order).
Tensor indexer_scores(const Tensor& q_, const Tensor& keys_, const Tensor& weights_) {
  Tensor q = q_.contiguous(), keys = keys_.contiguous(), w = weights_.contiguous();
  const int64_t T = q.size(0), Hi = q.size(1), Di = q.size(2), n = keys.size(0);
  TORCH_CHECK(keys.size(1) == Di && w.size(0) == T && w.size(1) == Hi,
              "indexer_scores: q [T, Hi, Di], keys [n, Di], weights [T, Hi]");
  Tensor out = at::empty({T, n}, at::kFloat);
  const float *qp = q.data_ptr<float>(), *kp = keys.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, PARALLEL_MIN / std::max<int64_t>(T * Hi * Di, 1)),
                   [&](int64_t s0, int64_t s1) {
    for (int64_t t = 0; t < T; t++)
      for (int64_t s = s0; s < s1; s++) {
        const float* k = kp + s * Di;
        float acc = 0.f;
        for (int64_t h = 0; h < Hi; h++) acc += wp[t * Hi + h] * std::max(dot(qp + (t * Hi + h) * Di, k, Di), 0.f);
        op[t * n + s] = acc;
      }
  });
  return out;
}

// Final collapse of the N streams: streams [T, N, D], fn [N, N*D], base [N], scale [1] -> [T, D]. The reference's
// math per token (mix = rms_norm(streams) . fn, pre = sigmoid(mix * scale + base) + eps, sum of pre * streams);
// TOLERANCE-BOUND (another summation order, libm's exp).
Tensor hc_head(const Tensor& streams_, const Tensor& fn_, const Tensor& base_, const Tensor& scale_, double eps,
               double norm_eps) {
  Tensor streams = streams_.contiguous(), fn = fn_.contiguous(), base = base_.contiguous(), scale = scale_.contiguous();
  const int64_t T = streams.size(0), N = streams.size(1), D = streams.size(2);
  TORCH_CHECK(N <= 16 && fn.size(0) == N && fn.size(1) == N * D, "hc_head: streams [T, N, D], fn [N, N*D]");
  Tensor out = at::empty({T, D}, at::kFloat);
  const float *sp = streams.data_ptr<float>(), *fp = fn.data_ptr<float>(), *bp = base.data_ptr<float>();
  const float sc = scale.data_ptr<float>()[0];
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, PARALLEL_MIN / (2 * N * N * D)), [&](int64_t t0, int64_t t1) {
    float pre[16];
    for (int64_t t = t0; t < t1; t++) {
      const float* a = sp + t * N * D;
      const float inv = 1.f / std::sqrt(dot(a, a, N * D) / float(N * D) + float(norm_eps));
      for (int64_t j = 0; j < N; j++) pre[j] = sigmoid(dot(fp + j * N * D, a, N * D) * inv * sc + bp[j]) + float(eps);
      float* o = op + t * D;
      #pragma omp simd
      for (int64_t d = 0; d < D; d++) o[d] = pre[0] * a[d];
      for (int64_t j = 1; j < N; j++) {
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) o[d] += pre[j] * a[j * D + d];
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Fused decode sequences: each runs the kernels above (and quant_gemv.cpp's) in the order model.py calls them, one
// Python call instead of several, so each is BIT-IDENTICAL to that sequence of torch_fast ops (and tolerance-bound
// against the reference exactly as they are).
// ---------------------------------------------------------------------------------------------------------------

// hc_pre, then the sub-block's RMSNorm of its input: -> (rms_norm(x, weight), post, comb)
std::vector<Tensor> hc_pre_norm(const Tensor& streams, const Tensor& fn, const Tensor& base, const Tensor& scale,
                                int64_t iters, double eps, double norm_eps, const Tensor& weight, double weight_eps) {
  std::vector<Tensor> r = hc_pre(streams, fn, base, scale, iters, eps, norm_eps);
  r[0] = rms_norm(r[0], weight, weight_eps);
  return r;
}

// hc_post of the previous sub-block, then hc_pre_norm of the next: -> (streams, rms_norm(x, weight), post, comb)
std::vector<Tensor> hc_post_pre_norm(const Tensor& out, const Tensor& streams, const Tensor& post, const Tensor& comb,
                                     const Tensor& fn, const Tensor& base, const Tensor& scale, int64_t iters,
                                     double eps, double norm_eps, const Tensor& weight, double weight_eps) {
  Tensor s = hc_post(out, streams, post, comb);
  std::vector<Tensor> r = hc_pre_norm(s, fn, base, scale, iters, eps, norm_eps, weight, weight_eps);
  return {s, r[0], r[1], r[2]};
}

// Rows [n0, n1) of a weight as a weight of their own (views: no copy), or false when the layout cannot be split
// there (FP8: n0 must start a 128-row scale block; an unknown layout: never).
static bool weight_rows(const QW& q, int64_t n0, int64_t n1, QW& out) {
  const int64_t n = n1 - n0;
  out = QW{q.fmt, n, q.K, q.group, q.w.narrow(0, n0, n), Tensor(), Tensor()};
  out.act_i8 = q.act_i8;  // the part runs the same kernel as the whole weight
  if (q.fmt == FMT_FP8) {
    if (n0 % FP8_BLOCK) return false;
    const int64_t b0 = n0 / FP8_BLOCK, b1 = (n1 + FP8_BLOCK - 1) / FP8_BLOCK;
    out.scale = q.scale.narrow(0, b0, b1 - b0);
    return true;
  }
  if (q.fmt == FMT_MXFP4 || q.fmt == FMT_I8 || q.fmt == FMT_I4) {
    out.scale = q.scale.narrow(0, n0, n);
    if (q.zp.defined()) out.zp = q.zp.narrow(0, n0, n);
    return true;
  }
  return q.fmt == FMT_BF16;
}

// A weight as consecutive row ranges for `parts` threads (views: no copy), or {q} when it cannot be split: each
// range a multiple of PART_ROWS rows (FP8: of its 128-row scale block), so every row meets the same kernel, in the
// same row block, as in one GEMV over the whole weight (the decode kernels take rows in blocks of 4 from the first:
// the same bits either way). rows > 0: ranges of exactly that many rows (a grouped projection's groups).
constexpr int64_t PART_ROWS = 16;
std::vector<QW> weight_parts(const QW& q, int64_t parts, int64_t rows) {
  const int64_t align = q.fmt == FMT_FP8 ? FP8_BLOCK : PART_ROWS;
  int64_t step = rows > 0 ? rows : (q.N + parts * align - 1) / (parts * align) * align;
  std::vector<QW> out;
  if (rows > 0 && (q.N % rows || rows % align)) return {q};
  for (int64_t n0 = 0; n0 < q.N; n0 += step) {
    QW part;
    if (!weight_rows(q, n0, std::min(q.N, n0 + step), part)) return {q};
    out.push_back(part);
  }
  return out;
}

// One GEMV over a row range of a weight: y[t * ldy + n] = x_t . W[n] (x rows ldx apart), T rows; grouped: a
// grouped projection's group (grouped_linear's kernels, which differ from linear's for int4)
struct Unit {
  const QW* q;
  const float* x;
  int64_t ldx;
  float* y;
  int64_t ldy;
  bool grouped = false;
};

// Every unit in one parallel region (one unit per thread's share: a decode step's GEMVs are too small to split
// each of them over threads, every parallel region waking the others)
static void run_units(const std::vector<Unit>& u, int64_t T) {
  at::parallel_for(0, int64_t(u.size()), 1, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; a++) {
      const Unit& v = u[a];
      gemv_into(*v.q, v.x, T, v.ldx, v.y, v.ldy, v.grouped ? v.q->N : 0);  // one group: its rows read x as given
    }
  });
}

// The units of y [T, N] = x [T, K] @ W.T over W's parts (consecutive row ranges)
static void add_units(std::vector<Unit>& u, const std::vector<QW>& parts, const float* x, int64_t ldx, float* y,
                      int64_t ldy) {
  int64_t row0 = 0;
  for (const QW& p : parts) {
    u.push_back(Unit{&p, x, ldx, y + row0, ldy});
    row0 += p.N;
  }
}

// linear(x, W) for decode rows over W's parts (weight_parts: consecutive row ranges), one parallel region: x [T, K]
// (T <= MAX_ROWS) -> [T, N]. BIT-IDENTICAL to linear (the same kernel per row).
Tensor linear_parts(const Tensor& x_, const std::vector<QW>& parts) {
  Tensor x = x_.contiguous();
  const int64_t T = x.size(0);
  int64_t N = 0;
  for (const QW& p : parts) N += p.N;
  TORCH_CHECK(T <= MAX_ROWS && !parts.empty() && x.size(1) == parts[0].K, "linear_parts: x [T <= MAX_ROWS, K]");
  Tensor y = at::empty({T, N}, at::kFloat);
  std::vector<Unit> u;
  add_units(u, parts, x.data_ptr<float>(), x.size(1), y.data_ptr<float>(), N);
  run_units(u, T);
  return y;
}

// The attention's projections of x [T, D]: qr = q_norm(wq_a x) [T, q_lora]; q = rope(rms_norm(wq_b qr as
// [T, H, Dh])) ; kv = rope(kv_norm(wkv x)) [T, Dh]; every RMSNorm with eps. -> (qr, q, kv)
std::vector<Tensor> attn_project(const Tensor& x_, const QW& wq_a, const Tensor& q_norm, const QW& wq_b,
                                 const QW& wkv, const Tensor& kv_norm, const Tensor& cos, const Tensor& sin,
                                 int64_t heads, double eps, const std::vector<QW>& wq_a_parts,
                                 const std::vector<QW>& wq_b_parts, const std::vector<QW>& wkv_parts) {
  Tensor x = x_.contiguous();
  const int64_t T = x.size(0), D = x.size(1);
  if (wq_a_parts.empty() || wq_b_parts.empty() || wkv_parts.empty() || T > MAX_ROWS) {
    Tensor qr = rms_norm(linear(x, wq_a), q_norm, eps);
    Tensor q = rope(rms_norm(linear(qr, wq_b).view({T, heads, -1}), c10::nullopt, eps), cos, sin, false);
    Tensor kv = rope(rms_norm(linear(x, wkv), kv_norm, eps), cos, sin, false);
    return {qr, q, kv};
  }
  // the parts (one per thread): wq_a and wkv in one parallel region, wq_b in a second
  Tensor qa = at::empty({T, wq_a.N}, at::kFloat), kva = at::empty({T, wkv.N}, at::kFloat);
  std::vector<Unit> u;
  add_units(u, wq_a_parts, x.data_ptr<float>(), D, qa.data_ptr<float>(), wq_a.N);
  add_units(u, wkv_parts, x.data_ptr<float>(), D, kva.data_ptr<float>(), wkv.N);
  run_units(u, T);
  Tensor qr = rms_norm(qa, q_norm, eps), qb = at::empty({T, wq_b.N}, at::kFloat);
  u.clear();
  add_units(u, wq_b_parts, qr.data_ptr<float>(), wq_b.K, qb.data_ptr<float>(), wq_b.N);
  run_units(u, T);
  Tensor q = rope(rms_norm(qb.view({T, heads, -1}), c10::nullopt, eps), cos, sin, false);
  Tensor kv = rope(rms_norm(kva, kv_norm, eps), cos, sin, false);
  return {qr, q, kv};
}

// Decode attention over keys every query sees (bias 0; one row: decode_attention, below), RoPE rotated back, the
// grouped wo_a over `groups` groups and wo_b: q [T, H, Dh], keys [S, Dh], sink [H] -> [T, D]. With parts (more than
// one thread): wo_a's groups in one parallel region, wo_b's parts in a second.
Tensor attn_output(const Tensor& q, const Tensor& keys, const Tensor& sink, double scale, const Tensor& cos,
                   const Tensor& sin, const QW& wo_a, int64_t groups, const QW& wo_b,
                   const std::vector<QW>& wo_a_groups, const std::vector<QW>& wo_b_parts) {
  const int64_t T = q.size(0);
  Tensor o = T == 1 ? decode_attention(q, keys, sink, scale, !wo_b_parts.empty())
                   : attention(q, keys, at::zeros({T, keys.size(0)}, at::kFloat), sink, scale, !wo_b_parts.empty());
  o = rope(o, cos, sin, true);
  if (int64_t(wo_a_groups.size()) != groups || wo_b_parts.empty() || T > MAX_ROWS) {
    o = grouped_linear(o.reshape({T, groups, -1}), wo_a);
    return linear(o.flatten(1), wo_b);
  }
  const int64_t I = wo_a.K, GR = wo_a.N;  // group g: rows g * GR / groups.. of wo_a against o's columns g * I..
  TORCH_CHECK(o.numel() == T * groups * I, "attn_output: wo_a [G * R, H * Dh / G]");
  Tensor oa = at::empty({T, GR}, at::kFloat), out = at::empty({T, wo_b.N}, at::kFloat);
  std::vector<Unit> u;
  for (int64_t g = 0; g < groups; g++)
    u.push_back(Unit{&wo_a_groups[g], o.data_ptr<float>() + g * I, groups * I, oa.data_ptr<float>() + g * (GR / groups),
                     GR, true});
  run_units(u, T);
  u.clear();
  add_units(u, wo_b_parts, oa.data_ptr<float>(), GR, out.data_ptr<float>(), wo_b.N);
  run_units(u, T);
  return out;
}

// A compressor's projections of x [T, D] appended to its buffered rows kv / gate [b, C]: (cat([kv, linear(x, wkv)]),
// cat([gate, linear(x, wgate)])) [b + T, C] each. Decode rows run the GEMV kernel straight into the new rows (the
// two GEMVs in one parallel region when `split`); more rows: linear and cat. BIT-IDENTICAL to those ops.
std::vector<Tensor> compress_project(const Tensor& x_, const Tensor& kv, const Tensor& gate, const QW& wkv,
                                     const QW& wgate, bool split) {
  Tensor x = x_.contiguous();
  const int64_t T = x.size(0), b = kv.size(0), C = wkv.N;
  TORCH_CHECK(wgate.N == C && kv.size(1) == C && gate.size(0) == b && gate.size(1) == C,
              "compress_project: kv, gate [b, C], wkv, wgate [C, D]");
  if (T > MAX_ROWS || wkv.fmt == FMT_F32 || wgate.fmt == FMT_F32)
    return {at::cat({kv, linear(x, wkv)}), at::cat({gate, linear(x, wgate)})};
  Tensor out[2] = {at::empty({b + T, C}, at::kFloat), at::empty({b + T, C}, at::kFloat)};
  out[0].narrow(0, 0, b).copy_(kv);
  out[1].narrow(0, 0, b).copy_(gate);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, 2, split ? 1 : 2, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; a++) gemv_into(a ? wgate : wkv, xp, T, x.size(1), out[a].data_ptr<float>() + b * C, C);
  });
  return {out[0], out[1]};
}

// The router of model.Gate for T rows, bit for bit: scores = sqrt(softplus(x gate_w^T)) (mm, softplus and sqrt by
// ATen, as model.Gate calls them: softplus's threshold rule and torch's vectorised exp/log1p/sqrt, which are not
// libm's: torch's fp32 sqrt differs from std::sqrt in the last bit now and then); picks = the top-k of scores +
// bias, or idx (hash layers); weights = the picks' scores / (their sum + 1e-20) * route_scale. The selection is
// plain C++ (a partial insertion sort, descending like torch.topk), so a row whose top k+1 biased scores hold a tie
// or a NaN, where torch.topk's own tie rule decides which win and in which order (reference.topk_indices), takes
// at::topk instead. The sum over the k picks follows ATen's inner-sum order for k < 8 (4 partial sums of every 4th
// pick, the rest added to the first, then the 4 joined left to right: SumKernel.cpp's row_sum); k >= 8 takes
// at::sum. -> ip [T*k] expert ids, wp [T*k] weights.
static void route(const Tensor& x, const Tensor& gate_w, const c10::optional<Tensor>& bias,
                  const c10::optional<Tensor>& idx_, int64_t k, double route_scale, std::vector<int64_t>& ip,
                  std::vector<float>& wp) {
  const int64_t T = x.size(0), E = gate_w.size(0);
  Tensor scores = at::softplus(at::mm(x, gate_w.t())).sqrt_().contiguous();  // [T, E]
  const float* sp = scores.data_ptr<float>();
  ip.assign(T * k, 0);
  wp.assign(T * k, 0.f);
  if (idx_.has_value() && idx_->defined()) {
    Tensor il = idx_->contiguous().to(at::kLong);
    std::copy(il.data_ptr<int64_t>(), il.data_ptr<int64_t>() + T * k, ip.begin());
  } else {
    Tensor bt = bias->contiguous();
    const float* bp = bt.data_ptr<float>();
    std::vector<float> top(k + 1);
    std::vector<int64_t> at_(k + 1);
    const int64_t kk = std::min(k + 1, E);  // the k picks and the first one left out (a tie there decides the set)
    bool fallback = false;
    for (int64_t t = 0; t < T && !fallback; t++) {
      int64_t m = 0;
      for (int64_t e = 0; e < E; e++) {
        const float v = sp[t * E + e] + bp[e];
        if (std::isnan(v)) { fallback = true; break; }
        if (m == kk && !(v > top[m - 1])) continue;  // not above the smallest kept (equal: a tie, checked below)
        int64_t j = m < kk ? m++ : m - 1;
        for (; j > 0 && top[j - 1] < v; j--) top[j] = top[j - 1], at_[j] = at_[j - 1];
        top[j] = v, at_[j] = e;
      }
      for (int64_t j = 0; j + 1 < m && !fallback; j++) fallback = top[j] == top[j + 1];
      if (!fallback && m == kk && kk == k + 1) {  // a value equal to the (k+1)-th, seen after it, was skipped
        int64_t eq = 0;
        for (int64_t e = 0; e < E; e++) eq += sp[t * E + e] + bp[e] == top[k];
        fallback = eq > 1;
      }
      std::copy(at_.begin(), at_.begin() + k, ip.begin() + t * k);
    }
    if (fallback) {  // torch's own selection, as model.Gate makes it
      Tensor il = std::get<1>(at::topk(at::add(scores, bt), k)).contiguous();
      std::copy(il.data_ptr<int64_t>(), il.data_ptr<int64_t>() + T * k, ip.begin());
    }
  }
  for (int64_t i = 0; i < T * k; i++)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < E, "gated_moe: expert id ", ip[i], " out of range (", E, " experts)");
  if (k >= 8) {  // ATen's vectorised inner sum: its own order
    Tensor w = at::gather(scores, 1, at::from_blob(ip.data(), {T, k}, at::kLong));
    w = at::mul(at::div(w, at::add(at::sum(w, {-1}, true), 1e-20)), route_scale).contiguous();
    std::copy(w.data_ptr<float>(), w.data_ptr<float>() + T * k, wp.begin());
    return;
  }
  const float scale = float(route_scale);
  for (int64_t t = 0; t < T; t++) {
    float* w = wp.data() + t * k;
    for (int64_t j = 0; j < k; j++) w[j] = sp[t * E + ip[t * k + j]];
    float s;
    if (k < 4) {
      s = w[0];
      for (int64_t j = 1; j < k; j++) s += w[j];
    } else {
      float p[4] = {w[0], w[1], w[2], w[3]};
      for (int64_t j = 4; j < k; j++) p[0] += w[j];
      s = ((p[0] + p[1]) + p[2]) + p[3];
    }
    const float d = s + 1e-20f;
    for (int64_t j = 0; j < k; j++) w[j] = w[j] / d * scale;
  }
}

// w2 of every expert split into `parts` row ranges (weight_parts), cached in the set
static const std::vector<std::vector<QW>>& w2_split(const ExpertSet& s, int64_t parts) {
  if (s.w2_parts != parts) {
    std::vector<std::vector<QW>> split(s.w2.size());
    for (size_t e = 0; e < s.w2.size(); e++) split[e] = weight_parts(s.w2[e], parts, 0);
    s.w2_split = std::move(split);
    s.w2_parts = parts;
  }
  return s.w2_split;
}

// model.MoE on x [T, D]: the router (`route` above: model.Gate bit for bit), the routed experts and the shared expert
// (weight 1), summed. For T <= MAX_ROWS (decode) with compact weights and threads > 1 the experts run in two
// parallel regions, whatever their number: (1) every picked expert's w1 and w3 GEMVs (one unit each), (2) every
// expert's SwiGLU and w2 GEMV, w2 split by rows into one part per thread (threads = 1: the same units in order, on
// the calling thread); then the outputs are summed on one thread in the order of
// `moe` (routed experts ascending, then the shared expert added). Each output row comes from the same GEMV kernel
// as in `moe` and every sum keeps its order, so the result is BIT-IDENTICAL to `moe` (routed) + `moe` (shared),
// the ops one by one, at any thread count. More rows (prefill) or an fp32 weight: exactly those two `moe` calls.
Tensor gated_moe(const Tensor& x_, const Tensor& gate_w, const c10::optional<Tensor>& bias,
                 const c10::optional<Tensor>& idx_, int64_t k, double route_scale, const ExpertSet& routed,
                 const ExpertSet& shared, double limit_, int64_t threads) {
  Tensor x = x_.contiguous();
  const int64_t T = x.size(0), D = x.size(1);
  std::vector<int64_t> ip;
  std::vector<float> wp;
  route(x, gate_w, bias, idx_, k, route_scale, ip, wp);
  std::vector<int64_t> ids(ip);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  // the experts of this step: the routed ones ascending, then the shared one (every row, weight 1)
  struct Job { const QW *w1, *w3, *w2; std::vector<int64_t> rows; std::vector<float> c; };
  std::vector<Job> jobs;
  for (int64_t e : ids) {
    Job j{&routed.w1[e], &routed.w3[e], &routed.w2[e], {}, {}};
    for (int64_t t = 0; t < T; t++)
      for (int64_t s = 0; s < k; s++)
        if (ip[t * k + s] == e) j.rows.push_back(t), j.c.push_back(wp[t * k + s]);
    jobs.push_back(std::move(j));
  }
  bool compact = T <= MAX_ROWS && shared.w1.size() == 1;
  if (compact) {
    Job sj{&shared.w1[0], &shared.w3[0], &shared.w2[0], {}, std::vector<float>(T, 1.f)};
    for (int64_t t = 0; t < T; t++) sj.rows.push_back(t);
    jobs.push_back(std::move(sj));
  }
  for (size_t j = 0; j < jobs.size() && compact; j++)  // moe's GEMV path: <= MAX_ROWS rows (a hash table may repeat
    compact = int64_t(jobs[j].rows.size()) <= MAX_ROWS && jobs[j].w1->fmt != FMT_F32 &&  // an expert in a row)
              jobs[j].w3->fmt != FMT_F32 && jobs[j].w2->fmt != FMT_F32;
  if (!compact) {
    std::vector<QW> w1, w3, w2;
    for (int64_t e : ids) w1.push_back(routed.w1[e]), w3.push_back(routed.w3[e]), w2.push_back(routed.w2[e]);
    Tensor out = moe(x, at::from_blob(wp.data(), {T, k}, at::kFloat), at::from_blob(ip.data(), {T, k}, at::kLong),
                     ids, w1, w3, w2, limit_);
    Tensor sh = moe(x, at::ones({T, 1}, at::kFloat), at::zeros({T, 1}, at::kLong), {0}, shared.w1, shared.w3,
                    shared.w2, limit_);
    return out.add_(sh);
  }
  const int64_t J = jobs.size();
  // w2 in one row range per thread
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, 8)), grain = parts > 1 ? 1 : 1 << 30;
  const auto& split = w2_split(routed, parts);
  const auto& split_sh = w2_split(shared, parts);
  auto consecutive = [](const std::vector<int64_t>& r) {  // r[0], r[0] + 1, ... (a hash row may repeat an expert)
    for (size_t i = 1; i < r.size(); i++)
      if (r[i] != r[0] + int64_t(i)) return false;
    return true;
  };
  // per job: its rows of x (consecutive rows read in place, others gathered), w1 x and w3 x [n, I], the output [n, D]
  const float* xp = x.data_ptr<float>();
  std::vector<const float*> xin(J);
  std::vector<int64_t> go(J), yo(J);
  int64_t xs = 0, gs = 0, ys = 0;
  for (int64_t j = 0; j < J; j++) {
    const std::vector<int64_t>& r = jobs[j].rows;
    const int64_t n = r.size();
    go[j] = gs, gs += n * jobs[j].w1->N;
    yo[j] = ys, ys += n * D;
    if (!consecutive(r)) xs += n * D;
  }
  std::vector<float> xbuf(xs), gbuf(gs), ubuf(gs), ybuf(ys);
  for (int64_t j = 0, off = 0; j < J; j++) {
    const std::vector<int64_t>& r = jobs[j].rows;
    const int64_t n = r.size();
    if (consecutive(r)) { xin[j] = xp + r.front() * D; continue; }
    for (int64_t i = 0; i < n; i++) std::memcpy(xbuf.data() + off + i * D, xp + r[i] * D, D * sizeof(float));
    xin[j] = xbuf.data() + off, off += n * D;
  }
  at::parallel_for(0, 2 * J, grain, [&](int64_t a0, int64_t a1) {  // (1) w1 and w3 of every expert
    for (int64_t a = a0; a < a1; a++) {
      const Job& b = jobs[a / 2];
      const QW& q = a % 2 ? *b.w3 : *b.w1;
      gemv_into(q, xin[a / 2], b.rows.size(), D, (a % 2 ? ubuf : gbuf).data() + go[a / 2], q.N);
    }
  });
  std::vector<const std::vector<QW>*> w2(J);  // each job's w2 parts
  std::vector<int64_t> unit_job, unit_part;
  for (int64_t j = 0; j < J; j++) {
    w2[j] = j + 1 < J ? &split[jobs[j].w2 - routed.w2.data()] : &split_sh[0];
    for (size_t p = 0; p < w2[j]->size(); p++) unit_job.push_back(j), unit_part.push_back(p);
  }
  const float limit = float(limit_);
  at::parallel_for(0, int64_t(unit_job.size()), grain, [&](int64_t a0, int64_t a1) {  // (2) SwiGLU and w2 (parts)
    std::vector<float> act;
    for (int64_t a = a0; a < a1; a++) {
      const int64_t j = unit_job[a];
      const Job& b = jobs[j];
      const int64_t I = b.w1->N, n = b.rows.size();
      act.resize(n * I);
      const float *g = gbuf.data() + go[j], *u = ubuf.data() + go[j];
      for (int64_t i = 0; i < n * I; i++) {  // moe's SwiGLU, statement for statement
        const float c = std::min(g[i], limit);
        const float v = std::min(std::max(u[i], -limit), limit);
        act[i] = c / (1.f + std::exp(-c)) * v;
      }
      const std::vector<QW>& parts_j = *w2[j];
      int64_t row0 = 0;
      for (int64_t p = 0; p < unit_part[a]; p++) row0 += parts_j[p].N;
      gemv_into(parts_j[unit_part[a]], act.data(), n, I, ybuf.data() + yo[j] + row0, D);
    }
  });
  Tensor out = at::zeros({T, D}, at::kFloat);
  float* op = out.data_ptr<float>();
  for (int64_t j = 0; j + 1 < J; j++) {  // routed, ascending: moe's accumulation
    const Job& b = jobs[j];
    for (size_t r = 0; r < b.rows.size(); r++) {
      const float c = b.c[r];
      float* dst = op + b.rows[r] * D;
      const float* src = ybuf.data() + yo[j] + r * D;
      #pragma omp simd
      for (int64_t d = 0; d < D; d++) dst[d] += src[d] * c;
    }
  }
  const float* sy = ybuf.data() + yo[J - 1];  // the shared expert: moe's (0 + y * 1), then added
  for (int64_t i = 0; i < T * D; i++) op[i] += 0.f + sy[i] * 1.f;
  return out;
}

// -- prefill attention: online softmax over key tiles -----------------------------------------------------------
// The same math as `attention` above for many queries (prefill), without the [T, S] logits: a block of FA_QB
// query rows streams over tiles of FA_KT keys and keeps, per (query, head), a running max M, a running sum L of
// exp(logit - M) and the output accumulator (flash attention's online softmax, rescaled by exp(M_old - M_new)
// when the max grows). The sink enters as the initial state (M = sink[h], L = exp(0) = 1, acc = 0): it joins the
// denominator and adds nothing to the output, as in the reference. A tile whose bias is -inf for every row of the
// block is skipped, and so is a row that sees none of a tile's keys (V4's masks are a window and a prefix or a
// top-k: most tiles of a CSA or SWA layer are hidden from a block).
// TOLERANCE-BOUND against reference.attention: fp32 with another summation order and a polynomial exp (Cephes
// expf, ~2 ulp; results below e**-87 flushed to 0, which the sink's term >= e**(sink - M) makes negligible);
// tested within 1e-5 relative (tests/test_torch_fast.py).
constexpr int64_t FA_QB = 16;  // query rows per block: the key tile is reused by FA_QB * H (query, head) pairs
constexpr int64_t FA_KT = 64;  // keys per tile (the transposed tile, Dh x 64 fp32, stays in L1)

#ifdef __AVX512F__
// e**x, Cephes expf (range reduction by ln 2 in two parts, degree-6 polynomial, 2**n by scalef); x < -87.3 -> 0
static inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(_mm512_knot(under), _mm512_scalef_ps(p, n));
}
#endif

// NP (query, head) pairs at once, so that each load of the key tile serves NP of them:
// lg[i][0:FA_KT] = (q_i . keys[s]) * scale + bias_i[s] from the transposed tile kT [Dh, FA_KT] (columns >= n are
// -inf); mx[i] = the largest of them
template <int NP>
static inline void fa_logits(const float* const* qa, const float* kT, const float* const* b, int64_t n, int64_t Dh,
                             float scale, float* lg, float* mx) {
#ifdef __AVX512F__
  static_assert(FA_KT == 64, "four zmm per pair");
  __m512 a[NP][4];
  for (int i = 0; i < NP; i++)
    for (int j = 0; j < 4; j++) a[i][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < Dh; d++) {
    const float* k = kT + d * FA_KT;
    const __m512 k0 = _mm512_loadu_ps(k), k1 = _mm512_loadu_ps(k + 16), k2 = _mm512_loadu_ps(k + 32),
                 k3 = _mm512_loadu_ps(k + 48);
    for (int i = 0; i < NP; i++) {
      const __m512 qd = _mm512_set1_ps(qa[i][d]);
      a[i][0] = _mm512_fmadd_ps(qd, k0, a[i][0]);
      a[i][1] = _mm512_fmadd_ps(qd, k1, a[i][1]);
      a[i][2] = _mm512_fmadd_ps(qd, k2, a[i][2]);
      a[i][3] = _mm512_fmadd_ps(qd, k3, a[i][3]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
  for (int i = 0; i < NP; i++) {
    __m512 m = ninf;
    for (int j = 0; j < 4; j++) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, n - 16 * j));
      const __mmask16 k = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512 v = _mm512_add_ps(_mm512_mul_ps(a[i][j], sc), _mm512_mask_loadu_ps(ninf, k, b[i] + 16 * j));
      _mm512_storeu_ps(lg + i * FA_KT + 16 * j, v);
      m = _mm512_max_ps(m, v);
    }
    mx[i] = _mm512_reduce_max_ps(m);
  }
#else
  for (int i = 0; i < NP; i++) {
    float* l = lg + i * FA_KT;
    for (int64_t s = 0; s < FA_KT; s++) l[s] = 0.f;
    for (int64_t d = 0; d < Dh; d++) {
      const float qd = qa[i][d];
      const float* k = kT + d * FA_KT;
      #pragma omp simd
      for (int64_t s = 0; s < FA_KT; s++) l[s] += qd * k[s];
    }
    mx[i] = -INFINITY;
    for (int64_t s = 0; s < FA_KT; s++) mx[i] = std::max(mx[i], l[s] = s < n ? l[s] * scale + b[i][s] : -INFINITY);
  }
#endif
}

// p = exp(lg - M) in place over FA_KT columns; returns their sum
static inline float fa_exp(float* lg, float M) {
#ifdef __AVX512F__
  const __m512 mv = _mm512_set1_ps(M);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < FA_KT; j += 16) {
    const __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(lg + j), mv));
    _mm512_storeu_ps(lg + j, p);
    sum = _mm512_add_ps(sum, p);
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.f;
  for (int64_t s = 0; s < FA_KT; s++) sum += (lg[s] = std::exp(lg[s] - M));
  return sum;
#endif
}

// o_i[0:Dh] += sum_s p_i[s] * k[s] over the tile's n keys k [n, Dh], for NP pairs (each key load serves NP)
template <int NP>
static inline void fa_accumulate(const float* p, const float* k, int64_t n, int64_t Dh, float* const* o) {
  int64_t d0 = 0;
#ifdef __AVX512F__
  for (; d0 + 64 <= Dh; d0 += 64) {
    __m512 a[NP][4];
    for (int i = 0; i < NP; i++)
      for (int j = 0; j < 4; j++) a[i][j] = _mm512_loadu_ps(o[i] + d0 + 16 * j);
    for (int64_t s = 0; s < n; s++) {
      bool any = false;
      for (int i = 0; i < NP; i++) any |= p[i * FA_KT + s] != 0.f;
      if (!any) continue;  // hidden from every pair (bias -inf): adds exactly nothing
      const float* ks = k + s * Dh + d0;
      const __m512 k0 = _mm512_loadu_ps(ks), k1 = _mm512_loadu_ps(ks + 16), k2 = _mm512_loadu_ps(ks + 32),
                   k3 = _mm512_loadu_ps(ks + 48);
      for (int i = 0; i < NP; i++) {
        const __m512 w = _mm512_set1_ps(p[i * FA_KT + s]);
        a[i][0] = _mm512_fmadd_ps(w, k0, a[i][0]);
        a[i][1] = _mm512_fmadd_ps(w, k1, a[i][1]);
        a[i][2] = _mm512_fmadd_ps(w, k2, a[i][2]);
        a[i][3] = _mm512_fmadd_ps(w, k3, a[i][3]);
      }
    }
    for (int i = 0; i < NP; i++)
      for (int j = 0; j < 4; j++) _mm512_storeu_ps(o[i] + d0 + 16 * j, a[i][j]);
  }
#endif
  if (d0 == Dh) return;
  for (int i = 0; i < NP; i++)
    for (int64_t s = 0; s < n; s++) {
      const float w = p[i * FA_KT + s];
      if (w == 0.f) continue;
      const float* ks = k + s * Dh;
      float* oi = o[i];
      #pragma omp simd
      for (int64_t d = d0; d < Dh; d++) oi[d] += w * ks[d];
    }
}

// One group of NP (query, head) pairs over one tile: logits, the online-softmax update, the weighted keys.
template <int NP>
static inline void fa_group(const int64_t* pairs, const float* const* qa, const float* const* b, const float* kT,
                            const float* k, int64_t n, int64_t Dh, float scale, float* M, float* L, float* acc) {
  alignas(64) float lg[NP * FA_KT];
  float mx[NP];
  float* o[NP];
  fa_logits<NP>(qa, kT, b, n, Dh, scale, lg, mx);
  for (int i = 0; i < NP; i++) {
    const int64_t a = pairs[i];
    o[i] = acc + a * Dh;
    if (mx[i] > M[a]) {  // the max grew: rescale what was summed so far
      const float c = std::exp(M[a] - mx[i]);
      L[a] *= c;
      #pragma omp simd
      for (int64_t d = 0; d < Dh; d++) o[i][d] *= c;
      M[a] = mx[i];
    }
    L[a] += fa_exp(lg + i * FA_KT, M[a]);
  }
  fa_accumulate<NP>(lg, k, n, Dh, o);
}

Tensor flash_attention(const Tensor& q_, const Tensor& keys_, const Tensor& bias_, const Tensor& sink_,
                       double scale_) {
  Tensor q = q_.contiguous(), keys = keys_.contiguous(), bias = bias_.contiguous(), sink = sink_.contiguous();
  const int64_t T = q.size(0), H = q.size(1), Dh = q.size(2), S = keys.size(0);
  TORCH_CHECK(keys.size(1) == Dh && bias.size(0) == T && bias.size(1) == S && sink.numel() == H,
              "flash_attention: q [T, H, Dh], keys [S, Dh], bias [T, S], sink [H]");
  Tensor out = at::empty({T, H, Dh}, at::kFloat);
  const float *qp = q.data_ptr<float>(), *kp = keys.data_ptr<float>(), *bp = bias.data_ptr<float>(),
              *sp = sink.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = float(scale_);
  const int64_t nb = (T + FA_QB - 1) / FA_QB;
  constexpr int NP = 4;  // pairs per group: 16 zmm accumulators
  at::parallel_for(0, nb, std::max<int64_t>(1, PARALLEL_MIN / std::max<int64_t>(FA_QB * H * S * Dh, 1)),
                   [&](int64_t b0, int64_t b1) {
    std::vector<float> kT(Dh * FA_KT), M(FA_QB * H), L(FA_QB * H), acc(FA_QB * H * Dh);
    std::vector<int64_t> pairs(FA_QB * H);
    std::vector<const float*> qa(FA_QB * H), bb(FA_QB * H);
    for (int64_t blk = b0; blk < b1; blk++) {
      const int64_t t0 = blk * FA_QB, nr = std::min(FA_QB, T - t0);
      for (int64_t r = 0; r < nr; r++)
        for (int64_t h = 0; h < H; h++) M[r * H + h] = sp[h], L[r * H + h] = 1.f;  // the sink: exp(sink - sink)
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s0 = 0; s0 < S; s0 += FA_KT) {
        const int64_t n = std::min(FA_KT, S - s0);
        int64_t np = 0;  // the pairs whose row sees some key of the tile
        for (int64_t r = 0; r < nr; r++) {
          const float* b = bp + (t0 + r) * S + s0;
          bool v = false;
          for (int64_t s = 0; s < n; s++) v |= b[s] > -INFINITY;
          if (!v) continue;
          for (int64_t h = 0; h < H; h++) {
            pairs[np] = r * H + h, qa[np] = qp + ((t0 + r) * H + h) * Dh, bb[np] = b;
            np++;
          }
        }
        if (!np) continue;  // every key of the tile is hidden from the block: it adds exactly nothing
        for (int64_t d = 0; d < Dh; d++)
          for (int64_t s = 0; s < FA_KT; s++) kT[d * FA_KT + s] = s < n ? kp[(s0 + s) * Dh + d] : 0.f;
        const float* k = kp + s0 * Dh;
        int64_t g = 0;
        for (; g + NP <= np; g += NP)
          fa_group<NP>(&pairs[g], &qa[g], &bb[g], kT.data(), k, n, Dh, scale, M.data(), L.data(), acc.data());
        for (; g < np; g++)
          fa_group<1>(&pairs[g], &qa[g], &bb[g], kT.data(), k, n, Dh, scale, M.data(), L.data(), acc.data());
      }
      for (int64_t r = 0; r < nr; r++)
        for (int64_t h = 0; h < H; h++) {
          const int64_t a = r * H + h;
          const float inv = 1.f / L[a];
          float* o = op + ((t0 + r) * H + h) * Dh;
          const float* src = acc.data() + a * Dh;
          for (int64_t d = 0; d < Dh; d++) o[d] = src[d] * inv;
        }
    }
  });
  return out;
}

// -- decode attention: split-K online softmax ---------------------------------------------------------------------
// One query row over S keys it all sees (bias 0: an HCA layer's window and every compressed entry, 32K entries at 1M
// tokens of flash-tiny). The work items are a segment of DA_SEG keys for a group of 4 heads; within an item each
// tile of FA_KT keys is read once for the group: the logits key by key (row-major dot products, no transposed tile:
// with few heads the transpose cost more than the products), then flash_attention's online-softmax update and
// weighted sum. The segments' (max, sum, accumulator) merge in segment order. The items are fixed by S and H, not
// by the thread count, so the result is the same bits at any number of threads. Where `attention` read the keys
// twice per head with a libm exp per key, this reads them once per tile and group of 4 heads: 0.2x its time at 32K
// keys, 4 heads of 64, one thread.
// TOLERANCE-BOUND against reference.attention like flash_attention (1e-5 relative, tests/test_torch_fast.py).
constexpr int64_t DA_SEG = 1024;

// lg[h * FA_KT + s] = (q_h . k_s) * scale for the tile's n keys k [n, Dh], -inf for s >= n
static inline void da_logits(const float* qp, int64_t H, const float* k, int64_t n, int64_t Dh, float scale,
                             float* lg) {
  for (int64_t h = 0; h < H; h++) std::fill(lg + h * FA_KT + n, lg + (h + 1) * FA_KT, -INFINITY);
#ifdef __AVX512F__
  if (Dh % 16 == 0) {
    for (int64_t h0 = 0; h0 < H; h0 += 4) {
      const int64_t nh = std::min<int64_t>(4, H - h0);
      const float* q0 = qp + h0 * Dh;
      for (int64_t s = 0; s < n; s++) {
        const float* ks = k + s * Dh;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < Dh; d += 16) {
          const __m512 kv = _mm512_loadu_ps(ks + d);
          a0 = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q0 + d), a0);
          if (nh > 1) a1 = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q0 + Dh + d), a1);
          if (nh > 2) a2 = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q0 + 2 * Dh + d), a2);
          if (nh > 3) a3 = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q0 + 3 * Dh + d), a3);
        }
        float* l = lg + h0 * FA_KT + s;
        l[0] = _mm512_reduce_add_ps(a0) * scale;
        if (nh > 1) l[FA_KT] = _mm512_reduce_add_ps(a1) * scale;
        if (nh > 2) l[2 * FA_KT] = _mm512_reduce_add_ps(a2) * scale;
        if (nh > 3) l[3 * FA_KT] = _mm512_reduce_add_ps(a3) * scale;
      }
    }
    return;
  }
#endif
  for (int64_t h = 0; h < H; h++)
    for (int64_t s = 0; s < n; s++) lg[h * FA_KT + s] = dot(qp + h * Dh, k + s * Dh, Dh) * scale;
}

Tensor decode_attention(const Tensor& q_, const Tensor& keys_, const Tensor& sink_, double scale_, bool split) {
  Tensor q = q_.contiguous(), keys = keys_.contiguous(), sink = sink_.contiguous();
  const int64_t H = q.size(1), Dh = q.size(2), S = keys.size(0);
  TORCH_CHECK(q.size(0) == 1 && keys.size(1) == Dh && sink.numel() == H,
              "decode_attention: q [1, H, Dh], keys [S, Dh], sink [H]");
  const float *qp = q.data_ptr<float>(), *kp = keys.data_ptr<float>(), *sp = sink.data_ptr<float>();
  const float scale = float(scale_);
  constexpr int NP = 4;  // heads per group: the logits and the weighted sum read a key once for NP heads
  const int64_t nseg = std::max<int64_t>(1, (S + DA_SEG - 1) / DA_SEG), ngr = (H + NP - 1) / NP;
  std::vector<float> M(nseg * H), L(nseg * H), acc(nseg * H * Dh, 0.f);
  // one work item: a segment of keys for a group of NP heads. Each head's arithmetic is the same in any item
  // layout and on any thread, so the result does not depend on how the items are spread.
  auto item = [&](int64_t it) {
    const int64_t sg = it / ngr, h0 = it % ngr * NP, nh = std::min<int64_t>(NP, H - h0);
    float *Ms = M.data() + sg * H, *Ls = L.data() + sg * H, *as = acc.data() + sg * H * Dh;
    for (int64_t h = h0; h < h0 + nh; h++)  // the sink joins once, as segment 0's initial state (flash_attention's)
      Ms[h] = sg == 0 ? sp[h] : -INFINITY, Ls[h] = sg == 0 ? 1.f : 0.f;
    alignas(64) float lg[NP * FA_KT];
    float* o[NP];
    for (int64_t i = 0; i < nh; i++) o[i] = as + (h0 + i) * Dh;
    const int64_t end = std::min(S, (sg + 1) * DA_SEG);
    for (int64_t s0 = sg * DA_SEG; s0 < end; s0 += FA_KT) {
      const int64_t n = std::min(FA_KT, end - s0);
      const float* k = kp + s0 * Dh;
      da_logits(qp + h0 * Dh, nh, k, n, Dh, scale, lg);
      for (int64_t i = 0; i < nh; i++) {
        const int64_t h = h0 + i;
        float* l = lg + i * FA_KT;
        const float mx = *std::max_element(l, l + n);
        if (mx > Ms[h]) {  // the max grew: rescale what was summed so far
          const float c = std::exp(Ms[h] - mx);
          Ls[h] *= c;
          for (int64_t d = 0; d < Dh; d++) o[i][d] *= c;
          Ms[h] = mx;
        }
        Ls[h] += fa_exp(l, Ms[h]);
      }
      if (nh == NP) {
        fa_accumulate<NP>(lg, k, n, Dh, o);
      } else {
        for (int64_t i = 0; i < nh; i++) fa_accumulate<1>(lg + i * FA_KT, k, n, Dh, &o[i]);
      }
    }
  };
  // split (decode on more than one thread, torch_fast's rule): items over the threads from HEADS_SPLIT_MIN
  // multiply-adds, else from PARALLEL_MIN
  const int64_t work = S * H * Dh, items = nseg * ngr;
  if (items > 1 && work >= (split ? HEADS_SPLIT_MIN : PARALLEL_MIN)) {
    at::parallel_for(0, items, 1, [&](int64_t a, int64_t b) { for (int64_t it = a; it < b; it++) item(it); });
  } else {
    for (int64_t it = 0; it < items; it++) item(it);
  }
  Tensor out = at::empty({1, H, Dh}, at::kFloat);
  float* op = out.data_ptr<float>();
  for (int64_t h = 0; h < H; h++) {
    float mx = -INFINITY, sum = 0.f;
    for (int64_t sg = 0; sg < nseg; sg++) mx = std::max(mx, M[sg * H + h]);
    float* o = op + h * Dh;
    std::fill(o, o + Dh, 0.f);
    for (int64_t sg = 0; sg < nseg; sg++) {
      const float c = std::exp(M[sg * H + h] - mx);  // 0 for a segment that saw nothing (M = -inf)
      sum += L[sg * H + h] * c;
      const float* a = acc.data() + (sg * H + h) * Dh;
      for (int64_t d = 0; d < Dh; d++) o[d] += a[d] * c;
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < Dh; d++) o[d] *= inv;
  }
  return out;
}

}  // namespace flashport

