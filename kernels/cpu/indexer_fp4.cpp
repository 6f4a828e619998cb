// The lightning indexer in the release's FP4 numerics: scores and top-k without materialising [T, H, n].
//
// Torch reference: flashport.quant.index_numerics.index_scores (same order of operations, hence the same bits)
// and flashport.backends.indexer_fp4 (the selection and its tie rule). Per query t and compressed entry e, with
// I[h, b] = sum_{j in block b} qc[t, h, j] * kc[e, j] the exact int32 dot product of the e2m1 codes (x2, int8):
//
//   one block (D = 32):  s[e] = ks[e] * sum_h, in order, (w[t, h] * qs[t, h]) * float(max(I[h], 0))
//   several blocks:      d[h] = sum_b, in order, (float(I[h, b]) * qs[t, h, b]) * ks[e, b]
//                        s[e] = sum_h, in order, w[t, h] * max(d[h], 0)
//
// fp32, each multiply and add rounded on its own (no FMA). Products by the power-of-two scales are exact, so the
// two forms agree wherever nothing underflows; the first saves the per-head scaling in the inner loop.
//
// Keys are stored interleaved for VNNI (flashport.backends.indexer_fp4.Fp4Keys): 16 entries per group, codes
// + 12 as uint8 [G, D/4, 16, 4] (one zmm = 4 consecutive dims of 16 entries) and scales fp32 [G, D/32, 16].
// vpdpbusd multiplies unsigned key bytes by signed query bytes, so I = acc - 12 * sum_j qc[t, h, j].
//
// The top-k keeps the k + 1 best per query (a min-heap: only scores above its smallest enter); a row whose k-th
// and (k+1)-th scores are equal is flagged `tied` and re-selected by the caller with torch.topk's own rule.
// Work is split over query blocks (prefill) or entry segments (decode, few queries), tiles of entries stay in
// L1/L2 while a block of queries passes over them; memory is O(T * k) whatever n.
#include "common.h"

#include <immintrin.h>

#include <limits>
#include <tuple>
#include <utility>

namespace flashport {

namespace {

constexpr int64_t GROUP = 16;   // entries per interleaved group (one zmm of int32 / fp32 lanes)
constexpr int64_t BLOCK = 32;   // values per FP4 scale
constexpr int64_t OFFSET = 12;  // codes are stored + 12 (unsigned)
constexpr int64_t TILE = 64;    // groups per tile (1024 entries: 32 KB of codes at D = 32)
constexpr int64_t QBLOCK = 8;   // queries per block passing over a tile
constexpr int64_t SEGMENT = 256;  // groups per decode segment (4096 entries)
constexpr int64_t PARALLEL_WORK = int64_t(1) << 26;  // multiply-adds below which the selection stays on one thread

struct Query {
  const int8_t* qc;   // [H, D]
  const float* qs;    // [H, nb]
  const float* w;     // [H]
  const int32_t* corr;  // [H, nb]: 12 * sum of the block's codes
  const float* wq;    // [H]: w * qs (one block only)
};

// D = 32 (one FP4 block): scores of two groups (32 entries) for one query -> out[32]. The keys stay in registers
// over the heads; each query broadcast serves both groups.
inline void pair_scores_d32(const Query& q, const uint8_t* kc, const float* ks, int64_t H, float* out) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  __m512i k0[8], k1[8];
  for (int g = 0; g < 8; g++) {
    k0[g] = _mm512_loadu_si512(kc + g * 64);
    k1[g] = _mm512_loadu_si512(kc + 512 + g * 64);
  }
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t h = 0; h < H; h++) {
    const int8_t* qh = q.qc + h * 32;
    __m512i a0 = zero, a1 = zero;
    for (int g = 0; g < 8; g++) {
      int32_t qv;
      std::memcpy(&qv, qh + g * 4, 4);
      const __m512i b = _mm512_set1_epi32(qv);
      a0 = _mm512_dpbusd_epi32(a0, k0[g], b);
      a1 = _mm512_dpbusd_epi32(a1, k1[g], b);
    }
    const __m512i c = _mm512_set1_epi32(q.corr[h]);
    const __m512 wq = _mm512_set1_ps(q.wq[h]);
    s0 = _mm512_add_ps(s0, _mm512_mul_ps(wq, _mm512_cvtepi32_ps(_mm512_max_epi32(_mm512_sub_epi32(a0, c), zero))));
    s1 = _mm512_add_ps(s1, _mm512_mul_ps(wq, _mm512_cvtepi32_ps(_mm512_max_epi32(_mm512_sub_epi32(a1, c), zero))));
  }
  _mm512_storeu_ps(out, _mm512_mul_ps(s0, _mm512_loadu_ps(ks)));
  _mm512_storeu_ps(out + 16, _mm512_mul_ps(s1, _mm512_loadu_ps(ks + 16)));
#else
  for (int half = 0; half < 2; half++) {
    const uint8_t* kg = kc + half * 512;
    float s[16] = {0};
    for (int64_t h = 0; h < H; h++) {
      for (int l = 0; l < 16; l++) {
        int32_t acc = 0;
        for (int g = 0; g < 8; g++)
          for (int j = 0; j < 4; j++) acc += int32_t(kg[g * 64 + l * 4 + j]) * int32_t(q.qc[h * 32 + g * 4 + j]);
        acc -= q.corr[h];
        const float m = q.wq[h] * float(acc > 0 ? acc : 0);
        s[l] = s[l] + m;
      }
    }
    for (int l = 0; l < 16; l++) out[half * 16 + l] = s[l] * ks[half * 16 + l];
  }
#endif
}

