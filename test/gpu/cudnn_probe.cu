// Standalone check of the cuDNN attention path (src/native/cuda/cudnn.{h,cc}), no Node: random
// bfloat16 q, k, v, dO in our layouts; cuDNN forward and backward against a naive float32
// reference computed on the GPU by the simple kernels below (o, lse, dq, dk, dv: max abs error and
// that over max |reference|); our own flash kernels (flash_mma.cuh) alongside, with the two
// paths' outputs mixed (our backward from cuDNN's o and lse, cuDNN's backward from ours) to show
// that the lse conventions agree; one cuDNN forward + backward captured into a CUDA graph and
// replayed; then timings (cudaEvents) of cuDNN and our kernels at training sizes, in TFLOP/s
// (forward 4·B·Hq·T²·hd, half that when causal; backward 2.5× the forward).
// On any failure it prints the error (cuDNN status name and last-error text) and goes on.
//
// Build (from the repository root; cuDNN is not needed to build):
//   mkdir -p .gpu-build/probe && nvcc -std=c++17 -O3 -arch=sm_90 --expt-relaxed-constexpr \
//     -o .gpu-build/probe/cudnn_probe test/gpu/cudnn_probe.cu src/native/cuda/cudnn.cc -ldl
// Run: LD_LIBRARY_PATH=<dir of libcudnn.so.9>:$LD_LIBRARY_PATH .gpu-build/probe/cudnn_probe [check|time|all]
// (or MAGIX_CUDNN_PATH=/path/to/libcudnn.so.9).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../src/native/cuda/cudnn.h"
#include "../../src/native/cuda/flash_mma.cuh"

using magix::cuda::cudnn::SdpaShape;
namespace cd = magix::cuda::cudnn;
namespace fl = magix::cuda::flash;
using bf16 = __nv_bfloat16;

#define CK(expr)                                                                                    \
  do {                                                                                              \
    cudaError_t e_ = (expr);                                                                        \
    if (e_ != cudaSuccess)                                                                          \
      throw std::runtime_error(std::string(cudaGetErrorName(e_)) + ": " + cudaGetErrorString(e_) + \
                               " (" #expr " line " + std::to_string(__LINE__) + ")");               \
  } while (0)

// ---------------- data ----------------

__global__ void fill_random(bf16* x, size_t n, uint32_t seed, float amp) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed * 0x9E3779B9u ^ static_cast<uint32_t>(i >> 32);
    h ^= h >> 16, h *= 0x7feb352du, h ^= h >> 15, h *= 0x846ca68bu, h ^= h >> 16;
    x[i] = __float2bfloat16(amp * ((h >> 8) * (1.f / 8388608.f) - 1.f));
  }
}

struct Buf {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Buf(size_t n) : bytes(n) {
    if (n) CK(cudaMalloc(&p, n));
  }
  ~Buf() {
    if (p) cudaFree(p);
  }
  Buf(const Buf&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(p); }
};

// ---------------- the float32 reference: one thread per row ----------------

struct Sh {
  int64_t B, T, Hq, Hkv, hd;
  int causal;
  float scale;
};
constexpr int kMaxHd = 128;

__device__ inline float bf(const bf16* p, int64_t i) { return __bfloat162float(p[i]); }

__global__ void ref_fwd(Sh s, const bf16* q, const bf16* k, const bf16* v, float* o, float* lse) {
  const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;  // (b, h, t)
  if (r >= s.B * s.Hq * s.T) return;
  const int64_t t = r % s.T, h = (r / s.T) % s.Hq, b = r / (s.T * s.Hq), hk = h / (s.Hq / s.Hkv);
  const bf16* qr = q + ((b * s.T + t) * s.Hq + h) * s.hd;
  float acc[kMaxHd];
  for (int d = 0; d < s.hd; ++d) acc[d] = 0.f;
  float m = -INFINITY, l = 0.f;
  const int64_t hi = s.causal ? t + 1 : s.T;
  for (int64_t j = 0; j < hi; ++j) {
    const int64_t kv = ((b * s.T + j) * s.Hkv + hk) * s.hd;
    float dot = 0.f;
    for (int d = 0; d < s.hd; ++d) dot += bf(qr, d) * bf(k, kv + d);
    const float sc = dot * s.scale, mn = fmaxf(m, sc), corr = expf(m - mn), e = expf(sc - mn);
    l = l * corr + e;
    for (int d = 0; d < s.hd; ++d) acc[d] = acc[d] * corr + e * bf(v, kv + d);
    m = mn;
  }
  float* orow = o + ((b * s.T + t) * s.Hq + h) * s.hd;
  for (int d = 0; d < s.hd; ++d) orow[d] = acc[d] / l;
  lse[(b * s.Hq + h) * s.T + t] = m + logf(l);
}

