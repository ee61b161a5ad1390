// Cross-entropy fused with the output projection (src/native/OPS.md). h [N, D], W [V, D] (this
// device's rows [vocabStart, vocabStart + V) of the head), targets [N] int32 (< 0: ignored),
// logits ℓ_j = h·W_j:
//   ce_fwd(h, W, targets, m, s, z; dtype, N, D, V, vocabStart, chunk):
//     m = max_j ℓ_j, s = Σ_j exp(ℓ_j − m), z = ℓ_{target − vocabStart} if held else 0;
//     ignored rows (and V = 0): m = 0, s = 1, z = 0
//   ce_rescale(m, mGlobal, s; dtype, N):  s = s·exp(m − mGlobal)
//   ce_lse(m, s, lse; dtype, N):          lse = m + log s
//   ce_rowloss(lse, z, targets, rowScale, out; dtype, N): out = target ≥ 0 ? rowScale·(lse − z) : 0
//   ce_bwd(h, W, targets, lse, rowScale, dh, dW; dtype, N, D, V, vocabStart, chunk, gradScale,
//          accumulateDh): g_j = gradScale·rowScale·(exp(ℓ_j − lse) − [j = target − vocabStart]) on
//     rows not ignored (else 0); dh (+)= Σ_j g_j·W_j, dW_j = Σ_n g_j·h_n
// h, W and dh are the compute dtype; m, s, z, lse, rowScale, out and dW are float32.
//
// The vocabulary goes by in chunks: cuBLASLt writes the chunk's logits [N, chunk] in float32 to
// scratch, then one block per row folds them into the running max and sum (an online softmax,
// one pass over the chunk) and picks the target's logit. The [N, V] logits never exist. The
// chunk is the caller's `chunk` or larger, up to kLogitsBudget bytes of logits (wider chunks
// keep cuBLASLt efficient and cut the passes over dh); the result does not depend on it beyond
// rounding (MAGIX_CE_CHUNK=exact in the environment keeps the caller's chunk). The backward pass
// makes each chunk's logits again, turns them into g (in place for float32, into a bf16 copy for
// bf16), then dh (+)= g·W_chunk (cuBLASLt, beta = 1 after the first chunk, into a float32
// accumulator under bf16 so dh is rounded once) and dW_chunk = gᵀ·h (cuBLASLt, float32 out).
#include <cstdlib>
#include <cstring>

#include "blas.h"
#include "common.cuh"

