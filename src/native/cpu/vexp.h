// The exponentials of the softmax-like kernels (attention, cross-entropy), a row at a time:
// vectorised in float32, where libm's scalar exp would cost more than the matmuls around it.
#pragma once
#include <cstdint>

namespace magix::cpu {

// out[j] = exp(x[j] − shift) for j < n, 0 where x[j] = −∞; returns Σ_j out[j] accumulated in
// float64 in a fixed order. out may alias x. float32: within 2 ulp of exp, and 0 below
// exp(−87.3) (the normal range ends there).
double exp_shifted(const float* x, float shift, float* out, int64_t n);
double exp_shifted(const double* x, double shift, double* out, int64_t n);

}  // namespace magix::cpu
