// Shared pieces of the CPU kernels: dtype dispatch over float and double, and overflow-checked
// size arithmetic for the bounds checks every op makes before touching memory.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "../common/backend.h"
#include "../common/dtype.h"
#include "threadpool.h"

namespace magix::cpu {

// Runs body with T = float or double according to a dtype argument.
#define MAGIX_FLOAT_DISPATCH(ctx, dtype, ...)                                                  \
  do {                                                                                          \
    ::magix::DType magix_dt_ = (dtype);                                                         \
    if (magix_dt_ == ::magix::DType::F32) {                                                     \
      using T = float;                                                                          \
      __VA_ARGS__;                                                                              \
    } else if (magix_dt_ == ::magix::DType::F64) {                                              \
      using T = double;                                                                         \
      __VA_ARGS__;                                                                              \
    } else {                                                                                    \
      ::magix::invalid((ctx).name + ": the CPU backend computes in float32 or float64");        \
    }                                                                                           \
  } while (0)

// a·b, failing instead of wrapping around.
inline size_t mul(size_t a, size_t b) {
  if (a != 0 && b > std::numeric_limits<size_t>::max() / a) invalid("size overflow");
  return a * b;
}
inline size_t mul(size_t a, size_t b, size_t c) { return mul(mul(a, b), c); }
inline size_t mul(size_t a, size_t b, size_t c, size_t d) { return mul(mul(a, b, c), d); }
inline size_t add(size_t a, size_t b) {
  if (b > std::numeric_limits<size_t>::max() - a) invalid("size overflow");
  return a + b;
}

inline DType dtype_arg(OpCtx& c, size_t i) { return to_dtype(c.f(i)); }

}  // namespace magix::cpu