namespace magix::cuda {
namespace {

constexpr size_t kLogitsBudget = size_t{256} << 20;
constexpr int kThreads = 256;

struct Dims {
  int64_t N, D, V, start, chunk;
};

Dims dims(OpCtx& c) {
  Dims d{c.i(1), c.i(2), c.i(3), c.i(4), c.i(5)};
  check(d.N >= 0 && d.D >= 0 && d.V >= 0 && d.chunk > 0, c.name + ": bad sizes");
  check(d.N <= 0x7fffffff, c.name + ": too many rows");
  return d;
}

// Vocabulary rows per chunk: at least the caller's chunk, up to the logits budget, at most V.
// MAGIX_CE_CHUNK=exact keeps the caller's chunk (tests use it to run many chunks on small shapes).
int64_t chunk_rows(const Dims& d) {
  int64_t cv = d.chunk;
  const char* e = std::getenv("MAGIX_CE_CHUNK");
  if (e && std::strcmp(e, "exact") == 0) return std::max<int64_t>(1, std::min(cv, std::max<int64_t>(d.V, 1)));
  const int64_t fit = static_cast<int64_t>(kLogitsBudget / 4 / static_cast<size_t>(std::max<int64_t>(d.N, 1)));
  if (fit > cv) cv = fit >= 256 ? fit / 256 * 256 : fit;
  return std::max<int64_t>(1, std::min(cv, std::max<int64_t>(d.V, 1)));
}

// (m, s) ⊕ (mo, so): the running max and sum of exp(x − max) of two sets.
__device__ __forceinline__ void merge(float& m, float& s, float mo, float so) {
  const float mn = fmaxf(m, mo);
  if (mn == -INFINITY) return;  // both empty
  s = s * __expf(m - mn) + so * __expf(mo - mn);
  m = mn;
}

// One block per row (grid-stride): folds the chunk's logits into (m, s) and picks z.
__global__ void __launch_bounds__(kThreads) fold_chunk(const float* __restrict logits, int64_t N, int64_t nv,
                                                       const int32_t* __restrict tg, int64_t offset, float* __restrict m,
                                                       float* __restrict s, float* __restrict z, bool first) {
  __shared__ float sm[32], ss[32];
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const float* row = logits + n * nv;
    float mt = -INFINITY, st = 0.f;
    auto add = [&](float x) {
      if (x > mt) {
        st = st * __expf(mt - x) + 1.f;
        mt = x;
      } else if (!(x == -INFINITY)) {  // -inf adds nothing (and -inf − -inf is NaN); NaN goes through
        st += __expf(x - mt);
      }
    };
    if (nv % 4 == 0) {
      for (int64_t j = threadIdx.x * 4; j < nv; j += kThreads * 4) {
        const float4 v = *reinterpret_cast<const float4*>(row + j);
        add(v.x), add(v.y), add(v.z), add(v.w);
      }
    } else {
      for (int64_t j = threadIdx.x; j < nv; j += kThreads) add(row[j]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, mt, o), so = __shfl_xor_sync(0xffffffffu, st, o);
      merge(mt, st, mo, so);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sm[warp] = mt, ss[warp] = st;
    __syncthreads();
    if (threadIdx.x == 0) {
      float M = sm[0], S = ss[0];
      for (int w = 1; w < kThreads / 32; ++w) merge(M, S, sm[w], ss[w]);
      if (!first) merge(M, S, m[n], s[n]);
      m[n] = M;
      s[n] = S;
      const int64_t t = static_cast<int64_t>(tg[n]) - offset;
      if (t >= 0 && t < nv) z[n] = row[t];
      else if (first) z[n] = 0.f;
    }
  }
}

__global__ void finish_stats(const int32_t* tg, float* m, float* s, float* z, int64_t N, bool none) {
  for (int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; n < N; n += (int64_t)gridDim.x * blockDim.x)
    if (none || tg[n] < 0) {
      m[n] = 0.f;
      s[n] = 1.f;
      z[n] = 0.f;
    }
}

// g = gradScale·rowScale·(exp(ℓ − lse) − [j = target]) over one chunk, one block per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_chunk(const float* logits, T* g, int64_t N, int64_t nv,
                                                       const int32_t* __restrict tg, const float* __restrict lse,
                                                       const float* __restrict rs, int64_t offset, float gradScale) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const float* row = logits + n * nv;
    T* out = g + n * nv;
    const int32_t target = tg[n];
    if (target < 0) {
      for (int64_t j = threadIdx.x; j < nv; j += kThreads) out[j] = from_f<T>(0.f);
      continue;
    }
    const float L = lse[n], scale = gradScale * rs[n];
    const int64_t t = static_cast<int64_t>(target) - offset;
    for (int64_t j = threadIdx.x; j < nv; j += kThreads) {
      const float p = __expf(row[j] - L);
      out[j] = from_f<T>(scale * (p - (j == t ? 1.f : 0.f)));
    }
  }
}

// dh = bf16(acc (+ dh)).
__global__ void finish_dh(const float* acc, bf16* dh, size_t n, bool accumulate) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    dh[i] = __float2bfloat16_rn(acc[i] + (accumulate ? __bfloat162float(dh[i]) : 0.f));
}

unsigned row_blocks(int64_t N) { return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(N, 1), 65535)); }

// Logits of rows [0, N) against vocabulary rows [v0, v0 + nv): C [N, nv] float32.
template <typename T>
GemmArgs logits_gemm(const T* h, const T* W, float* out, const Dims& d, int64_t v0, int64_t nv, DType dt) {
  GemmArgs g;
  g.M = d.N;
  g.N = nv;
  g.K = d.D;
  g.transB = true;
  g.A = h;
  g.lda = std::max<int64_t>(d.D, 1);
  g.B = W + v0 * d.D;
  g.ldb = std::max<int64_t>(d.D, 1);
  g.C = out;
  g.ldc = nv;
  g.ab = dt;
  g.c = DType::F32;
  return g;
}

