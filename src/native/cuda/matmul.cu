// matmul(A, B, C; dtype, batch, M, N, K, transA, transB, alpha, beta, lda, ldb, ldc, strideA,
//        strideB, strideC, offA, offB, offC[, cdtype]) (src/native/OPS.md):
//   C[offC + b·strideC + i·ldc + j] = alpha·Σ_k opA(b,i,k)·opB(b,k,j) + beta·C[...]
//   opA(b,i,k) = A[offA + b·strideA + (transA ? k·lda + i : i·lda + k)], opB likewise with ldb.
// beta = 0 never reads C; a stride of 0 broadcasts one matrix over the batch.
//
// Through cuBLASLt (dynloaded, dynload.h): one handle and one 32 MiB workspace per device.
// cuBLASLt is column-major: a row-major X with leading dimension ld is the column-major Xᵀ with
// the same ld, so the row-major C = op(A)·op(B) is computed as the column-major
// Cᵀ = op(B)ᵀ·op(A)ᵀ: the operands swapped, each keeping its own transpose flag.
// Types: bf16 A and B with float32 compute (CUBLAS_COMPUTE_32F) and C in bf16, or in float32
// when cdtype is 0 (weight gradients); float32 A, B and C with exact float32 compute (no TF32).
// The descriptors and the chosen algorithm are cached per shape, dtypes, pointer alignment
// (cuBLASLt kernels may need 16-byte aligned operands; offsets can break that) and whether beta
// is 0 (an algorithm that reads C can rank differently from one that does not).
//
// Autotuning (on a plan-cache miss): cuBLASLt's heuristic ranks algorithms by a model, and its
// first pick measured 45–82% of the bf16 ceiling on the Llama-3.2-1B step's thinner products
// (16384×2048×512, 512×2048×16384 Aᵀ, 16384×2048×2048 Bᵀ) where a lower-ranked one may do better.
// A miss asks for up to kTuneCandidates results, keeps those with a success state and a workspace
// within ours, and times each on the call's own A and B with CUDA events on the op's stream: one
// untimed warm-up, one timed run that sizes the batch of runs (about kTuneWindowUs of work, 2 to
// 32 runs), then two interleaved rounds of that batch; a candidate's time is its better round's
// mean. The pick is the first candidate in heuristic order within 1% of the fastest, so noise
// does not move it off the heuristic's choice for nothing. The timed runs write a temporary
// output of C's extent (zeroed; alpha and beta as the call's, C = D as in the real call), never
// C itself: with beta ≠ 0 C must take the product exactly once, which the real launch after the
// tuning does. The temporary is cudaMalloc'd and freed around the tuning, outside the caching
// allocator: gemm() also runs inside other ops (ce_fwd, ce_bwd, ce_fused in cross_entropy.cu)
// whose op scratch holds live data (the logits chunk is the very C being tuned), and the op
// scratch is grow-only, so borrowing it would pin C's size (4 GiB for a 16384×128256 bf16 product)
// for the process. Where cudaMalloc fails (memory held by the cache), the plan keeps the
// heuristic's first result. Tuning synchronises the stream (cudaEventSynchronize) once per new
// plan; it runs only where that is allowed and pays:
//   - never while the stream (or the backend) is capturing a graph: such a miss caches the
//     heuristic's first result for good, so within a process one plan always runs one algorithm
//     and a graph's replay matches the same product run op by op (jit replays op by op before it
//     captures, so a step's plans are tuned by then);
//   - not for small products (batch·M·N·K < kTuneMinWork), where the timing cannot pay back;
//   - not with MAGIX_MATMUL_TUNE=0 (the heuristic's first result, as before tuning existed).
// MAGIX_MATMUL_TUNE_LOG=1 prints each tuning's candidates and pick to stderr.
// Determinism: every candidate is kept, split-K ones included. cuBLAS documents its routines as
// bit-wise reproducible run to run on the same architecture and SM count (cuBLAS guide, "Results
// reproducibility"; the multi-stream caveat there is lifted by cublasLtMatmul with a user-owned
// workspace, which we pass; the exception named there is cublasSetAtomicsMode's atomics, a
// cuBLAS handle setting we do not use); and cublasLt.h's cublasLtReductionScheme_t, which
// describes how split-K parts are summed, has no unordered scheme: INPLACE reduces in the output
// "using ... counters (in workspace) to guarantee the sequentiality", COMPUTE_TYPE and
// OUTPUT_TYPE store the parts in the workspace and reduce them in a separate step. Excluding
// split-K would give up the algorithms that help the thin-output, long-K products most (weight
// gradients such as 512×2048×16384) for no determinism gained. So a cached plan gives the same
// bits every call. What can differ between processes (or between the GPUs of one process, each
// tuning its own plans) is the pick itself, through timing noise, and with it the rounding;
// MAGIX_MATMUL_TUNE=0 gives the heuristic's choice, which depends only on the library, the GPU
// and the shape.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "blas.h"
#include "common.cuh"

