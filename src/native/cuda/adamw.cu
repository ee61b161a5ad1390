// The fused optimizer pass (src/native/OPS.md, optax semantics):
//   adamw(state, normSq, p_0, g_0, m_0, v_0, ...; dtype, count, b1, b2, eps, maxNorm, skipNonFinite,
//         scheduleKind, schedule[5], n_0, wd_0, ...)
//   norm = √normSq; a non-finite norm with skipNonFinite only counts (state[1]++, state[2]++);
//   else with c = state[0], t = c + 1, lr = schedule(c), scale = maxNorm/norm when maxNorm > 0 and
//   norm ≥ maxNorm (else 1): g' = scale·g, m = b1·m + (1 − b1)·g', v = b2·v + (1 − b2)·g'²,
//   p −= lr·((m / (1 − b1ᵗ)) / (√(v / (1 − b2ᵗ)) + eps) + wd·p); state[0] = t, state[4] = lr.
//   state[3] = norm always. state: float64 [8]; normSq: float64 [1]; p, g, m, v: float32.
// Schedules at c (updates already applied): 0 constant(v); 1 linear(init, end, steps);
// 2 warmup-cosine(init, peak, warmup, decaySteps, end).
// Optional shadows: a shadowDtype argument (2, bfloat16) after the per-tensor pairs, and buffers
// s_0, ..., s_{count-1} (bfloat16) after the quads: every updated p is also written to s rounded
// to nearest even, as `cast` rounds, so the next forward pass reads them instead of casting.
//
// Nothing is read on the host: a one-thread prologue reads normSq and the state on the device,
// evaluates the schedule, decides skip / clip and updates the state, leaving the step's scalars in
// scratch. Then ONE launch updates a whole group of tensors (multi-tensor apply): the tensors'
// pointers, sizes, decays and tile offsets travel by value in a kernel parameter struct (sm_90
// takes up to 32 KB of parameters; kGroup tensors fill about 17 KB), read in place as a
// __grid_constant__. A list longer than kGroup tensors takes one launch per kGroup. No
// host-to-device copy of a pointer table: the launches can be captured in a CUDA graph.
// Work is split in tiles of kTile elements over a grid of a few blocks per SM, so one huge
// embedding and a hundred small norms balance; float4 accesses.
#include <vector>

#include "common.cuh"

