// Rotary position embedding, rotate-half convention (Hugging Face):
//   rope(x, positions, invFreq, out; dtype, N, H, hd, sign, scaling)
//   a = position·invFreq[i] (a float32 product for float32, as transformers computes it),
//   c = cos(a)·scaling, s = sign·sin(a)·scaling:
//   out[i] = x[i]·c − x[i + hd/2]·s,  out[i + hd/2] = x[i + hd/2]·c + x[i]·s   (i < hd/2)
// sign −1 is the transpose (the backward pass). out may alias x.
#include <vector>

#include "kernel.h"

namespace magix::cpu {
namespace {

void rope(OpCtx& c) {
  const size_t N = c.n(1), H = c.n(2), hd = c.n(3);
  const double sign = c.f(4), scaling = c.f(5);
  check(hd % 2 == 0 && hd > 0, "rope: the head size must be even");
  check(sign == 1 || sign == -1, "rope: sign must be 1 or -1");
  const size_t half = hd / 2;
  const int32_t* pos = c.need(1, N, sizeof(int32_t)).as<int32_t>();
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* x = c.need(0, mul(N, H, hd), sizeof(T)).as<T>();
    const T* inv = c.need(2, half, sizeof(T)).as<T>();
    T* out = c.need(3, mul(N, H, hd), sizeof(T)).as<T>();
    const int64_t grain = std::max<int64_t>(1, 2048 / static_cast<int64_t>(std::max<size_t>(1, mul(H, hd))));
    parallel_for(static_cast<int64_t>(N), grain, [&](int64_t lo, int64_t hi) {
      std::vector<T> cs(half), sn(half);
      for (int64_t n = lo; n < hi; ++n) {
        for (size_t i = 0; i < half; ++i) {
          const T a = static_cast<T>(pos[n]) * inv[i];
          cs[i] = static_cast<T>(std::cos(static_cast<double>(a)) * scaling);
          sn[i] = static_cast<T>(sign * std::sin(static_cast<double>(a)) * scaling);
        }
        for (size_t h = 0; h < H; ++h) {
          const T* xr = x + (n * H + h) * hd;
          T* o = out + (n * H + h) * hd;
          for (size_t i = 0; i < half; ++i) {
            const T x1 = xr[i], x2 = xr[i + half];
            o[i] = x1 * cs[i] - x2 * sn[i];
            o[i + half] = x2 * cs[i] + x1 * sn[i];
          }
        }
      }
    });
  });
}

MAGIX_REGISTER_OP("cpu", "rope", rope);

}  // namespace
}  // namespace magix::cpu
