// rope(x, positions, invFreq, out; dtype, N, H, hd, sign, scaling), rotate-half convention:
//   a = position·invFreq[i] (float32), c = cos(a)·scaling, s = sign·sin(a)·scaling,
//   out[i] = x[i]·c − x[i + hd/2]·s, out[i + hd/2] = x[i + hd/2]·c + x[i]·s. out may alias x.
// invFreq is float32 under bfloat16 compute (bfloat16 angles would drift at long positions).
#include "common.cuh"

namespace magix::cuda {
namespace {

template <typename T>
__global__ void rope_kernel(const T* x, const int32_t* pos, const float* inv, T* out, int64_t N, int64_t H, int64_t half,
                            float sign, float scaling) {
  const int64_t total = N * H * half;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = i % half, row = i / half, n = row / H;
    float sn, cs;
    sincosf(static_cast<float>(pos[n]) * inv[j], &sn, &cs);
    cs *= scaling;
    sn *= sign * scaling;
    const int64_t base = row * 2 * half;
    const float x1 = to_f(x[base + j]), x2 = to_f(x[base + j + half]);
    out[base + j] = from_f<T>(x1 * cs - x2 * sn);
    out[base + j + half] = from_f<T>(x2 * cs + x1 * sn);
  }
}

void rope(OpCtx& c) {
  const size_t N = c.n(1), H = c.n(2), hd = c.n(3);
  const float sign = static_cast<float>(c.f(4)), scaling = static_cast<float>(c.f(5));
  check(hd % 2 == 0 && hd > 0, "rope: the head size must be even");
  check(sign == 1 || sign == -1, "rope: sign must be 1 or -1");
  cudaStream_t s = op_stream(c);
  const int32_t* pos = c.need(1, N, 4).as<int32_t>();
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* x = c.need(0, mul(N, H, hd), sizeof(T)).as<T>();
    const float* inv = c.need(2, hd / 2, 4).as<float>();
    T* out = c.need(3, mul(N, H, hd), sizeof(T)).as<T>();
    if (N * H == 0) return;
    rope_kernel<T><<<grid_for(N * H * hd / 2), 256, 0, s>>>(x, pos, inv, out, N, H, hd / 2, sign, scaling);
    CUDA_CHECK_LAUNCH();
  });
}

MAGIX_REGISTER_OP("cuda", "rope", rope);

}  // namespace
}  // namespace magix::cuda
