// Reductions (src/native/OPS.md), accumulated in float64:
//   sum(x, out; dtype, n, weight, accumulate):   out[0] (+)= weight·Σ x    (out: float32, the stats dtype)
//   sumsq(x, out; dtype, n, weight, accumulate): out[0] (+)= weight·Σ x²   (out: float64)
// Deterministic two-pass reductions: the first pass gives each of G blocks (G a function of n
// only) a fixed set of elements and writes one float64 partial per block to scratch; the second
// pass, one block, adds the partials in a fixed tree order and writes out. No atomics: a replay
// gives the same bits.
#include "common.cuh"

namespace magix::cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kMaxBlocks = 1024;

template <typename T, bool SQUARE>
__global__ void partial_kernel(const T* __restrict x, size_t n, double* __restrict partial, bool vec) {
  constexpr int P = Pack<T>::N;
  __shared__ double red[32];
  double acc = 0;
  const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  size_t done = 0;
  if (vec) {
    const size_t packs = n / P;
    for (size_t i = tid; i < packs; i += stride) {
      float v[P];
      load_pack(x + i * P, v);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const double d = v[j];
        acc += SQUARE ? d * d : d;
      }
    }
    done = packs * P;
  }
  for (size_t i = done + tid; i < n; i += stride) {
    const double v = to_f(x[i]);
    acc += SQUARE ? v * v : v;
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <typename O>
__global__ void finish_kernel(const double* __restrict partial, int count, O* out, double weight, bool accumulate) {
  __shared__ double red[32];
  double acc = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) {
    const double v = weight * acc;
    out[0] = static_cast<O>(accumulate ? static_cast<double>(out[0]) + v : v);
  }
}

template <bool SQUARE>
void reduce(OpCtx& c) {
  const size_t n = c.n(1);
  const double weight = c.f(2);
  const bool accumulate = c.i(3) != 0;
  cudaStream_t s = op_stream(c);
  const int dev = op_device(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* x = c.need(0, n, sizeof(T)).as<T>();
    void* out = SQUARE ? c.need(1, 1, 8).ptr : c.need(1, 1, 4).ptr;  // sumsq: float64; sum: float32
    const bool vec = aligned16(x);
    const size_t per_block = static_cast<size_t>(kThreads) * (vec ? Pack<T>::N : 1) * 8;
    const unsigned blocks = static_cast<unsigned>(std::max<size_t>(1, std::min(kMaxBlocks, (n + per_block - 1) / per_block)));
    double* partial = static_cast<double*>(cuda_backend(c).scratch(dev, blocks * sizeof(double)));
    partial_kernel<T, SQUARE><<<blocks, kThreads, 0, s>>>(x, n, partial, vec);
    CUDA_CHECK_LAUNCH();
    if (SQUARE)
      finish_kernel<double><<<1, kThreads, 0, s>>>(partial, static_cast<int>(blocks), static_cast<double*>(out), weight,
                                                   accumulate);
    else
      finish_kernel<float><<<1, kThreads, 0, s>>>(partial, static_cast<int>(blocks), static_cast<float*>(out), weight,
                                                  accumulate);
    CUDA_CHECK_LAUNCH();
  });
}

MAGIX_REGISTER_OP("cuda", "sum", reduce<false>);
MAGIX_REGISTER_OP("cuda", "sumsq", reduce<true>);

}  // namespace
}  // namespace magix::cuda