namespace magix::cuda {
namespace {

int cuda_type(DType t) {
  if (t == DType::F32) return CUDA_R_32F;
  if (t == DType::BF16) return CUDA_R_16BF;
  invalid("matmul: the CUDA backend multiplies float32 or bfloat16");
}

uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al >>= 1;
  return al;
}

struct PlanKey {
  int64_t v[16];
  bool operator==(const PlanKey& o) const { return std::memcmp(v, o.v, sizeof(v)) == 0; }
};
struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t x : k.v) h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t x = nullptr, y = nullptr, d = nullptr;  // X = the B buffer, Y = the A buffer
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

std::mutex g_mu;
std::unordered_map<PlanKey, Plan, PlanKeyHash> g_plans;

void destroy_plan(Plan& p) {
  const CublasLt& L = cublaslt();
  if (p.desc) L.MatmulDescDestroy(p.desc);
  if (p.x) L.MatrixLayoutDestroy(p.x);
  if (p.y) L.MatrixLayoutDestroy(p.y);
  if (p.d) L.MatrixLayoutDestroy(p.d);
  p = Plan{};
}

// Destroys what a half-built plan holds when building (or tuning) it fails.
struct PlanGuard {
  Plan& p;
  bool keep = false;
  ~PlanGuard() {
    if (!keep) destroy_plan(p);
  }
};

cublasLtMatrixLayout_t layout(int type, int64_t rows, int64_t cols, int64_t ld, int64_t batch, int64_t stride) {
  const CublasLt& L = cublaslt();
  cublasLtMatrixLayout_t l = nullptr;
  CUBLAS_CHECK(L.MatrixLayoutCreate(&l, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld));
  if (batch > 1) {
    const int32_t count = static_cast<int32_t>(batch);
    const int st1 = L.MatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count));
    const int st2 = st1 != 0 ? st1 : L.MatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride));
    if (st2 != 0) {
      L.MatrixLayoutDestroy(l);
      CUBLAS_CHECK(st2);
    }
  }
  return l;
}

// Builds the descriptors and asks the heuristic for up to `want` algorithms; `cands` gets those
// that can run here (success state, workspace within ours), best-ranked first, and the plan
// starts with the first of them.
Plan make_plan(cublasLtHandle_t handle, const GemmArgs& g, uint32_t alA, uint32_t alB, uint32_t alC, int want,
               std::vector<cublasLtMatmulHeuristicResult_t>& cands) {
  const CublasLt& L = cublaslt();
  const int abType = cuda_type(g.ab), cType = cuda_type(g.c);
  Plan plan;
  PlanGuard guard{plan};
  CUBLAS_CHECK(L.MatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const int32_t opX = g.transB ? CUBLAS_OP_T : CUBLAS_OP_N, opY = g.transA ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(L.MatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &opX, sizeof(opX)));
  CUBLAS_CHECK(L.MatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &opY, sizeof(opY)));
  // X = op(B)ᵀ (N×K): the B buffer seen column-major is N×K (no transB) or K×N (transB).
  plan.x = g.transB ? layout(abType, g.K, g.N, g.ldb, g.batch, g.strideB) : layout(abType, g.N, g.K, g.ldb, g.batch, g.strideB);
  // Y = op(A)ᵀ (K×M): the A buffer seen column-major is K×M (no transA) or M×K (transA).
  plan.y = g.transA ? layout(abType, g.M, g.K, g.lda, g.batch, g.strideA) : layout(abType, g.K, g.M, g.lda, g.batch, g.strideA);
  plan.d = layout(cType, g.N, g.M, g.ldc, g.batch, g.strideC);
  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_CHECK(L.MatmulPreferenceCreate(&pref));
  const uint64_t ws = CudaBackend::kLtWorkspace;
  int st = L.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  // The first operand of the column-major product is the B buffer, the second the A buffer.
  if (st == 0) st = L.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &alB, sizeof(alB));
  if (st == 0) st = L.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &alA, sizeof(alA));
  if (st == 0) st = L.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &alC, sizeof(alC));
  if (st == 0) st = L.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &alC, sizeof(alC));
  std::vector<cublasLtMatmulHeuristicResult_t> results(static_cast<size_t>(std::max(want, 1)));
  int found = 0;
  if (st == 0)
    st = L.MatmulAlgoGetHeuristic(handle, plan.desc, plan.x, plan.y, plan.d, plan.d, pref, static_cast<int>(results.size()),
                                  results.data(), &found);
  L.MatmulPreferenceDestroy(pref);
  CUBLAS_CHECK(st);
  cands.clear();
  for (int i = 0; i < found && i < static_cast<int>(results.size()); ++i)
    if (results[i].state == 0 && results[i].workspaceSize <= CudaBackend::kLtWorkspace) cands.push_back(results[i]);
  if (cands.empty())
    throw MagixError("CUBLAS_ERROR", "cuBLASLt has no algorithm for matmul batch " + std::to_string(g.batch) + ", M " +
                                         std::to_string(g.M) + ", N " + std::to_string(g.N) + ", K " + std::to_string(g.K) +
                                         " (lda " + std::to_string(g.lda) + ", ldb " + std::to_string(g.ldb) + ", ldc " +
                                         std::to_string(g.ldc) + ")")
        .with("library", "cublasLt")
        .with("status", CUBLAS_STATUS_NOT_SUPPORTED)
        .with("name", "CUBLAS_STATUS_NOT_SUPPORTED");
  plan.algo = cands[0].algo;
  plan.workspace = cands[0].workspaceSize;
  guard.keep = true;
  return plan;
}

