// RMSNorm over rows of D (src/native/OPS.md), with g = w + offset (offset 0: Llama, 1: Gemma's 1 + w):
//   rmsnorm_fwd(x, w, y, rstd; dtype, N, D, eps, offset):
//     rstd = 1/√(mean(x²) + eps), y = (x·rstd)·g
//   rmsnorm_bwd(dy, x, w, rstd, dx, dw; dtype, N, D, offset, accumulateDw[, accumulateDx]):
//     x̂ = x·rstd, dx (+)= rstd·(g·dy − x̂·mean(g·dy·x̂)), dw (+)= Σ_n dy·x̂
// x, w, y, dy, dx are the compute dtype; rstd and dw are float32 (stats and a weight gradient).
// Arithmetic in float32. One block per row; a thread keeps its columns of the row in registers
// (16-byte packs), so x is read once. The backward pass also accumulates each block's share of
// dw in registers over a fixed set of rows, writes it to scratch, and a second kernel sums the
// shares in a fixed order: dw has the same bits on every run (no atomics). Accumulating dx (a
// residual stream's cotangent, saving autodiff a separate add) reads each element once, adds in
// float32 and rounds once: the thread that writes an element is the only one that reads it.
#include "common.cuh"

namespace magix::cuda {
namespace {

// ---- the vector path: D a multiple of the pack, at most 256·MAXP packs ----

template <typename T, int MAXP>
__global__ void fwd_vec(const T* __restrict x, const T* __restrict w, T* __restrict y, float* __restrict rstd, int64_t D,
                        float eps, float offset) {
  constexpr int P = Pack<T>::N;
  __shared__ float red[32];
  const int64_t n = blockIdx.x;
  const int packs = static_cast<int>(D / P);
  const T* xr = x + n * D;
  float xv[MAXP][P];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < MAXP; ++k) {
    const int idx = k * blockDim.x + threadIdx.x;
    if (idx < packs) {
      load_pack(xr + idx * P, xv[k]);
#pragma unroll
      for (int j = 0; j < P; ++j) ss += xv[k][j] * xv[k][j];
    }
  }
  ss = block_sum(ss, red);
  const float r = rsqrtf(ss / static_cast<float>(D) + eps);
  if (threadIdx.x == 0) rstd[n] = r;
#pragma unroll
  for (int k = 0; k < MAXP; ++k) {
    const int idx = k * blockDim.x + threadIdx.x;
    if (idx < packs) {
      float wv[P], out[P];
      load_pack(w + idx * P, wv);
#pragma unroll
      for (int j = 0; j < P; ++j) out[j] = (xv[k][j] * r) * (wv[j] + offset);
      store_pack(y + n * D + idx * P, out);
    }
  }
}

// Block b takes rows b, b + G, ... (G = gridDim.x) and writes its dw share to partial[b][D].
template <typename T, int MAXP>
__global__ void bwd_vec(const T* __restrict dy, const T* __restrict x, const T* __restrict w,
                        const float* __restrict rstd, T* __restrict dx, float* __restrict partial, int64_t N, int64_t D,
                        float offset, bool accumulateDx) {
  constexpr int P = Pack<T>::N;
  __shared__ float red[32];
  const int packs = static_cast<int>(D / P);
  const float invD = 1.f / static_cast<float>(D);
  float g[MAXP][P], dw[MAXP][P];
#pragma unroll
  for (int k = 0; k < MAXP; ++k) {
    const int idx = k * blockDim.x + threadIdx.x;
#pragma unroll
    for (int j = 0; j < P; ++j) dw[k][j] = 0.f, g[k][j] = 0.f;
    if (idx < packs) {
      load_pack(w + idx * P, g[k]);
#pragma unroll
      for (int j = 0; j < P; ++j) g[k][j] += offset;
    }
  }
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const float r = rstd[n];
    float dyv[MAXP][P], xh[MAXP][P];
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < MAXP; ++k) {
      const int idx = k * blockDim.x + threadIdx.x;
      if (idx < packs) {
        load_pack(dy + n * D + idx * P, dyv[k]);
        load_pack(x + n * D + idx * P, xh[k]);
#pragma unroll
        for (int j = 0; j < P; ++j) {
          xh[k][j] *= r;
          dot += dyv[k][j] * g[k][j] * xh[k][j];
        }
      }
    }
    const float mean = block_sum(dot, red) * invD;
#pragma unroll
    for (int k = 0; k < MAXP; ++k) {
      const int idx = k * blockDim.x + threadIdx.x;
      if (idx < packs) {
        float out[P], prev[P];
        if (accumulateDx) load_pack(dx + n * D + idx * P, prev);
#pragma unroll
        for (int j = 0; j < P; ++j) {
          out[j] = r * (dyv[k][j] * g[k][j] - xh[k][j] * mean);
          if (accumulateDx) out[j] += prev[j];
          dw[k][j] += dyv[k][j] * xh[k][j];
        }
        store_pack(dx + n * D + idx * P, out);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < MAXP; ++k) {
    const int idx = k * blockDim.x + threadIdx.x;
    if (idx < packs) {
      float* dst = partial + blockIdx.x * D + idx * P;
#pragma unroll
      for (int j = 0; j < P; ++j) dst[j] = dw[k][j];
    }
  }
}

// ---- the scalar path: any D ----

template <typename T>
__global__ void fwd_scalar(const T* x, const T* w, T* y, float* rstd, int64_t D, float eps, float offset) {
  __shared__ float red[32];
  const int64_t n = blockIdx.x;
  const T* xr = x + n * D;
  float ss = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float v = to_f(xr[d]);
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const float r = rsqrtf(ss / static_cast<float>(D) + eps);
  if (threadIdx.x == 0) rstd[n] = r;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) y[n * D + d] = from_f<T>((to_f(xr[d]) * r) * (to_f(w[d]) + offset));
}

