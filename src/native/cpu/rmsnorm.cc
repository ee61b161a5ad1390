// RMSNorm over rows of D, with g = w + offset (offset 1 is Gemma's (1 + w)):
//   rmsnorm_fwd(x, w, y, rstd; dtype, N, D, eps, offset):  rstd = 1/√(mean(x²) + eps), y = x·rstd·g
//   rmsnorm_bwd(dy, x, w, rstd, dx, dw; dtype, N, D, offset, accumulateDw[, accumulateDx]):
//     x̂ = x·rstd, dx (+)= rstd·(g·dy − x̂·mean(g·dy·x̂)), dw (+)= Σ_n dy·x̂
// accumulateDx adds into a cotangent that already holds another contribution (a residual stream),
// saving autodiff a separate add; dx must not alias dy or x.
// Row statistics accumulate in float64.
#include <vector>

#include "kernel.h"

namespace magix::cpu {
namespace {

void rmsnorm_fwd(OpCtx& c) {
  const size_t N = c.n(1), D = c.n(2);
  const double eps = c.f(3), offset = c.f(4);
  check(D > 0, "rmsnorm_fwd: D must be positive");
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* x = c.need(0, mul(N, D), sizeof(T)).as<T>();
    const T* w = c.need(1, D, sizeof(T)).as<T>();
    T* y = c.need(2, mul(N, D), sizeof(T)).as<T>();
    T* rstd = c.need(3, N, sizeof(T)).as<T>();
    parallel_for(static_cast<int64_t>(N), std::max<int64_t>(1, 4096 / static_cast<int64_t>(D)), [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const T* xr = x + n * D;
        double ss = 0;
        for (size_t d = 0; d < D; ++d) ss += static_cast<double>(xr[d]) * xr[d];
        const T r = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(D) + eps));
        rstd[n] = r;
        T* yr = y + n * D;
        for (size_t d = 0; d < D; ++d) yr[d] = (xr[d] * r) * (w[d] + static_cast<T>(offset));
      }
    });
  });
}

void rmsnorm_bwd(OpCtx& c) {
  const size_t N = c.n(1), D = c.n(2);
  const double offset = c.f(3);
  const bool accumulate = c.i(4) != 0;
  const bool accumulateDx = c.nargs > 5 && c.i(5) != 0;
  check(D > 0, "rmsnorm_bwd: D must be positive");
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* dy = c.need(0, mul(N, D), sizeof(T)).as<T>();
    const T* x = c.need(1, mul(N, D), sizeof(T)).as<T>();
    const T* w = c.need(2, D, sizeof(T)).as<T>();
    const T* rstd = c.need(3, N, sizeof(T)).as<T>();
    T* dx = c.need(4, mul(N, D), sizeof(T)).as<T>();
    T* dw = c.need(5, D, sizeof(T)).as<T>();
    check(!accumulateDx || (dx != dy && dx != x), "rmsnorm_bwd: an accumulated dx must not alias dy or x");
    // dw sums over rows: per-chunk partials, combined in chunk order.
    const int64_t rowsPerChunk = std::max<int64_t>(1, 16384 / static_cast<int64_t>(D));
    const int64_t chunks = (static_cast<int64_t>(N) + rowsPerChunk - 1) / rowsPerChunk;
    std::vector<double> partial(mul(static_cast<size_t>(chunks), D), 0.0);
    parallel_for(chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t ch = lo; ch < hi; ++ch) {
        double* pw = partial.data() + ch * D;
        const int64_t n0 = ch * rowsPerChunk, n1 = std::min<int64_t>(static_cast<int64_t>(N), n0 + rowsPerChunk);
        for (int64_t n = n0; n < n1; ++n) {
          const T* xr = x + n * D;
          const T* dyr = dy + n * D;
          const double r = rstd[n];
          double dot = 0;
          for (size_t d = 0; d < D; ++d) {
            const double xh = xr[d] * r;
            dot += static_cast<double>(dyr[d]) * (w[d] + offset) * xh;
            pw[d] += static_cast<double>(dyr[d]) * xh;
          }
          const double mean = dot / static_cast<double>(D);
          T* dxr = dx + n * D;
          for (size_t d = 0; d < D; ++d) {
            const double xh = xr[d] * r;
            const double v = r * (static_cast<double>(dyr[d]) * (w[d] + offset) - xh * mean);
            dxr[d] = static_cast<T>(accumulateDx ? static_cast<double>(dxr[d]) + v : v);
          }
        }
      }
    });
    for (size_t d = 0; d < D; ++d) {
      double acc = accumulate ? static_cast<double>(dw[d]) : 0.0;
      for (int64_t ch = 0; ch < chunks; ++ch) acc += partial[ch * D + d];
      dw[d] = static_cast<T>(acc);
    }
  });
}

MAGIX_REGISTER_OP("cpu", "rmsnorm_fwd", rmsnorm_fwd);
MAGIX_REGISTER_OP("cpu", "rmsnorm_bwd", rmsnorm_bwd);

}  // namespace
}  // namespace magix::cpu