// ---- autotuning (see the top of the file) ----
constexpr int kTuneCandidates = 16;
constexpr double kTuneMinWork = 1073741824.0;  // 2^30 multiply-adds: below, the heuristic's first
constexpr float kTuneWindowUs = 300.f;         // work per timed batch of runs
constexpr int kTuneMinRuns = 2, kTuneMaxRuns = 32;
constexpr float kTuneTolerance = 1.01f;  // a later-ranked candidate must beat the earlier by more

bool env_off(const char* name) {
  const char* e = std::getenv(name);
  return e != nullptr && std::strcmp(e, "0") == 0;
}
bool env_on(const char* name) {
  const char* e = std::getenv(name);
  return e != nullptr && *e != 0 && std::strcmp(e, "0") != 0;
}

// Why a miss takes the heuristic's first result untimed, or nullptr when it tunes.
const char* skip_tuning(CudaBackend& backend, const GemmArgs& g, cudaStream_t stream) {
  if (env_off("MAGIX_MATMUL_TUNE")) return "MAGIX_MATMUL_TUNE=0";
  if (static_cast<double>(g.batch) * static_cast<double>(g.M) * static_cast<double>(g.N) * static_cast<double>(g.K) <
      kTuneMinWork)
    return "small";
  if (backend.capturing()) return "capturing";
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(stream, &cs));
  if (cs != cudaStreamCaptureStatusNone) return "capturing";
  return nullptr;
}

// The temporary output and the two timing events of one tuning; the destructor waits for the
// stream before freeing (also when a check throws part-way).
struct TuneScratch {
  cudaStream_t stream;
  void* out = nullptr;
  cudaEvent_t ev[2] = {nullptr, nullptr};
  ~TuneScratch() {
    if (out) {
      cudaStreamSynchronize(stream);
      cudaFree(out);
    }
    for (cudaEvent_t e : ev)
      if (e) cudaEventDestroy(e);
  }
};