// scores of one group of 16 entries for one query -> out[16]
inline void group_scores(const Query& q, const uint8_t* kc, const float* ks, int64_t H, int64_t D, float* out) {
  const int64_t nb = D / BLOCK, quads = D / 4;
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  __m512 s = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t h = 0; h < H; h++) {
    const int8_t* qh = q.qc + h * D;
    __m512 d = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
      __m512i acc = _mm512_setzero_si512();
      for (int64_t g = 0; g < BLOCK / 4; g++) {
        int32_t qv;
        std::memcpy(&qv, qh + b * BLOCK + g * 4, 4);
        const __m512i kv = _mm512_loadu_si512(kc + (b * (BLOCK / 4) + g) * 64);
        acc = _mm512_dpbusd_epi32(acc, kv, _mm512_set1_epi32(qv));
      }
      acc = _mm512_sub_epi32(acc, _mm512_set1_epi32(q.corr[h * nb + b]));
      const __m512 x = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(q.qs[h * nb + b])),
                                     _mm512_loadu_ps(ks + b * GROUP));
      d = _mm512_add_ps(d, x);
    }
    s = _mm512_add_ps(s, _mm512_mul_ps(_mm512_set1_ps(q.w[h]), _mm512_max_ps(d, zero)));
  }
  _mm512_storeu_ps(out, s);
#else
  float s[GROUP] = {0};
  for (int64_t h = 0; h < H; h++) {
    const int8_t* qh = q.qc + h * D;
    float d[GROUP] = {0};
    for (int64_t b = 0; b < nb; b++) {
      for (int64_t l = 0; l < GROUP; l++) {
        int32_t acc = 0;
        for (int64_t g = 0; g < BLOCK / 4; g++)
          for (int64_t j = 0; j < 4; j++)
            acc += int32_t(kc[(b * (BLOCK / 4) + g) * 64 + l * 4 + j]) * int32_t(qh[b * BLOCK + g * 4 + j]);
        acc -= q.corr[h * nb + b];
        const float x = (float(acc) * q.qs[h * nb + b]) * ks[b * GROUP + l];
        d[l] = d[l] + x;
      }
    }
    for (int64_t l = 0; l < GROUP; l++) {
      const float r = d[l] > 0.f ? d[l] : 0.f;
      const float m = q.w[h] * r;
      s[l] = s[l] + m;
    }
  }
  std::memcpy(out, s, sizeof(s));
#endif
  (void)quads;
}

using Cand = std::pair<float, int64_t>;
inline bool heap_cmp(const Cand& a, const Cand& b) { return a.first > b.first; }  // min-heap on the score

