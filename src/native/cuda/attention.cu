// Attention on CUDA (src/native/OPS.md): q, o [B, T, Hq, hd]; k, v [B, sMax, Hkv, hd]; lse [B, Hq, T]
// float32; optional keyMask [B, sMax]. Key s is visible to query t when the mask allows it,
// s ≤ qOffset + t (causal) and qOffset + t − s < window (window > 0).
//   attention_fwd: o = softmax(scale·q·kᵀ over visible keys)·v, lse = log Σ exp(...)
//   attention_bwd: D = rowsum(dO·o), P = exp(scale·q·kᵀ − lse), dv = Pᵀ·dO,
//                  dS = P·(dO·vᵀ − D), dq = scale·dS·k, dk = scale·dSᵀ·q
// This is the reference path: one thread per query (or key) row, keys (or queries) streamed
// through shared memory in tiles with an online softmax, so no score matrix is ever stored;
// arithmetic in float32. Fully masked rows give o = 0, lse = −∞ and no gradient.
#include <string>
#include <type_traits>

#include "common.cuh"

namespace magix::cuda {
namespace {

constexpr int TILE = 32;

struct Shape {
  int64_t B, T, S, Hq, Hkv, hd, sMax, window, qOffset;
  float scale;
  bool causal;
  const uint8_t* mask;
};

__device__ __forceinline__ bool visible(const Shape& sh, int64_t b, int64_t t, int64_t s) {
  if (s >= sh.S) return false;
  if (sh.mask && !sh.mask[b * sh.sMax + s]) return false;
  const int64_t q = sh.qOffset + t;
  if (sh.causal && s > q) return false;
  if (sh.window > 0 && q - s >= sh.window) return false;
  return true;
}

template <typename T, int HD>
__global__ void fwd_kernel(const T* q, const T* k, const T* v, T* o, float* lse, Shape sh) {
  __shared__ float ks[TILE][HD], vs[TILE][HD];
  const int64_t bh = blockIdx.y, b = bh / sh.Hq, h = bh % sh.Hq, hk = h / (sh.Hq / sh.Hkv);
  const int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const bool active = t < sh.T;
  float qr[HD], acc[HD];
  if (active)
    for (int d = 0; d < HD; ++d) qr[d] = to_f(q[((b * sh.T + t) * sh.Hq + h) * HD + d]) * sh.scale;
  for (int d = 0; d < HD; ++d) acc[d] = 0.f;
  float m = -INFINITY, l = 0.f;
  // Keys any query of this block can see.
  const int64_t t0 = blockIdx.x * (int64_t)blockDim.x, t1 = min(sh.T, t0 + (int64_t)blockDim.x);
  int64_t hi = sh.S, lo = 0;
  if (sh.causal) hi = min(hi, sh.qOffset + t1);
  if (sh.window > 0) lo = max((int64_t)0, sh.qOffset + t0 - sh.window + 1);
  for (int64_t s0 = lo; s0 < hi; s0 += TILE) {
    __syncthreads();
    for (int i = threadIdx.x; i < TILE * HD; i += blockDim.x) {
      const int r = i / HD, d = i % HD;
      const int64_t s = s0 + r;
      const bool in = s < sh.S;
      ks[r][d] = in ? to_f(k[((b * sh.sMax + s) * sh.Hkv + hk) * HD + d]) : 0.f;
      vs[r][d] = in ? to_f(v[((b * sh.sMax + s) * sh.Hkv + hk) * HD + d]) : 0.f;
    }
    __syncthreads();
    if (!active) continue;
    for (int r = 0; r < TILE; ++r) {
      if (!visible(sh, b, t, s0 + r)) continue;
      float sc = 0.f;
      for (int d = 0; d < HD; ++d) sc += qr[d] * ks[r][d];
      const float mn = fmaxf(m, sc);
      const float corr = __expf(m - mn), p = __expf(sc - mn);
      l = l * corr + p;
      for (int d = 0; d < HD; ++d) acc[d] = acc[d] * corr + p * vs[r][d];
      m = mn;
    }
  }
  if (!active) return;
  const float inv = l > 0 ? 1.f / l : 0.f;
  for (int d = 0; d < HD; ++d) o[((b * sh.T + t) * sh.Hq + h) * HD + d] = from_f<T>(acc[d] * inv);
  lse[(b * sh.Hq + h) * sh.T + t] = l > 0 ? m + logf(l) : -INFINITY;
}

template <typename T, int HD>
__global__ void delta_kernel(const T* o, const T* dO, float* D, Shape sh) {
  const int64_t rows = sh.B * sh.Hq * sh.T;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i % sh.T, bh = i / sh.T, b = bh / sh.Hq, h = bh % sh.Hq;
    const int64_t base = ((b * sh.T + t) * sh.Hq + h) * HD;
    float acc = 0.f;
    for (int d = 0; d < HD; ++d) acc += to_f(o[base + d]) * to_f(dO[base + d]);
    D[i] = acc;
  }
}

template <typename T, int HD>
__global__ void dq_kernel(const T* q, const T* k, const T* v, const float* lse, const T* dO, const float* D, T* dq, Shape sh) {
  __shared__ float ks[TILE][HD], vs[TILE][HD];
  const int64_t bh = blockIdx.y, b = bh / sh.Hq, h = bh % sh.Hq, hk = h / (sh.Hq / sh.Hkv);
  const int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const bool active = t < sh.T;
  float qr[HD], dor[HD], acc[HD];
  float L = -INFINITY, Dt = 0.f;
  if (active) {
    const int64_t base = ((b * sh.T + t) * sh.Hq + h) * HD;
    for (int d = 0; d < HD; ++d) {
      qr[d] = to_f(q[base + d]);
      dor[d] = to_f(dO[base + d]);
    }
    L = lse[(b * sh.Hq + h) * sh.T + t];
    Dt = D[(b * sh.Hq + h) * sh.T + t];
  }
  for (int d = 0; d < HD; ++d) acc[d] = 0.f;
  for (int64_t s0 = 0; s0 < sh.S; s0 += TILE) {
    __syncthreads();
    for (int i = threadIdx.x; i < TILE * HD; i += blockDim.x) {
      const int r = i / HD, d = i % HD;
      const int64_t s = s0 + r;
      const bool in = s < sh.S;
      ks[r][d] = in ? to_f(k[((b * sh.sMax + s) * sh.Hkv + hk) * HD + d]) : 0.f;
      vs[r][d] = in ? to_f(v[((b * sh.sMax + s) * sh.Hkv + hk) * HD + d]) : 0.f;
    }
    __syncthreads();
    if (!active || L == -INFINITY) continue;
    for (int r = 0; r < TILE; ++r) {
      if (!visible(sh, b, t, s0 + r)) continue;
      float sc = 0.f, dp = 0.f;
      for (int d = 0; d < HD; ++d) {
        sc += qr[d] * ks[r][d];
        dp += dor[d] * vs[r][d];
      }
      const float p = __expf(sc * sh.scale - L);
      const float ds = p * (dp - Dt) * sh.scale;
      for (int d = 0; d < HD; ++d) acc[d] += ds * ks[r][d];
    }
  }
  if (!active) return;
  for (int d = 0; d < HD; ++d) dq[((b * sh.T + t) * sh.Hq + h) * HD + d] = from_f<T>(acc[d]);
}

// One thread per key row of one KV head, over every query of the heads sharing it.
template <typename T, int HD>
__global__ void dkdv_kernel(const T* q, const T* k, const T* v, const float* lse, const T* dO, const float* D, T* dk, T* dv,
                            Shape sh) {
  __shared__ float qs[TILE][HD], ds_[TILE][HD];
  __shared__ float Ls[TILE], Ds[TILE];
  const int64_t bh = blockIdx.y, b = bh / sh.Hkv, hk = bh % sh.Hkv;
  const int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const bool active = s < sh.S;
  float kr[HD], vr[HD], dka[HD], dva[HD];
  if (active) {
    const int64_t base = ((b * sh.sMax + s) * sh.Hkv + hk) * HD;
    for (int d = 0; d < HD; ++d) {
      kr[d] = to_f(k[base + d]);
      vr[d] = to_f(v[base + d]);
    }
  }
  for (int d = 0; d < HD; ++d) dka[d] = dva[d] = 0.f;
  const int64_t group = sh.Hq / sh.Hkv;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t t0 = 0; t0 < sh.T; t0 += TILE) {
      __syncthreads();
      for (int i = threadIdx.x; i < TILE * HD; i += blockDim.x) {
        const int r = i / HD, d = i % HD;
        const int64_t t = t0 + r;
        const bool in = t < sh.T;
        qs[r][d] = in ? to_f(q[((b * sh.T + t) * sh.Hq + h) * HD + d]) : 0.f;
        ds_[r][d] = in ? to_f(dO[((b * sh.T + t) * sh.Hq + h) * HD + d]) : 0.f;
      }
      for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
        const int64_t t = t0 + r;
        Ls[r] = t < sh.T ? lse[(b * sh.Hq + h) * sh.T + t] : -INFINITY;
        Ds[r] = t < sh.T ? D[(b * sh.Hq + h) * sh.T + t] : 0.f;
      }
      __syncthreads();
      if (!active) continue;
      for (int r = 0; r < TILE; ++r) {
        const int64_t t = t0 + r;
        if (t >= sh.T || Ls[r] == -INFINITY || !visible(sh, b, t, s)) continue;
        float sc = 0.f, dp = 0.f;
        for (int d = 0; d < HD; ++d) {
          sc += qs[r][d] * kr[d];
          dp += ds_[r][d] * vr[d];
        }
        const float p = __expf(sc * sh.scale - Ls[r]);
        const float dsc = p * (dp - Ds[r]) * sh.scale;
        for (int d = 0; d < HD; ++d) {
          dva[d] += p * ds_[r][d];
          dka[d] += dsc * qs[r][d];
        }
      }
    }
  }
  if (!active) return;
  const int64_t base = ((b * sh.sMax + s) * sh.Hkv + hk) * HD;
  for (int d = 0; d < HD; ++d) {
    dk[base + d] = from_f<T>(dka[d]);
    dv[base + d] = from_f<T>(dva[d]);
  }
}

