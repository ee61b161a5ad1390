// axpby(x, y; dtype, n, a, b): y = a·x + b·y (b = 0 never reads y); add(a, b, c): c = a + b;
// mul(a, b, c): c = a·b. float32 or bfloat16, arithmetic in float32; outputs may alias inputs.
#include "common.cuh"

namespace magix::cuda {
namespace {

template <typename T>
__global__ void axpby_kernel(const T* x, T* y, size_t n, float a, float b) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(b == 0.f ? a * to_f(x[i]) : a * to_f(x[i]) + b * to_f(y[i]));
}

template <typename T, int Op>
__global__ void binary_kernel(const T* a, const T* b, T* c, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float x = to_f(a[i]), y = to_f(b[i]);
    c[i] = from_f<T>(Op == 0 ? x + y : x * y);
  }
}

void axpby(OpCtx& c) {
  const size_t n = c.n(1);
  const float a = static_cast<float>(c.f(2)), b = static_cast<float>(c.f(3));
  cudaStream_t s = op_stream(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* x = c.need(0, n, sizeof(T)).as<T>();
    T* y = c.need(1, n, sizeof(T)).as<T>();
    if (n == 0) return;
    axpby_kernel<T><<<grid_for(n), 256, 0, s>>>(x, y, n, a, b);
    CUDA_CHECK_LAUNCH();
  });
}

template <int Op>
void binary(OpCtx& c) {
  const size_t n = c.n(1);
  cudaStream_t s = op_stream(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* a = c.need(0, n, sizeof(T)).as<T>();
    const T* b = c.need(1, n, sizeof(T)).as<T>();
    T* out = c.need(2, n, sizeof(T)).as<T>();
    if (n == 0) return;
    binary_kernel<T, Op><<<grid_for(n), 256, 0, s>>>(a, b, out, n);
    CUDA_CHECK_LAUNCH();
  });
}

MAGIX_REGISTER_OP("cuda", "axpby", axpby);
MAGIX_REGISTER_OP("cuda", "add", binary<0>);
MAGIX_REGISTER_OP("cuda", "mul", binary<1>);

}  // namespace
}  // namespace magix::cuda
