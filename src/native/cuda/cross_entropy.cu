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
//
//   ce_fused(h, W, targets, rowScale, lse, rowLoss, dh, dW; dtype, N, D, V, chunkRows, gradScale,
//            accumulateDh): forward and backward at once for an unsplit vocabulary (three
//     vocabulary-sized GEMMs instead of ce_fwd + ce_bwd's four). The ROWS go by in chunks of R
//     (chunkRows, or with 0 as many as fit kFusedElems float32 logits, a multiple of 64): cuBLASLt
//     writes the chunk's whole logit rows [R, V] in float32 to scratch, then a row kernel takes
//     max and Σ exp (online, one pass), lse, rowLoss = rowScale·(lse − ℓ_target), and writes
//     g = gradScale·rowScale·(softmax − onehot). Ignored rows: lse = 0, rowLoss = 0, g = 0.
//     Two ways to go on from there:
//     - whole g (when N·V g values fit kFullGBudget and the scratch can be had): g goes to a
//       [N, V] buffer in the compute dtype, and after the last chunk dh (+)= g·W and dW = gᵀ·h are
//       ONE GEMM each (dW written once, float32, beta 0): no float32 dW read and written back per
//       chunk, no short GEMMs.
//     - chunked (the fallback, or MAGIX_CE_FUSED=chunked): g replaces the chunk's logits in place
//       (float32: in place; bf16: into the first half of the row's bytes, so g has leading
//       dimension 2V), then dh_chunk (+)= g·W (cuBLASLt, C in the compute dtype, rounded once)
//       and dW (+)= gᵀ·h_chunk (float32, beta 0 on the first chunk).
//     Op scratch: the whole-g way R·V·4 + N·V·sizeof(T) bytes (4.9 GiB at N = 16384, V = 128256,
//     bf16), the chunked way R·V·4 (1 GiB there).
//     The row kernel: for V ≥ kClusterMinV a cluster of kCluster blocks per row, each holding a
//     slice of the row in shared memory, so the float32 logits are read from memory ONCE (the
//     slices' (max, Σ exp) are merged through distributed shared memory); else (or with
//     MAGIX_CE_ROWS=twopass) one block per row, reading the row twice. Both are deterministic.
#include <cooperative_groups.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

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

// ---- ce_fused ----

// Float32 logits per chunk when the caller leaves chunkRows to the op: 1 GiB of scratch. In the
// chunked way each chunk's dW GEMM reads and writes the whole float32 dW (V·D), so fewer, taller
// chunks keep that GEMM compute-bound (2048 rows at V = 128256, where 1024 would make it about as
// memory-bound); in the whole-g way tall chunks keep the logits GEMM's last wave small.
constexpr int64_t kFusedElems = int64_t{1} << 28;
// The whole-g way takes at most kFullGBudget bytes of g ([N, V] in the compute dtype: 4.2 GB at
// N = 16384, V = 128256 in bf16) on top of the logits chunk. Above it the chunked way runs.
constexpr size_t kFullGBudget = size_t{6} << 30;

// Rows per chunk: chunkRows, or as many as fit kFusedElems (a multiple of 64 when at least 64);
// at most N, and never more than 2^28 logits (a huge chunkRows is clamped there).
int64_t fused_rows_per_chunk(int64_t N, int64_t V, int64_t chunkRows) {
  const int64_t Vc = std::max<int64_t>(V, 1);
  int64_t R = chunkRows;
  if (R == 0) {
    R = std::max<int64_t>(1, kFusedElems / Vc);
    if (R >= 64) R = R / 64 * 64;
  }
  R = std::min(R, std::max<int64_t>(1, (int64_t{1} << 28) / Vc));
  return std::max<int64_t>(1, std::min(R, N));
}

bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e && std::strcmp(e, value) == 0;
}