// Times the candidates as described at the top; `us` gets each one's microseconds per run (-1
// for one whose launch failed). Returns the index to use, or -1 when the timing could not run
// (no memory for the temporary output).
int autotune(cublasLtHandle_t handle, const Plan& plan, const GemmArgs& g, cudaStream_t stream, void* ws,
             const std::vector<cublasLtMatmulHeuristicResult_t>& cands, std::vector<float>& us) {
  const CublasLt& L = cublaslt();
  const size_t elems = static_cast<size_t>((g.batch - 1) * g.strideC + (g.M - 1) * g.ldc + g.N);
  const size_t bytes = elems * dtype_size(g.c);
  TuneScratch t{stream};
  if (cudaMalloc(&t.out, bytes) != cudaSuccess) {
    t.out = nullptr;
    cudaGetLastError();  // an allocation failure is not sticky: clear it
    return -1;
  }
  CUDA_CHECK(cudaEventCreate(&t.ev[0]));
  CUDA_CHECK(cudaEventCreate(&t.ev[1]));
  CUDA_CHECK(cudaMemsetAsync(t.out, 0, bytes, stream));
  const size_t n = cands.size();
  std::vector<bool> alive(n, true);
  std::vector<int> runs(n, kTuneMinRuns);
  us.assign(n, -1.f);
  auto launch = [&](size_t i) {
    return L.Matmul(handle, plan.desc, &g.alpha, g.B, plan.x, g.A, plan.y, &g.beta, t.out, plan.d, t.out, plan.d,
                    &cands[i].algo, ws, cands[i].workspaceSize, stream);
  };
  // Microseconds per run over `count` runs of candidate i, or -1 if a launch fails.
  auto timed = [&](size_t i, int count) {
    bool ok = true;
    CUDA_CHECK(cudaEventRecord(t.ev[0], stream));
    for (int r = 0; r < count && ok; ++r) ok = launch(i) == 0;
    CUDA_CHECK(cudaEventRecord(t.ev[1], stream));
    CUDA_CHECK(cudaEventSynchronize(t.ev[1]));
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, t.ev[0], t.ev[1]));
    return ok ? 1000.f * ms / static_cast<float>(count) : -1.f;
  };
  for (size_t i = 0; i < n; ++i) {
    if (launch(i) != 0) {  // warm-up (the first launch of a kernel may load its module)
      alive[i] = false;
      continue;
    }
    const float once = timed(i, 1);
    if (once < 0.f) {
      alive[i] = false;
      continue;
    }
    runs[i] = static_cast<int>(std::min<float>(kTuneMaxRuns, std::max<float>(kTuneMinRuns, kTuneWindowUs / std::max(once, 1.f))));
  }
  for (int round = 0; round < 2; ++round)
    for (size_t i = 0; i < n; ++i) {
      if (!alive[i]) continue;
      const float u = timed(i, runs[i]);
      if (u < 0.f) {
        alive[i] = false;
        us[i] = -1.f;
      } else if (us[i] < 0.f || u < us[i]) {
        us[i] = u;
      }
    }
  float best = -1.f;
  for (size_t i = 0; i < n; ++i)
    if (alive[i] && (best < 0.f || us[i] < best)) best = us[i];
  if (best < 0.f) return 0;  // nothing ran: keep the heuristic's first (its own launch reports why)
  for (size_t i = 0; i < n; ++i)
    if (alive[i] && us[i] <= best * kTuneTolerance) return static_cast<int>(i);
  return 0;
}

const char* dtype_name(DType t) { return t == DType::BF16 ? "bf16" : "f32"; }

void log_tuning(int device, const GemmArgs& g, const std::vector<cublasLtMatmulHeuristicResult_t>& cands,
                const std::vector<float>& us, int pick, const char* skipped) {
  std::fprintf(stderr, "magix matmul tune: device %d batch %lld M %lld N %lld K %lld transA %d transB %d %s->%s beta %g: ",
               device, static_cast<long long>(g.batch), static_cast<long long>(g.M), static_cast<long long>(g.N),
               static_cast<long long>(g.K), g.transA ? 1 : 0, g.transB ? 1 : 0, dtype_name(g.ab), dtype_name(g.c),
               static_cast<double>(g.beta));
  if (skipped) {
    std::fprintf(stderr, "heuristic's first (%s)\n", skipped);
    return;
  }
  const double flops = 2.0 * static_cast<double>(g.batch) * static_cast<double>(g.M) * static_cast<double>(g.N) *
                       static_cast<double>(g.K);
  uint32_t splitk = 0, scheme = 0;
  int32_t id = -1;
  const CublasLt& L = cublaslt();
  if (L.MatmulAlgoConfigGetAttribute) {
    size_t w = 0;
    L.MatmulAlgoConfigGetAttribute(&cands[pick].algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof(id), &w);
    L.MatmulAlgoConfigGetAttribute(&cands[pick].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof(splitk), &w);
    L.MatmulAlgoConfigGetAttribute(&cands[pick].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme), &w);
  }
  const auto tflops = [&](float u) { return u > 0.f ? flops / (static_cast<double>(u) * 1e-6) / 1e12 : 0.0; };
  std::fprintf(stderr, "%zu candidates, heuristic's first %.1f us (%.0f TFLOP/s), picked #%d %.1f us (%.0f TFLOP/s, algo %d, split-K %u, reduction %u); all us:",
               cands.size(), static_cast<double>(us[0]), tflops(us[0]), pick, static_cast<double>(us[pick]),
               tflops(us[pick]), id, splitk, scheme);
  for (float u : us) std::fprintf(stderr, " %.1f", static_cast<double>(u));
  std::fprintf(stderr, "\n");
}