Shape parse(OpCtx& c, size_t maskIndex) {
  Shape s{};
  s.B = c.i(1), s.T = c.i(2), s.S = c.i(3), s.Hq = c.i(4), s.Hkv = c.i(5), s.hd = c.i(6);
  s.scale = static_cast<float>(c.f(7));
  s.causal = c.i(8) != 0;
  s.window = c.i(9);
  s.qOffset = c.i(10);
  const bool hasMask = c.i(11) != 0;
  s.sMax = c.i(12);
  for (int64_t v : {s.B, s.T, s.S, s.Hq, s.Hkv, s.hd, s.window, s.qOffset, s.sMax}) check(v >= 0, c.name + ": negative size");
  check(s.Hkv > 0 && s.Hq % s.Hkv == 0, c.name + ": query heads must be a multiple of KV heads");
  check(s.S <= s.sMax, c.name + ": S exceeds sMax");
  s.mask = hasMask ? c.need(maskIndex, mul(s.B, s.sMax), 1).as<uint8_t>() : nullptr;
  return s;
}

// Calls f(std::integral_constant<int, HD>) for the head sizes this path is compiled for.
template <typename F>
void with_head_dim(int64_t hd, const std::string& name, F&& f) {
  switch (hd) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
  }
  invalid(name + ": head size " + std::to_string(hd) + " is not supported on CUDA (8, 16, 32, 64 or 128)");
}

