// Cross-entropy fused with the output projection. h [N, D], W [V, D] (rows [vocabStart,
// vocabStart + V) of the head), targets [N] int32 (< 0 ignored). Logits ℓ_j = h·W_j are made
// `chunk` vocabulary rows at a time for a block of rows: the [N, V] matrix never exists.
//   ce_fwd(h, W, targets, m, s, z; dtype, N, D, V, vocabStart, chunk):
//     m = max_j ℓ_j, s = Σ_j exp(ℓ_j − m), z = ℓ_{target − vocabStart} if held else 0;
//     ignored rows: m = 0, s = 1, z = 0
//   ce_rescale(m, mGlobal, s; dtype, N):  s = s·exp(m − mGlobal)
//   ce_lse(m, s, lse; dtype, N):          lse = m + log s
//   ce_rowloss(lse, z, targets, rowScale, out; dtype, N): out = target ≥ 0 ? rowScale·(lse − z) : 0
//   ce_bwd(h, W, targets, lse, rowScale, dh, dW; dtype, N, D, V, vocabStart, chunk, gradScale,
//          accumulateDh): g_j = gradScale·rowScale·(exp(ℓ_j − lse) − [j = target − vocabStart]),
//     dh (+)= Σ_j g_j·W_j, dW_j = Σ_n g_j·h_n (ignored rows contribute nothing)
//   ce_fused(h, W, targets, rowScale, lse, rowLoss, dh, dW; dtype, N, D, V, chunkRows, gradScale,
//            accumulateDh): the forward and backward at once for an unsplit vocabulary. The ROWS
//     go by in chunks of chunkRows (0: automatic), so each chunk's whole logit rows [R, V] exist
//     at once: lse = max + log Σ exp(ℓ − max), rowLoss = rowScale·(lse − ℓ_target), g =
//     gradScale·rowScale·(softmax − onehot) in place over the logits, dh_chunk (+)= g·W,
//     dW (+)= gᵀ·h_chunk (written by the first chunk). Ignored rows: lse = 0, rowLoss = 0, g = 0.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "gemm.h"
#include "kernel.h"
#include "vexp.h"

namespace magix::cpu {
namespace {

constexpr int64_t RB = 64;  // rows per block

struct Dims {
  int64_t N, D, V, start, chunk;
};

Dims dims(OpCtx& c) {
  Dims d{c.i(1), c.i(2), c.i(3), c.i(4), c.i(5)};
  check(d.N >= 0 && d.D >= 0 && d.V >= 0 && d.chunk > 0, c.name + ": sizes must be non-negative and chunk positive");
  // A chunk wider than the vocabulary would only size the logits buffer beyond need.
  d.chunk = std::min(d.chunk, std::max<int64_t>(d.V, 1));
  return d;
}

template <typename T>
void fwd(OpCtx& c, const Dims& d) {
  const T* h = c.need(0, mul(d.N, d.D), sizeof(T)).as<T>();
  const T* W = c.need(1, mul(d.V, d.D), sizeof(T)).as<T>();
  const int32_t* tg = c.need(2, d.N, sizeof(int32_t)).as<int32_t>();
  T* m = c.need(3, d.N, sizeof(T)).as<T>();
  T* s = c.need(4, d.N, sizeof(T)).as<T>();
  T* z = c.need(5, d.N, sizeof(T)).as<T>();
  const int64_t blocks = (d.N + RB - 1) / RB;
  parallel_for(blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> logits(RB * d.chunk);
    std::vector<double> mx(RB), sm(RB), tz(RB);
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t n0 = blk * RB, nr = std::min(RB, d.N - n0);
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<double>::infinity());
      std::fill(sm.begin(), sm.end(), 0.0);
      std::fill(tz.begin(), tz.end(), 0.0);
      for (int64_t v0 = 0; v0 < d.V; v0 += d.chunk) {
        const int64_t nv = std::min(d.chunk, d.V - v0);
        gemm<T>(nr, nv, d.D, T(1), MatView<T>{h + n0 * d.D, d.D, false}, MatView<T>{W + v0 * d.D, d.D, true}, T(0),
                logits.data(), d.chunk, false);
        for (int64_t i = 0; i < nr; ++i) {
          T* row = logits.data() + i * d.chunk;
          const int64_t t = static_cast<int64_t>(tg[n0 + i]) - d.start - v0;
          if (t >= 0 && t < nv) tz[i] = row[t];
          T bmax = row[0];
          for (int64_t j = 1; j < nv; ++j) bmax = std::max(bmax, row[j]);
          const double mnew = std::max(mx[i], static_cast<double>(bmax));
          sm[i] = sm[i] * std::exp(mx[i] - mnew) + exp_shifted(row, static_cast<T>(mnew), row, nv);
          mx[i] = mnew;
        }
      }
      for (int64_t i = 0; i < nr; ++i) {
        const bool ignored = tg[n0 + i] < 0 || d.V == 0;
        m[n0 + i] = ignored ? T(0) : static_cast<T>(mx[i]);
        s[n0 + i] = ignored ? T(1) : static_cast<T>(sm[i]);
        z[n0 + i] = ignored ? T(0) : static_cast<T>(tz[i]);
      }
    }
  });
}