namespace magix::cuda {
namespace {

struct StepParams {
  float lr, scale, inv_bc1, inv_bc2;
  int skip;
};

struct Schedule {
  int kind;
  double p[5];
};

__device__ double schedule_at(const Schedule& s, double c) {
  if (s.kind == 0) return s.p[0];
  if (s.kind == 1) return s.p[2] > 0 ? s.p[0] + (s.p[1] - s.p[0]) * fmin(c, s.p[2]) / s.p[2] : s.p[1];
  const double init = s.p[0], peak = s.p[1], warmup = s.p[2], decay = s.p[3], end = s.p[4];
  if (c < warmup) return init + (peak - init) * c / warmup;
  const double d = decay - warmup;
  const double r = d > 0 ? fmin(c - warmup, d) / d : 1.0;
  return end + (peak - end) * (1 + cos(3.141592653589793 * r)) / 2;
}

__global__ void prologue(double* state, const double* normSq, StepParams* out, Schedule sched, double b1, double b2,
                         double maxNorm, int skipNonFinite) {
  const double norm = sqrt(normSq[0]);
  state[3] = norm;
  if (skipNonFinite && !isfinite(norm)) {
    state[1] += 1;
    state[2] += 1;
    out->skip = 1;
    return;
  }
  state[1] = 0;
  const double c = state[0], t = c + 1;
  const double lr = schedule_at(sched, c);
  out->skip = 0;
  out->lr = static_cast<float>(lr);
  out->scale = static_cast<float>((maxNorm > 0 && norm >= maxNorm) ? maxNorm / norm : 1.0);
  out->inv_bc1 = static_cast<float>(1.0 / (1 - pow(b1, t)));
  out->inv_bc2 = static_cast<float>(1.0 / (1 - pow(b2, t)));
  state[0] = t;
  state[4] = lr;
}

constexpr int kGroup = 320;
constexpr int64_t kTile = 4096;  // elements per work item (a multiple of 4: tiles start 16-byte aligned)
constexpr int kThreads = 256;

struct TensorList {
  float* p[kGroup];
  const float* g[kGroup];
  float* m[kGroup];
  float* v[kGroup];
  bf16* s[kGroup];  // the shadow, or null
  int64_t n[kGroup];
  int64_t first_tile[kGroup + 1];  // tensor i owns tiles [first_tile[i], first_tile[i + 1])
  float wd[kGroup];
  uint8_t vec[kGroup];  // all four pointers 16-byte aligned (and the shadow 8-byte aligned)
  int count;
};
static_assert(sizeof(TensorList) < 32000, "kernel parameters must stay under 32 KB");

__device__ __forceinline__ void adam_one(float& p, float g, float& m, float& v, const StepParams& sp, float b1, float b2,
                                         float eps, float wd) {
  const float gi = sp.scale * g;
  m = b1 * m + (1.f - b1) * gi;
  v = b2 * v + (1.f - b2) * gi * gi;
  p = p - sp.lr * ((m * sp.inv_bc1) / (sqrtf(v * sp.inv_bc2) + eps) + wd * p);
}

__global__ void __launch_bounds__(kThreads) update(const __grid_constant__ TensorList L, const StepParams* __restrict sp_,
                                                   float b1, float b2, float eps) {
  const StepParams sp = *sp_;
  if (sp.skip) return;
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
    const int64_t start = (tile - L.first_tile[t]) * kTile, end = min(L.n[t], start + kTile);
    float* p = L.p[t];
    const float* g = L.g[t];
    float* m = L.m[t];
    float* v = L.v[t];
    bf16* sh = L.s[t];
    const float wd = L.wd[t];
    int64_t scalar_from = start;
    if (L.vec[t]) {
      const int64_t vend = start + (end - start) / 4 * 4;
      for (int64_t i = start + 4 * threadIdx.x; i < vend; i += 4 * kThreads) {
        float4 pv = *reinterpret_cast<const float4*>(p + i);
        const float4 gv = *reinterpret_cast<const float4*>(g + i);
        float4 mv = *reinterpret_cast<const float4*>(m + i);
        float4 vv = *reinterpret_cast<const float4*>(v + i);
        adam_one(pv.x, gv.x, mv.x, vv.x, sp, b1, b2, eps, wd);
        adam_one(pv.y, gv.y, mv.y, vv.y, sp, b1, b2, eps, wd);
        adam_one(pv.z, gv.z, mv.z, vv.z, sp, b1, b2, eps, wd);
        adam_one(pv.w, gv.w, mv.w, vv.w, sp, b1, b2, eps, wd);
        *reinterpret_cast<float4*>(p + i) = pv;
        *reinterpret_cast<float4*>(m + i) = mv;
        *reinterpret_cast<float4*>(v + i) = vv;
        if (sh) {
          const __nv_bfloat162 lo = __floats2bfloat162_rn(pv.x, pv.y), hi = __floats2bfloat162_rn(pv.z, pv.w);
          uint2 u;
          u.x = *reinterpret_cast<const uint32_t*>(&lo);
          u.y = *reinterpret_cast<const uint32_t*>(&hi);
          *reinterpret_cast<uint2*>(sh + i) = u;
        }
      }
      scalar_from = vend;
    }
    for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) {
      float pi = p[i], mi = m[i], vi = v[i];
      adam_one(pi, g[i], mi, vi, sp, b1, b2, eps, wd);
      p[i] = pi, m[i] = mi, v[i] = vi;
      if (sh) sh[i] = __float2bfloat16_rn(pi);
    }
  }
}

