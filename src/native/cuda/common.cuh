// Shared pieces of the CUDA kernels: the two compute dtypes (float and bfloat16, math in float),
// launch helpers, warp and block reductions, and the op context's device and stream.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/backend.h"
#include "../common/dtype.h"
#include "backend.h"
#include "check.h"

namespace magix::cuda {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over a block of up to 1024 threads; every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* shared32) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  float r = lane < warps ? shared32[lane] : 0.f;
  return warp_sum(r);
}
__device__ __forceinline__ float block_max(float v, float* shared32) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  float r = lane < warps ? shared32[lane] : -INFINITY;
  return warp_max(r);
}

inline unsigned grid_for(size_t n, unsigned block = 256, unsigned cap = 65535 * 8) {
  size_t g = (n + block - 1) / block;
  if (g == 0) g = 1;
  return static_cast<unsigned>(g < cap ? g : cap);
}

inline CudaBackend& cuda_backend(OpCtx& c) { return static_cast<CudaBackend&>(c.backend); }

// Sets the device of buffer i (all an op's buffers must share it) and returns its stream.
inline cudaStream_t op_stream(OpCtx& c, size_t i = 0) {
  const int dev = c.buf(i).device;
  for (const auto& b : c.bufs) check(b.device == dev, c.name + ": all buffers must be on one GPU");
  CUDA_CHECK(cudaSetDevice(dev));
  return cuda_backend(c).stream(dev);
}

// Dispatch over the compute dtype: T = float (dtype 0) or bf16 (dtype 2).
#define MAGIX_CUDA_DISPATCH(ctx, dtype, ...)                                                   \
  do {                                                                                          \
    ::magix::DType magix_dt_ = (dtype);                                                         \
    if (magix_dt_ == ::magix::DType::F32) {                                                     \
      using T = float;                                                                          \
      __VA_ARGS__;                                                                              \
    } else if (magix_dt_ == ::magix::DType::BF16) {                                             \
      using T = ::magix::cuda::bf16;                                                            \
      __VA_ARGS__;                                                                              \
    } else {                                                                                    \
      ::magix::invalid((ctx).name + ": the CUDA backend computes in float32 or bfloat16");      \
    }                                                                                           \
  } while (0)

// The size of a "stats" or weight-gradient element for compute dtype d (OPS.md, Mixed precision).
inline size_t stats_size(DType d) { return d == DType::BF16 ? 4 : dtype_size(d); }

inline size_t mul(size_t a, size_t b) {
  if (a != 0 && b > SIZE_MAX / a) invalid("size overflow");
  return a * b;
}
inline size_t mul(size_t a, size_t b, size_t c) { return mul(mul(a, b), c); }
inline size_t mul(size_t a, size_t b, size_t c, size_t d) { return mul(mul(a, b, c), d); }

}  // namespace magix::cuda