// g for a block of rows and a vocabulary chunk, in place over its logits.
template <typename T>
void gradient_block(T* logits, int64_t ld, int64_t n0, int64_t nr, int64_t v0, int64_t nv, const Dims& d, const int32_t* tg,
                    const T* lse, const T* rs, double gradScale) {
  for (int64_t i = 0; i < nr; ++i) {
    T* row = logits + i * ld;
    const int64_t n = n0 + i;
    if (tg[n] < 0) {
      for (int64_t j = 0; j < nv; ++j) row[j] = T(0);
      continue;
    }
    const T scale = static_cast<T>(gradScale * static_cast<double>(rs[n]));
    exp_shifted(row, lse[n], row, nv);
    for (int64_t j = 0; j < nv; ++j) row[j] *= scale;
    const int64_t t = static_cast<int64_t>(tg[n]) - d.start - v0;
    if (t >= 0 && t < nv) row[t] -= scale;
  }
}

template <typename T>
void bwd(OpCtx& c, const Dims& d) {
  const double gradScale = c.f(6);
  const bool accumulate = c.i(7) != 0;
  const T* h = c.need(0, mul(d.N, d.D), sizeof(T)).as<T>();
  const T* W = c.need(1, mul(d.V, d.D), sizeof(T)).as<T>();
  const int32_t* tg = c.need(2, d.N, sizeof(int32_t)).as<int32_t>();
  const T* lse = c.need(3, d.N, sizeof(T)).as<T>();
  const T* rs = c.need(4, d.N, sizeof(T)).as<T>();
  T* dh = c.need(5, mul(d.N, d.D), sizeof(T)).as<T>();
  T* dW = c.need(6, mul(d.V, d.D), sizeof(T)).as<T>();
  // dh sums over the vocabulary: one task per block of rows.
  const int64_t rowBlocks = (d.N + RB - 1) / RB;
  parallel_for(rowBlocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> g(RB * d.chunk);
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t n0 = blk * RB, nr = std::min(RB, d.N - n0);
      for (int64_t v0 = 0; v0 < d.V; v0 += d.chunk) {
        const int64_t nv = std::min(d.chunk, d.V - v0);
        gemm<T>(nr, nv, d.D, T(1), MatView<T>{h + n0 * d.D, d.D, false}, MatView<T>{W + v0 * d.D, d.D, true}, T(0),
                g.data(), d.chunk, false);
        gradient_block(g.data(), d.chunk, n0, nr, v0, nv, d, tg, lse, rs, gradScale);
        const T beta = (v0 == 0 && !accumulate) ? T(0) : T(1);
        gemm<T>(nr, d.D, nv, T(1), MatView<T>{g.data(), d.chunk, false}, MatView<T>{W + v0 * d.D, d.D, false}, beta,
                dh + n0 * d.D, d.D, false);
      }
      if (d.V == 0 && !accumulate)
        for (int64_t i = 0; i < nr * d.D; ++i) dh[n0 * d.D + i] = T(0);
    }
  });
  // dW sums over rows: one task per vocabulary chunk (its logits are made again).
  const int64_t vBlocks = (d.V + d.chunk - 1) / d.chunk;
  parallel_for(vBlocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> g(RB * d.chunk);
    for (int64_t vb = lo; vb < hi; ++vb) {
      const int64_t v0 = vb * d.chunk, nv = std::min(d.chunk, d.V - v0);
      if (d.N == 0)
        for (int64_t i = 0; i < nv * d.D; ++i) dW[v0 * d.D + i] = T(0);
      for (int64_t n0 = 0; n0 < d.N; n0 += RB) {
        const int64_t nr = std::min(RB, d.N - n0);
        gemm<T>(nr, nv, d.D, T(1), MatView<T>{h + n0 * d.D, d.D, false}, MatView<T>{W + v0 * d.D, d.D, true}, T(0),
                g.data(), d.chunk, false);
        gradient_block(g.data(), d.chunk, n0, nr, v0, nv, d, tg, lse, rs, gradScale);
        gemm<T>(nv, d.D, nr, T(1), MatView<T>{g.data(), d.chunk, true}, MatView<T>{h + n0 * d.D, d.D, false},
                n0 == 0 ? T(0) : T(1), dW + v0 * d.D, d.D, false);
      }
    }
  });
}

