// Elementwise ops (src/native/OPS.md), float32 or bfloat16 with arithmetic in float32:
//   axpby(x, y; dtype, n, a, b): y = a·x + b·y   (b = 0: y is never read; x may alias y)
//   add(a, b, c; dtype, n):      c = a + b       (c may alias a or b)
//   mul(a, b, c; dtype, n):      c = a·b         (c may alias a or b)
// Memory-bound: 16-byte loads and stores per thread when the buffers are aligned, a scalar tail.
// Each element is read before it is written by the same thread, so aliasing is safe.
#include "common.cuh"

namespace magix::cuda {
namespace {

enum Op { kAxpby = 0, kAdd = 1, kMul = 2 };

template <int OP>
__device__ __forceinline__ float apply(float x, float y, float a, float b) {
  if (OP == kAxpby) return a * x + b * y;
  if (OP == kAdd) return x + y;
  return x * y;
}

// out = f(x, y); for axpby `readY` false means y is not read (b = 0), with y taken as 0.
template <typename T, int OP>
__global__ void binary_kernel(const T* x, const T* y, T* out, size_t n, float a, float b, bool readY, bool vec) {
  constexpr int P = Pack<T>::N;
  const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  size_t done = 0;
  if (vec) {
    const size_t packs = n / P;
    for (size_t i = tid; i < packs; i += stride) {
      float xv[P], yv[P], r[P];
      load_pack(x + i * P, xv);
      if (readY) load_pack(y + i * P, yv);
#pragma unroll
      for (int j = 0; j < P; ++j) r[j] = apply<OP>(xv[j], readY ? yv[j] : 0.f, a, b);
      store_pack(out + i * P, r);
    }
    done = packs * P;
  }
  for (size_t i = done + tid; i < n; i += stride)
    out[i] = from_f<T>(apply<OP>(to_f(x[i]), readY ? to_f(y[i]) : 0.f, a, b));
}

template <typename T, int OP>
void launch(cudaStream_t s, const T* x, const T* y, T* out, size_t n, float a, float b, bool readY) {
  if (n == 0) return;
  const bool vec = aligned16(x, y, out);
  binary_kernel<T, OP><<<grid_for(vec ? (n + Pack<T>::N - 1) / Pack<T>::N : n, 256, 4096), 256, 0, s>>>(x, y, out, n, a, b,
                                                                                                      readY, vec);
  CUDA_CHECK_LAUNCH();
}

void axpby(OpCtx& c) {
  const size_t n = c.n(1);
  const float a = static_cast<float>(c.f(2)), b = static_cast<float>(c.f(3));
  cudaStream_t s = op_stream(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* x = c.need(0, n, sizeof(T)).as<T>();
    T* y = c.need(1, n, sizeof(T)).as<T>();
    launch<T, kAxpby>(s, x, y, y, n, a, b, b != 0.f);
  });
}

template <int OP>
void binary(OpCtx& c) {
  const size_t n = c.n(1);
  cudaStream_t s = op_stream(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* a = c.need(0, n, sizeof(T)).as<T>();
    const T* b = c.need(1, n, sizeof(T)).as<T>();
    T* out = c.need(2, n, sizeof(T)).as<T>();
    launch<T, OP>(s, a, b, out, n, 1.f, 1.f, true);
  });
}

MAGIX_REGISTER_OP("cuda", "axpby", axpby);
MAGIX_REGISTER_OP("cuda", "add", binary<kAdd>);
MAGIX_REGISTER_OP("cuda", "mul", binary<kMul>);

}  // namespace
}  // namespace magix::cuda