struct Heap {  // the `cap` best (score, entry) seen so far
  std::vector<Cand> h;
  int64_t cap = 0;
  float thr = -std::numeric_limits<float>::infinity();  // scores must exceed this to enter (once full)
  void push(float s, int64_t e) {
    if (int64_t(h.size()) < cap) {
      h.emplace_back(s, e);
      std::push_heap(h.begin(), h.end(), heap_cmp);
      if (int64_t(h.size()) == cap) thr = h.front().first;
    } else if (s > h.front().first) {
      std::pop_heap(h.begin(), h.end(), heap_cmp);
      h.back() = {s, e};
      std::push_heap(h.begin(), h.end(), heap_cmp);
      thr = h.front().first;
    }
  }
};

struct Prepared {
  std::vector<int32_t> corr;  // [T, H, nb]
  std::vector<float> wq;      // [T, H]
  std::vector<Query> q;
};

Prepared prepare(const Tensor& qc, const Tensor& qs, const Tensor& w) {
  const int64_t T = qc.size(0), H = qc.size(1), D = qc.size(2), nb = D / BLOCK;
  Prepared p;
  p.corr.resize(T * H * nb);
  const int8_t* c = qc.data_ptr<int8_t>();
  for (int64_t i = 0; i < T * H * nb; i++) {
    int32_t sum = 0;
    for (int64_t j = 0; j < BLOCK; j++) sum += c[i * BLOCK + j];
    p.corr[i] = int32_t(OFFSET) * sum;
  }
  const float *qsp = qs.data_ptr<float>(), *wp = w.data_ptr<float>();
  p.wq.resize(T * H);
  for (int64_t i = 0; i < T * H; i++) p.wq[i] = wp[i] * qsp[i * nb];  // exact: qs is a power of two
  for (int64_t t = 0; t < T; t++)
    p.q.push_back({c + t * H * D, qsp + t * H * nb, wp + t * H, p.corr.data() + t * H * nb, p.wq.data() + t * H});
  return p;
}

void check(const Tensor& qc, const Tensor& qs, const Tensor& w, const Tensor& kc, const Tensor& ks) {
  TORCH_CHECK(qc.dim() == 3 && qc.scalar_type() == at::kChar && qc.is_contiguous(), "qc: int8 [T, H, D]");
  const int64_t T = qc.size(0), H = qc.size(1), D = qc.size(2);
  TORCH_CHECK(D % BLOCK == 0 && D > 0, "head dim must be a multiple of 32");
  TORCH_CHECK(qs.scalar_type() == at::kFloat && qs.is_contiguous() && qs.numel() == T * H * (D / BLOCK), "qs");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == T * H, "w: fp32 [T, H]");
  TORCH_CHECK(kc.scalar_type() == at::kByte && kc.is_contiguous(), "kc: uint8, interleaved");
  TORCH_CHECK(ks.scalar_type() == at::kFloat && ks.is_contiguous(), "ks: fp32, interleaved");
  TORCH_CHECK(kc.numel() % (2 * GROUP * D) == 0 && kc.numel() / D == ks.numel() / (D / BLOCK), "keys do not fit");
}

// scores of `step` groups from group g (2 groups for D = 32, else 1) -> out[16 * step]
inline int64_t groups_step(int64_t D) { return D == BLOCK ? 2 : 1; }
inline void scores_at(const Query& q, const uint8_t* kcp, const float* ksp, int64_t g, int64_t H, int64_t D,
                      float* out) {
  const int64_t nb = D / BLOCK;
  if (D == BLOCK)
    pair_scores_d32(q, kcp + g * GROUP * D, ksp + g * GROUP, H, out);
  else
    group_scores(q, kcp + g * GROUP * D, ksp + g * nb * GROUP, H, D, out);
}

}  // namespace