// Logit elements per chunk when the caller leaves chunkRows to the op: 8 MiB of float32.
constexpr int64_t kFusedElems = int64_t{1} << 21;

template <typename T>
void fused(OpCtx& c) {
  const int64_t N = c.i(1), D = c.i(2), V = c.i(3), chunkRows = c.i(4);
  check(N >= 0 && D >= 0 && V >= 0 && chunkRows >= 0, c.name + ": sizes must be non-negative");
  const double gradScale = c.f(5);
  const bool accumulate = c.i(6) != 0;
  const T* h = c.need(0, mul(N, D), sizeof(T)).as<T>();
  const T* W = c.need(1, mul(V, D), sizeof(T)).as<T>();
  const int32_t* tg = c.need(2, N, sizeof(int32_t)).as<int32_t>();
  const T* rs = c.need(3, N, sizeof(T)).as<T>();
  T* lse = c.need(4, N, sizeof(T)).as<T>();
  T* rowLoss = c.need(5, N, sizeof(T)).as<T>();
  T* dh = c.need(6, mul(N, D), sizeof(T)).as<T>();
  T* dW = c.need(7, mul(V, D), sizeof(T)).as<T>();
  if (N == 0) {
    std::fill(dW, dW + V * D, T(0));
    return;
  }
  // Rows per chunk: the caller's, or as many as fit kFusedElems logits; never a buffer beyond
  // 2^28 elements (a huge chunkRows is clamped there) nor more rows than N.
  const int64_t Vc = std::max<int64_t>(V, 1);
  int64_t R = chunkRows > 0 ? chunkRows : std::max<int64_t>(1, kFusedElems / Vc);
  R = std::min({R, N, std::max<int64_t>(1, (int64_t{1} << 28) / Vc)});
  std::vector<T> g(static_cast<size_t>(R * V));
  for (int64_t n0 = 0; n0 < N; n0 += R) {
    const int64_t nr = std::min(R, N - n0);
    gemm<T>(nr, V, D, T(1), MatView<T>{h + n0 * D, D, false}, MatView<T>{W, D, true}, T(0), g.data(), V);
    parallel_for(nr, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t n = n0 + i;
        T* row = g.data() + i * V;
        const int64_t t = tg[n];
        if (t < 0 || V == 0) {
          std::fill(row, row + V, T(0));
          lse[n] = T(0);
          rowLoss[n] = T(0);
          continue;
        }
        T mx = row[0];
        for (int64_t j = 1; j < V; ++j) mx = std::max(mx, row[j]);
        const double z = t < V ? static_cast<double>(row[t]) : 0.0;
        const double s = exp_shifted(row, mx, row, V);  // row = exp(ℓ − max)
        const double L = static_cast<double>(mx) + std::log(s);
        lse[n] = static_cast<T>(L);
        rowLoss[n] = static_cast<T>(static_cast<double>(rs[n]) * (L - z));
        const double scale = gradScale * static_cast<double>(rs[n]);
        const T k = static_cast<T>(scale / s);
        for (int64_t j = 0; j < V; ++j) row[j] *= k;  // scale·softmax
        if (t < V) row[t] -= static_cast<T>(scale);
      }
    });
    gemm<T>(nr, D, V, T(1), MatView<T>{g.data(), V, false}, MatView<T>{W, D, false}, accumulate ? T(1) : T(0),
            dh + n0 * D, D);
    gemm<T>(V, D, nr, T(1), MatView<T>{g.data(), V, true}, MatView<T>{h + n0 * D, D, false}, n0 == 0 ? T(0) : T(1), dW,
            D);
  }
}

