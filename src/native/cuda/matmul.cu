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
// The descriptors and the heuristic's algorithm are cached per shape, dtypes and pointer
// alignment (cuBLASLt kernels may need 16-byte aligned operands; offsets can break that).
#include <cstring>
#include <mutex>
#include <unordered_map>

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

// Destroys what a half-built plan holds when building it fails.
struct PlanGuard {
  Plan& p;
  bool keep = false;
  ~PlanGuard() {
    if (keep) return;
    const CublasLt& L = cublaslt();
    if (p.desc) L.MatmulDescDestroy(p.desc);
    if (p.x) L.MatrixLayoutDestroy(p.x);
    if (p.y) L.MatrixLayoutDestroy(p.y);
    if (p.d) L.MatrixLayoutDestroy(p.d);
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

Plan make_plan(cublasLtHandle_t handle, const GemmArgs& g, uint32_t alA, uint32_t alB, uint32_t alC) {
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
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (st == 0) st = L.MatmulAlgoGetHeuristic(handle, plan.desc, plan.x, plan.y, plan.d, plan.d, pref, 1, &result, &found);
  L.MatmulPreferenceDestroy(pref);
  CUBLAS_CHECK(st);
  if (found == 0)
    throw MagixError("CUBLAS_ERROR", "cuBLASLt has no algorithm for matmul batch " + std::to_string(g.batch) + ", M " +
                                         std::to_string(g.M) + ", N " + std::to_string(g.N) + ", K " + std::to_string(g.K) +
                                         " (lda " + std::to_string(g.lda) + ", ldb " + std::to_string(g.ldb) + ", ldc " +
                                         std::to_string(g.ldc) + ")")
        .with("library", "cublasLt")
        .with("status", CUBLAS_STATUS_NOT_SUPPORTED)
        .with("name", "CUBLAS_STATUS_NOT_SUPPORTED");
  plan.algo = result.algo;
  plan.workspace = result.workspaceSize;
  guard.keep = true;
  return plan;
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
  PlanKey key{{device, g.batch, g.M, g.N, g.K, (g.transA ? 1 : 0) | (g.transB ? 2 : 0), g.lda, g.ldb, g.ldc, g.strideA,
               g.strideB, g.strideC, static_cast<int64_t>(g.ab) * 16 + static_cast<int64_t>(g.c), alA, alB, alC}};
  Plan plan;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_plans.find(key);
    if (it != g_plans.end()) plan = it->second;
  }
  if (!plan.desc) {
    plan = make_plan(handle, g, alA, alB, alC);
    std::lock_guard<std::mutex> lock(g_mu);
    g_plans.emplace(key, plan);
  }
  void* ws = backend.lt_workspace(device);
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
