// Cross-entropy fused with the output projection (src/native/OPS.md): the logits of a chunk of
// vocabulary rows are made by cuBLASLt into float32 scratch and folded into running row
// statistics, so the [N, V] logits never exist. The chunk is sized so its logits fit 64 MiB.
//   ce_fwd(h, W, targets, m, s, z), ce_rescale(m, mGlobal, s), ce_lse(m, s, lse),
//   ce_rowloss(lse, z, targets, rowScale, out), ce_bwd(h, W, targets, lse, rowScale, dh, dW)
// Statistics, rowScale and dW are float32; h, W and dh are the compute dtype.
#include "blas.h"
#include "common.cuh"

namespace magix::cuda {
namespace {

constexpr size_t kChunkBytes = 64u << 20;

int64_t chunk_rows(int64_t N, int64_t V) {
  const int64_t c = static_cast<int64_t>(kChunkBytes / 4 / std::max<int64_t>(N, 1));
  return std::max<int64_t>(64, std::min<int64_t>(V, c / 64 * 64));
}

__global__ void init_stats(float* m, float* s, float* z, int64_t N) {
  for (int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; n < N; n += (int64_t)gridDim.x * blockDim.x) {
    m[n] = -INFINITY;
    s[n] = 0.f;
    z[n] = 0.f;
  }
}

// One block per row: fold a chunk of logits into (m, s) and pick the target's logit.
__global__ void fold_chunk(const float* logits, int64_t nv, const int32_t* tg, int64_t start, int64_t v0, float* m, float* s,
                           float* z) {
  __shared__ float red[32];
  const int64_t n = blockIdx.x;
  const float* row = logits + n * nv;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) mx = fmaxf(mx, row[j]);
  mx = block_max(mx, red);
  const float mnew = fmaxf(m[n], mx);
  float acc = 0;
  for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) acc += __expf(row[j] - mnew);
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) {
    s[n] = s[n] * __expf(m[n] - mnew) + acc;
    m[n] = mnew;
    const int64_t t = static_cast<int64_t>(tg[n]) - start - v0;
    if (t >= 0 && t < nv) z[n] = row[t];
  }
}

__global__ void finish_stats(const int32_t* tg, float* m, float* s, float* z, int64_t N) {
  for (int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; n < N; n += (int64_t)gridDim.x * blockDim.x)
    if (tg[n] < 0) {
      m[n] = 0.f;
      s[n] = 1.f;
      z[n] = 0.f;
    }
}

template <typename T>
__global__ void grad_chunk(const float* logits, T* g, int64_t nv, const int32_t* tg, const float* lse, const float* rs,
                           int64_t start, int64_t v0, float gradScale, int64_t N) {
  const int64_t total = N * nv;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / nv, j = i % nv;
    float v = 0.f;
    if (tg[n] >= 0) {
      const float p = __expf(logits[i] - lse[n]);
      const int64_t t = static_cast<int64_t>(tg[n]) - start - v0;
      v = gradScale * rs[n] * (p - (j == t ? 1.f : 0.f));
    }
    g[i] = from_f<T>(v);
  }
}

struct Dims {
  int64_t N, D, V, start;
};
Dims dims(OpCtx& c) {
  Dims d{c.i(1), c.i(2), c.i(3), c.i(4)};
  check(d.N >= 0 && d.D > 0 && d.V >= 0, c.name + ": bad sizes");
  return d;
}

void ce_fwd(OpCtx& c) {
  const Dims d = dims(c);
  cudaStream_t s = op_stream(c);
  const int dev = c.buf(0).device;
  const DType dt = to_dtype(c.f(0));
  MAGIX_CUDA_DISPATCH(c, dt, {
    const T* h = c.need(0, mul(d.N, d.D), sizeof(T)).as<T>();
    const T* W = c.need(1, mul(d.V, d.D), sizeof(T)).as<T>();
    const int32_t* tg = c.need(2, d.N, 4).as<int32_t>();
    float* m = c.need(3, d.N, 4).as<float>();
    float* sm = c.need(4, d.N, 4).as<float>();
    float* z = c.need(5, d.N, 4).as<float>();
    if (d.N == 0) return;
    init_stats<<<grid_for(d.N), 256, 0, s>>>(m, sm, z, d.N);
    CUDA_CHECK_LAUNCH();
    const int64_t chunk = chunk_rows(d.N, d.V);
    float* logits = static_cast<float*>(cuda_backend(c).workspace(dev, mul(d.N, chunk, 4)));
    for (int64_t v0 = 0; v0 < d.V; v0 += chunk) {
      const int64_t nv = std::min(chunk, d.V - v0);
      GemmArgs g;
      g.M = d.N;
      g.N = nv;
      g.K = d.D;
      g.transB = true;
      g.A = h;
      g.lda = d.D;
      g.B = W + v0 * d.D;
      g.ldb = d.D;
      g.C = logits;
      g.ldc = nv;
      g.ab = dt;
      g.c = DType::F32;
      gemm(cuda_backend(c), dev, g);
      fold_chunk<<<static_cast<unsigned>(d.N), 256, 0, s>>>(logits, nv, tg, d.start, v0, m, sm, z);
      CUDA_CHECK_LAUNCH();
    }
    finish_stats<<<grid_for(d.N), 256, 0, s>>>(tg, m, sm, z, d.N);
    CUDA_CHECK_LAUNCH();
  });
}

