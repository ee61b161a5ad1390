// Attention, flash-style: blocks of queries against blocks of keys with an online softmax, so the
// [T, S] score matrix never exists; blocks hidden by causality or the window are skipped.
//   attention_fwd(q, k, v, o, lse[, keyMask]; dtype, B, T, S, Hq, Hkv, hd, scale, causal, window,
//                 qOffset, hasMask, sMax)
//     o = softmax(scale·q·kᵀ over visible keys)·v, lse = log Σ exp(scale·q·kᵀ) over visible keys
//   attention_bwd(q, k, v, o, lse, dO, dq, dk, dv[, keyMask]; same args)
//     D = rowsum(dO·o), P = exp(scale·q·kᵀ − lse), dv = Pᵀ·dO, dS = P·(dO·vᵀ − D),
//     dq = scale·dS·k, dk = scale·dSᵀ·q
// Layouts: q, o [B, T, Hq, hd]; k, v [B, sMax, Hkv, hd] (the first S rows used); lse [B, Hq, T];
// keyMask [B, sMax] uint8. Query head h reads KV head h / (Hq / Hkv); query t sits at key
// position qOffset + t. Key s is visible when keyMask[b, s] (if given), s ≤ qOffset + t (if causal)
// and qOffset + t − s < window (if window > 0). A query with no visible key: o = 0, lse = −∞.
#include <limits>
#include <vector>

#include "gemm.h"
#include "kernel.h"

