// matmul(A, B, C; dtype, batch, M, N, K, transA, transB, alpha, beta, lda, ldb, ldc, strideA,
//        strideB, strideC, offA, offB, offC[, cdtype]) through cuBLASLt (see src/native/OPS.md).
// cuBLASLt is column-major: the row-major C = op(A)·op(B) is computed as Cᵀ = op(B)ᵀ·op(A)ᵀ,
// i.e. with the operands swapped and each row-major matrix read as its column-major transpose.
#include <mutex>
#include <string>
#include <unordered_map>

#include "blas.h"
#include "check.h"
#include "common.cuh"

namespace magix::cuda {
namespace {

// Values from the CUDA 13 headers (library_types.h, cublas_api.h, cublasLt.h).
constexpr int CUDA_R_32F = 0;
constexpr int CUDA_R_16BF = 14;
constexpr int CUBLAS_COMPUTE_32F = 68;
constexpr int CUBLAS_OP_N = 0;
constexpr int CUBLAS_OP_T = 1;
constexpr int DESC_TRANSA = 3;                 // CUBLASLT_MATMUL_DESC_TRANSA
constexpr int DESC_TRANSB = 4;                 // CUBLASLT_MATMUL_DESC_TRANSB
constexpr int LAYOUT_BATCH_COUNT = 5;          // CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT
constexpr int LAYOUT_STRIDED_BATCH_OFFSET = 6; // CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET
constexpr int PREF_MAX_WORKSPACE_BYTES = 1;    // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES
constexpr size_t kWorkspace = 32u << 20;

void lt_check(int status, const char* what) {
  if (status == 0) return;
  const CublasLt& L = cublaslt();
  std::string name = L.GetStatusName ? L.GetStatusName(status) : "CUBLAS_STATUS_" + std::to_string(status);
  std::string text = L.GetStatusString ? L.GetStatusString(status) : "";
  throw MagixError("CUBLAS_ERROR", std::string(what) + ": " + name + (text.empty() ? "" : " (" + text + ")"))
      .with("library", "cublasLt")
      .with("status", status)
      .with("name", name);
}

int cuda_type(DType t) {
  if (t == DType::F32) return CUDA_R_32F;
  if (t == DType::BF16) return CUDA_R_16BF;
  invalid("matmul: the CUDA backend multiplies float32 or bfloat16");
}

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

std::mutex g_mu;
std::unordered_map<std::string, Plan> g_plans;

cublasLtMatrixLayout_t layout(int type, int64_t rows, int64_t cols, int64_t ld, int64_t batch, int64_t stride) {
  const CublasLt& L = cublaslt();
  cublasLtMatrixLayout_t l = nullptr;
  lt_check(L.MatrixLayoutCreate(&l, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld), "cublasLtMatrixLayoutCreate");
  if (batch > 1) {
    const int32_t count = static_cast<int32_t>(batch);
    lt_check(L.MatrixLayoutSetAttribute(l, LAYOUT_BATCH_COUNT, &count, sizeof(count)), "cublasLtMatrixLayoutSetAttribute");
    lt_check(L.MatrixLayoutSetAttribute(l, LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)), "cublasLtMatrixLayoutSetAttribute");
  }
  return l;
}

}  // namespace