// D = Σ_d dO·o (o float32 here; bf16 for our flash backward below).
template <class OT>
__global__ void row_delta(Sh s, const bf16* dO, const OT* o, float* D) {
  const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (r >= s.B * s.Hq * s.T) return;
  const int64_t t = r % s.T, h = (r / s.T) % s.Hq, b = r / (s.T * s.Hq);
  const int64_t base = ((b * s.T + t) * s.Hq + h) * s.hd;
  float acc = 0.f;
  for (int d = 0; d < s.hd; ++d) acc += bf(dO, base + d) * static_cast<float>(o[base + d]);
  D[r] = acc;
}

__global__ void ref_dq(Sh s, const bf16* q, const bf16* k, const bf16* v, const bf16* dO, const float* lse,
                       const float* D, float* dq) {
  const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (r >= s.B * s.Hq * s.T) return;
  const int64_t t = r % s.T, h = (r / s.T) % s.Hq, b = r / (s.T * s.Hq), hk = h / (s.Hq / s.Hkv);
  const int64_t base = ((b * s.T + t) * s.Hq + h) * s.hd;
  float acc[kMaxHd];
  for (int d = 0; d < s.hd; ++d) acc[d] = 0.f;
  const float L = lse[r], Dt = D[r];
  const int64_t hi = s.causal ? t + 1 : s.T;
  for (int64_t j = 0; j < hi; ++j) {
    const int64_t kv = ((b * s.T + j) * s.Hkv + hk) * s.hd;
    float qk = 0.f, dv = 0.f;
    for (int d = 0; d < s.hd; ++d) qk += bf(q, base + d) * bf(k, kv + d), dv += bf(dO, base + d) * bf(v, kv + d);
    const float p = expf(qk * s.scale - L), ds = p * (dv - Dt);
    for (int d = 0; d < s.hd; ++d) acc[d] += ds * bf(k, kv + d);
  }
  for (int d = 0; d < s.hd; ++d) dq[base + d] = acc[d] * s.scale;
}

__global__ void ref_dkdv(Sh s, const bf16* q, const bf16* k, const bf16* v, const bf16* dO, const float* lse,
                         const float* D, float* dk, float* dv) {
  const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;  // (b, hk, j)
  if (r >= s.B * s.Hkv * s.T) return;
  const int64_t j = r % s.T, hk = (r / s.T) % s.Hkv, b = r / (s.T * s.Hkv), group = s.Hq / s.Hkv;
  const int64_t kv = ((b * s.T + j) * s.Hkv + hk) * s.hd;
  float ak[kMaxHd], av[kMaxHd];
  for (int d = 0; d < s.hd; ++d) ak[d] = av[d] = 0.f;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t t = s.causal ? j : 0; t < s.T; ++t) {
      const int64_t row = (b * s.Hq + h) * s.T + t, base = ((b * s.T + t) * s.Hq + h) * s.hd;
      float qk = 0.f, dpv = 0.f;
      for (int d = 0; d < s.hd; ++d) qk += bf(q, base + d) * bf(k, kv + d), dpv += bf(dO, base + d) * bf(v, kv + d);
      const float p = expf(qk * s.scale - lse[row]), ds = p * (dpv - D[row]);
      for (int d = 0; d < s.hd; ++d) av[d] += p * bf(dO, base + d), ak[d] += ds * bf(q, base + d);
    }
  }
  for (int d = 0; d < s.hd; ++d) dk[kv + d] = ak[d] * s.scale, dv[kv + d] = av[d];
}