namespace magix::cpu {
namespace {

constexpr int64_t QB = 32;  // queries per block
constexpr int64_t KB = 64;  // keys per block

struct Shape {
  int64_t B, T, S, Hq, Hkv, hd, sMax, window, qOffset;
  double scale;
  bool causal, hasMask;
};

Shape parse(OpCtx& c) {
  Shape s{};
  s.B = c.i(1), s.T = c.i(2), s.S = c.i(3), s.Hq = c.i(4), s.Hkv = c.i(5), s.hd = c.i(6);
  s.scale = c.f(7);
  s.causal = c.i(8) != 0;
  s.window = c.i(9);
  s.qOffset = c.i(10);
  s.hasMask = c.i(11) != 0;
  s.sMax = c.i(12);
  for (int64_t v : {s.B, s.T, s.S, s.Hq, s.Hkv, s.hd, s.window, s.qOffset, s.sMax})
    check(v >= 0, c.name + ": sizes must be non-negative");
  check(s.Hkv > 0 && s.Hq % s.Hkv == 0, c.name + ": query heads must be a multiple of KV heads");
  check(s.S <= s.sMax, c.name + ": S exceeds sMax");
  return s;
}

// Whether key s is visible to query t of batch b.
inline bool visible(const Shape& sh, const uint8_t* mask, int64_t b, int64_t t, int64_t s) {
  if (mask && !mask[b * sh.sMax + s]) return false;
  const int64_t qpos = sh.qOffset + t;
  if (sh.causal && s > qpos) return false;
  if (sh.window > 0 && qpos - s >= sh.window) return false;
  return true;
}

// The key range [lo, hi) that can be visible to queries [t0, t1): everything else is skipped.
inline void key_range(const Shape& sh, int64_t t0, int64_t t1, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = sh.S;
  if (sh.causal) hi = std::min(hi, sh.qOffset + t1);
  if (sh.window > 0) lo = std::max<int64_t>(0, sh.qOffset + t0 - sh.window + 1);
}

template <typename T>
void forward(OpCtx& c, const Shape& sh) {
  const size_t qn = mul(sh.B, sh.T, sh.Hq, sh.hd), kn = mul(sh.B, sh.sMax, sh.Hkv, sh.hd);
  const T* q = c.need(0, qn, sizeof(T)).as<T>();
  const T* k = c.need(1, kn, sizeof(T)).as<T>();
  const T* v = c.need(2, kn, sizeof(T)).as<T>();
  T* o = c.need(3, qn, sizeof(T)).as<T>();
  T* lse = c.need(4, mul(sh.B, sh.Hq, sh.T), sizeof(T)).as<T>();
  const uint8_t* mask = sh.hasMask ? c.need(5, mul(sh.B, sh.sMax), 1).as<uint8_t>() : nullptr;
  const int64_t group = sh.Hq / sh.Hkv, qBlocks = (sh.T + QB - 1) / QB;
  const int64_t qld = sh.Hq * sh.hd, kld = sh.Hkv * sh.hd;
  parallel_for(sh.B * sh.Hq * qBlocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> scores(QB * KB), acc(QB * sh.hd);
    std::vector<double> m(QB), l(QB);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / (sh.Hq * qBlocks), h = (task / qBlocks) % sh.Hq, qb = task % qBlocks;
      const int64_t t0 = qb * QB, t1 = std::min(sh.T, t0 + QB), nq = t1 - t0, hk = h / group;
      const T* qbase = q + ((b * sh.T + t0) * sh.Hq + h) * sh.hd;
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<double>::infinity());
      std::fill(l.begin(), l.end(), 0.0);
      int64_t klo, khi;
      key_range(sh, t0, t1, klo, khi);
      for (int64_t s0 = klo; s0 < khi; s0 += KB) {
        const int64_t ns = std::min(KB, khi - s0);
        const T* kbase = k + ((b * sh.sMax + s0) * sh.Hkv + hk) * sh.hd;
        const T* vbase = v + ((b * sh.sMax + s0) * sh.Hkv + hk) * sh.hd;
        gemm<T>(nq, ns, sh.hd, static_cast<T>(sh.scale), MatView<T>{qbase, qld, false}, MatView<T>{kbase, kld, true}, T(0),
                scores.data(), KB, false);
        for (int64_t i = 0; i < nq; ++i) {
          T* row = scores.data() + i * KB;
          double bmax = -std::numeric_limits<double>::infinity();
          for (int64_t j = 0; j < ns; ++j) {
            if (!visible(sh, mask, b, t0 + i, s0 + j)) row[j] = -std::numeric_limits<T>::infinity();
            else bmax = std::max(bmax, static_cast<double>(row[j]));
          }
          if (bmax == -std::numeric_limits<double>::infinity()) {
            for (int64_t j = 0; j < ns; ++j) row[j] = T(0);
            continue;
          }
          const double mnew = std::max(m[i], bmax);
          const double corr = std::exp(m[i] - mnew);
          double sum = 0;
          for (int64_t j = 0; j < ns; ++j) {
            const double p = row[j] == -std::numeric_limits<T>::infinity() ? 0.0 : std::exp(row[j] - mnew);
            row[j] = static_cast<T>(p);
            sum += p;
          }
          l[i] = l[i] * corr + sum;
          m[i] = mnew;
          T* a = acc.data() + i * sh.hd;
          for (int64_t d = 0; d < sh.hd; ++d) a[d] = static_cast<T>(a[d] * corr);
        }
        // acc += P·V for the block.
        gemm<T>(nq, sh.hd, ns, T(1), MatView<T>{scores.data(), KB, false}, MatView<T>{vbase, kld, false}, T(1), acc.data(),
                sh.hd, false);
      }
      for (int64_t i = 0; i < nq; ++i) {
        T* orow = o + ((b * sh.T + t0 + i) * sh.Hq + h) * sh.hd;
        T* lrow = lse + (b * sh.Hq + h) * sh.T + t0 + i;
        if (l[i] == 0) {
          for (int64_t d = 0; d < sh.hd; ++d) orow[d] = T(0);
          *lrow = -std::numeric_limits<T>::infinity();
          continue;
        }
        const double inv = 1.0 / l[i];
        for (int64_t d = 0; d < sh.hd; ++d) orow[d] = static_cast<T>(acc[i * sh.hd + d] * inv);
        *lrow = static_cast<T>(m[i] + std::log(l[i]));
      }
    }
  });
}

