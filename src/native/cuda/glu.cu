// Gated MLP (activation 0: SiLU, 1: tanh-GELU), arithmetic in float32:
//   glu_fwd(g, u, h; dtype, n, act): h = act(g)·u
//   glu_bwd(g, u, dh, dg, du; dtype, n, act): dg = dh·u·act'(g), du = dh·act(g)
#include "common.cuh"

namespace magix::cuda {
namespace {

__device__ __forceinline__ void activation(float x, int act, float& v, float& d) {
  if (act == 0) {
    const float s = 1.f / (1.f + __expf(-x));
    v = x * s;
    d = s * (1.f + x * (1.f - s));
  } else {
    const float k = 0.7978845608028654f;
    const float inner = k * (x + 0.044715f * x * x * x);
    const float t = tanhf(inner);
    v = 0.5f * x * (1.f + t);
    d = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * x * x);
  }
}

template <typename T>
__global__ void fwd_kernel(const T* g, const T* u, T* h, size_t n, int act) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v, d;
    activation(to_f(g[i]), act, v, d);
    h[i] = from_f<T>(v * to_f(u[i]));
  }
}

template <typename T>
__global__ void bwd_kernel(const T* g, const T* u, const T* dh, T* dg, T* du, size_t n, int act) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v, d;
    activation(to_f(g[i]), act, v, d);
    const float gi = to_f(dh[i]);
    dg[i] = from_f<T>(gi * to_f(u[i]) * d);
    du[i] = from_f<T>(gi * v);
  }
}

int act_arg(OpCtx& c) {
  const int64_t a = c.i(2);
  check(a == 0 || a == 1, c.name + ": activation must be 0 (SiLU) or 1 (tanh-GELU)");
  return static_cast<int>(a);
}

void glu_fwd(OpCtx& c) {
  const size_t n = c.n(1);
  const int act = act_arg(c);
  cudaStream_t s = op_stream(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* g = c.need(0, n, sizeof(T)).as<T>();
    const T* u = c.need(1, n, sizeof(T)).as<T>();
    T* h = c.need(2, n, sizeof(T)).as<T>();
    if (n == 0) return;
    fwd_kernel<T><<<grid_for(n), 256, 0, s>>>(g, u, h, n, act);
    CUDA_CHECK_LAUNCH();
  });
}

void glu_bwd(OpCtx& c) {
  const size_t n = c.n(1);
  const int act = act_arg(c);
  cudaStream_t s = op_stream(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* g = c.need(0, n, sizeof(T)).as<T>();
    const T* u = c.need(1, n, sizeof(T)).as<T>();
    const T* dh = c.need(2, n, sizeof(T)).as<T>();
    T* dg = c.need(3, n, sizeof(T)).as<T>();
    T* du = c.need(4, n, sizeof(T)).as<T>();
    if (n == 0) return;
    bwd_kernel<T><<<grid_for(n), 256, 0, s>>>(g, u, dh, dg, du, n, act);
    CUDA_CHECK_LAUNCH();
  });
}

MAGIX_REGISTER_OP("cuda", "glu_fwd", glu_fwd);
MAGIX_REGISTER_OP("cuda", "glu_bwd", glu_bwd);

}  // namespace
}  // namespace magix::cuda
