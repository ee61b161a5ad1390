// Rotary position embedding, rotate-half convention (src/native/OPS.md):
//   rope(x [N, H, hd], positions [N] int32, invFreq [hd/2], out [N, H, hd]; dtype, N, H, hd, sign, scaling)
//   a = position·invFreq[i] (a float32 product, as transformers computes it),
//   c = cos(a)·scaling, s = sign·sin(a)·scaling, for i < hd/2:
//     out[i]        = x[i]·c − x[i + hd/2]·s
//     out[i + hd/2] = x[i + hd/2]·c + x[i]·s
// sign −1 is the transpose (the backward pass); out may alias x (each thread reads its elements
// before writing them). invFreq is float32 for both compute dtypes (a bfloat16 angle would drift
// at long positions; the TypeScript side makes it in the stats dtype). cos and sin are taken in
// float64 (fast-math sincosf is inaccurate for angles of thousands of radians), once per
// position, frequency and group of kHeads heads.
#include "common.cuh"

namespace magix::cuda {
namespace {

constexpr int kHeads = 4;

// Thread: (row n, group of kHeads heads, W consecutive frequencies). W = the pack when vec.
template <typename T, int W, bool VEC>
__global__ void rope_kernel(const T* x, const int32_t* pos, const float* inv, T* out, int64_t N, int64_t H, int64_t half,
                            float sign, float scaling) {
  const int64_t slots = half / W, groups = (H + kHeads - 1) / kHeads;
  const int64_t total = N * groups * slots;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t slot = i % slots, rest = i / slots, group = rest % groups, n = rest / groups;
    const int64_t j0 = slot * W;
    const float p = static_cast<float>(pos[n]);
    float cs[W], sn[W];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      double sd, cd;
      sincos(static_cast<double>(p * inv[j0 + j]), &sd, &cd);
      cs[j] = static_cast<float>(cd) * scaling;
      sn[j] = static_cast<float>(sd) * sign * scaling;
    }
    const int64_t h1 = min(H, (group + 1) * kHeads);
    for (int64_t h = group * kHeads; h < h1; ++h) {
      const int64_t base = (n * H + h) * 2 * half + j0;
      float x1[W], x2[W], o1[W], o2[W];
      if constexpr (VEC) {
        load_pack(x + base, reinterpret_cast<float(&)[Pack<T>::N]>(x1));
        load_pack(x + base + half, reinterpret_cast<float(&)[Pack<T>::N]>(x2));
      } else {
#pragma unroll
        for (int j = 0; j < W; ++j) x1[j] = to_f(x[base + j]), x2[j] = to_f(x[base + half + j]);
      }
#pragma unroll
      for (int j = 0; j < W; ++j) {
        o1[j] = x1[j] * cs[j] - x2[j] * sn[j];
        o2[j] = x2[j] * cs[j] + x1[j] * sn[j];
      }
      if constexpr (VEC) {
        store_pack(out + base, reinterpret_cast<float(&)[Pack<T>::N]>(o1));
        store_pack(out + base + half, reinterpret_cast<float(&)[Pack<T>::N]>(o2));
      } else {
#pragma unroll
        for (int j = 0; j < W; ++j) out[base + j] = from_f<T>(o1[j]), out[base + half + j] = from_f<T>(o2[j]);
      }
    }
  }
}

void rope(OpCtx& c) {
  const size_t N = c.n(1), H = c.n(2), hd = c.n(3);
  const float sign = static_cast<float>(c.f(4)), scaling = static_cast<float>(c.f(5));
  check(hd % 2 == 0 && hd > 0, "rope: the head size must be even");
  check(sign == 1 || sign == -1, "rope: sign must be 1 or -1");
  cudaStream_t s = op_stream(c);
  const int32_t* pos = c.need(1, N, 4).as<int32_t>();
  const size_t half = hd / 2;
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* x = c.need(0, mul(N, H, hd), sizeof(T)).as<T>();
    const float* inv = c.need(2, half, 4).as<float>();  // float32 for both compute dtypes
    T* out = c.need(3, mul(N, H, hd), sizeof(T)).as<T>();
    if (N * H == 0) return;
    constexpr int P = Pack<T>::N;
    const size_t groups = (H + kHeads - 1) / kHeads;
    const int64_t n64 = static_cast<int64_t>(N), h64 = static_cast<int64_t>(H), half64 = static_cast<int64_t>(half);
    if (half % P == 0 && aligned16(x, out)) {
      rope_kernel<T, P, true><<<grid_for(N * groups * (half / P)), 256, 0, s>>>(x, pos, inv, out, n64, h64, half64, sign,
                                                                                 scaling);
    } else {
      rope_kernel<T, 1, false><<<grid_for(N * groups * half), 256, 0, s>>>(x, pos, inv, out, n64, h64, half64, sign,
                                                                           scaling);
    }
    CUDA_CHECK_LAUNCH();
  });
}

MAGIX_REGISTER_OP("cuda", "rope", rope);

}  // namespace
}  // namespace magix::cuda