void ce_fwd(OpCtx& c) {
  const Dims d = dims(c);
  cudaStream_t s = op_stream(c);
  const int dev = op_device(c);
  const DType dt = compute_dtype(c);
  MAGIX_CUDA_DISPATCH(c, dt, {
    const T* h = c.need(0, mul(d.N, d.D), sizeof(T)).as<T>();
    const T* W = c.need(1, mul(d.V, d.D), sizeof(T)).as<T>();
    const int32_t* tg = c.need(2, d.N, 4).as<int32_t>();
    float* m = c.need(3, d.N, 4).as<float>();
    float* sm = c.need(4, d.N, 4).as<float>();
    float* z = c.need(5, d.N, 4).as<float>();
    if (d.N == 0) return;
    const int64_t cv = chunk_rows(d);
    float* logits = d.V > 0 ? static_cast<float*>(cuda_backend(c).scratch(dev, mul(d.N, cv, 4))) : nullptr;
    for (int64_t v0 = 0; v0 < d.V; v0 += cv) {
      const int64_t nv = std::min(cv, d.V - v0);
      gemm(cuda_backend(c), dev, logits_gemm(h, W, logits, d, v0, nv, dt));
      fold_chunk<<<row_blocks(d.N), kThreads, 0, s>>>(logits, d.N, nv, tg, d.start + v0, m, sm, z, v0 == 0);
      CUDA_CHECK_LAUNCH();
    }
    finish_stats<<<grid_for(d.N), 256, 0, s>>>(tg, m, sm, z, d.N, d.V == 0);
    CUDA_CHECK_LAUNCH();
  });
}

void ce_bwd(OpCtx& c) {
  const Dims d = dims(c);
  const float gradScale = static_cast<float>(c.f(6));
  const bool accumulate = c.i(7) != 0;
  cudaStream_t s = op_stream(c);
  const int dev = op_device(c);
  const DType dt = compute_dtype(c);
  MAGIX_CUDA_DISPATCH(c, dt, {
    constexpr bool kBf16 = sizeof(T) == 2;
    const T* h = c.need(0, mul(d.N, d.D), sizeof(T)).as<T>();
    const T* W = c.need(1, mul(d.V, d.D), sizeof(T)).as<T>();
    const int32_t* tg = c.need(2, d.N, 4).as<int32_t>();
    const float* lse = c.need(3, d.N, 4).as<float>();
    const float* rs = c.need(4, d.N, 4).as<float>();
    T* dh = c.need(5, mul(d.N, d.D), sizeof(T)).as<T>();
    float* dW = c.need(6, mul(d.V, d.D), 4).as<float>();  // a weight gradient: float32
    if (d.N == 0) {
      if (d.V * d.D > 0) CUDA_CHECK(cudaMemsetAsync(dW, 0, mul(d.V, d.D, 4), s));
      return;
    }
    if (d.V == 0 || d.D == 0) {
      if (!accumulate && d.D > 0) CUDA_CHECK(cudaMemsetAsync(dh, 0, mul(d.N, d.D, sizeof(T)), s));
      return;
    }
    const int64_t cv = chunk_rows(d);
    ScratchLayout lay;
    const size_t oLogits = lay.add(mul(d.N, cv, 4));
    const size_t oG = kBf16 ? lay.add(mul(d.N, cv, 2)) : 0;
    const size_t oAcc = kBf16 ? lay.add(mul(d.N, d.D, 4)) : 0;
    char* ws = static_cast<char*>(cuda_backend(c).scratch(dev, lay.total));
    float* logits = reinterpret_cast<float*>(ws + oLogits);
    T* g = kBf16 ? reinterpret_cast<T*>(ws + oG) : reinterpret_cast<T*>(logits);  // float32: g in place
    float* acc = kBf16 ? reinterpret_cast<float*>(ws + oAcc) : nullptr;
    for (int64_t v0 = 0; v0 < d.V; v0 += cv) {
      const int64_t nv = std::min(cv, d.V - v0);
      gemm(cuda_backend(c), dev, logits_gemm(h, W, logits, d, v0, nv, dt));
      grad_chunk<T><<<row_blocks(d.N), kThreads, 0, s>>>(logits, g, d.N, nv, tg, lse, rs, d.start + v0, gradScale);
      CUDA_CHECK_LAUNCH();
      // dh (+)= g·W_chunk
      GemmArgs a;
      a.M = d.N;
      a.N = d.D;
      a.K = nv;
      a.A = g;
      a.lda = nv;
      a.B = W + v0 * d.D;
      a.ldb = d.D;
      a.ldc = d.D;
      a.ab = dt;
      if (kBf16) {
        a.C = acc;
        a.c = DType::F32;
        a.beta = v0 == 0 ? 0.f : 1.f;
      } else {
        a.C = dh;
        a.c = DType::F32;
        a.beta = (v0 == 0 && !accumulate) ? 0.f : 1.f;
      }
      gemm(cuda_backend(c), dev, a);
      // dW_chunk = gᵀ·h
      GemmArgs w;
      w.M = nv;
      w.N = d.D;
      w.K = d.N;
      w.transA = true;
      w.A = g;
      w.lda = nv;
      w.B = h;
      w.ldb = d.D;
      w.C = dW + v0 * d.D;
      w.ldc = d.D;
      w.ab = dt;
      w.c = DType::F32;
      gemm(cuda_backend(c), dev, w);
    }
    if (kBf16) {
      finish_dh<<<grid_for(mul(d.N, d.D), 256, 8192), 256, 0, s>>>(acc, reinterpret_cast<bf16*>(dh), mul(d.N, d.D),
                                                                   accumulate);
      CUDA_CHECK_LAUNCH();
    }
  });
}