// One block per row of a chunk (grid-stride): the row's lse and loss, then g over its logits,
// written to gout + n·ldg. In place (gout = logits): float32 with ldg = V rewrites each logit;
// bf16 with ldg = 2V puts g[j] on the row's bytes [2j, 2j + 2), i.e. on float ⌊j/2⌋: the row goes
// by in tiles, every thread loads its part of a tile, a barrier, then the stores: tile k's stores
// cover floats below (k + 1)·tile/2, all of them loaded by tile k or before. A separate gout
// takes the same code (the barriers are then merely unneeded).
template <typename T>
__global__ void __launch_bounds__(kThreads) fused_rows(float* logits, int64_t R, int64_t V, T* gout, int64_t ldg,
                                                       const int32_t* __restrict tg, const float* __restrict rs,
                                                       float* __restrict lse, float* __restrict loss, float gradScale) {
  __shared__ float sm[32], ss[32];
  __shared__ float sL;
  const bool vec = V % 4 == 0;
  for (int64_t n = blockIdx.x; n < R; n += gridDim.x) {
    const float* row = logits + n * V;
    T* g = gout + n * ldg;
    const int64_t t = tg[n];  // the same for the whole block: no divergent barrier
    if (t < 0) {
      for (int64_t j = threadIdx.x; j < V; j += kThreads) g[j] = from_f<T>(0.f);
      if (threadIdx.x == 0) lse[n] = 0.f, loss[n] = 0.f;
      continue;
    }
    float mt = -INFINITY, st = 0.f;
    auto add = [&](float x) {
      if (x > mt) {
        st = st * __expf(mt - x) + 1.f;
        mt = x;
      } else if (!(x == -INFINITY)) {
        st += __expf(x - mt);
      }
    };
    if (vec) {
      for (int64_t j = threadIdx.x * 4; j < V; j += kThreads * 4) {
        const float4 v = *reinterpret_cast<const float4*>(row + j);
        add(v.x), add(v.y), add(v.z), add(v.w);
      }
    } else {
      for (int64_t j = threadIdx.x; j < V; j += kThreads) add(row[j]);
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
      const float L = M + logf(S);
      const float z = t < V ? row[t] : 0.f;  // read before any g is stored
      lse[n] = L;
      loss[n] = rs[n] * (L - z);
      sL = L;
    }
    __syncthreads();
    const float L = sL, scale = gradScale * rs[n];
    auto grad = [&](float x, int64_t j) { return scale * (__expf(x - L) - (j == t ? 1.f : 0.f)); };
    if constexpr (sizeof(T) == 4) {
      if (vec) {
        for (int64_t j = threadIdx.x * 4; j < V; j += kThreads * 4) {
          float4 v = *reinterpret_cast<const float4*>(row + j);
          v.x = grad(v.x, j), v.y = grad(v.y, j + 1), v.z = grad(v.z, j + 2), v.w = grad(v.w, j + 3);
          *reinterpret_cast<float4*>(g + j) = v;
        }
      } else {
        for (int64_t j = threadIdx.x; j < V; j += kThreads) g[j] = grad(row[j], j);
      }
    } else if (vec) {
      for (int64_t base = 0; base < V; base += kThreads * 4) {
        const int64_t j = base + threadIdx.x * 4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (j < V) v = *reinterpret_cast<const float4*>(row + j);
        __syncthreads();
        if (j < V) {
          uint2 packed;
          packed.x = pack_bf16x2(grad(v.x, j), grad(v.y, j + 1));
          packed.y = pack_bf16x2(grad(v.z, j + 2), grad(v.w, j + 3));
          *reinterpret_cast<uint2*>(g + j) = packed;  // 8-byte aligned: V % 4 = 0
        }
      }
    } else {
      for (int64_t base = 0; base < V; base += kThreads) {
        const int64_t j = base + threadIdx.x;
        const float x = j < V ? row[j] : 0.f;
        __syncthreads();
        if (j < V) g[j] = from_f<T>(grad(x, j));
      }
    }
    __syncthreads();  // sL and the shared partials are rewritten for the next row
  }
}

// The row kernel with the row read once: a cluster of kCluster blocks per row (cluster c takes
// row c), block r holding floats [r·S, r·S + S) of it in shared memory (S a multiple of 4). Each
// block loads its slice (streaming loads) while folding it into (max, Σ exp), publishes that pair,
// a cluster barrier, then every block merges the kCluster pairs in rank order (the same lse in
// each, bit for bit), rank 0 stores lse, the block holding the target stores rowLoss (rank 0 when
// the target is ≥ V), and each block writes g over its slice from shared memory. In place (bf16,
// ldg = 2V) block r's stores land on floats below (r + 1)·S/2, in slices of ranks ≤ r, all loaded
// before the barrier. A last cluster barrier keeps every block's pair alive until all have read it.
constexpr int kCluster = 8;
constexpr int kClusterThreads = 512;
constexpr int kClusterUnroll = 4;
constexpr int64_t kClusterMinV = 1024;             // below: rows are small, one block each
constexpr size_t kClusterSmemMax = size_t{200} << 10;  // a slice's bytes at most (V ≲ 409600)

int64_t cluster_slice(int64_t V) { return ((V + kCluster - 1) / kCluster + 3) / 4 * 4; }