void adamw(OpCtx& c) {
  check(to_dtype(c.f(0)) == DType::F32,
        "adamw: the CUDA backend updates float32 parameters and moments (dtype 0; OPS.md, Mixed precision)");
  const size_t count = c.n(1);
  const double b1 = c.f(2), b2 = c.f(3), eps = c.f(4), maxNorm = c.f(5);
  const int skip = c.i(6) != 0;
  Schedule sched{};
  sched.kind = static_cast<int>(c.i(7));
  check(sched.kind >= 0 && sched.kind <= 2, "adamw: unknown schedule kind " + std::to_string(sched.kind));
  for (int i = 0; i < 5; ++i) sched.p[i] = c.f(8 + i);
  check(count <= c.bufs.size(), "adamw: buffers must be state, normSq, then p, g, m, v per tensor");
  // A shadowDtype argument after the per-tensor pairs asks for shadows s_i after the quads.
  const bool shadows = c.nargs > 13 + 2 * count;
  check(!shadows || to_dtype(c.f(13 + 2 * count)) == DType::BF16,
        "adamw: the CUDA backend writes bfloat16 shadows (shadowDtype 2)");
  check(c.bufs.size() == (shadows ? 2 + 5 * count : 2 + 4 * count),
        "adamw: buffers must be state, normSq, then p, g, m, v per tensor (then s per tensor with shadowDtype)");
  double* state = c.need(0, 8, 8).as<double>();
  const double* normSq = c.need(1, 1, 8).as<double>();
  // Every buffer is checked before anything is enqueued.
  std::vector<int64_t> ns(count);
  for (size_t i = 0; i < count; ++i) {
    ns[i] = static_cast<int64_t>(c.n(13 + 2 * i));
    c.f(14 + 2 * i);
    for (size_t j = 0; j < 4; ++j) c.need(2 + 4 * i + j, static_cast<size_t>(ns[i]), 4);
    if (shadows) c.need(2 + 4 * count + i, static_cast<size_t>(ns[i]), 2);
  }
  cudaStream_t s = op_stream(c);
  const int dev = op_device(c);
  auto* sp = static_cast<StepParams*>(cuda_backend(c).scratch(dev, sizeof(StepParams)));
  prologue<<<1, 1, 0, s>>>(state, normSq, sp, sched, b1, b2, maxNorm, skip);
  CUDA_CHECK_LAUNCH();
  const int64_t maxBlocks = 8 * static_cast<int64_t>(cuda_backend(c).multiprocessors(dev));
  for (size_t start = 0; start < count; start += kGroup) {
    // The struct is large: build it in static storage rather than on the host stack.
    static thread_local TensorList L;
    L.count = static_cast<int>(std::min<size_t>(kGroup, count - start));
    int64_t tiles = 0;
    for (int t = 0; t < L.count; ++t) {
      const size_t i = start + t;
      L.p[t] = c.bufs[2 + 4 * i].as<float>();
      L.g[t] = c.bufs[3 + 4 * i].as<const float>();
      L.m[t] = c.bufs[4 + 4 * i].as<float>();
      L.v[t] = c.bufs[5 + 4 * i].as<float>();
      L.n[t] = ns[i];
      L.wd[t] = static_cast<float>(c.f(14 + 2 * i));
      L.s[t] = shadows ? c.bufs[2 + 4 * count + i].as<bf16>() : nullptr;
      L.vec[t] = aligned16(L.p[t], L.g[t], L.m[t], L.v[t]) &&
                         (reinterpret_cast<uintptr_t>(L.s[t]) & 7) == 0
                     ? 1
                     : 0;
      L.first_tile[t] = tiles;
      tiles += (ns[i] + kTile - 1) / kTile;
    }
    L.first_tile[L.count] = tiles;
    if (tiles == 0) continue;
    const unsigned grid = static_cast<unsigned>(std::min(tiles, maxBlocks));
    update<<<grid, kThreads, 0, s>>>(L, sp, static_cast<float>(b1), static_cast<float>(b2), static_cast<float>(eps));
    CUDA_CHECK_LAUNCH();
  }
}

MAGIX_REGISTER_OP("cuda", "adamw", adamw);

}  // namespace
}  // namespace magix::cuda