// ---------------- our flash kernels (as attention.cu launches them) ----------------

// D for our backward: 8 threads a row, rows in memory order ((b, t, h)), as attention.cu's flash_delta.
__global__ void fast_delta(Sh s, const bf16* dO, const bf16* o, float* D) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, m = i / 8, rows = s.B * s.T * s.Hq;
  const int per = static_cast<int>(s.hd / 8), c = static_cast<int>(i % 8) * per;
  float acc = 0.f;
  if (m < rows)
    for (int d = 0; d < per; ++d) acc += bf(dO, m * s.hd + c + d) * bf(o, m * s.hd + c + d);
  for (int off = 4; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (m < rows && c == 0) {
    const int64_t h = m % s.Hq, t = (m / s.Hq) % s.T, b = m / (s.Hq * s.T);
    D[(b * s.Hq + h) * s.T + t] = acc;
  }
}

__global__ void dq_to_bf16(const float* acc, bf16* dq, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    dq[i] = __float2bfloat16(acc[i]);
}

fl::Params params(const SdpaShape& s) {
  fl::Params p{};
  p.B = s.B, p.T = s.T, p.S = s.T, p.sMax = s.T, p.Hq = s.Hq, p.Hkv = s.Hkv, p.hd = s.hd;
  p.causal = s.causal, p.scale = s.scale, p.scale_log2 = s.scale * fl::kLog2e;
  return p;
}

template <class C>
void launch_fwd(const fl::Params& p, cudaStream_t st) {
  CK(cudaFuncSetAttribute(fl::flash_fwd<C>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::smem));
  const int64_t blocks = (p.T + C::BM - 1) / C::BM * p.B * p.Hq;
  fl::flash_fwd<C><<<(unsigned)blocks, C::THREADS, C::smem, st>>>(p);
  CK(cudaGetLastError());
}
template <class C>
void launch_bwd(const fl::Params& p, cudaStream_t st) {
  CK(cudaFuncSetAttribute(fl::flash_bwd<C>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::smem));
  const int64_t blocks = (p.S + C::BN - 1) / C::BN * p.B * p.Hkv;
  fl::flash_bwd<C><<<(unsigned)blocks, C::THREADS, C::smem, st>>>(p);
  CK(cudaGetLastError());
}

void ours_fwd(const SdpaShape& s, const void* q, const void* k, const void* v, void* o, float* lse, cudaStream_t st) {
  fl::Params p = params(s);
  p.q = q, p.k = k, p.v = v, p.out = o, p.lse = lse;
  if (s.hd == 128) launch_fwd<fl::FwdHd128>(p, st);
  else if (s.T > 2048) launch_fwd<fl::FwdHd64Long>(p, st);
  else launch_fwd<fl::FwdHd64>(p, st);
}

// D and the float dq accumulator come from `ws` (rows·4 + q elements·4 bytes).
void ours_bwd(const SdpaShape& s, const void* q, const void* k, const void* v, const void* o, const float* lse,
              const void* dO, void* dq, void* dk, void* dv, void* ws, cudaStream_t st) {
  fl::Params p = params(s);
  const size_t rows = s.B * s.Hq * s.T, qn = rows * s.hd;
  p.q = q, p.k = k, p.v = v, p.o = o, p.lse = const_cast<float*>(lse), p.dO = dO, p.dq = dq, p.dk = dk, p.dv = dv;
  float* D = static_cast<float*>(ws);
  p.D = D;
  p.dqacc = D + (rows + 63) / 64 * 64;
  Sh sh{s.B, s.T, s.Hq, s.Hkv, s.hd, s.causal, s.scale};
  fast_delta<<<(rows * 8 + 255) / 256, 256, 0, st>>>(sh, static_cast<const bf16*>(dO), static_cast<const bf16*>(o), D);
  CK(cudaMemsetAsync(p.dqacc, 0, qn * 4, st));
  if (s.hd == 64) launch_bwd<fl::BwdHd64>(p, st);
  else launch_bwd<fl::BwdHd128>(p, st);
  dq_to_bf16<<<1024, 256, 0, st>>>(p.dqacc, static_cast<bf16*>(dq), qn);
  CK(cudaGetLastError());
}
size_t ours_bwd_ws(const SdpaShape& s) {
  const size_t rows = s.B * s.Hq * s.T;
  return ((rows + 63) / 64 * 64 + rows * s.hd) * 4;
}

