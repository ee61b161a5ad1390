// Shared pieces of the CUDA kernels: the two compute dtypes (float and bfloat16, arithmetic in
// float), 16-byte vector loads and stores, warp and block reductions, launch sizing, and the op
// context's device and stream. Checked calls are in check.h (CUDA_CHECK, CUDA_CHECK_LAUNCH after
// every launch, CUBLAS_CHECK, NCCL_CHECK).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common/backend.h"
#include "../common/dtype.h"
#include "backend.h"
#include "check.h"

namespace magix::cuda {

using bf16 = __nv_bfloat16;

// ---- conversions ----
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

// Two floats as one 32-bit bf16x2 word: `lo` in the low half (the lower index), as mma expects.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---- 16-byte packs: 4 floats or 8 bfloat16 per load/store ----
template <typename T> struct Pack { static constexpr int N = 16 / sizeof(T); };

template <typename T>
__device__ __forceinline__ void load_pack(const T* p, float (&v)[Pack<T>::N]);
template <>
__device__ __forceinline__ void load_pack<float>(const float* p, float (&v)[4]) {
  const float4 f = *reinterpret_cast<const float4*>(p);
  v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
}
template <>
__device__ __forceinline__ void load_pack<bf16>(const bf16* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float (&v)[Pack<T>::N]);
template <>
__device__ __forceinline__ void store_pack<float>(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
template <>
__device__ __forceinline__ void store_pack<bf16>(bf16* p, const float (&v)[8]) {
  uint4 u;
  u.x = pack_bf16x2(v[0], v[1]);
  u.y = pack_bf16x2(v[2], v[3]);
  u.z = pack_bf16x2(v[4], v[5]);
  u.w = pack_bf16x2(v[6], v[7]);
  *reinterpret_cast<uint4*>(p) = u;
}

// Whether every pointer is 16-byte aligned (vector paths need it; buffers start 256-aligned).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
template <typename... P>
inline bool aligned16(const void* p, P... rest) {
  return aligned16(p) && aligned16(rest...);
}

// ---- reductions ----
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over a block of up to 1024 threads (a multiple of 32); every thread gets the result, in
// the same order of additions on every run. `shared32` holds 32 values of V.
template <typename V>
__device__ __forceinline__ V block_sum(V v, V* shared32) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // shared32 may still be read by a previous call
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  V r = lane < warps ? shared32[lane] : V(0);
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

// ---- launch sizing ----
// Blocks for a grid-stride loop over n items: enough to fill the GPU, no more than needed.
inline unsigned grid_for(size_t n, unsigned block = 256, unsigned cap = 65535u * 8) {
  size_t g = (n + block - 1) / block;
  if (g == 0) g = 1;
  return static_cast<unsigned>(g < cap ? g : cap);
}

inline CudaBackend& cuda_backend(OpCtx& c) { return static_cast<CudaBackend&>(c.backend); }

// Checks that all the op's buffers are on one GPU, makes it current, returns its stream.
inline cudaStream_t op_stream(OpCtx& c, size_t i = 0) {
  const int dev = c.buf(i).device;
  for (const auto& b : c.bufs) check(b.device == dev, c.name + ": all buffers must be on one GPU");
  CUDA_CHECK(cudaSetDevice(dev));
  return cuda_backend(c).stream(dev);
}
inline int op_device(OpCtx& c) { return c.buf(0).device; }

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
      ::magix::invalid((ctx).name + ": the CUDA backend computes in float32 (0) or bfloat16 (2)"); \
    }                                                                                           \
  } while (0)

// The compute dtype argument, checked to be float32 or bfloat16.
inline DType compute_dtype(OpCtx& c, size_t i = 0) {
  const DType d = to_dtype(c.f(i));
  if (d != DType::F32 && d != DType::BF16) invalid(c.name + ": the CUDA backend computes in float32 (0) or bfloat16 (2)");
  return d;
}

// Element size of a "stats" or weight-gradient buffer for compute dtype d (OPS.md, Mixed
// precision): float32 under bfloat16 compute, else the dtype (float32 on CUDA).
inline size_t stats_size(DType d) { return d == DType::BF16 ? 4 : dtype_size(d); }

inline size_t mul(size_t a, size_t b) {
  if (a != 0 && b > SIZE_MAX / a) invalid("size overflow");
  return a * b;
}
inline size_t mul(size_t a, size_t b, size_t c) { return mul(mul(a, b), c); }
inline size_t mul(size_t a, size_t b, size_t c, size_t d) { return mul(mul(a, b, c), d); }

}  // namespace magix::cuda
