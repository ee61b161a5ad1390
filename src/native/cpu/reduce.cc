// Reductions, accumulated in float64 in a fixed order (the same bits on every run):
//   sum(x, out; dtype, n, weight, accumulate):   out[0] (+)= weight·Σ x     (out: the dtype)
//   sumsq(x, out; dtype, n, weight, accumulate): out[0] (+)= weight·Σ x²    (out: float64)
//   sumsq_multi(x_0, ..., x_{k-1}, out; dtype, k, accumulate, n_0, weight_0, ..., n_{k-1}, weight_{k-1}):
//     out[0] (+)= Σ_i weight_i·Σ x_i²  (out: float64; the tensors added in list order, each as
//     sumsq reduces it, so the result has the bits of k sumsq calls with accumulate on after the first)
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

void sumsq_multi(OpCtx& c) {
  const size_t count = c.n(1);
  const bool accumulate = c.i(2) != 0;
  check(c.bufs.size() == add(count, 1), "sumsq_multi: buffers must be x_0, ..., x_{count-1}, out");
  // Every buffer and argument is checked before anything is read or written.
  double* out = c.need(count, 1, sizeof(double)).as<double>();
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    for (size_t i = 0; i < count; ++i) {
      c.f(4 + 2 * i);  // its weight is there
      c.need(i, c.n(3 + 2 * i), sizeof(T));
    }
    double total = accumulate ? out[0] : 0.0;
    for (size_t i = 0; i < count; ++i) {
      const size_t n = c.n(3 + 2 * i);
      const double v = c.f(4 + 2 * i) * reduce<T, true>(c.buf(i).as<T>(), n);
      total = (i == 0 && !accumulate) ? v : total + v;
    }
    out[0] = total;
  });
}

MAGIX_REGISTER_OP("cpu", "sum", sum);
MAGIX_REGISTER_OP("cpu", "sumsq", sumsq);
MAGIX_REGISTER_OP("cpu", "sumsq_multi", sumsq_multi);

}  // namespace
}  // namespace magix::cpu
