// Vocabulary-parallel embedding (rows [vocabStart, vocabStart + V) held here):
//   embedding_fwd(table, ids, out; dtype, N, V, D, vocabStart): out[n] = table[ids[n] − start] or 0
//   embedding_bwd(ids, dout, dtable; dtype, N, V, D, vocabStart, accumulate):
//     dtable[r] (+)= Σ_{n: ids[n] − start = r} dout[n]; dtable is float32 under bfloat16 compute,
//     summed with float32 atomics.
#include "common.cuh"

namespace magix::cuda {
namespace {

template <typename T>
__global__ void fwd_kernel(const T* table, const int32_t* ids, T* out, int64_t N, int64_t V, int64_t D, int64_t start) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t r = static_cast<int64_t>(ids[n]) - start;
    const bool held = r >= 0 && r < V;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) out[n * D + d] = held ? table[r * D + d] : from_f<T>(0.f);
  }
}

template <typename T, typename G>
__global__ void bwd_kernel(const int32_t* ids, const T* dout, G* dtable, int64_t N, int64_t V, int64_t D, int64_t start) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t r = static_cast<int64_t>(ids[n]) - start;
    if (r < 0 || r >= V) continue;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) atomicAdd(&dtable[r * D + d], static_cast<G>(to_f(dout[n * D + d])));
  }
}

void embedding_fwd(OpCtx& c) {
  const size_t N = c.n(1), V = c.n(2), D = c.n(3);
  const int64_t start = c.i(4);
  cudaStream_t s = op_stream(c);
  const int32_t* ids = c.need(1, N, 4).as<int32_t>();
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* table = c.need(0, mul(V, D), sizeof(T)).as<T>();
    T* out = c.need(2, mul(N, D), sizeof(T)).as<T>();
    if (N == 0 || D == 0) return;
    fwd_kernel<T><<<static_cast<unsigned>(std::min<size_t>(N, 65535)), 256, 0, s>>>(table, ids, out, N, V, D, start);
    CUDA_CHECK_LAUNCH();
  });
}

void embedding_bwd(OpCtx& c) {
  const size_t N = c.n(1), V = c.n(2), D = c.n(3);
  const int64_t start = c.i(4);
  const bool accumulate = c.i(5) != 0;
  cudaStream_t s = op_stream(c);
  const int32_t* ids = c.need(0, N, 4).as<int32_t>();
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* dout = c.need(1, mul(N, D), sizeof(T)).as<T>();
    float* dtable = c.need(2, mul(V, D), 4).as<float>();  // float32 for both compute dtypes
    if (!accumulate) CUDA_CHECK(cudaMemsetAsync(dtable, 0, mul(V, D, 4), s));
    if (N == 0 || D == 0) return;
    bwd_kernel<T, float><<<static_cast<unsigned>(std::min<size_t>(N, 65535)), 256, 0, s>>>(ids, dout, dtable, N, V, D, start);
    CUDA_CHECK_LAUNCH();
  });
}

MAGIX_REGISTER_OP("cuda", "embedding_fwd", embedding_fwd);
MAGIX_REGISTER_OP("cuda", "embedding_bwd", embedding_bwd);

}  // namespace
}  // namespace magix::cuda