// C = beta·C (K = 0): beta = 0 writes zeros without reading C.
template <typename T>
__global__ void scale_c(T* C, int64_t batch, int64_t M, int64_t N, int64_t ldc, int64_t strideC, float beta) {
  const int64_t total = batch * M * N;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = i % N, r = (i / N) % M, b = i / (N * M);
    T* p = C + b * strideC + r * ldc + j;
    *p = from_f<T>(beta == 0.f ? 0.f : beta * to_f(*p));
  }
}

}  // namespace

void gemm(CudaBackend& backend, int device, const GemmArgs& g) {
  if (g.M == 0 || g.N == 0 || g.batch == 0) return;
  cudaStream_t stream = backend.stream(device);
  CUDA_CHECK(cudaSetDevice(device));
  if (g.K == 0) {
    const size_t total = static_cast<size_t>(g.batch * g.M * g.N);
    if (g.c == DType::F32)
      scale_c<float><<<grid_for(total), 256, 0, stream>>>(static_cast<float*>(g.C), g.batch, g.M, g.N, g.ldc, g.strideC, g.beta);
    else
      scale_c<bf16><<<grid_for(total), 256, 0, stream>>>(static_cast<bf16*>(g.C), g.batch, g.M, g.N, g.ldc, g.strideC, g.beta);
    CUDA_CHECK_LAUNCH();
    return;
  }
  if (g.batch > 1 && g.strideC == 0) {
    // Every product of the batch lands on the same C: run them in order, as the CPU does.
    const size_t ea = dtype_size(g.ab);
    for (int64_t b = 0; b < g.batch; ++b) {
      GemmArgs one = g;
      one.batch = 1;
      one.A = static_cast<const char*>(g.A) + static_cast<size_t>(b * g.strideA) * ea;
      one.B = static_cast<const char*>(g.B) + static_cast<size_t>(b * g.strideB) * ea;
      one.strideA = one.strideB = 0;
      gemm(backend, device, one);
    }
    return;
  }
  const CublasLt& L = cublaslt();
  cublasLtHandle_t handle = backend.lt(device);
  const uint32_t alA = alignment(g.A), alB = alignment(g.B), alC = alignment(g.C);
  PlanKey key{{device, g.batch, g.M, g.N, g.K, (g.transA ? 1 : 0) | (g.transB ? 2 : 0) | (g.beta != 0.f ? 4 : 0), g.lda,
               g.ldb, g.ldc, g.strideA, g.strideB, g.strideC, static_cast<int64_t>(g.ab) * 16 + static_cast<int64_t>(g.c),
               alA, alB, alC}};
  Plan plan;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_plans.find(key);
    if (it != g_plans.end()) plan = it->second;
  }
  void* ws = backend.lt_workspace(device);
  if (!plan.desc) {
    const char* skipped = skip_tuning(backend, g, stream);
    std::vector<cublasLtMatmulHeuristicResult_t> cands;
    plan = make_plan(handle, g, alA, alB, alC, skipped ? 1 : kTuneCandidates, cands);
    {
      PlanGuard guard{plan};
      if (!skipped && cands.size() < 2) skipped = "one candidate";
      std::vector<float> us;
      int pick = 0;
      if (!skipped) {
        pick = autotune(handle, plan, g, stream, ws, cands, us);
        if (pick < 0) {
          skipped = "no memory for the timing output";
          pick = 0;
        }
      }
      plan.algo = cands[pick].algo;
      plan.workspace = cands[pick].workspaceSize;
      if (env_on("MAGIX_MATMUL_TUNE_LOG")) log_tuning(device, g, cands, us, pick, skipped);
      guard.keep = true;
    }
    std::lock_guard<std::mutex> lock(g_mu);
    auto [it, inserted] = g_plans.emplace(key, plan);
    if (!inserted) {  // another thread made this plan meanwhile: use its, drop ours
      destroy_plan(plan);
      plan = it->second;
    }
  }
  CUBLAS_CHECK(L.Matmul(handle, plan.desc, &g.alpha, g.B, plan.x, g.A, plan.y, &g.beta, g.C, plan.d, g.C, plan.d, &plan.algo,
                        ws, plan.workspace, stream));
}

