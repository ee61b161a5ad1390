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
#include <algorithm>
#include <limits>
#include <vector>

#include "gemm.h"
#include "kernel.h"
#include "vexp.h"

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

// Sets the scores of keys [s0, s0 + ns) that query t of batch b may not see to −∞: outside the
// interval causality and the window leave, or masked.
template <typename T>
inline void hide(const Shape& sh, const uint8_t* mask, int64_t b, int64_t t, int64_t s0, int64_t ns, T* row) {
  const int64_t qpos = sh.qOffset + t;
  const int64_t lo = sh.window > 0 ? qpos - sh.window + 1 : 0, hi = sh.causal ? qpos + 1 : sh.S;
  const int64_t jlo = std::clamp<int64_t>(lo - s0, 0, ns), jhi = std::clamp<int64_t>(hi - s0, jlo, ns);
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < jlo; ++j) row[j] = ninf;
  for (int64_t j = jhi; j < ns; ++j) row[j] = ninf;
  if (mask)
    for (int64_t j = jlo; j < jhi; ++j)
      if (!mask[b * sh.sMax + s0 + j]) row[j] = ninf;
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
          hide(sh, mask, b, t0 + i, s0, ns, row);
          T bmax = -std::numeric_limits<T>::infinity();
          for (int64_t j = 0; j < ns; ++j) bmax = std::max(bmax, row[j]);
          if (bmax == -std::numeric_limits<T>::infinity()) {
            std::fill(row, row + ns, T(0));
            continue;
          }
          const double mnew = std::max(m[i], static_cast<double>(bmax));
          const T corr = static_cast<T>(std::exp(m[i] - mnew));
          l[i] = l[i] * corr + exp_shifted(row, static_cast<T>(mnew), row, ns);
          m[i] = mnew;
          if (corr != T(1))
            for (T* a = acc.data() + i * sh.hd; a != acc.data() + (i + 1) * sh.hd; ++a) *a *= corr;
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
              T* prow = p.data() + i * KB;
              T* dsrow = dp.data() + i * KB;
              if (L == -std::numeric_limits<T>::infinity()) {
                std::fill(prow, prow + ns, T(0));
                std::fill(dsrow, dsrow + ns, T(0));
                continue;
              }
              hide(sh, mask, b, t0 + i, s0, ns, prow);
              exp_shifted(prow, L, prow, ns);
              for (int64_t j = 0; j < ns; ++j) dsrow[j] = prow[j] * (dsrow[j] - Drow[i]);
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
