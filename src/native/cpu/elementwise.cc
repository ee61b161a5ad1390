// Elementwise ops:
//   axpby(x, y; dtype, n, a, b): y = a·x + b·y   (b = 0 never reads y)
//   add(a, b, c; dtype, n):      c = a + b
//   mul(a, b, c; dtype, n):      c = a · b
// Outputs may alias inputs: every element is read before it is written, by the same thread.
#include "kernel.h"

namespace magix::cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;

void axpby(OpCtx& c) {
  const size_t n = c.n(1);
  const double a = c.f(2), b = c.f(3);
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* x = c.need(0, n, sizeof(T)).as<T>();
    T* y = c.need(1, n, sizeof(T)).as<T>();
    const T ta = static_cast<T>(a), tb = static_cast<T>(b);
    parallel_for(static_cast<int64_t>(n), kGrain, [&](int64_t lo, int64_t hi) {
      if (b == 0)
        for (int64_t i = lo; i < hi; ++i) y[i] = ta * x[i];
      else
        for (int64_t i = lo; i < hi; ++i) y[i] = ta * x[i] + tb * y[i];
    });
  });
}

template <typename F>
void binary(OpCtx& c, F f) {
  const size_t n = c.n(1);
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* a = c.need(0, n, sizeof(T)).as<T>();
    const T* b = c.need(1, n, sizeof(T)).as<T>();
    T* out = c.need(2, n, sizeof(T)).as<T>();
    parallel_for(static_cast<int64_t>(n), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) out[i] = f(a[i], b[i]);
    });
  });
}

void add(OpCtx& c) {
  binary(c, [](auto x, auto y) { return x + y; });
}
void mul_op(OpCtx& c) {
  binary(c, [](auto x, auto y) { return x * y; });
}

MAGIX_REGISTER_OP("cpu", "axpby", axpby);
MAGIX_REGISTER_OP("cpu", "add", add);
MAGIX_REGISTER_OP("cpu", "mul", mul_op);

}  // namespace
}  // namespace magix::cpu
