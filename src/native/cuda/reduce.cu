// Deterministic reductions (fixed partition, fixed order; float64 accumulation):
//   sum(x, out; dtype, n, weight, accumulate):   out[0] (+)= weight·Σ x   (out: float32 under bfloat16)
//   sumsq(x, out; dtype, n, weight, accumulate): out[0] (+)= weight·Σ x²  (out: float64)
#include "common.cuh"

namespace magix::cuda {
namespace {

constexpr int kBlocks = 256;

template <typename T, bool Square>
__global__ void partial_kernel(const T* x, size_t n, double* partial) {
  __shared__ double red[256];
  double acc = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const double v = to_f(x[i]);
    acc += Square ? v * v : v;
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}

template <typename O>
__global__ void finish_kernel(const double* partial, int count, O* out, double weight, bool accumulate) {
  double acc = 0;
  for (int i = 0; i < count; ++i) acc += partial[i];
  const double v = weight * acc;
  out[0] = static_cast<O>(accumulate ? static_cast<double>(out[0]) + v : v);
}

template <bool Square>
void reduce(OpCtx& c) {
  const size_t n = c.n(1);
  const double weight = c.f(2);
  const bool accumulate = c.i(3) != 0;
  cudaStream_t s = op_stream(c);
  const int dev = c.buf(0).device;
  double* partial = static_cast<double*>(cuda_backend(c).workspace(dev, kBlocks * sizeof(double)));
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* x = c.need(0, n, sizeof(T)).as<T>();
    const unsigned blocks = static_cast<unsigned>(std::max<size_t>(1, std::min<size_t>(kBlocks, (n + 255) / 256)));
    partial_kernel<T, Square><<<blocks, 256, 0, s>>>(x, n, partial);
    CUDA_CHECK_LAUNCH();
    if (Square) {
      double* out = c.need(1, 1, 8).as<double>();
      finish_kernel<double><<<1, 1, 0, s>>>(partial, blocks, out, weight, accumulate);
    } else {
      float* out = c.need(1, 1, 4).as<float>();  // the stats dtype: float32 for both compute dtypes
      finish_kernel<float><<<1, 1, 0, s>>>(partial, blocks, out, weight, accumulate);
    }
    CUDA_CHECK_LAUNCH();
  });
}

MAGIX_REGISTER_OP("cuda", "sum", reduce<false>);
MAGIX_REGISTER_OP("cuda", "sumsq", reduce<true>);

}  // namespace
}  // namespace magix::cuda
