// Reductions (src/native/OPS.md), accumulated in float64:
//   sum(x, out; dtype, n, weight, accumulate):   out[0] (+)= weight·Σ x    (out: float32, the stats dtype)
//   sumsq(x, out; dtype, n, weight, accumulate): out[0] (+)= weight·Σ x²   (out: float64)
// Deterministic two-pass reductions: the first pass gives each of G blocks (G a function of n
// only) a fixed set of elements and writes one float64 partial per block to scratch; the second
// pass, one block, adds the partials in a fixed tree order and writes out. No atomics: a replay
// gives the same bits.
//
//   sumsq_multi(x_0, ..., x_{k-1}, out; dtype, k, accumulate, n_0, weight_0, ..., n_{k-1}, weight_{k-1}):
//     out[0] (+)= Σ_i weight_i·Σ x_i²  (out: float64)
// The global gradient norm in two launches whatever k (multi-tensor apply, as adamw.cu): the
// tensors' pointers, sizes, weights and tile offsets travel by value in a __grid_constant__
// parameter struct (kMultiGroup tensors, about 17 KB). Each tensor is cut in tiles of
// kMultiTile elements; the tiles of all tensors are spread over a grid of at most kMaxBlocks
// blocks (a function of the sizes only), each block writing one float64 partial (Σ over its
// tiles of weight·Σ x²) to scratch. A list longer than kMultiGroup tensors takes one partial
// launch per group, each writing its own range of partials; one finishing block then adds all
// partials in a fixed order.
#include <vector>

#include "common.cuh"

namespace magix::cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kMaxBlocks = 1024;

template <typename T, bool SQUARE>
__global__ void partial_kernel(const T* __restrict x, size_t n, double* __restrict partial, bool vec) {
  constexpr int P = Pack<T>::N;
  __shared__ double red[32];
  double acc = 0;
  const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  size_t done = 0;
  if (vec) {
    const size_t packs = n / P;
    for (size_t i = tid; i < packs; i += stride) {
      float v[P];
      load_pack(x + i * P, v);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const double d = v[j];
        acc += SQUARE ? d * d : d;
      }
    }
    done = packs * P;
  }
  for (size_t i = done + tid; i < n; i += stride) {
    const double v = to_f(x[i]);
    acc += SQUARE ? v * v : v;
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <typename O>
__global__ void finish_kernel(const double* __restrict partial, int count, O* out, double weight, bool accumulate) {
  __shared__ double red[32];
  double acc = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) {
    const double v = weight * acc;
    out[0] = static_cast<O>(accumulate ? static_cast<double>(out[0]) + v : v);
  }
}

template <bool SQUARE>
void reduce(OpCtx& c) {
  const size_t n = c.n(1);
  const double weight = c.f(2);
  const bool accumulate = c.i(3) != 0;
  cudaStream_t s = op_stream(c);
  const int dev = op_device(c);
  MAGIX_CUDA_DISPATCH(c, to_dtype(c.f(0)), {
    const T* x = c.need(0, n, sizeof(T)).as<T>();
    void* out = SQUARE ? c.need(1, 1, 8).ptr : c.need(1, 1, 4).ptr;  // sumsq: float64; sum: float32
    const bool vec = aligned16(x);
    const size_t per_block = static_cast<size_t>(kThreads) * (vec ? Pack<T>::N : 1) * 8;
    const unsigned blocks = static_cast<unsigned>(std::max<size_t>(1, std::min(kMaxBlocks, (n + per_block - 1) / per_block)));
    double* partial = static_cast<double*>(cuda_backend(c).scratch(dev, blocks * sizeof(double)));
    partial_kernel<T, SQUARE><<<blocks, kThreads, 0, s>>>(x, n, partial, vec);
    CUDA_CHECK_LAUNCH();
    if (SQUARE)
      finish_kernel<double><<<1, kThreads, 0, s>>>(partial, static_cast<int>(blocks), static_cast<double*>(out), weight,
                                                   accumulate);
    else
      finish_kernel<float><<<1, kThreads, 0, s>>>(partial, static_cast<int>(blocks), static_cast<float*>(out), weight,
                                                  accumulate);
    CUDA_CHECK_LAUNCH();
  });
}

constexpr int kMultiGroup = 512;
constexpr int64_t kMultiTile = 16384;  // elements per tile (a multiple of 8: tiles start 16-byte aligned)

struct SumsqList {
  const void* x[kMultiGroup];
  int64_t n[kMultiGroup];
  int64_t first_tile[kMultiGroup + 1];  // tensor i owns tiles [first_tile[i], first_tile[i + 1])
  double weight[kMultiGroup];
  uint8_t vec[kMultiGroup];  // x 16-byte aligned
  int count;
};
static_assert(sizeof(SumsqList) < 32000, "kernel parameters must stay under 32 KB");