__global__ void rescale_kernel(const float* m, const float* mg, float* s, int64_t N) {
  for (int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; n < N; n += (int64_t)gridDim.x * blockDim.x)
    s[n] *= __expf(m[n] - mg[n]);
}
__global__ void lse_kernel(const float* m, const float* s, float* lse, int64_t N) {
  for (int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; n < N; n += (int64_t)gridDim.x * blockDim.x)
    lse[n] = m[n] + logf(s[n]);
}
__global__ void rowloss_kernel(const float* lse, const float* z, const int32_t* tg, const float* rs, float* out, int64_t N) {
  for (int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; n < N; n += (int64_t)gridDim.x * blockDim.x)
    out[n] = tg[n] >= 0 ? rs[n] * (lse[n] - z[n]) : 0.f;
}

// The row-statistics ops: every buffer is float32 (the stats dtype) for both compute dtypes.
void ce_rescale(OpCtx& c) {
  compute_dtype(c);
  const size_t N = c.n(1);
  cudaStream_t s = op_stream(c);
  const float* m = c.need(0, N, 4).as<float>();
  const float* mg = c.need(1, N, 4).as<float>();
  float* sm = c.need(2, N, 4).as<float>();
  if (N == 0) return;
  rescale_kernel<<<grid_for(N), 256, 0, s>>>(m, mg, sm, static_cast<int64_t>(N));
  CUDA_CHECK_LAUNCH();
}
void ce_lse(OpCtx& c) {
  compute_dtype(c);
  const size_t N = c.n(1);
  cudaStream_t s = op_stream(c);
  const float* m = c.need(0, N, 4).as<float>();
  const float* sm = c.need(1, N, 4).as<float>();
  float* lse = c.need(2, N, 4).as<float>();
  if (N == 0) return;
  lse_kernel<<<grid_for(N), 256, 0, s>>>(m, sm, lse, static_cast<int64_t>(N));
  CUDA_CHECK_LAUNCH();
}
void ce_rowloss(OpCtx& c) {
  compute_dtype(c);
  const size_t N = c.n(1);
  cudaStream_t s = op_stream(c);
  const float* lse = c.need(0, N, 4).as<float>();
  const float* z = c.need(1, N, 4).as<float>();
  const int32_t* tg = c.need(2, N, 4).as<int32_t>();
  const float* rs = c.need(3, N, 4).as<float>();
  float* out = c.need(4, N, 4).as<float>();
  if (N == 0) return;
  rowloss_kernel<<<grid_for(N), 256, 0, s>>>(lse, z, tg, rs, out, static_cast<int64_t>(N));
  CUDA_CHECK_LAUNCH();
}

MAGIX_REGISTER_OP("cuda", "ce_fwd", ce_fwd);
MAGIX_REGISTER_OP("cuda", "ce_bwd", ce_bwd);
MAGIX_REGISTER_OP("cuda", "ce_rescale", ce_rescale);
MAGIX_REGISTER_OP("cuda", "ce_lse", ce_lse);
MAGIX_REGISTER_OP("cuda", "ce_rowloss", ce_rowloss);

}  // namespace
}  // namespace magix::cuda