template <typename T>
__global__ void dx_scalar(const T* dy, const T* x, const T* w, const float* rstd, T* dx, int64_t D, float offset,
                          bool accumulateDx) {
  __shared__ float red[32];
  const int64_t n = blockIdx.x;
  const float r = rstd[n];
  float dot = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    dot += to_f(dy[n * D + d]) * (to_f(w[d]) + offset) * (to_f(x[n * D + d]) * r);
  const float mean = block_sum(dot, red) / static_cast<float>(D);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float xh = to_f(x[n * D + d]) * r;
    const float v = r * (to_f(dy[n * D + d]) * (to_f(w[d]) + offset) - xh * mean);
    dx[n * D + d] = from_f<T>(accumulateDx ? to_f(dx[n * D + d]) + v : v);
  }
}

// partial[split][d] = Σ over rows split, split + G, ... of dy·x̂ (grid: column tiles × G splits).
template <typename T>
__global__ void dw_scalar(const T* dy, const T* x, const float* rstd, float* partial, int64_t N, int64_t D) {
  const int64_t d = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (d >= D) return;
  float acc = 0.f;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) acc += to_f(dy[n * D + d]) * (to_f(x[n * D + d]) * rstd[n]);
  partial[blockIdx.y * D + d] = acc;
}

// dw[d] (+)= Σ_{b < G} partial[b][d], in order.
__global__ void dw_reduce(const float* partial, float* dw, int64_t G, int64_t D, bool accumulate) {
  for (int64_t d = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; d < D; d += (int64_t)gridDim.x * blockDim.x) {
    float acc = 0.f;
    for (int64_t b = 0; b < G; ++b) acc += partial[b * D + d];
    dw[d] = accumulate ? dw[d] + acc : acc;
  }
}

// Packs per thread for the vector path (1, 2 or 4), or 0 when the scalar path must run.
template <typename T>
int vec_packs(size_t D, bool aligned, unsigned& threads) {
  constexpr size_t P = Pack<T>::N;
  if (!aligned || D % P != 0) return 0;
  const size_t packs = D / P;
  threads = static_cast<unsigned>(std::min<size_t>(256, (packs + 31) / 32 * 32));
  const size_t per = (packs + threads - 1) / threads;
  return per <= 1 ? 1 : per <= 2 ? 2 : per <= 4 ? 4 : 0;
}

unsigned scalar_threads(size_t D) { return D >= 1024 ? 512 : D >= 256 ? 256 : 128; }