template <typename T>
__global__ void __cluster_dims__(kCluster, 1, 1) __launch_bounds__(kClusterThreads)
    cluster_rows(const float* logits, int64_t V, int64_t S, T* gout, int64_t ldg, const int32_t* __restrict tg,
                 const float* __restrict rs, float* __restrict lse, float* __restrict loss, float gradScale) {
  extern __shared__ float4 slice4[];
  float* slice = reinterpret_cast<float*>(slice4);
  __shared__ float wm[kClusterThreads / 32], wsum[kClusterThreads / 32];
  __shared__ float part[2];
  __shared__ float sL;
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t n = blockIdx.x / kCluster;
  const float* row = logits + n * V;
  T* g = gout + n * ldg;
  const int64_t j0 = rank * S < V ? rank * S : V;
  const int64_t len = V - j0 < S ? V - j0 : S;  // 0 for a rank past the row's end
  const int64_t t = tg[n];  // the same for the whole cluster: every block skips the barriers together
  if (t < 0) {
    for (int64_t k = threadIdx.x; k < len; k += kClusterThreads) g[j0 + k] = from_f<T>(0.f);
    if (rank == 0 && threadIdx.x == 0) lse[n] = 0.f, loss[n] = 0.f;
    return;
  }
  float mt = -INFINITY, st = 0.f;
  auto add = [&](float x) {
    if (x > mt) {
      st = st * __expf(mt - x) + 1.f;
      mt = x;
    } else if (!(x == -INFINITY)) {
      st += __expf(x - mt);
    }
  };
  const bool vec = V % 4 == 0;  // then j0 and len are multiples of 4 too
  if (vec) {
    constexpr int64_t kStep = kClusterThreads * 4;
    for (int64_t k0 = threadIdx.x * 4; k0 < len; k0 += kStep * kClusterUnroll) {
      float4 v[kClusterUnroll];
#pragma unroll
      for (int u = 0; u < kClusterUnroll; ++u) {
        const int64_t k = k0 + u * kStep;
        v[u] = k < len ? __ldcs(reinterpret_cast<const float4*>(row + j0 + k)) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < kClusterUnroll; ++u) {
        const int64_t k = k0 + u * kStep;
        if (k < len) {
          *reinterpret_cast<float4*>(slice + k) = v[u];
          add(v[u].x), add(v[u].y), add(v[u].z), add(v[u].w);
        }
      }
    }
  } else {
    for (int64_t k = threadIdx.x; k < len; k += kClusterThreads) {
      const float x = row[j0 + k];
      slice[k] = x;
      add(x);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float mo = __shfl_xor_sync(0xffffffffu, mt, o), so = __shfl_xor_sync(0xffffffffu, st, o);
    merge(mt, st, mo, so);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) wm[warp] = mt, wsum[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    float M = wm[0], Sm = wsum[0];
    for (int w = 1; w < kClusterThreads / 32; ++w) merge(M, Sm, wm[w], wsum[w]);
    part[0] = M, part[1] = Sm;
  }
  cluster.sync();  // every slice loaded, every pair published
  if (threadIdx.x == 0) {
    float M = -INFINITY, Sm = 0.f;
    for (int r = 0; r < kCluster; ++r) {
      const float* p = cluster.map_shared_rank(part, r);
      merge(M, Sm, p[0], p[1]);
    }
    const float L = M + logf(Sm);
    sL = L;
    if (rank == 0) lse[n] = L;
    const int owner = t < V ? static_cast<int>(t / S) : 0;
    if (rank == owner) loss[n] = rs[n] * (L - (t < V ? slice[t - j0] : 0.f));
  }
  __syncthreads();
  const float L = sL, scale = gradScale * rs[n];
  auto grad = [&](float x, int64_t j) { return scale * (__expf(x - L) - (j == t ? 1.f : 0.f)); };
  if (vec) {
    for (int64_t k = threadIdx.x * 4; k < len; k += kClusterThreads * 4) {
      const float4 v = *reinterpret_cast<const float4*>(slice + k);
      const int64_t j = j0 + k;
      if constexpr (sizeof(T) == 4) {
        *reinterpret_cast<float4*>(g + j) = make_float4(grad(v.x, j), grad(v.y, j + 1), grad(v.z, j + 2), grad(v.w, j + 3));
      } else {
        uint2 packed;
        packed.x = pack_bf16x2(grad(v.x, j), grad(v.y, j + 1));
        packed.y = pack_bf16x2(grad(v.z, j + 2), grad(v.w, j + 3));
        *reinterpret_cast<uint2*>(g + j) = packed;  // 8-byte aligned: V % 4 = 0 and j % 4 = 0
      }
    }
  } else {
    for (int64_t k = threadIdx.x; k < len; k += kClusterThreads) g[j0 + k] = from_f<T>(grad(slice[k], j0 + k));
  }
  cluster.sync();  // no block leaves (freeing its `part`) while another may still read it
}

// Whether cluster_rows<T> with `smem` bytes of slice can run on `device` (at least one cluster
// resident), asked once per device, dtype and size; raises the kernel's shared memory limit.
template <typename T>
bool cluster_rows_fit(int device, size_t smem) {
  static std::mutex mu;
  static std::map<std::pair<int, size_t>, bool> known;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(device, smem);
  auto it = known.find(key);
  if (it != known.end()) return it->second;
  bool ok = false;
  if (cudaFuncSetAttribute(cluster_rows<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) ==
      cudaSuccess) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(kCluster);
    cfg.blockDim = dim3(kClusterThreads);
    cfg.dynamicSmemBytes = smem;
    int clusters = 0;
    ok = cudaOccupancyMaxActiveClusters(&clusters, cluster_rows<T>, &cfg) == cudaSuccess && clusters > 0;
  }
  if (!ok) cudaGetLastError();  // a refusal is an answer, not an error to leave behind
  known.emplace(key, ok);
  return ok;
}