template <typename T>
void backward(OpCtx& c, const Shape& sh) {
  const size_t qn = mul(sh.B, sh.T, sh.Hq, sh.hd), kn = mul(sh.B, sh.sMax, sh.Hkv, sh.hd);
  const T* q = c.need(0, qn, sizeof(T)).as<T>();
  const T* k = c.need(1, kn, sizeof(T)).as<T>();
  const T* v = c.need(2, kn, sizeof(T)).as<T>();
  const T* o = c.need(3, qn, sizeof(T)).as<T>();
  const T* lse = c.need(4, mul(sh.B, sh.Hq, sh.T), sizeof(T)).as<T>();
  const T* dO = c.need(5, qn, sizeof(T)).as<T>();
  T* dq = c.need(6, qn, sizeof(T)).as<T>();
  T* dk = c.need(7, kn, sizeof(T)).as<T>();
  T* dv = c.need(8, kn, sizeof(T)).as<T>();
  const uint8_t* mask = sh.hasMask ? c.need(9, mul(sh.B, sh.sMax), 1).as<uint8_t>() : nullptr;
  const int64_t group = sh.Hq / sh.Hkv;
  const int64_t qld = sh.Hq * sh.hd, kld = sh.Hkv * sh.hd;
  // One task per (batch, KV head): it owns dk, dv of that head and dq of its query heads.
  parallel_for(sh.B * sh.Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> p(QB * KB), dp(QB * KB), dkAcc(sh.S * sh.hd), dvAcc(sh.S * sh.hd), Drow(QB);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / sh.Hkv, hk = task % sh.Hkv;
      std::fill(dkAcc.begin(), dkAcc.end(), T(0));
      std::fill(dvAcc.begin(), dvAcc.end(), T(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t t0 = 0; t0 < sh.T; t0 += QB) {
          const int64_t t1 = std::min(sh.T, t0 + QB), nq = t1 - t0;
          const T* qbase = q + ((b * sh.T + t0) * sh.Hq + h) * sh.hd;
          const T* dObase = dO + ((b * sh.T + t0) * sh.Hq + h) * sh.hd;
          T* dqbase = dq + ((b * sh.T + t0) * sh.Hq + h) * sh.hd;
          for (int64_t i = 0; i < nq; ++i) {
            const T* orow = o + ((b * sh.T + t0 + i) * sh.Hq + h) * sh.hd;
            double d = 0;
            for (int64_t e = 0; e < sh.hd; ++e) d += static_cast<double>(orow[e]) * dObase[i * qld + e];
            Drow[i] = static_cast<T>(d);
            for (int64_t e = 0; e < sh.hd; ++e) dqbase[i * qld + e] = T(0);
          }
          int64_t klo, khi;
          key_range(sh, t0, t1, klo, khi);
          for (int64_t s0 = klo; s0 < khi; s0 += KB) {
            const int64_t ns = std::min(KB, khi - s0);
            const T* kbase = k + ((b * sh.sMax + s0) * sh.Hkv + hk) * sh.hd;
            const T* vbase = v + ((b * sh.sMax + s0) * sh.Hkv + hk) * sh.hd;
            gemm<T>(nq, ns, sh.hd, static_cast<T>(sh.scale), MatView<T>{qbase, qld, false}, MatView<T>{kbase, kld, true}, T(0),
                    p.data(), KB, false);
            gemm<T>(nq, ns, sh.hd, T(1), MatView<T>{dObase, qld, false}, MatView<T>{vbase, kld, true}, T(0), dp.data(), KB,
                    false);
            for (int64_t i = 0; i < nq; ++i) {
              const T L = lse[(b * sh.Hq + h) * sh.T + t0 + i];
              for (int64_t j = 0; j < ns; ++j) {
                const bool vis = L != -std::numeric_limits<T>::infinity() && visible(sh, mask, b, t0 + i, s0 + j);
                const T pij = vis ? static_cast<T>(std::exp(static_cast<double>(p[i * KB + j]) - L)) : T(0);
                p[i * KB + j] = pij;
                dp[i * KB + j] = pij * (dp[i * KB + j] - Drow[i]);  // dS
              }
            }
            // dv += Pᵀ·dO, dk += scale·dSᵀ·q, dq += scale·dS·k
            gemm<T>(ns, sh.hd, nq, T(1), MatView<T>{p.data(), KB, true}, MatView<T>{dObase, qld, false}, T(1),
                    dvAcc.data() + s0 * sh.hd, sh.hd, false);
            gemm<T>(ns, sh.hd, nq, static_cast<T>(sh.scale), MatView<T>{dp.data(), KB, true}, MatView<T>{qbase, qld, false},
                    T(1), dkAcc.data() + s0 * sh.hd, sh.hd, false);
            gemm<T>(nq, sh.hd, ns, static_cast<T>(sh.scale), MatView<T>{dp.data(), KB, false}, MatView<T>{kbase, kld, false},
                    T(1), dqbase, qld, false);
          }
        }
      }
      for (int64_t s = 0; s < sh.S; ++s) {
        T* dkrow = dk + ((b * sh.sMax + s) * sh.Hkv + hk) * sh.hd;
        T* dvrow = dv + ((b * sh.sMax + s) * sh.Hkv + hk) * sh.hd;
        for (int64_t e = 0; e < sh.hd; ++e) {
          dkrow[e] = dkAcc[s * sh.hd + e];
          dvrow[e] = dvAcc[s * sh.hd + e];
        }
      }
    }
  });
}

void attention_fwd(OpCtx& c) {
  const Shape sh = parse(c);
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), forward<T>(c, sh));
}
void attention_bwd(OpCtx& c) {
  const Shape sh = parse(c);
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), backward<T>(c, sh));
}

MAGIX_REGISTER_OP("cpu", "attention_fwd", attention_fwd);
MAGIX_REGISTER_OP("cpu", "attention_bwd", attention_bwd);

}  // namespace
}  // namespace magix::cpu