// ---------------- comparisons ----------------

std::vector<float> to_host_f(const void* d, size_t n, bool isBf16) {
  std::vector<float> h(n);
  if (isBf16) {
    std::vector<bf16> t(n);
    CK(cudaMemcpy(t.data(), d, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) h[i] = __bfloat162float(t[i]);
  } else {
    CK(cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost));
  }
  return h;
}

int g_fail = 0;

// Max abs error, and that over max |ref|; `tol` on the latter.
void compare(const char* what, const void* got, bool gotBf16, const void* ref, size_t n, double tol) {
  auto a = to_host_f(got, n, gotBf16), b = to_host_f(ref, n, false);
  double maxErr = 0, maxRef = 0, sumErr = 0;
  size_t bad = 0, worst = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(a[i])) ++bad;
    const double e = std::fabs((double)a[i] - b[i]);
    if (e > maxErr) maxErr = e, worst = i;
    sumErr += e;
    maxRef = std::fmax(maxRef, std::fabs((double)b[i]));
  }
  const double rel = maxErr / (maxRef > 0 ? maxRef : 1);
  const bool ok = bad == 0 && rel <= tol;
  if (!ok) ++g_fail;
  std::printf("    %-22s max|err| %.3e  max|ref| %.3e  rel %.3e  mean|err| %.2e%s  %s\n", what, maxErr, maxRef, rel,
              sumErr / n, bad ? "  NON-FINITE" : "", ok ? "ok" : "FAIL");
  if (!ok) std::printf("      worst at %zu: got %.6f ref %.6f\n", worst, a[worst], b[worst]);
}

const char* yes(bool b) { return b ? "causal" : "full"; }

