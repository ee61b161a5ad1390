// One fused optimizer pass over every tensor of a parameter tree (optax semantics):
//   adamw(state, normSq, p_0, g_0, m_0, v_0, ...; dtype, count, b1, b2, eps, maxNorm, skipNonFinite,
//         scheduleKind, schedule[5], n_0, wd_0, ...)
//   norm = √normSq; a non-finite norm with skipNonFinite only counts (state[1]++, state[2]++);
//   else with c = state[0], t = c + 1, lr = schedule(c), scale = maxNorm/norm when maxNorm > 0 and
//   norm ≥ maxNorm (else 1): g' = scale·g, m = b1·m + (1 − b1)·g', v = b2·v + (1 − b2)·g'²,
//   p −= lr·((m / (1 − b1ᵗ)) / (√(v / (1 − b2ᵗ)) + eps) + wd·p); state[0] = t, state[4] = lr.
//   state[3] = norm always. state: float64 [8]; normSq: float64 [1].
// Optional shadows: with one more argument, shadowDtype, after the per-tensor pairs, buffers
// s_0, ..., s_{count-1} follow the quads and every updated p is also written to s converted to
// shadowDtype, rounded as `cast` rounds (the compute-dtype copies the next forward pass reads). A
// skipped step leaves them, like p, unchanged.
// Schedules (at c, updates already applied): 0 constant(v); 1 linear(init, end, steps);
// 2 warmup-cosine(init, peak, warmup, decaySteps, end), as optax computes them.
#include <cmath>
#include <vector>

#include "elementwise.h"
#include "kernel.h"

namespace magix::cpu {
namespace {

double schedule(int64_t kind, const double* s, double c) {
  switch (kind) {
    case 0:
      return s[0];
    case 1:  // optax: no transition steps is the constant init
      return s[2] > 0 ? s[0] + (s[1] - s[0]) * std::min(c, s[2]) / s[2] : s[0];
    case 2: {
      const double init = s[0], peak = s[1], warmup = s[2], decay = s[3], end = s[4];
      if (c < warmup) return init + (peak - init) * c / warmup;
      const double d = decay - warmup;
      const double r = d > 0 ? std::min(c - warmup, d) / d : 1.0;
      return end + (peak - end) * (1 + std::cos(M_PI * r)) / 2;
    }
  }
  invalid("adamw: unknown schedule kind " + std::to_string(kind));
}

template <typename T>
void update(T* p, const T* g, T* m, T* v, void* shadow, DType sdt, size_t n, double scale, double b1, double b2,
            double eps, double lr, double wd, double bc1, double bc2) {
  parallel_for(static_cast<int64_t>(n), 1 << 14, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const double gi = scale * static_cast<double>(g[i]);
      const double mi = b1 * static_cast<double>(m[i]) + (1 - b1) * gi;
      const double vi = b2 * static_cast<double>(v[i]) + (1 - b2) * gi * gi;
      m[i] = static_cast<T>(mi);
      v[i] = static_cast<T>(vi);
      const double pi = static_cast<double>(p[i]);
      p[i] = static_cast<T>(pi - lr * ((mi / bc1) / (std::sqrt(vi / bc2) + eps) + wd * pi));
      if (shadow) store_from_double(shadow, static_cast<size_t>(i), sdt, static_cast<double>(p[i]));
    }
  });
}

void adamw(OpCtx& c) {
  const size_t count = c.n(1);
  const double b1 = c.f(2), b2 = c.f(3), eps = c.f(4), maxNorm = c.f(5);
  const bool skip = c.i(6) != 0;
  const int64_t kind = c.i(7);
  double sched[5];
  for (int i = 0; i < 5; ++i) sched[i] = c.f(8 + i);
  check(count <= c.bufs.size(), "adamw: buffers must be state, normSq, then p, g, m, v per tensor");
  // A shadowDtype argument after the per-tensor pairs asks for shadows s_i after the quads.
  const bool shadows = c.nargs > 13 + 2 * count;
  const DType sdt = shadows ? dtype_arg(c, 13 + 2 * count) : DType::F32;
  check(c.bufs.size() == (shadows ? 2 + 5 * count : 2 + 4 * count),
        "adamw: buffers must be state, normSq, then p, g, m, v per tensor (then s per tensor with shadowDtype)");
  check(!shadows || sdt == DType::F32 || sdt == DType::F64 || sdt == DType::BF16,
        "adamw: shadowDtype must be float32, float64 or bfloat16");
  double* state = c.need(0, 8, sizeof(double)).as<double>();
  const double normSq = *c.need(1, 1, sizeof(double)).as<double>();
  // Every buffer and argument is checked before anything changes.
  check(kind >= 0 && kind <= 2, "adamw: unknown schedule kind " + std::to_string(kind));
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    for (size_t i = 0; i < count; ++i) {
      c.f(14 + 2 * i);  // its weight decay is there
      for (size_t j = 0; j < 4; ++j) c.need(2 + 4 * i + j, c.n(13 + 2 * i), sizeof(T));
      if (shadows) c.need(2 + 4 * count + i, c.n(13 + 2 * i), dtype_size(sdt));
    }
  });
  const double norm = std::sqrt(normSq);
  state[3] = norm;
  if (skip && !std::isfinite(norm)) {
    state[1] += 1;
    state[2] += 1;
    return;
  }
  state[1] = 0;
  const double step = state[0], t = step + 1;
  const double lr = schedule(kind, sched, step);
  const double scale = (maxNorm > 0 && norm >= maxNorm) ? maxNorm / norm : 1.0;
  const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    for (size_t i = 0; i < count; ++i) {
      const size_t n = c.n(13 + 2 * i);
      const double wd = c.f(14 + 2 * i);
      T* p = c.need(2 + 4 * i, n, sizeof(T)).as<T>();
      const T* g = c.need(3 + 4 * i, n, sizeof(T)).as<T>();
      T* m = c.need(4 + 4 * i, n, sizeof(T)).as<T>();
      T* v = c.need(5 + 4 * i, n, sizeof(T)).as<T>();
      void* sh = shadows ? c.buf(2 + 4 * count + i).ptr : nullptr;
      update(p, g, m, v, sh, sdt, n, scale, b1, b2, eps, lr, wd, bc1, bc2);
    }
  });
  state[0] = t;
  state[4] = lr;
}

MAGIX_REGISTER_OP("cpu", "adamw", adamw);

}  // namespace
}  // namespace magix::cpu