// scores [T, n] of every query against entries 0..n-1 (tests; the selection below never builds them)
Tensor indexer_fp4_scores(const Tensor& qc, const Tensor& qs, const Tensor& w, const Tensor& kc, const Tensor& ks,
                          int64_t n) {
  check(qc, qs, w, kc, ks);
  const int64_t T = qc.size(0), H = qc.size(1), D = qc.size(2), nb = D / BLOCK;
  TORCH_CHECK(n * D <= kc.numel(), "n exceeds the stored entries");
  Prepared p = prepare(qc, qs, w);
  Tensor out = at::empty({T, n}, at::kFloat);
  float* o = out.data_ptr<float>();
  const uint8_t* kcp = kc.data_ptr<uint8_t>();
  const float* ksp = ks.data_ptr<float>();
  const int64_t G = (n + GROUP - 1) / GROUP;
  const int64_t step = groups_step(D);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    float buf[2 * GROUP];
    for (int64_t t = t0; t < t1; t++)
      for (int64_t g = 0; g < G; g += step) {
        scores_at(p.q[t], kcp, ksp, g, H, D, buf);
        for (int64_t l = 0; l < step * GROUP && g * GROUP + l < n; l++) o[t * n + g * GROUP + l] = buf[l];
      }
  });
  (void)nb;
  return out;
}

// x fp32 [R, D] -> (codes int8 [R, D], exponents int32 [R, D/32]): hadamard then fp4_quantize of
// flashport.quant.index_numerics, bit for bit (the same butterflies in the same order, then the same rounding)
std::tuple<Tensor, Tensor> fp4_rotate_quantize(const Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: fp32 [R, D], contiguous");
  const int64_t R = x.size(0), D = x.size(1), nb = D / BLOCK;
  TORCH_CHECK(D >= BLOCK && D % BLOCK == 0 && (D & (D - 1)) == 0, "D must be a power of two >= 32");
  Tensor codes = at::empty({R, D}, at::kChar), exps = at::empty({R, nb}, at::kInt);
  const float* xp = x.data_ptr<float>();
  int8_t* cp = codes.data_ptr<int8_t>();
  int32_t* ep = exps.data_ptr<int32_t>();
  const float norm = float(std::pow(double(D), -0.5));  // torch multiplies by the Python float cast to fp32
  at::parallel_for(0, R, std::max<int64_t>(1, PARALLEL_WORK / 64 / (D * D)), [&](int64_t r0, int64_t r1) {
    std::vector<float> y(D), t(D);
    for (int64_t r = r0; r < r1; r++) {
      std::memcpy(y.data(), xp + r * D, D * sizeof(float));
      for (int64_t h = 1; h < D; h *= 2) {  // pairs (i, i + h) within blocks of 2h
        for (int64_t b = 0; b < D; b += 2 * h)
          for (int64_t i = b; i < b + h; i++) {
            t[i] = y[i] + y[i + h];
            t[i + h] = y[i] - y[i + h];
          }
        std::swap(y, t);
      }
      for (int64_t i = 0; i < D; i++) y[i] = y[i] * norm;
      for (int64_t b = 0; b < nb; b++) {
        const float* v = y.data() + b * BLOCK;
        float amax = 0.f;
        for (int64_t j = 0; j < BLOCK; j++) amax = std::max(amax, std::fabs(v[j]));
        amax = std::max(amax, 6.f * std::ldexp(1.f, -126)) * (1.f / 6.f);
        int e;
        const float mant = std::frexp(amax, &e);  // amax = mant * 2**e: ceil(log2) is e, or e - 1 at mant 0.5
        if (mant == 0.5f) e -= 1;
        ep[r * nb + b] = e;
        for (int64_t j = 0; j < BLOCK; j++) {
          const float q = std::min(std::max(std::ldexp(v[j], -e), -6.f), 6.f), a = std::fabs(q);
          // nearest e2m1 value, ties to even (nearbyint rounds half to even, as torch.round)
          const float c = a < 2.f ? std::nearbyint(a * 2.f) : a < 4.f ? 2.f * std::nearbyint(a) : 4.f * std::nearbyint(a * 0.5f);
          cp[r * D + b * BLOCK + j] = int8_t(q < 0.f ? -c : c);
        }
      }
    }
  });
  return {codes, exps};
}

