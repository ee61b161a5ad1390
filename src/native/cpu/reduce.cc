// Reductions, accumulated in float64 in a fixed order (the same bits on every run):
//   sum(x, out; dtype, n, weight, accumulate):   out[0] (+)= weight·Σ x     (out: the dtype)
//   sumsq(x, out; dtype, n, weight, accumulate): out[0] (+)= weight·Σ x²    (out: float64)
#include <vector>

#include "kernel.h"

namespace magix::cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;

template <typename T, bool Square>
double reduce(const T* x, size_t n) {
  const int64_t chunks = (static_cast<int64_t>(n) + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  parallel_for(chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t ch = lo; ch < hi; ++ch) {
      const size_t b = static_cast<size_t>(ch) * kChunk, e = std::min(n, b + kChunk);
      double acc = 0;
      for (size_t i = b; i < e; ++i) {
        const double v = static_cast<double>(x[i]);
        acc += Square ? v * v : v;
      }
      partial[static_cast<size_t>(ch)] = acc;
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

void sum(OpCtx& c) {
  const size_t n = c.n(1);
  const double weight = c.f(2);
  const bool accumulate = c.i(3) != 0;
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* x = c.need(0, n, sizeof(T)).as<T>();
    T* out = c.need(1, 1, sizeof(T)).as<T>();
    const double v = weight * reduce<T, false>(x, n);
    out[0] = static_cast<T>(accumulate ? static_cast<double>(out[0]) + v : v);
  });
}

void sumsq(OpCtx& c) {
  const size_t n = c.n(1);
  const double weight = c.f(2);
  const bool accumulate = c.i(3) != 0;
  double* out = c.need(1, 1, sizeof(double)).as<double>();
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* x = c.need(0, n, sizeof(T)).as<T>();
    const double v = weight * reduce<T, true>(x, n);
    out[0] = accumulate ? out[0] + v : v;
  });
}

MAGIX_REGISTER_OP("cpu", "sum", sum);
MAGIX_REGISTER_OP("cpu", "sumsq", sumsq);

}  // namespace
}  // namespace magix::cpu
