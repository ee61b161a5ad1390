// Vocabulary-parallel embedding: this device holds rows [vocabStart, vocabStart + V) of the table.
//   embedding_fwd(table, ids, out; dtype, N, V, D, vocabStart):
//     out[n] = table[ids[n] − vocabStart] if that row is held, else 0
//   embedding_bwd(ids, dout, dtable; dtype, N, V, D, vocabStart, accumulate):
//     dtable[r] (+)= Σ_{n: ids[n] − vocabStart = r} dout[n]
// The backward pass splits D over threads, so no two threads add into the same element.
#include <cstring>

#include "kernel.h"

namespace magix::cpu {
namespace {

void embedding_fwd(OpCtx& c) {
  const size_t N = c.n(1), V = c.n(2), D = c.n(3);
  const int64_t start = c.i(4);
  const int32_t* ids = c.need(1, N, sizeof(int32_t)).as<int32_t>();
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* table = c.need(0, mul(V, D), sizeof(T)).as<T>();
    T* out = c.need(2, mul(N, D), sizeof(T)).as<T>();
    parallel_for(static_cast<int64_t>(N), 64, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const int64_t r = static_cast<int64_t>(ids[n]) - start;
        if (r >= 0 && r < static_cast<int64_t>(V))
          std::memcpy(out + n * D, table + r * D, D * sizeof(T));
        else
          std::memset(out + n * D, 0, D * sizeof(T));
      }
    });
  });
}

void embedding_bwd(OpCtx& c) {
  const size_t N = c.n(1), V = c.n(2), D = c.n(3);
  const int64_t start = c.i(4);
  const bool accumulate = c.i(5) != 0;
  const int32_t* ids = c.need(0, N, sizeof(int32_t)).as<int32_t>();
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* dout = c.need(1, mul(N, D), sizeof(T)).as<T>();
    T* dtable = c.need(2, mul(V, D), sizeof(T)).as<T>();
    if (!accumulate) std::memset(dtable, 0, mul(V, D, sizeof(T)));
    parallel_for(static_cast<int64_t>(D), 16, [&](int64_t lo, int64_t hi) {
      for (size_t n = 0; n < N; ++n) {
        const int64_t r = static_cast<int64_t>(ids[n]) - start;
        if (r < 0 || r >= static_cast<int64_t>(V)) continue;
        T* dst = dtable + r * D;
        const T* src = dout + n * D;
        for (int64_t d = lo; d < hi; ++d) dst[d] += src[d];
      }
    });
  });
}

MAGIX_REGISTER_OP("cpu", "embedding_fwd", embedding_fwd);
MAGIX_REGISTER_OP("cpu", "embedding_bwd", embedding_bwd);

}  // namespace
}  // namespace magix::cpu