namespace {

// Elements a strided batch of rows×cols matrices reaches (0 when empty), overflow-checked.
size_t extent(int64_t batch, int64_t rows, int64_t cols, bool trans, int64_t ld, int64_t stride, int64_t off) {
  if (batch == 0 || rows == 0 || cols == 0) return 0;
  const size_t last = trans ? mul(static_cast<size_t>(cols - 1), static_cast<size_t>(ld)) + static_cast<size_t>(rows - 1)
                            : mul(static_cast<size_t>(rows - 1), static_cast<size_t>(ld)) + static_cast<size_t>(cols - 1);
  return static_cast<size_t>(off) + mul(static_cast<size_t>(batch - 1), static_cast<size_t>(stride)) + last + 1;
}

void matmul(OpCtx& c) {
  const DType ab = to_dtype(c.f(0));
  const DType ct = c.nargs > 18 ? to_dtype(c.f(18)) : ab;
  check((ab == DType::F32 && ct == DType::F32) || (ab == DType::BF16 && (ct == DType::BF16 || ct == DType::F32)),
        "matmul: the CUDA backend takes float32 A, B and C, or bfloat16 A and B with a bfloat16 or float32 C");
  const int64_t batch = c.i(1), M = c.i(2), N = c.i(3), K = c.i(4);
  const bool ta = c.i(5) != 0, tb = c.i(6) != 0;
  const int64_t lda = c.i(9), ldb = c.i(10), ldc = c.i(11), sa = c.i(12), sb = c.i(13), sc = c.i(14);
  const int64_t oa = c.i(15), ob = c.i(16), oc = c.i(17);
  for (int64_t v : {batch, M, N, K, lda, ldb, ldc, sa, sb, sc, oa, ob, oc})
    check(v >= 0, "matmul: sizes, strides and offsets must be non-negative");
  check(batch <= 0x7fffffff, "matmul: batch too large");
  check(ldc >= std::max<int64_t>(1, N), "matmul: ldc is smaller than N");
  if (K > 0 && M > 0 && N > 0) {
    // cuBLASLt needs each leading dimension to cover its column-major rows.
    check(lda >= std::max<int64_t>(1, ta ? M : K), "matmul: lda is smaller than the rows of A (" +
                                                       std::string(ta ? "M" : "K") + ") on the CUDA backend");
    check(ldb >= std::max<int64_t>(1, tb ? K : N), "matmul: ldb is smaller than the rows of B (" +
                                                       std::string(tb ? "K" : "N") + ") on the CUDA backend");
  }
  const size_t es = dtype_size(ab), cs = dtype_size(ct);
  const BufRef& A = c.need(0, extent(batch, M, K, ta, lda, sa, oa), es);
  const BufRef& B = c.need(1, extent(batch, K, N, tb, ldb, sb, ob), es);
  const BufRef& C = c.need(2, extent(batch, M, N, false, ldc, sc, oc), cs);
  check(C.ptr != A.ptr && C.ptr != B.ptr, "matmul: C must not alias A or B");
  op_stream(c);
  GemmArgs g;
  g.batch = batch;
  g.M = M;
  g.N = N;
  g.K = K;
  g.transA = ta;
  g.transB = tb;
  g.alpha = static_cast<float>(c.f(7));
  g.beta = static_cast<float>(c.f(8));
  g.A = static_cast<const char*>(A.ptr) + static_cast<size_t>(oa) * es;
  g.B = static_cast<const char*>(B.ptr) + static_cast<size_t>(ob) * es;
  g.C = static_cast<char*>(C.ptr) + static_cast<size_t>(oc) * cs;
  g.lda = lda;
  g.ldb = ldb;
  g.ldc = ldc;
  g.strideA = sa;
  g.strideB = sb;
  g.strideC = sc;
  g.ab = ab;
  g.c = ct;
  gemm(cuda_backend(c), C.device, g);
}

MAGIX_REGISTER_OP("cuda", "matmul", matmul);

}  // namespace
}  // namespace magix::cuda