template <typename T>
__global__ void __launch_bounds__(kThreads) sumsq_multi_partial(const __grid_constant__ SumsqList L,
                                                                double* __restrict partial) {
  constexpr int P = Pack<T>::N;
  __shared__ double red[32];
  double acc = 0;
  const int64_t tiles = L.first_tile[L.count];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    // The tensor owning this tile: the last i with first_tile[i] <= tile.
    int lo = 0, hi = L.count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (L.first_tile[mid] <= tile) lo = mid;
      else hi = mid - 1;
    }
    const int t = lo;
    const T* x = static_cast<const T*>(L.x[t]);
    const int64_t start = (tile - L.first_tile[t]) * kMultiTile, end = min(L.n[t], start + kMultiTile);
    double tacc = 0;
    int64_t scalar_from = start;
    if (L.vec[t]) {
      const int64_t vend = start + (end - start) / P * P;
#pragma unroll 4
      for (int64_t i = start + P * threadIdx.x; i < vend; i += P * kThreads) {
        float v[P];
        load_pack(x + i, v);
#pragma unroll
        for (int j = 0; j < P; ++j) {
          const double d = v[j];
          tacc += d * d;
        }
      }
      scalar_from = vend;
    }
    for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) {
      const double d = to_f(x[i]);
      tacc += d * d;
    }
    acc += L.weight[t] * tacc;
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

void sumsq_multi(OpCtx& c) {
  const DType dt = compute_dtype(c, 0);
  const size_t count = c.n(1);
  const bool accumulate = c.i(2) != 0;
  check(count < SIZE_MAX && c.bufs.size() == count + 1, "sumsq_multi: buffers must be x_0, ..., x_{count-1}, out");
  // Every buffer and argument is checked before anything is enqueued.
  const size_t esize = dtype_size(dt);
  std::vector<int64_t> ns(count);
  for (size_t i = 0; i < count; ++i) {
    ns[i] = static_cast<int64_t>(c.n(3 + 2 * i));
    c.f(4 + 2 * i);
    c.need(i, static_cast<size_t>(ns[i]), esize);
  }
  double* out = c.need(count, 1, 8).as<double>();
  cudaStream_t s = op_stream(c);
  const int dev = op_device(c);
  // The grid of each group: its tiles, at most kMaxBlocks; partials of group g start at base[g].
  const size_t groups = (count + kMultiGroup - 1) / kMultiGroup;
  std::vector<int64_t> tiles(groups, 0);
  std::vector<size_t> base(groups + 1, 0);
  for (size_t g = 0; g < groups; ++g) {
    for (size_t i = g * kMultiGroup; i < std::min(count, (g + 1) * kMultiGroup); ++i)
      tiles[g] += (ns[i] + kMultiTile - 1) / kMultiTile;
    base[g + 1] = base[g] + static_cast<size_t>(std::min<int64_t>(tiles[g], kMaxBlocks));
  }
  double* partial = static_cast<double*>(cuda_backend(c).scratch(dev, std::max<size_t>(1, base[groups]) * sizeof(double)));
  for (size_t g = 0; g < groups; ++g) {
    if (tiles[g] == 0) continue;
    // The struct is large: build it in static storage rather than on the host stack.
    static thread_local SumsqList L;
    const size_t start = g * kMultiGroup;
    L.count = static_cast<int>(std::min<size_t>(kMultiGroup, count - start));
    int64_t first = 0;
    for (int t = 0; t < L.count; ++t) {
      const size_t i = start + t;
      L.x[t] = c.bufs[i].ptr;
      L.n[t] = ns[i];
      L.weight[t] = c.f(4 + 2 * i);
      L.vec[t] = aligned16(L.x[t]) ? 1 : 0;
      L.first_tile[t] = first;
      first += (ns[i] + kMultiTile - 1) / kMultiTile;
    }
    L.first_tile[L.count] = first;
    const unsigned grid = static_cast<unsigned>(base[g + 1] - base[g]);
    MAGIX_CUDA_DISPATCH(c, dt, {
      sumsq_multi_partial<T><<<grid, kThreads, 0, s>>>(L, partial + base[g]);
      CUDA_CHECK_LAUNCH();
    });
  }
  finish_kernel<double><<<1, 1024, 0, s>>>(partial, static_cast<int>(base[groups]), out, 1.0, accumulate);
  CUDA_CHECK_LAUNCH();
}

MAGIX_REGISTER_OP("cuda", "sum", reduce<false>);
MAGIX_REGISTER_OP("cuda", "sumsq", reduce<true>);
MAGIX_REGISTER_OP("cuda", "sumsq_multi", sumsq_multi);

}  // namespace
}  // namespace magix::cuda