void ce_bwd(OpCtx& c) {
  const Dims d = dims(c);
  const float gradScale = static_cast<float>(c.f(6));
  const bool accumulate = c.i(7) != 0;
  cudaStream_t s = op_stream(c);
  const int dev = c.buf(0).device;
  const DType dt = to_dtype(c.f(0));
  MAGIX_CUDA_DISPATCH(c, dt, {
    const T* h = c.need(0, mul(d.N, d.D), sizeof(T)).as<T>();
    const T* W = c.need(1, mul(d.V, d.D), sizeof(T)).as<T>();
    const int32_t* tg = c.need(2, d.N, 4).as<int32_t>();
    const float* lse = c.need(3, d.N, 4).as<float>();
    const float* rs = c.need(4, d.N, 4).as<float>();
    T* dh = c.need(5, mul(d.N, d.D), sizeof(T)).as<T>();
    float* dW = c.need(6, mul(d.V, d.D), 4).as<float>();
    if (d.N == 0) {
      CUDA_CHECK(cudaMemsetAsync(dW, 0, mul(d.V, d.D, 4), s));
      return;
    }
    const int64_t chunk = chunk_rows(d.N, d.V);
    char* ws = static_cast<char*>(cuda_backend(c).workspace(dev, mul(d.N, chunk, 4) + mul(d.N, chunk, sizeof(T))));
    float* logits = reinterpret_cast<float*>(ws);
    T* g = reinterpret_cast<T*>(ws + mul(d.N, chunk, 4));
    if (d.V == 0 && !accumulate) CUDA_CHECK(cudaMemsetAsync(dh, 0, mul(d.N, d.D, sizeof(T)), s));
    for (int64_t v0 = 0; v0 < d.V; v0 += chunk) {
      const int64_t nv = std::min(chunk, d.V - v0);
      GemmArgs l;
      l.M = d.N;
      l.N = nv;
      l.K = d.D;
      l.transB = true;
      l.A = h;
      l.lda = d.D;
      l.B = W + v0 * d.D;
      l.ldb = d.D;
      l.C = logits;
      l.ldc = nv;
      l.ab = dt;
      l.c = DType::F32;
      gemm(cuda_backend(c), dev, l);
      grad_chunk<T><<<grid_for(d.N * nv), 256, 0, s>>>(logits, g, nv, tg, lse, rs, d.start, v0, gradScale, d.N);
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
      a.C = dh;
      a.ldc = d.D;
      a.beta = (v0 == 0 && !accumulate) ? 0.f : 1.f;
      a.ab = dt;
      a.c = dt;
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

void ce_rescale(OpCtx& c) {
  const size_t N = c.n(1);
  cudaStream_t s = op_stream(c);
  const float* m = c.need(0, N, 4).as<float>();
  const float* mg = c.need(1, N, 4).as<float>();
  float* sm = c.need(2, N, 4).as<float>();
  if (N) rescale_kernel<<<grid_for(N), 256, 0, s>>>(m, mg, sm, N);
  CUDA_CHECK_LAUNCH();
}
void ce_lse(OpCtx& c) {
  const size_t N = c.n(1);
  cudaStream_t s = op_stream(c);
  const float* m = c.need(0, N, 4).as<float>();
  const float* sm = c.need(1, N, 4).as<float>();
  float* lse = c.need(2, N, 4).as<float>();
  if (N) lse_kernel<<<grid_for(N), 256, 0, s>>>(m, sm, lse, N);
  CUDA_CHECK_LAUNCH();
}
void ce_rowloss(OpCtx& c) {
  const size_t N = c.n(1);
  cudaStream_t s = op_stream(c);
  const float* lse = c.need(0, N, 4).as<float>();
  const float* z = c.need(1, N, 4).as<float>();
  const int32_t* tg = c.need(2, N, 4).as<int32_t>();
  const float* rs = c.need(3, N, 4).as<float>();
  float* out = c.need(4, N, 4).as<float>();
  if (N) rowloss_kernel<<<grid_for(N), 256, 0, s>>>(lse, z, tg, rs, out, N);
  CUDA_CHECK_LAUNCH();
}

MAGIX_REGISTER_OP("cuda", "ce_fwd", ce_fwd);
MAGIX_REGISTER_OP("cuda", "ce_bwd", ce_bwd);
MAGIX_REGISTER_OP("cuda", "ce_rescale", ce_rescale);
MAGIX_REGISTER_OP("cuda", "ce_lse", ce_lse);
MAGIX_REGISTER_OP("cuda", "ce_rowloss", ce_rowloss);

}  // namespace
}  // namespace magix::cuda