void gemm(CudaBackend& backend, int device, const GemmArgs& g) {
  if (g.M == 0 || g.N == 0 || g.batch == 0) return;
  const CublasLt& L = cublaslt();
  cublasLtHandle_t handle = backend.lt(device);
  const int abType = cuda_type(g.ab), cType = cuda_type(g.c);
  const std::string key = std::to_string(device) + ":" + std::to_string(g.batch) + "," + std::to_string(g.M) + "," +
                          std::to_string(g.N) + "," + std::to_string(g.K) + "," + std::to_string(g.transA) +
                          std::to_string(g.transB) + "," + std::to_string(g.lda) + "," + std::to_string(g.ldb) + "," +
                          std::to_string(g.ldc) + "," + std::to_string(g.strideA) + "," + std::to_string(g.strideB) + "," +
                          std::to_string(g.strideC) + "," + std::to_string(abType) + "," + std::to_string(cType) +
                          (g.beta != 0 ? "+" : "");
  Plan plan;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_plans.find(key);
    if (it != g_plans.end()) plan = it->second;
  }
  if (!plan.desc) {
    lt_check(L.MatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
    // First operand: B (N×K as column-major), second: A (K×M).
    const int opB = g.transB ? CUBLAS_OP_T : CUBLAS_OP_N, opA = g.transA ? CUBLAS_OP_T : CUBLAS_OP_N;
    lt_check(L.MatmulDescSetAttribute(plan.desc, DESC_TRANSA, &opB, sizeof(opB)), "cublasLtMatmulDescSetAttribute");
    lt_check(L.MatmulDescSetAttribute(plan.desc, DESC_TRANSB, &opA, sizeof(opA)), "cublasLtMatmulDescSetAttribute");
    plan.a = g.transB ? layout(abType, g.K, g.N, g.ldb, g.batch, g.strideB) : layout(abType, g.N, g.K, g.ldb, g.batch, g.strideB);
    plan.b = g.transA ? layout(abType, g.M, g.K, g.lda, g.batch, g.strideA) : layout(abType, g.K, g.M, g.lda, g.batch, g.strideA);
    plan.c = layout(cType, g.N, g.M, g.ldc, g.batch, g.strideC);
    cublasLtMatmulPreference_t pref = nullptr;
    lt_check(L.MatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
    const uint64_t ws = kWorkspace;
    lt_check(L.MatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)), "cublasLtMatmulPreferenceSetAttribute");
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const int st = L.MatmulAlgoGetHeuristic(handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref, 1, &result, &found);
    L.MatmulPreferenceDestroy(pref);
    lt_check(st, "cublasLtMatmulAlgoGetHeuristic");
    if (found == 0) invalid("matmul: cuBLASLt has no algorithm for this shape and layout");
    plan.algo = result.algo;
    plan.workspace = result.workspaceSize;
    std::lock_guard<std::mutex> lock(g_mu);
    g_plans[key] = plan;
  }
  void* ws = backend.workspace(device, kWorkspace);
  lt_check(L.Matmul(handle, plan.desc, &g.alpha, g.B, plan.a, g.A, plan.b, &g.beta, g.C, plan.c, g.C, plan.c, &plan.algo, ws,
                    plan.workspace, backend.stream(device)),
           "cublasLtMatmul");
}

namespace {

size_t extent(int64_t batch, int64_t rows, int64_t cols, bool trans, int64_t ld, int64_t stride, int64_t off) {
  if (batch == 0 || rows == 0 || cols == 0) return 0;
  const int64_t last = trans ? (cols - 1) * ld + (rows - 1) : (rows - 1) * ld + (cols - 1);
  return static_cast<size_t>(off) + mul(static_cast<size_t>(batch - 1), static_cast<size_t>(stride)) + static_cast<size_t>(last) + 1;
}

void matmul(OpCtx& c) {
  const DType ab = to_dtype(c.f(0));
  const DType ct = c.nargs > 18 ? to_dtype(c.f(18)) : ab;
  const int64_t batch = c.i(1), M = c.i(2), N = c.i(3), K = c.i(4);
  const bool ta = c.i(5) != 0, tb = c.i(6) != 0;
  const int64_t lda = c.i(9), ldb = c.i(10), ldc = c.i(11), sa = c.i(12), sb = c.i(13), sc = c.i(14);
  const int64_t oa = c.i(15), ob = c.i(16), oc = c.i(17);
  for (int64_t v : {batch, M, N, K, lda, ldb, ldc, sa, sb, sc, oa, ob, oc}) check(v >= 0, "matmul: negative argument");
  check(ldc >= N && lda >= (ta ? M : K) && ldb >= (tb ? K : N), "matmul: leading dimension too small");
  const size_t es = dtype_size(ab), cs = dtype_size(ct);
  const BufRef& A = c.need(0, extent(batch, M, K, ta, lda, sa, oa), es);
  const BufRef& B = c.need(1, extent(batch, K, N, tb, ldb, sb, ob), es);
  const BufRef& C = c.need(2, extent(batch, M, N, false, ldc, sc, oc), cs);
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
  g.A = static_cast<const char*>(A.ptr) + oa * es;
  g.B = static_cast<const char*>(B.ptr) + ob * es;
  g.C = static_cast<char*>(C.ptr) + oc * cs;
  g.lda = lda;
  g.ldb = ldb;
  g.ldc = ldc;
  g.strideA = sa;
  g.strideB = sb;
  g.strideC = sc;
  g.ab = ab;
  g.c = ct;
  if (K == 0) {
    check(g.beta == 0, "matmul: K = 0 with beta ≠ 0 is not supported on CUDA");
    CUDA_CHECK(cudaMemsetAsync(g.C, 0, extent(batch, M, N, false, ldc, sc, 0) * cs, cuda_backend(c).stream(C.device)));
    return;
  }
  gemm(cuda_backend(c), C.device, g);
}

MAGIX_REGISTER_OP("cuda", "matmul", matmul);

}  // namespace
}  // namespace magix::cuda