void ce_fwd(OpCtx& c) {
  const Dims d = dims(c);
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), fwd<T>(c, d));
}
void ce_bwd(OpCtx& c) {
  const Dims d = dims(c);
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), bwd<T>(c, d));
}

void ce_fused(OpCtx& c) { MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), fused<T>(c)); }

void ce_rescale(OpCtx& c) {
  const size_t N = c.n(1);
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* m = c.need(0, N, sizeof(T)).as<T>();
    const T* mg = c.need(1, N, sizeof(T)).as<T>();
    T* s = c.need(2, N, sizeof(T)).as<T>();
    for (size_t n = 0; n < N; ++n) s[n] = static_cast<T>(s[n] * std::exp(static_cast<double>(m[n]) - mg[n]));
  });
}

void ce_lse(OpCtx& c) {
  const size_t N = c.n(1);
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* m = c.need(0, N, sizeof(T)).as<T>();
    const T* s = c.need(1, N, sizeof(T)).as<T>();
    T* lse = c.need(2, N, sizeof(T)).as<T>();
    for (size_t n = 0; n < N; ++n) lse[n] = static_cast<T>(static_cast<double>(m[n]) + std::log(static_cast<double>(s[n])));
  });
}

void ce_rowloss(OpCtx& c) {
  const size_t N = c.n(1);
  const int32_t* tg = c.need(2, N, sizeof(int32_t)).as<int32_t>();
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* lse = c.need(0, N, sizeof(T)).as<T>();
    const T* z = c.need(1, N, sizeof(T)).as<T>();
    const T* rs = c.need(3, N, sizeof(T)).as<T>();
    T* out = c.need(4, N, sizeof(T)).as<T>();
    for (size_t n = 0; n < N; ++n) out[n] = tg[n] >= 0 ? static_cast<T>(rs[n] * (lse[n] - z[n])) : T(0);
  });
}

MAGIX_REGISTER_OP("cpu", "ce_fwd", ce_fwd);
MAGIX_REGISTER_OP("cpu", "ce_bwd", ce_bwd);
MAGIX_REGISTER_OP("cpu", "ce_fused", ce_fused);
MAGIX_REGISTER_OP("cpu", "ce_rescale", ce_rescale);
MAGIX_REGISTER_OP("cpu", "ce_lse", ce_lse);
MAGIX_REGISTER_OP("cpu", "ce_rowloss", ce_rowloss);

}  // namespace
}  // namespace magix::cpu
