// Vocabulary-parallel embedding (src/native/OPS.md): this device holds table rows
// [vocabStart, vocabStart + V).
//   embedding_fwd(table [V, D], ids [N], out [N, D]; dtype, N, V, D, vocabStart):
//     out[n] = table[ids[n] − vocabStart] if that row is held, else 0
//   embedding_bwd(ids [N], dout [N, D], dtable [V, D]; dtype, N, V, D, vocabStart, accumulate):
//     dtable[r] (+)= Σ_{n: ids[n] − vocabStart = r} dout[n]
// dtable is a weight gradient: float32 for both compute dtypes. Rows that share an id meet in
// float32 atomics (16-byte vector atomics on sm_90), so the order of their sum may vary by run.
#include "common.cuh"

namespace magix::cuda {
namespace {

// One block per output row (grid-stride over rows), 16-byte copies when aligned.
template <typename T>
__global__ void fwd_kernel(const T* table, const int32_t* ids, T* out, int64_t N, int64_t V, int64_t D, int64_t start,
                           bool vec) {
  constexpr int P = Pack<T>::N;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t r = static_cast<int64_t>(ids[n]) - start;
    const bool held = r >= 0 && r < V;
    T* dst = out + n * D;
    const T* src = table + (held ? r : 0) * D;
    if (vec) {
      for (int64_t d = threadIdx.x * (int64_t)P; d < D; d += (int64_t)blockDim.x * P) {
        if (held)
          *reinterpret_cast<uint4*>(dst + d) = *reinterpret_cast<const uint4*>(src + d);
        else
          *reinterpret_cast<uint4*>(dst + d) = make_uint4(0, 0, 0, 0);
      }
    } else {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = held ? src[d] : from_f<T>(0.f);
    }
  }
}

template <typename T>
__global__ void bwd_kernel(const int32_t* ids, const T* dout, float* dtable, int64_t N, int64_t V, int64_t D, int64_t start,
                           bool vec4) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t r = static_cast<int64_t>(ids[n]) - start;
    if (r < 0 || r >= V) continue;
    const T* src = dout + n * D;
    float* dst = dtable + r * D;
    if (vec4) {
      for (int64_t d = threadIdx.x * 4; d < D; d += (int64_t)blockDim.x * 4)
        atomicAdd(reinterpret_cast<float4*>(dst + d),
                  make_float4(to_f(src[d]), to_f(src[d + 1]), to_f(src[d + 2]), to_f(src[d + 3])));
    } else {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) atomicAdd(dst + d, to_f(src[d]));
    }
  }
}

unsigned row_threads(size_t per_row) {
  size_t t = (per_row + 31) / 32 * 32;
  return static_cast<unsigned>(std::max<size_t>(32, std::min<size_t>(256, t)));
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
    constexpr int P = Pack<T>::N;
    const bool vec = D % P == 0 && aligned16(table, out);
    fwd_kernel<T><<<static_cast<unsigned>(std::min<size_t>(N, 65535)), row_threads(vec ? D / P : D), 0, s>>>(
        table, ids, out, static_cast<int64_t>(N), static_cast<int64_t>(V), static_cast<int64_t>(D), start, vec);
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
    float* dtable = c.need(2, mul(V, D), 4).as<float>();  // a weight gradient: float32
    if (!accumulate && V * D > 0) CUDA_CHECK(cudaMemsetAsync(dtable, 0, mul(V, D, 4), s));
    if (N == 0 || D == 0) return;
    const bool vec4 = D % 4 == 0 && aligned16(dtable);
    bwd_kernel<T><<<static_cast<unsigned>(std::min<size_t>(N, 65535)), row_threads(vec4 ? D / 4 : D), 0, s>>>(
        ids, dout, dtable, static_cast<int64_t>(N), static_cast<int64_t>(V), static_cast<int64_t>(D), start, vec4);
    CUDA_CHECK_LAUNCH();
  });
}

MAGIX_REGISTER_OP("cuda", "embedding_fwd", embedding_fwd);
MAGIX_REGISTER_OP("cuda", "embedding_bwd", embedding_bwd);

}  // namespace
}  // namespace magix::cuda
