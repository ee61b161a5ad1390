// Data movement on the CUDA backend (the same contract as cpu/copy.cc):
//   fill(dst; dtype, n, v), cast(src, dst; from, to, n), copy_box(src, dst; esize, box...)
// copy_box between two GPUs goes through the peer copy of each contiguous run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/backend.h"
#include "../common/box.h"
#include "../common/dtype.h"
#include "backend.h"
#include "check.h"

namespace magix::cuda {
namespace {

__device__ double load_d(const void* p, size_t i, int t) {
  switch (t) {
    case 0: return static_cast<const float*>(p)[i];
    case 1: return static_cast<const double*>(p)[i];
    case 2: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case 3: return __half2float(static_cast<const __half*>(p)[i]);
    case 4: return static_cast<const int32_t*>(p)[i];
    case 5: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case 6: case 7: return static_cast<const uint8_t*>(p)[i];
    case 8: return static_cast<const int8_t*>(p)[i];
    case 9: return static_cast<const int16_t*>(p)[i];
  }
  return 0;
}

__device__ void store_d(void* p, size_t i, int t, double v) {
  switch (t) {
    case 0: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case 1: static_cast<double*>(p)[i] = v; break;
    case 2: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
    case 3: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
    case 4: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); break;
    case 5: static_cast<int64_t*>(p)[i] = static_cast<int64_t>(v); break;
    case 6: static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); break;
    case 7: static_cast<uint8_t*>(p)[i] = v != 0 ? 1 : 0; break;
    case 8: static_cast<int8_t*>(p)[i] = static_cast<int8_t>(v); break;
    case 9: static_cast<int16_t*>(p)[i] = static_cast<int16_t>(v); break;
  }
}

__global__ void fill_kernel(void* dst, size_t n, int t, double v) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) store_d(dst, i, t, v);
}

__global__ void cast_kernel(const void* src, int from, void* dst, int to, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    store_d(dst, i, to, load_d(src, i, from));
}

// The casts of every step (master weights to bf16 and back): 16-byte vectors, no per-element switch.
__global__ void cast_f32_bf16(const float* src, __nv_bfloat16* dst, size_t n, bool vec) {
  const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  size_t done = 0;
  if (vec) {
    for (size_t i = tid; i < n / 8; i += stride) {
      const float4 a = reinterpret_cast<const float4*>(src)[2 * i], b = reinterpret_cast<const float4*>(src)[2 * i + 1];
      __nv_bfloat162 o[4] = {__floats2bfloat162_rn(a.x, a.y), __floats2bfloat162_rn(a.z, a.w),
                             __floats2bfloat162_rn(b.x, b.y), __floats2bfloat162_rn(b.z, b.w)};
      reinterpret_cast<uint4*>(dst)[i] = *reinterpret_cast<const uint4*>(o);
    }
    done = n / 8 * 8;
  }
  for (size_t i = done + tid; i < n; i += stride) dst[i] = __float2bfloat16_rn(src[i]);
}

__global__ void cast_bf16_f32(const __nv_bfloat16* src, float* dst, size_t n, bool vec) {
  const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  size_t done = 0;
  if (vec) {
    for (size_t i = tid; i < n / 8; i += stride) {
      const uint4 u = reinterpret_cast<const uint4*>(src)[i];
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
      const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]), c = __bfloat1622float2(h[2]),
                   d = __bfloat1622float2(h[3]);
      reinterpret_cast<float4*>(dst)[2 * i] = make_float4(a.x, a.y, b.x, b.y);
      reinterpret_cast<float4*>(dst)[2 * i + 1] = make_float4(c.x, c.y, d.x, d.y);
    }
    done = n / 8 * 8;
  }
  for (size_t i = done + tid; i < n; i += stride) dst[i] = __bfloat162float(src[i]);
}

bool aligned16(const void* a, const void* b) {
  return ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) & 15) == 0;
}

unsigned blocks_for(size_t n) {
  size_t b = (n + 255) / 256;
  return static_cast<unsigned>(b < 65535 ? (b == 0 ? 1 : b) : 65535);
}

CudaBackend& cuda_of(OpCtx& c) { return static_cast<CudaBackend&>(c.backend); }

void fill(OpCtx& c) {
  const DType t = to_dtype(c.f(0));
  const size_t n = c.n(1);
  const BufRef& dst = c.need(0, n, dtype_size(t));
  if (n == 0) return;
  CUDA_CHECK(cudaSetDevice(dst.device));
  fill_kernel<<<blocks_for(n), 256, 0, cuda_of(c).stream(dst.device)>>>(dst.ptr, n, static_cast<int>(t), c.f(2));
  CUDA_CHECK_LAUNCH();
}

void cast(OpCtx& c) {
  const DType from = to_dtype(c.f(0)), to = to_dtype(c.f(1));
  const size_t n = c.n(2);
  const BufRef& src = c.need(0, n, dtype_size(from));
  const BufRef& dst = c.need(1, n, dtype_size(to));
  check(src.device == dst.device, "cast: source and destination must be on one device");
  if (n == 0) return;
  CUDA_CHECK(cudaSetDevice(dst.device));
  cudaStream_t stream = cuda_of(c).stream(dst.device);
  const bool vec = aligned16(src.ptr, dst.ptr);
  if (from == DType::F32 && to == DType::BF16) {
    cast_f32_bf16<<<blocks_for(vec ? (n + 7) / 8 : n), 256, 0, stream>>>(src.as<float>(), dst.as<__nv_bfloat16>(), n, vec);
    CUDA_CHECK_LAUNCH();
    return;
  }
  if (from == DType::BF16 && to == DType::F32) {
    cast_bf16_f32<<<blocks_for(vec ? (n + 7) / 8 : n), 256, 0, stream>>>(src.as<__nv_bfloat16>(), dst.as<float>(), n, vec);
    CUDA_CHECK_LAUNCH();
    return;
  }
  if (from == to) {
    if (dst.ptr != src.ptr)
      CUDA_CHECK(cudaMemcpyAsync(dst.ptr, src.ptr, n * dtype_size(from), cudaMemcpyDeviceToDevice, stream));
    return;
  }
  cast_kernel<<<blocks_for(n), 256, 0, cuda_of(c).stream(dst.device)>>>(src.ptr, static_cast<int>(from), dst.ptr,
                                                                        static_cast<int>(to), n);
  CUDA_CHECK_LAUNCH();
}

void copy_box(OpCtx& c) {
  const size_t esize = c.n(0);
  check(esize == 1 || esize == 2 || esize == 4 || esize == 8, "copy_box: element size must be 1, 2, 4 or 8");
  BoxCopy b = parse_box(c.args, c.nargs, 1, esize, "copy_box");
  const BufRef& src = c.buf(0);
  const BufRef& dst = c.buf(1);
  check(box_array_bytes(b.src_shape, esize) <= src.bytes, "copy_box: source shape is larger than its buffer");
  check(box_array_bytes(b.dst_shape, esize) <= dst.bytes, "copy_box: destination shape is larger than its buffer");
  // Each contiguous run becomes one async copy; boxes here are shard-sized, so runs are long.
  for_each_box_run(b, [&](size_t so, size_t dof, size_t len) {
    BufRef s{static_cast<char*>(src.ptr), src.bytes, src.device};
    c.backend.copy(dst, dof, s, so, len);
  });
}

MAGIX_REGISTER_OP("cuda", "fill", fill);
MAGIX_REGISTER_OP("cuda", "cast", cast);
MAGIX_REGISTER_OP("cuda", "copy_box", copy_box);

}  // namespace
}  // namespace magix::cuda
