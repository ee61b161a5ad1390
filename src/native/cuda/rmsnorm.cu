// RMSNorm over rows of D with g = w + offset (offset 1: Gemma's 1 + w):
//   rmsnorm_fwd(x, w, y, rstd; dtype, N, D, eps, offset): rstd = 1/√(mean(x²) + eps), y = x·rstd·g
//   rmsnorm_bwd(dy, x, w, rstd, dx, dw; dtype, N, D, offset, accumulateDw):
//     x̂ = x·rstd, dx = rstd·(g·dy − x̂·mean(g·dy·x̂)), dw (+)= Σ_n dy·x̂
// Under bfloat16 compute rstd and dw are float32. dx is one block per row; dw is a second pass
// over column tiles with float32 atomics between row splits.
#include "common.cuh"

namespace magix::cuda {
namespace {

template <typename T>
__global__ void fwd_kernel(const T* x, const T* w, T* y, float* rstd, int64_t D, float eps, float offset) {
  __shared__ float red[32];
  const int64_t n = blockIdx.x;
  const T* xr = x + n * D;
  float ss = 0;
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
__global__ void dx_kernel(const T* dy, const T* x, const T* w, const float* rstd, T* dx, int64_t D, float offset) {
  __shared__ float red[32];
  const int64_t n = blockIdx.x;
  const float r = rstd[n];
  float dot = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    dot += to_f(dy[n * D + d]) * (to_f(w[d]) + offset) * to_f(x[n * D + d]) * r;
  const float mean = block_sum(dot, red) / static_cast<float>(D);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float xh = to_f(x[n * D + d]) * r;
    dx[n * D + d] = from_f<T>(r * (to_f(dy[n * D + d]) * (to_f(w[d]) + offset) - xh * mean));
  }
}

// Column d of dw over rows [n0, n1) for a split of the rows; splits meet in float32 atomics.
template <typename T>
__global__ void dw_kernel(const T* dy, const T* x, const float* rstd, float* dw, int64_t N, int64_t D, int64_t rowsPerSplit) {
  const int64_t d = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (d >= D) return;
  const int64_t n0 = blockIdx.y * rowsPerSplit, n1 = min(N, n0 + rowsPerSplit);
  float acc = 0;
  for (int64_t n = n0; n < n1; ++n) acc += to_f(dy[n * D + d]) * to_f(x[n * D + d]) * rstd[n];
  atomicAdd(&dw[d], acc);
}

unsigned threads_for(size_t D) { return D >= 1024 ? 1024 : D >= 256 ? 256 : 128; }

void rmsnorm_fwd(OpCtx& c) {
  const size_t N = c.n(1), D = c.n(2);
  const float eps = static_cast<float>(c.f(3)), offset = static_cast<float>(c.f(4));
  check(D > 0, "rmsnorm_fwd: D must be positive");
  cudaStream_t s = op_stream(c);
  const DType dt = to_dtype(c.f(0));
  check(dt == DType::BF16 || dt == DType::F32, "rmsnorm_fwd: float32 or bfloat16");
  MAGIX_CUDA_DISPATCH(c, dt, {
    const T* x = c.need(0, mul(N, D), sizeof(T)).as<T>();
    const T* w = c.need(1, D, sizeof(T)).as<T>();
    T* y = c.need(2, mul(N, D), sizeof(T)).as<T>();
    float* rstd = c.need(3, N, 4).as<float>();
    if (N == 0) return;
    fwd_kernel<T><<<static_cast<unsigned>(N), threads_for(D), 0, s>>>(x, w, y, rstd, D, eps, offset);
    CUDA_CHECK_LAUNCH();
  });
}

void rmsnorm_bwd(OpCtx& c) {
  const size_t N = c.n(1), D = c.n(2);
  const float offset = static_cast<float>(c.f(3));
  const bool accumulate = c.i(4) != 0;
  check(D > 0, "rmsnorm_bwd: D must be positive");
  cudaStream_t s = op_stream(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* dy = c.need(0, mul(N, D), sizeof(T)).as<T>();
    const T* x = c.need(1, mul(N, D), sizeof(T)).as<T>();
    const T* w = c.need(2, D, sizeof(T)).as<T>();
    const float* rstd = c.need(3, N, 4).as<float>();
    T* dx = c.need(4, mul(N, D), sizeof(T)).as<T>();
    float* dw = c.need(5, D, 4).as<float>();
    if (!accumulate) CUDA_CHECK(cudaMemsetAsync(dw, 0, D * 4, s));
    if (N == 0) return;
    dx_kernel<T><<<static_cast<unsigned>(N), threads_for(D), 0, s>>>(dy, x, w, rstd, dx, D, offset);
    CUDA_CHECK_LAUNCH();
    const int64_t splits = std::min<int64_t>(static_cast<int64_t>(N), 256);
    const int64_t rows = (static_cast<int64_t>(N) + splits - 1) / splits;
    dim3 grid(static_cast<unsigned>((D + 255) / 256), static_cast<unsigned>((N + rows - 1) / rows));
    dw_kernel<T><<<grid, 256, 0, s>>>(dy, x, rstd, dw, N, D, rows);
    CUDA_CHECK_LAUNCH();
  });
}

MAGIX_REGISTER_OP("cuda", "rmsnorm_fwd", rmsnorm_fwd);
MAGIX_REGISTER_OP("cuda", "rmsnorm_bwd", rmsnorm_bwd);

}  // namespace
}  // namespace magix::cuda