void check_case(SdpaShape s) {
  std::printf("\n== check B=%lld T=%lld Hq=%lld Hkv=%lld hd=%lld %s scale=%.4f\n", (long long)s.B, (long long)s.T,
              (long long)s.Hq, (long long)s.Hkv, (long long)s.hd, yes(s.causal), s.scale);
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const size_t rows = s.B * s.Hq * s.T, qn = rows * s.hd, kn = s.B * s.T * s.Hkv * s.hd;
  Buf q(qn * 2), k(kn * 2), v(kn * 2), dO(qn * 2);
  fill_random<<<512, 256, 0, st>>>(q.as<bf16>(), qn, 1, 1.5f);
  fill_random<<<512, 256, 0, st>>>(k.as<bf16>(), kn, 2, 1.5f);
  fill_random<<<512, 256, 0, st>>>(v.as<bf16>(), kn, 3, 1.f);
  fill_random<<<512, 256, 0, st>>>(dO.as<bf16>(), qn, 4, 1.f);
  CK(cudaGetLastError());
  // reference
  Sh sh{s.B, s.T, s.Hq, s.Hkv, s.hd, s.causal, s.scale};
  Buf ro(qn * 4), rl(rows * 4), rD(rows * 4), rdq(qn * 4), rdk(kn * 4), rdv(kn * 4);
  const unsigned gr = (rows + 127) / 128, gk = (s.B * s.Hkv * s.T + 127) / 128;
  ref_fwd<<<gr, 128, 0, st>>>(sh, q.as<bf16>(), k.as<bf16>(), v.as<bf16>(), ro.as<float>(), rl.as<float>());
  row_delta<float><<<gr, 128, 0, st>>>(sh, dO.as<bf16>(), ro.as<float>(), rD.as<float>());
  ref_dq<<<gr, 128, 0, st>>>(sh, q.as<bf16>(), k.as<bf16>(), v.as<bf16>(), dO.as<bf16>(), rl.as<float>(), rD.as<float>(),
                             rdq.as<float>());
  ref_dkdv<<<gk, 128, 0, st>>>(sh, q.as<bf16>(), k.as<bf16>(), v.as<bf16>(), dO.as<bf16>(), rl.as<float>(),
                               rD.as<float>(), rdk.as<float>(), rdv.as<float>());
  CK(cudaGetLastError());
  CK(cudaStreamSynchronize(st));

  Buf o(qn * 2), lse(rows * 4), dq(qn * 2), dk(kn * 2), dv(kn * 2);
  bool cudnnFwd = false;
  try {
    auto t0 = std::chrono::steady_clock::now();
    const size_t wf = cd::sdpa_fwd_workspace(s, 0);
    auto t1 = std::chrono::steady_clock::now();
    std::printf("  cuDNN fwd plan built in %.2f s, workspace %zu B\n", std::chrono::duration<double>(t1 - t0).count(), wf);
    Buf ws(wf);
    CK(cudaMemsetAsync(o.p, 0xff, qn * 2, st));
    CK(cudaMemsetAsync(lse.p, 0xff, rows * 4, st));
    cd::sdpa_fwd(s, 0, q.p, k.p, v.p, o.p, lse.as<float>(), ws.p, st);
    CK(cudaStreamSynchronize(st));
    std::printf("  cuDNN forward vs float32 reference:\n");
    compare("o", o.p, true, ro.p, qn, 2e-2);
    compare("lse (Stats)", lse.p, false, rl.p, rows, 1e-3);
    cudnnFwd = true;
  } catch (const std::exception& e) {
    ++g_fail;
    std::printf("  cuDNN forward FAILED: %s\n", e.what());
  }
  // Our flash forward: its o and lse against the reference and against cuDNN's Stats.
  Buf o2(qn * 2), lse2(rows * 4), dq2(qn * 2), dk2(kn * 2), dv2(kn * 2), ws2(ours_bwd_ws(s));
  try {
    ours_fwd(s, q.p, k.p, v.p, o2.p, lse2.as<float>(), st);
    CK(cudaStreamSynchronize(st));
    std::printf("  our flash forward vs reference, and its lse vs cuDNN Stats:\n");
    compare("o (ours)", o2.p, true, ro.p, qn, 2e-2);
    compare("lse (ours)", lse2.p, false, rl.p, rows, 1e-3);
    if (cudnnFwd) compare("cuDNN Stats vs our lse", lse.p, false, lse2.p, rows, 1e-3);
  } catch (const std::exception& e) {
    ++g_fail;
    std::printf("  our forward FAILED: %s\n", e.what());
  }
  if (!cd::sdpa_in_scope(s, true)) {
    std::printf("  cuDNN backward: out of scope for cuDNN %zu at this T (attention.cu falls back to our kernels)\n",
                cd::version());
    cudaStreamDestroy(st);
    return;
  }
  try {
    auto t0 = std::chrono::steady_clock::now();
    const size_t wb = cd::sdpa_bwd_workspace(s, 0);
    auto t1 = std::chrono::steady_clock::now();
    std::printf("  cuDNN bwd plan built in %.2f s, workspace %zu B\n", std::chrono::duration<double>(t1 - t0).count(), wb);
    Buf ws(wb);
    if (!cudnnFwd) throw std::runtime_error("skipped: no cuDNN forward");
    cd::sdpa_bwd(s, 0, q.p, k.p, v.p, o.p, lse.as<float>(), dO.p, dq.p, dk.p, dv.p, ws.p, st);
    CK(cudaStreamSynchronize(st));
    std::printf("  cuDNN backward (from cuDNN o, lse) vs float32 reference:\n");
    compare("dq", dq.p, true, rdq.p, qn, 2e-2);
    compare("dk", dk.p, true, rdk.p, kn, 2e-2);
    compare("dv", dv.p, true, rdv.p, kn, 2e-2);

    // Mixing the paths: cuDNN's backward from our o and lse, our backward from cuDNN's.
    cd::sdpa_bwd(s, 0, q.p, k.p, v.p, o2.p, lse2.as<float>(), dO.p, dq2.p, dk2.p, dv2.p, ws.p, st);
    CK(cudaStreamSynchronize(st));
    std::printf("  cuDNN backward from OUR o, lse:\n");
    compare("dq", dq2.p, true, rdq.p, qn, 2e-2);
    compare("dk", dk2.p, true, rdk.p, kn, 2e-2);
    compare("dv", dv2.p, true, rdv.p, kn, 2e-2);
    ours_bwd(s, q.p, k.p, v.p, o.p, lse.as<float>(), dO.p, dq2.p, dk2.p, dv2.p, ws2.p, st);
    CK(cudaStreamSynchronize(st));
    std::printf("  OUR backward from cuDNN o, Stats:\n");
    compare("dq", dq2.p, true, rdq.p, qn, 2e-2);
    compare("dk", dk2.p, true, rdk.p, kn, 2e-2);
    compare("dv", dv2.p, true, rdv.p, kn, 2e-2);

    // Stream capture: cuDNN forward + backward recorded into a graph, replayed twice.
    Buf wsf(cd::sdpa_fwd_workspace(s, 0));
    size_t wsz = 0;
    const bool readyF = cd::sdpa_fwd_ready(s, 0, st, wsz), readyB = cd::sdpa_bwd_ready(s, 0, st, wsz);
    cudaGraph_t graph;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    try {
      cd::sdpa_fwd(s, 0, q.p, k.p, v.p, o2.p, lse2.as<float>(), wsf.p, st);
      cd::sdpa_bwd(s, 0, q.p, k.p, v.p, o2.p, lse2.as<float>(), dO.p, dq2.p, dk2.p, dv2.p, ws.p, st);
    } catch (...) {
      cudaStreamEndCapture(st, &graph);
      throw;
    }
    CK(cudaStreamEndCapture(st, &graph));
    cudaGraphExec_t exec;
    CK(cudaGraphInstantiate(&exec, graph, 0));
    CK(cudaMemsetAsync(dq2.p, 0, qn * 2, st));
    CK(cudaGraphLaunch(exec, st));
    CK(cudaGraphLaunch(exec, st));
    CK(cudaStreamSynchronize(st));
    std::printf("  captured graph (ready fwd %d bwd %d), replayed:\n", readyF, readyB);
    compare("o (graph)", o2.p, true, ro.p, qn, 2e-2);
    compare("dq (graph)", dq2.p, true, rdq.p, qn, 2e-2);
    compare("dk (graph)", dk2.p, true, rdk.p, kn, 2e-2);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  } catch (const std::exception& e) {
    ++g_fail;
    std::printf("  cuDNN backward / mixing / capture FAILED: %s\n", e.what());
  }
  cudaStreamDestroy(st);
}