void rmsnorm_fwd(OpCtx& c) {
  const size_t N = c.n(1), D = c.n(2);
  const float eps = static_cast<float>(c.f(3)), offset = static_cast<float>(c.f(4));
  check(D > 0, "rmsnorm_fwd: D must be positive");
  cudaStream_t s = op_stream(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* x = c.need(0, mul(N, D), sizeof(T)).as<T>();
    const T* w = c.need(1, D, sizeof(T)).as<T>();
    T* y = c.need(2, mul(N, D), sizeof(T)).as<T>();
    float* rstd = c.need(3, N, 4).as<float>();  // stats: float32
    if (N == 0) return;
    check(N <= 0x7fffffff, "rmsnorm_fwd: too many rows");
    unsigned threads = 0;
    const int per = vec_packs<T>(D, aligned16(x, w, y), threads);
    const unsigned grid = static_cast<unsigned>(N);
    if (per == 1) fwd_vec<T, 1><<<grid, threads, 0, s>>>(x, w, y, rstd, D, eps, offset);
    else if (per == 2) fwd_vec<T, 2><<<grid, threads, 0, s>>>(x, w, y, rstd, D, eps, offset);
    else if (per == 4) fwd_vec<T, 4><<<grid, threads, 0, s>>>(x, w, y, rstd, D, eps, offset);
    else fwd_scalar<T><<<grid, scalar_threads(D), 0, s>>>(x, w, y, rstd, D, eps, offset);
    CUDA_CHECK_LAUNCH();
  });
}

void rmsnorm_bwd(OpCtx& c) {
  const size_t N = c.n(1), D = c.n(2);
  const float offset = static_cast<float>(c.f(3));
  const bool accumulate = c.i(4) != 0;
  const bool accumulateDx = c.nargs > 5 && c.i(5) != 0;
  check(D > 0, "rmsnorm_bwd: D must be positive");
  cudaStream_t s = op_stream(c);
  const int dev = op_device(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* dy = c.need(0, mul(N, D), sizeof(T)).as<T>();
    const T* x = c.need(1, mul(N, D), sizeof(T)).as<T>();
    const T* w = c.need(2, D, sizeof(T)).as<T>();
    const float* rstd = c.need(3, N, 4).as<float>();
    T* dx = c.need(4, mul(N, D), sizeof(T)).as<T>();
    float* dw = c.need(5, D, 4).as<float>();  // a weight gradient: float32
    check(!accumulateDx || (dx != dy && dx != x), "rmsnorm_bwd: an accumulated dx must not alias dy or x");
    if (N == 0) {
      if (!accumulate) CUDA_CHECK(cudaMemsetAsync(dw, 0, D * 4, s));
      return;
    }
    check(N <= 0x7fffffff, "rmsnorm_bwd: too many rows");
    const int64_t G = static_cast<int64_t>(std::min<size_t>(N, 4 * static_cast<size_t>(cuda_backend(c).multiprocessors(dev))));
    float* partial = static_cast<float*>(cuda_backend(c).scratch(dev, mul(G, D, 4)));
    unsigned threads = 0;
    const int per = vec_packs<T>(D, aligned16(dy, x, w, dx), threads);
    const unsigned grid = static_cast<unsigned>(G);
    const int64_t n64 = static_cast<int64_t>(N), d64 = static_cast<int64_t>(D);
    if (per == 1) bwd_vec<T, 1><<<grid, threads, 0, s>>>(dy, x, w, rstd, dx, partial, n64, d64, offset, accumulateDx);
    else if (per == 2) bwd_vec<T, 2><<<grid, threads, 0, s>>>(dy, x, w, rstd, dx, partial, n64, d64, offset, accumulateDx);
    else if (per == 4) bwd_vec<T, 4><<<grid, threads, 0, s>>>(dy, x, w, rstd, dx, partial, n64, d64, offset, accumulateDx);
    else {
      dx_scalar<T><<<static_cast<unsigned>(N), scalar_threads(D), 0, s>>>(dy, x, w, rstd, dx, d64, offset, accumulateDx);
      CUDA_CHECK_LAUNCH();
      dw_scalar<T><<<dim3(static_cast<unsigned>((D + 255) / 256), grid), 256, 0, s>>>(dy, x, rstd, partial, n64, d64);
    }
    CUDA_CHECK_LAUNCH();
    dw_reduce<<<grid_for(D, 256, 1024), 256, 0, s>>>(partial, dw, G, d64, accumulate);
    CUDA_CHECK_LAUNCH();
  });
}

MAGIX_REGISTER_OP("cuda", "rmsnorm_fwd", rmsnorm_fwd);
MAGIX_REGISTER_OP("cuda", "rmsnorm_bwd", rmsnorm_bwd);

}  // namespace
}  // namespace magix::cuda