void attention_fwd(OpCtx& c) {
  Shape sh = parse(c, 5);
  cudaStream_t s = op_stream(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const size_t qn = mul(sh.B, sh.T, sh.Hq, sh.hd), kn = mul(sh.B, sh.sMax, sh.Hkv, sh.hd);
    const T* q = c.need(0, qn, sizeof(T)).as<T>();
    const T* k = c.need(1, kn, sizeof(T)).as<T>();
    const T* v = c.need(2, kn, sizeof(T)).as<T>();
    T* o = c.need(3, qn, sizeof(T)).as<T>();
    float* lse = c.need(4, mul(sh.B, sh.Hq, sh.T), 4).as<float>();
    if (qn == 0) return;
    with_head_dim(sh.hd, c.name, [&](auto hdc) {
      constexpr int HD = decltype(hdc)::value;
      dim3 grid(static_cast<unsigned>((sh.T + 63) / 64), static_cast<unsigned>(sh.B * sh.Hq));
      fwd_kernel<T, HD><<<grid, 64, 0, s>>>(q, k, v, o, lse, sh);
      CUDA_CHECK_LAUNCH();
    });
  });
}

void attention_bwd(OpCtx& c) {
  Shape sh = parse(c, 9);
  cudaStream_t s = op_stream(c);
  const int dev = c.buf(0).device;
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const size_t qn = mul(sh.B, sh.T, sh.Hq, sh.hd), kn = mul(sh.B, sh.sMax, sh.Hkv, sh.hd);
    const T* q = c.need(0, qn, sizeof(T)).as<T>();
    const T* k = c.need(1, kn, sizeof(T)).as<T>();
    const T* v = c.need(2, kn, sizeof(T)).as<T>();
    const T* o = c.need(3, qn, sizeof(T)).as<T>();
    const float* lse = c.need(4, mul(sh.B, sh.Hq, sh.T), 4).as<float>();
    const T* dO = c.need(5, qn, sizeof(T)).as<T>();
    T* dq = c.need(6, qn, sizeof(T)).as<T>();
    T* dk = c.need(7, kn, sizeof(T)).as<T>();
    T* dv = c.need(8, kn, sizeof(T)).as<T>();
    if (qn == 0) return;
    float* D = static_cast<float*>(cuda_backend(c).workspace(dev, mul(sh.B, sh.Hq, sh.T, 4)));
    with_head_dim(sh.hd, c.name, [&](auto hdc) {
      constexpr int HD = decltype(hdc)::value;
      delta_kernel<T, HD><<<grid_for(sh.B * sh.Hq * sh.T), 256, 0, s>>>(o, dO, D, sh);
      CUDA_CHECK_LAUNCH();
      dq_kernel<T, HD><<<dim3(static_cast<unsigned>((sh.T + 63) / 64), static_cast<unsigned>(sh.B * sh.Hq)), 64, 0, s>>>(
          q, k, v, lse, dO, D, dq, sh);
      CUDA_CHECK_LAUNCH();
      dkdv_kernel<T, HD><<<dim3(static_cast<unsigned>((sh.S + 63) / 64), static_cast<unsigned>(sh.B * sh.Hkv)), 64, 0, s>>>(
          q, k, v, lse, dO, D, dk, dv, sh);
      CUDA_CHECK_LAUNCH();
    });
  });
}

MAGIX_REGISTER_OP("cuda", "attention_fwd", attention_fwd);
MAGIX_REGISTER_OP("cuda", "attention_bwd", attention_bwd);

}  // namespace
}  // namespace magix::cuda
