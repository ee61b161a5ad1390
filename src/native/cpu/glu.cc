// Gated MLP activations (act 0 = SiLU x·σ(x), 1 = tanh-GELU 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))):
//   glu_fwd(g, u, h; dtype, n, act):          h = act(g)·u
//   glu_bwd(g, u, dh, dg, du; dtype, n, act): dg = dh·u·act'(g), du = dh·act(g)
#include "kernel.h"

namespace magix::cpu {
namespace {

constexpr int64_t kGrain = 1 << 14;
constexpr double kSqrt2OverPi = 0.7978845608028654;

// act(x) and act'(x), computed in the wider of T and float.
template <typename T>
inline void activation(T x, int act, T& value, T& derivative) {
  if (act == 0) {
    const T s = T(1) / (T(1) + std::exp(-x));
    value = x * s;
    derivative = s * (T(1) + x * (T(1) - s));
  } else {
    const T inner = static_cast<T>(kSqrt2OverPi) * (x + static_cast<T>(0.044715) * x * x * x);
    const T t = std::tanh(inner);
    value = static_cast<T>(0.5) * x * (T(1) + t);
    const T dinner = static_cast<T>(kSqrt2OverPi) * (T(1) + static_cast<T>(3 * 0.044715) * x * x);
    derivative = static_cast<T>(0.5) * (T(1) + t) + static_cast<T>(0.5) * x * (T(1) - t * t) * dinner;
  }
}

int act_arg(OpCtx& c) {
  const int64_t a = c.i(2);
  check(a == 0 || a == 1, c.name + ": activation must be 0 (SiLU) or 1 (tanh-GELU)");
  return static_cast<int>(a);
}

void glu_fwd(OpCtx& c) {
  const size_t n = c.n(1);
  const int act = act_arg(c);
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* g = c.need(0, n, sizeof(T)).as<T>();
    const T* u = c.need(1, n, sizeof(T)).as<T>();
    T* h = c.need(2, n, sizeof(T)).as<T>();
    parallel_for(static_cast<int64_t>(n), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        T v, d;
        activation(g[i], act, v, d);
        h[i] = v * u[i];
      }
    });
  });
}

void glu_bwd(OpCtx& c) {
  const size_t n = c.n(1);
  const int act = act_arg(c);
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* g = c.need(0, n, sizeof(T)).as<T>();
    const T* u = c.need(1, n, sizeof(T)).as<T>();
    const T* dh = c.need(2, n, sizeof(T)).as<T>();
    T* dg = c.need(3, n, sizeof(T)).as<T>();
    T* du = c.need(4, n, sizeof(T)).as<T>();
    parallel_for(static_cast<int64_t>(n), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        T v, d;
        activation(g[i], act, v, d);
        const T gi = dh[i];
        dg[i] = gi * u[i] * d;
        du[i] = gi * v;
      }
    });
  });
}

MAGIX_REGISTER_OP("cpu", "glu_fwd", glu_fwd);
MAGIX_REGISTER_OP("cpu", "glu_bwd", glu_bwd);

}  // namespace
}  // namespace magix::cpu
