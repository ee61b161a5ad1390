// Gated MLP (src/native/OPS.md), arithmetic in float32 for float32 or bfloat16 buffers:
//   act 0 = SiLU:      a(x) = x·σ(x),                       a'(x) = σ(x)·(1 + x·(1 − σ(x)))
//   act 1 = tanh-GELU: a(x) = ½x(1 + tanh(k(x + 0.044715x³))), k = √(2/π),
//                      a'(x) = ½(1 + t) + ½x(1 − t²)·k(1 + 3·0.044715x²), t = tanh(k(x + 0.044715x³))
//   glu_fwd(g, u, h; dtype, n, act):          h = a(g)·u
//   glu_bwd(g, u, dh, dg, du; dtype, n, act): dg = dh·u·a'(g), du = dh·a(g)
// One memory-bound pass each, 16-byte vectors where aligned.
#include "common.cuh"

namespace magix::cuda {
namespace {

template <int ACT>
__device__ __forceinline__ void activation(float x, float& v, float& d) {
  if (ACT == 0) {
    const float s = 1.f / (1.f + __expf(-x));
    v = x * s;
    d = s * (1.f + x * (1.f - s));
  } else {
    constexpr float k = 0.7978845608028654f, c = 0.044715f;
    const float t = tanhf(k * (x + c * x * x * x));
    v = 0.5f * x * (1.f + t);
    d = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * k * (1.f + 3.f * c * x * x);
  }
}

template <typename T, int ACT>
__global__ void fwd_kernel(const T* g, const T* u, T* h, size_t n, bool vec) {
  constexpr int P = Pack<T>::N;
  const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  size_t done = 0;
  if (vec) {
    const size_t packs = n / P;
    for (size_t i = tid; i < packs; i += stride) {
      float gv[P], uv[P], r[P];
      load_pack(g + i * P, gv);
      load_pack(u + i * P, uv);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        float v, d;
        activation<ACT>(gv[j], v, d);
        r[j] = v * uv[j];
      }
      store_pack(h + i * P, r);
    }
    done = packs * P;
  }
  for (size_t i = done + tid; i < n; i += stride) {
    float v, d;
    activation<ACT>(to_f(g[i]), v, d);
    h[i] = from_f<T>(v * to_f(u[i]));
  }
}

template <typename T, int ACT>
__global__ void bwd_kernel(const T* g, const T* u, const T* dh, T* dg, T* du, size_t n, bool vec) {
  constexpr int P = Pack<T>::N;
  const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  size_t done = 0;
  if (vec) {
    const size_t packs = n / P;
    for (size_t i = tid; i < packs; i += stride) {
      float gv[P], uv[P], hv[P], rg[P], ru[P];
      load_pack(g + i * P, gv);
      load_pack(u + i * P, uv);
      load_pack(dh + i * P, hv);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        float v, d;
        activation<ACT>(gv[j], v, d);
        rg[j] = hv[j] * uv[j] * d;
        ru[j] = hv[j] * v;
      }
      store_pack(dg + i * P, rg);
      store_pack(du + i * P, ru);
    }
    done = packs * P;
  }
  for (size_t i = done + tid; i < n; i += stride) {
    float v, d;
    activation<ACT>(to_f(g[i]), v, d);
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

template <typename T>
unsigned blocks(size_t n, bool vec) {
  return grid_for(vec ? (n + Pack<T>::N - 1) / Pack<T>::N : n, 256, 4096);
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
    const bool vec = aligned16(g, u, h);
    if (act == 0)
      fwd_kernel<T, 0><<<blocks<T>(n, vec), 256, 0, s>>>(g, u, h, n, vec);
    else
      fwd_kernel<T, 1><<<blocks<T>(n, vec), 256, 0, s>>>(g, u, h, n, vec);
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
    const bool vec = aligned16(g, u, dh, dg, du);
    if (act == 0)
      bwd_kernel<T, 0><<<blocks<T>(n, vec), 256, 0, s>>>(g, u, dh, dg, du, n, vec);
    else
      bwd_kernel<T, 1><<<blocks<T>(n, vec), 256, 0, s>>>(g, u, dh, dg, du, n, vec);
    CUDA_CHECK_LAUNCH();
  });
}

MAGIX_REGISTER_OP("cuda", "glu_fwd", glu_fwd);
MAGIX_REGISTER_OP("cuda", "glu_bwd", glu_bwd);

}  // namespace
}  // namespace magix::cuda