// The row kernel over R rows of logits [R, V], g to gout + n·ldg.
template <typename T>
void launch_rows(float* logits, int64_t R, int64_t V, T* gout, int64_t ldg, const int32_t* tg, const float* rs,
                 float* lse, float* loss, float gradScale, int device, cudaStream_t s) {
  const int64_t S = cluster_slice(V);
  const size_t smem = static_cast<size_t>(S) * 4;
  if (V >= kClusterMinV && smem <= kClusterSmemMax && R <= (int64_t{1} << 27) && !env_is("MAGIX_CE_ROWS", "twopass") &&
      cluster_rows_fit<T>(device, smem)) {
    cluster_rows<T><<<static_cast<unsigned>(R * kCluster), kClusterThreads, smem, s>>>(logits, V, S, gout, ldg, tg, rs,
                                                                                       lse, loss, gradScale);
  } else {
    fused_rows<T><<<row_blocks(R), kThreads, 0, s>>>(logits, R, V, gout, ldg, tg, rs, lse, loss, gradScale);
  }
  CUDA_CHECK_LAUNCH();
}

// Op scratch of `bytes` for the whole-g way, or nullptr when the allocator cannot give it (then
// the chunked way runs; a size that failed on a device is not asked for again, so a step does not
// empty the allocator's cache each time).
void* try_scratch(CudaBackend& b, int device, size_t bytes) {
  static std::atomic<size_t> failed[64];
  if (device < 64) {
    const size_t f = failed[device].load();
    if (f != 0 && bytes >= f) return nullptr;
  }
  try {
    return b.scratch(device, bytes);
  } catch (const MagixError& e) {
    if (e.code != "OUT_OF_MEMORY") throw;
    if (device < 64) failed[device].store(bytes);
    return nullptr;
  }
}

