// random_normal(dst; dtype, key, std, rank, globalShape[rank], offsets[rank], localShape[rank]):
//   dst[j] = std·normal(key, global index of local element j) for the block at `offsets`
// (src/core/random.ts computes the same numbers).
#include <vector>

#include "../common/random.h"
#include "kernel.h"

namespace magix::cpu {
namespace {

void random_normal(OpCtx& c) {
  const uint32_t key = static_cast<uint32_t>(c.i(1));
  const double stddev = c.f(2);
  const size_t rank = c.n(3);
  check(rank <= 8, "random_normal: rank above 8");
  std::vector<int64_t> shape(rank), off(rank), local(rank);
  size_t n = 1;
  for (size_t d = 0; d < rank; ++d) {
    shape[d] = c.i(4 + d);
    off[d] = c.i(4 + rank + d);
    local[d] = c.i(4 + 2 * rank + d);
    check(off[d] >= 0 && local[d] >= 0 && off[d] + local[d] <= shape[d], "random_normal: block outside the array");
    n = mul(n, static_cast<size_t>(local[d]));
  }
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    T* dst = c.need(0, n, sizeof(T)).as<T>();
    parallel_for(static_cast<int64_t>(n), 1 << 14, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        int64_t rest = j, global = 0, stride = 1;
        for (size_t d = rank; d-- > 0;) {
          const int64_t i = rest % local[d];
          rest /= local[d];
          global += (off[d] + i) * stride;
          stride *= shape[d];
        }
        dst[j] = static_cast<T>(stddev * rng_normal(key, static_cast<uint64_t>(global)));
      }
    });
  });
}

MAGIX_REGISTER_OP("cpu", "random_normal", random_normal);

}  // namespace
}  // namespace magix::cpu
