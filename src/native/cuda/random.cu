// random_normal(dst; dtype, key, std, rank, globalShape[rank], offsets[rank], localShape[rank]) on
// CUDA: the counter-based numbers of src/core/random.ts, for this device's block.
#include "../common/random.h"
#include "common.cuh"

namespace magix::cuda {
namespace {

struct Box {
  int rank;
  int64_t shape[8], off[8], local[8];
};

template <typename T>
__global__ void normal_kernel(T* dst, int64_t n, uint32_t key, double stddev, Box box) {
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.x * blockDim.x) {
    int64_t rest = j, global = 0, stride = 1;
    for (int d = box.rank - 1; d >= 0; --d) {
      const int64_t i = rest % box.local[d];
      rest /= box.local[d];
      global += (box.off[d] + i) * stride;
      stride *= box.shape[d];
    }
    dst[j] = from_f<T>(static_cast<float>(stddev * rng_normal(key, static_cast<uint64_t>(global))));
  }
}

void random_normal(OpCtx& c) {
  const uint32_t key = static_cast<uint32_t>(c.i(1));
  const double stddev = c.f(2);
  Box box{};
  box.rank = static_cast<int>(c.n(3));
  check(box.rank <= 8, "random_normal: rank above 8");
  size_t n = 1;
  for (int d = 0; d < box.rank; ++d) {
    box.shape[d] = c.i(4 + d);
    box.off[d] = c.i(4 + box.rank + d);
    box.local[d] = c.i(4 + 2 * box.rank + d);
    check(box.off[d] >= 0 && box.local[d] >= 0 && box.off[d] + box.local[d] <= box.shape[d], "random_normal: block outside the array");
    n = mul(n, static_cast<size_t>(box.local[d]));
  }
  cudaStream_t s = op_stream(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    T* dst = c.need(0, n, sizeof(T)).as<T>();
    if (n == 0) return;
    normal_kernel<T><<<grid_for(n), 256, 0, s>>>(dst, static_cast<int64_t>(n), key, stddev, box);
    CUDA_CHECK_LAUNCH();
  });
}

MAGIX_REGISTER_OP("cuda", "random_normal", random_normal);

}  // namespace
}  // namespace magix::cuda