void ce_fused(OpCtx& c) {
  const int64_t N = c.i(1), D = c.i(2), V = c.i(3), chunkRows = c.i(4);
  check(N >= 0 && D >= 0 && V >= 0 && chunkRows >= 0, c.name + ": sizes must be non-negative");
  check(N <= 0x7fffffff, c.name + ": too many rows");
  const float gradScale = static_cast<float>(c.f(5));
  const bool accumulate = c.i(6) != 0;
  cudaStream_t s = op_stream(c);
  const int dev = op_device(c);
  const DType dt = compute_dtype(c);
  MAGIX_CUDA_DISPATCH(c, dt, {
    constexpr bool kBf16 = sizeof(T) == 2;
    const T* h = c.need(0, mul(N, D), sizeof(T)).as<T>();
    const T* W = c.need(1, mul(V, D), sizeof(T)).as<T>();
    const int32_t* tg = c.need(2, N, 4).as<int32_t>();
    const float* rs = c.need(3, N, 4).as<float>();
    float* lse = c.need(4, N, 4).as<float>();
    float* loss = c.need(5, N, 4).as<float>();
    T* dh = c.need(6, mul(N, D), sizeof(T)).as<T>();
    float* dW = c.need(7, mul(V, D), 4).as<float>();  // a weight gradient: float32
    if (N == 0) {
      if (V * D > 0) CUDA_CHECK(cudaMemsetAsync(dW, 0, mul(V, D, 4), s));
      return;
    }
    if (V == 0) {
      CUDA_CHECK(cudaMemsetAsync(lse, 0, mul(N, 4), s));
      CUDA_CHECK(cudaMemsetAsync(loss, 0, mul(N, 4), s));
      if (!accumulate && D > 0) CUDA_CHECK(cudaMemsetAsync(dh, 0, mul(N, D, sizeof(T)), s));
      return;
    }
    // logits = h_chunk·Wᵀ (float32) into `logits`
    auto logits_of = [&](int64_t n0, int64_t nr, float* logits) {
      GemmArgs l;
      l.M = nr;
      l.N = V;
      l.K = D;
      l.transB = true;
      l.A = h + n0 * D;
      l.lda = std::max<int64_t>(D, 1);
      l.B = W;
      l.ldb = std::max<int64_t>(D, 1);
      l.C = logits;
      l.ldc = V;
      l.ab = dt;
      l.c = DType::F32;
      gemm(cuda_backend(c), dev, l);
    };
    // dh[n0, n0 + nr) (+)= g·W, C in the compute dtype (rounded once)
    auto dh_of = [&](int64_t n0, int64_t nr, const T* g, int64_t ldg) {
      GemmArgs a;
      a.M = nr;
      a.N = D;
      a.K = V;
      a.A = g;
      a.lda = ldg;
      a.B = W;
      a.ldb = D;
      a.C = dh + n0 * D;
      a.ldc = D;
      a.ab = dt;
      a.c = dt;
      a.beta = accumulate ? 1.f : 0.f;
      gemm(cuda_backend(c), dev, a);
    };
    // dW (+)= gᵀ·h[n0, n0 + nr), float32
    auto dW_of = [&](int64_t n0, int64_t nr, const T* g, int64_t ldg, float beta) {
      GemmArgs w;
      w.M = V;
      w.N = D;
      w.K = nr;
      w.transA = true;
      w.A = g;
      w.lda = ldg;
      w.B = h + n0 * D;
      w.ldb = D;
      w.C = dW;
      w.ldc = D;
      w.ab = dt;
      w.c = DType::F32;
      w.beta = beta;
      gemm(cuda_backend(c), dev, w);
    };
    // The whole-g way.
    if (D > 0 && !env_is("MAGIX_CE_FUSED", "chunked") && mul(N, V, sizeof(T)) <= kFullGBudget) {
      const int64_t R = fused_rows_per_chunk(N, V, chunkRows);
      ScratchLayout lay;
      const size_t oLogits = lay.add(mul(R, V, 4));
      const size_t oG = lay.add(mul(N, V, sizeof(T)));
      if (char* ws = static_cast<char*>(try_scratch(cuda_backend(c), dev, lay.total))) {
        float* logits = reinterpret_cast<float*>(ws + oLogits);
        T* g = reinterpret_cast<T*>(ws + oG);
        for (int64_t n0 = 0; n0 < N; n0 += R) {
          const int64_t nr = std::min(R, N - n0);
          logits_of(n0, nr, logits);
          launch_rows<T>(logits, nr, V, g + n0 * V, V, tg + n0, rs + n0, lse + n0, loss + n0, gradScale, dev, s);
        }
        dh_of(0, N, g, V);
        dW_of(0, N, g, V, 0.f);
        return;
      }
    }
    // The chunked way: g in place of each chunk's logits.
    const int64_t R = fused_rows_per_chunk(N, V, chunkRows);
    float* logits = static_cast<float*>(cuda_backend(c).scratch(dev, mul(R, V, 4)));
    T* g = reinterpret_cast<T*>(logits);
    const int64_t ldg = kBf16 ? 2 * V : V;  // bf16 g sits in the first half of each float32 row
    for (int64_t n0 = 0; n0 < N; n0 += R) {
      const int64_t nr = std::min(R, N - n0);
      logits_of(n0, nr, logits);
      launch_rows<T>(logits, nr, V, g, ldg, tg + n0, rs + n0, lse + n0, loss + n0, gradScale, dev, s);
      if (D == 0) continue;  // dh and dW are empty
      dh_of(n0, nr, g, ldg);
      dW_of(n0, nr, g, ldg, n0 == 0 ? 0.f : 1.f);
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
MAGIX_REGISTER_OP("cuda", "ce_fused", ce_fused);
MAGIX_REGISTER_OP("cuda", "ce_rescale", ce_rescale);
MAGIX_REGISTER_OP("cuda", "ce_lse", ce_lse);
MAGIX_REGISTER_OP("cuda", "ce_rowloss", ce_rowloss);

}  // namespace
}  // namespace magix::cuda