// -> (idx int64 [T, k]: each query's top-k among entries 0..limits[t]-1, -1 padded; tied bool [T])
std::tuple<Tensor, Tensor> indexer_fp4_topk(const Tensor& qc, const Tensor& qs, const Tensor& w, const Tensor& kc,
                                            const Tensor& ks, const Tensor& limits, int64_t k) {
  check(qc, qs, w, kc, ks);
  const int64_t T = qc.size(0), H = qc.size(1), D = qc.size(2), nb = D / BLOCK;
  TORCH_CHECK(limits.scalar_type() == at::kLong && limits.numel() == T && limits.is_contiguous(), "limits");
  TORCH_CHECK(k > 0, "k must be positive");
  const int64_t* lim = limits.data_ptr<int64_t>();
  int64_t maxlim = 0;
  for (int64_t t = 0; t < T; t++) {
    TORCH_CHECK(lim[t] >= 0 && lim[t] * D <= kc.numel(), "a limit exceeds the stored entries");
    maxlim = std::max(maxlim, lim[t]);
  }
  Prepared p = prepare(qc, qs, w);
  const uint8_t* kcp = kc.data_ptr<uint8_t>();
  const float* ksp = ks.data_ptr<float>();
  const int64_t groups = (maxlim + GROUP - 1) / GROUP;
  const int64_t nqb = (T + QBLOCK - 1) / QBLOCK;
  // few query blocks (decode): split the entries too, so every thread has work; the segments' heaps merge after
  // (a parallel region costs milliseconds on a loaded machine when a thread waits for a core: small work stays
  // on one thread)
  const int64_t threads = at::get_num_threads(), step = groups_step(D);
  const bool big = int64_t(T) * maxlim * H * D >= PARALLEL_WORK;
  const int64_t nseg = !big || nqb >= 2 * threads ? 1 : std::min<int64_t>((groups + SEGMENT - 1) / SEGMENT, 2 * threads);
  const int64_t seg_groups = ((groups + nseg - 1) / nseg + step - 1) / step * step;
  std::vector<Heap> heaps(T * nseg);
  for (auto& hp : heaps) hp.cap = k + 1;
  at::parallel_for(0, nqb * nseg, big ? 1 : nqb * nseg, [&](int64_t i0, int64_t i1) {
    float buf[2 * GROUP];
    for (int64_t item = i0; item < i1; item++) {
      const int64_t qb = item / nseg, seg = item % nseg;
      const int64_t ta = qb * QBLOCK, tb = std::min(T, ta + QBLOCK);
      const int64_t ga = seg * seg_groups, gb = std::min(groups, ga + seg_groups);
      for (int64_t g0 = ga; g0 < gb; g0 += TILE) {
        const int64_t g1 = std::min(gb, g0 + TILE);
        for (int64_t t = ta; t < tb; t++) {
          if (lim[t] <= k) continue;  // everything visible is chosen: no scores needed
          Heap& hp = heaps[t * nseg + seg];
          const int64_t gl = std::min(g1, (lim[t] + GROUP - 1) / GROUP);
          for (int64_t g = g0; g < gl; g += step) {
            scores_at(p.q[t], kcp, ksp, g, H, D, buf);
            const int64_t lanes = std::min<int64_t>(step * GROUP, lim[t] - g * GROUP);
            for (int64_t l = 0; l < lanes; l++)
              if (buf[l] > hp.thr) hp.push(buf[l], g * GROUP + l);
          }
        }
      }
    }
  });
  Tensor idx = at::empty({T, k}, at::kLong), tied = at::zeros({T}, at::kBool);
  int64_t* ip = idx.data_ptr<int64_t>();
  bool* tp = tied.data_ptr<bool>();
  for (int64_t t = 0; t < T; t++) {
    int64_t* row = ip + t * k;
    if (lim[t] <= k) {
      for (int64_t j = 0; j < k; j++) row[j] = j < lim[t] ? j : -1;
      continue;
    }
    Heap all;
    all.cap = k + 1;
    for (int64_t s = 0; s < nseg; s++)
      for (const Cand& c : heaps[t * nseg + s].h) all.push(c.first, c.second);
    std::sort(all.h.begin(), all.h.end(), heap_cmp);  // descending score
    for (int64_t j = 0; j < k; j++) row[j] = j < int64_t(all.h.size()) ? all.h[j].second : -1;
    tp[t] = int64_t(all.h.size()) == k + 1 && all.h[k - 1].first == all.h[k].first;
  }
  return {idx, tied};
}

}  // namespace flashport