// ---------------- timing ----------------

template <class F>
double time_ms(cudaStream_t st, int iters, F&& f) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  CK(cudaEventRecord(a, st));
  for (int i = 0; i < iters; ++i) f();
  CK(cudaEventRecord(b, st));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / iters;
}

void time_case(SdpaShape s) {
  std::printf("\n== time B=%lld T=%lld Hq=%lld Hkv=%lld hd=%lld %s\n", (long long)s.B, (long long)s.T, (long long)s.Hq,
              (long long)s.Hkv, (long long)s.hd, yes(s.causal));
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const size_t rows = s.B * s.Hq * s.T, qn = rows * s.hd, kn = s.B * s.T * s.Hkv * s.hd;
  Buf q(qn * 2), k(kn * 2), v(kn * 2), dO(qn * 2), o(qn * 2), lse(rows * 4), dq(qn * 2), dk(kn * 2), dv(kn * 2);
  fill_random<<<1024, 256, 0, st>>>(q.as<bf16>(), qn, 1, 1.5f);
  fill_random<<<1024, 256, 0, st>>>(k.as<bf16>(), kn, 2, 1.5f);
  fill_random<<<1024, 256, 0, st>>>(v.as<bf16>(), kn, 3, 1.f);
  fill_random<<<1024, 256, 0, st>>>(dO.as<bf16>(), qn, 4, 1.f);
  CK(cudaGetLastError());
  const double fwdFlops = (s.causal ? 2.0 : 4.0) * s.B * s.Hq * (double)s.T * s.T * s.hd, bwdFlops = 2.5 * fwdFlops;
  const int iters = 20;
  double cf = 0, cb = 0;
  try {
    auto t0 = std::chrono::steady_clock::now();
    Buf wf(cd::sdpa_fwd_workspace(s, 0));
    Buf wb(cd::sdpa_bwd_workspace(s, 0));
    auto t1 = std::chrono::steady_clock::now();
    std::printf("  plans built in %.2f s; workspace fwd %zu B, bwd %zu B\n",
                std::chrono::duration<double>(t1 - t0).count(), wf.bytes, wb.bytes);
    cf = time_ms(st, iters, [&] { cd::sdpa_fwd(s, 0, q.p, k.p, v.p, o.p, lse.as<float>(), wf.p, st); });
    cb = time_ms(st, iters, [&] {
      cd::sdpa_bwd(s, 0, q.p, k.p, v.p, o.p, lse.as<float>(), dO.p, dq.p, dk.p, dv.p, wb.p, st);
    });
    std::printf("  cuDNN  fwd %8.3f ms %6.1f TFLOP/s   bwd %8.3f ms %6.1f TFLOP/s\n", cf, fwdFlops / cf * 1e-9, cb,
                bwdFlops / cb * 1e-9);
  } catch (const std::exception& e) {
    ++g_fail;
    std::printf("  cuDNN timing FAILED: %s\n", e.what());
  }
  try {
    Buf ws(ours_bwd_ws(s));
    const double of = time_ms(st, iters, [&] { ours_fwd(s, q.p, k.p, v.p, o.p, lse.as<float>(), st); });
    const double ob = time_ms(st, iters, [&] {
      ours_bwd(s, q.p, k.p, v.p, o.p, lse.as<float>(), dO.p, dq.p, dk.p, dv.p, ws.p, st);
    });
    std::printf("  ours   fwd %8.3f ms %6.1f TFLOP/s   bwd %8.3f ms %6.1f TFLOP/s", of, fwdFlops / of * 1e-9, ob,
                bwdFlops / ob * 1e-9);
    if (cf > 0 && cb > 0) std::printf("   (cuDNN/ours speed: fwd %.2fx bwd %.2fx)", of / cf, ob / cb);
    std::printf("\n");
  } catch (const std::exception& e) {
    ++g_fail;
    std::printf("  our kernels' timing FAILED: %s\n", e.what());
  }
  cudaStreamDestroy(st);
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const std::string what = argc > 1 ? argv[1] : "all";
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::printf("no CUDA device\n");
    return 2;
  }
  CK(cudaSetDevice(0));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  if (!cd::sdpa_available()) {
    std::printf("cuDNN unavailable: %s\n", cd::sdpa_unavailable_reason().c_str());
    return 1;
  }
  std::printf("cuDNN version %zu\n", cd::version());
  auto S = [](int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, bool causal) {
    SdpaShape s;
    s.B = B, s.T = T, s.Hq = Hq, s.Hkv = Hkv, s.hd = hd, s.causal = causal, s.scale = 1.f / std::sqrt((float)hd);
    return s;
  };
  auto guarded = [](auto f, SdpaShape s) {
    try {
      f(s);
    } catch (const std::exception& e) {
      ++g_fail;
      std::printf("  FAILED: %s\n", e.what());
    }
  };
  if (what == "all" || what == "check") {
    guarded(check_case, S(2, 256, 8, 2, 64, true));
    guarded(check_case, S(2, 256, 8, 2, 128, false));
    guarded(check_case, S(2, 1000, 8, 2, 64, true));
    guarded(check_case, S(1, 384, 4, 4, 128, true));  // MHA (no group reduction)
    guarded(check_case, S(1, 200, 4, 1, 128, false)); // MQA, odd length, no causal mask
  }
  if (what == "all" || what == "time") {
    guarded(time_case, S(8, 2048, 32, 8, 64, true));
    guarded(time_case, S(4, 4096, 16, 8, 128, true));
  }
  std::printf("\n%s (%d failures)\n", g_fail ? "FAILURES" : "ALL OK", g_fail);
  return g_fail ? 1 : 0;
}
