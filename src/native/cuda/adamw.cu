// adamw(state, normSq, p_0, g_0, m_0, v_0, ...; dtype, count, b1, b2, eps, maxNorm, skipNonFinite,
//       scheduleKind, schedule[5], n_0, wd_0, ...): the fused optimizer pass of src/native/OPS.md.
// A one-thread prologue reads the gradient norm and the update count on the device, decides
// skip / clip / learning rate and updates the state; then the tensors are updated in launches of
// up to 32 tensors whose pointers travel in the kernel's parameters (capturable in a CUDA graph:
// no host-to-device copies). Parameters and moments are float32.
#include <vector>

#include "common.cuh"

namespace magix::cuda {
namespace {

struct StepParams {
  float lr, scale, bc1, bc2;
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
  out->bc1 = static_cast<float>(1 - pow(b1, t));
  out->bc2 = static_cast<float>(1 - pow(b2, t));
  state[0] = t;
  state[4] = lr;
}

constexpr int kGroup = 32;
struct Group {
  float* p[kGroup];
  const float* g[kGroup];
  float* m[kGroup];
  float* v[kGroup];
  int64_t n[kGroup];
  float wd[kGroup];
};

__global__ void update(Group grp, const StepParams* sp, float b1, float b2, float eps) {
  if (sp->skip) return;
  const int t = blockIdx.y;
  float* p = grp.p[t];
  const float* g = grp.g[t];
  float* m = grp.m[t];
  float* v = grp.v[t];
  const float lr = sp->lr, scale = sp->scale, bc1 = sp->bc1, bc2 = sp->bc2, wd = grp.wd[t];
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < grp.n[t]; i += (int64_t)gridDim.x * blockDim.x) {
    const float gi = scale * g[i];
    const float mi = b1 * m[i] + (1 - b1) * gi;
    const float vi = b2 * v[i] + (1 - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float pi = p[i];
    p[i] = pi - lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * pi);
  }
}

void adamw(OpCtx& c) {
  check(to_dtype(c.f(0)) == DType::F32, "adamw: parameters and moments are float32 on CUDA");
  const size_t count = c.n(1);
  const double b1 = c.f(2), b2 = c.f(3), eps = c.f(4), maxNorm = c.f(5);
  const int skip = c.i(6) != 0;
  Schedule sched{};
  sched.kind = static_cast<int>(c.i(7));
  check(sched.kind >= 0 && sched.kind <= 2, "adamw: unknown schedule kind");
  for (int i = 0; i < 5; ++i) sched.p[i] = c.f(8 + i);
  check(c.bufs.size() == 2 + 4 * count, "adamw: buffers must be state, normSq, then p, g, m, v per tensor");
  double* state = c.need(0, 8, 8).as<double>();
  const double* normSq = c.need(1, 1, 8).as<double>();
  std::vector<int64_t> ns(count);
  for (size_t i = 0; i < count; ++i) {
    ns[i] = static_cast<int64_t>(c.n(13 + 2 * i));
    for (size_t j = 0; j < 4; ++j) c.need(2 + 4 * i + j, static_cast<size_t>(ns[i]), 4);
  }
  cudaStream_t s = op_stream(c);
  auto* sp = static_cast<StepParams*>(cuda_backend(c).workspace(c.buf(0).device, sizeof(StepParams)));
  prologue<<<1, 1, 0, s>>>(state, normSq, sp, sched, b1, b2, maxNorm, skip);
  CUDA_CHECK_LAUNCH();
  for (size_t start = 0; start < count; start += kGroup) {
    Group grp{};
    const int k = static_cast<int>(std::min<size_t>(kGroup, count - start));
    int64_t biggest = 1;
    for (int t = 0; t < k; ++t) {
      const size_t i = start + t;
      grp.p[t] = c.bufs[2 + 4 * i].as<float>();
      grp.g[t] = c.bufs[3 + 4 * i].as<const float>();
      grp.m[t] = c.bufs[4 + 4 * i].as<float>();
      grp.v[t] = c.bufs[5 + 4 * i].as<float>();
      grp.n[t] = ns[i];
      grp.wd[t] = static_cast<float>(c.f(14 + 2 * i));
      biggest = std::max(biggest, ns[i]);
    }
    dim3 grid(static_cast<unsigned>(std::min<int64_t>((biggest + 255) / 256, 1024)), static_cast<unsigned>(k));
    update<<<grid, 256, 0, s>>>(grp, sp, static_cast<float>(b1), static_cast<float>(b2), static_cast<float>(eps));
    CUDA_CHECK_LAUNCH();
  }
}

MAGIX_REGISTER_OP("cuda", "adamw", adamw);

}  // namespace
}  // namespace magix::cuda
