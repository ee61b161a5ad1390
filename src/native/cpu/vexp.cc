// exp(x − shift) over a row, with the row's sum in float64. float32 uses Cephes' expf: exp(x) =
// 2ⁿ·exp(r) with n = round(x·log₂e) and r = x − n·ln2 (ln2 split in two for exactness), exp(r)
// a degree-7 polynomial; written on vector types, branch-free, and compiled per isa() level.
#include "vexp.h"

#include <cmath>
#include <cstring>

#include "isa.h"

namespace magix::cpu {
namespace {

template <int VB>
struct Vec {
  typedef float F __attribute__((vector_size(VB)));
  typedef int32_t I __attribute__((vector_size(VB)));
  static constexpr int64_t L = VB / 4;
};

// x = exp(x), lane by lane (in place: vector arguments by value would change the ABI).
template <int VB>
inline __attribute__((always_inline)) void expf_vec(typename Vec<VB>::F& x) {
  using F = typename Vec<VB>::F;
  using I = typename Vec<VB>::I;
  const F lo = F{} - 87.33654f, hi = F{} + 88.72283f, zero = F{}, one = F{} + 1.0f;
  F xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // n = floor(xc·log₂e + 0.5): truncation, less one where it rounded up (negative values).
  const F t = xc * 1.44269504088896341f + 0.5f;
  F n = __builtin_convertvector(__builtin_convertvector(t, I), F);
  n = n > t ? n - one : n;
  F r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2ⁿ from its exponent bits; n reaches 128 just below the overflow, so that is 2¹²⁷·2.
  const F twice = n > 127.0f ? one + one : one;
  n = n > 127.0f ? n - one : n;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  F e = p * (F)bits * twice;
  e = x < lo ? zero : e;
  e = x > hi ? F{} + __builtin_inff() : e;
  x = x != x ? x : e;  // NaN stays NaN
}

template <int VB>
inline __attribute__((always_inline)) double exp_row(const float* x, float shift, float* out, int64_t n) {
  using F = typename Vec<VB>::F;
  constexpr int64_t L = Vec<VB>::L;
  // Independent float64 partial sums, a fixed number whatever the vector width, so every
  // instruction set adds in the same order.
  constexpr int64_t kLanes = 16;
  double lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    F v;
    std::memcpy(&v, x + j, sizeof v);
    v -= shift;
    expf_vec<VB>(v);
    std::memcpy(out + j, &v, sizeof v);
  }
  if (j < n) {
    F v = F{} - __builtin_inff();
    for (int64_t i = j; i < n; ++i) v[i - j] = x[i] - shift;
    expf_vec<VB>(v);
    for (int64_t i = j; i < n; ++i) out[i] = v[i - j];
  }
  for (j = 0; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += out[j + l];
  double sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; j < n; ++j) sum += out[j];
  return sum;
}

__attribute__((target("arch=x86-64-v4"))) double exp_row_avx512(const float* x, float shift, float* out, int64_t n) {
  return exp_row<64>(x, shift, out, n);
}
__attribute__((target("arch=x86-64-v3"))) double exp_row_avx2(const float* x, float shift, float* out, int64_t n) {
  return exp_row<32>(x, shift, out, n);
}
double exp_row_base(const float* x, float shift, float* out, int64_t n) { return exp_row<16>(x, shift, out, n); }

}  // namespace

double exp_shifted(const float* x, float shift, float* out, int64_t n) {
  static const auto fn = isa() == Isa::Avx512 ? exp_row_avx512 : isa() == Isa::Avx2 ? exp_row_avx2 : exp_row_base;
  return fn(x, shift, out, n);
}

double exp_shifted(const double* x, double shift, double* out, int64_t n) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (out[j] = std::exp(x[j] - shift));
  return sum;
}

}  // namespace magix::cpu
