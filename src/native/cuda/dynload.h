// cuBLASLt and NCCL are opened at run time (dlopen), with the few declarations we use written
// out here, so the addon builds on machines that have neither's headers nor libraries.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

namespace magix::cuda {

// ---- cuBLASLt (the subset of cublasLt.h we call; values from the CUDA 13 headers) ----
// library_types.h, cudaDataType_t
constexpr int CUDA_R_32F = 0;    // float
constexpr int CUDA_R_16BF = 14;  // __nv_bfloat16
// cublas_api.h, cublasComputeType_t
constexpr int CUBLAS_COMPUTE_32F = 68;  // float32 accumulation; float32 inputs stay exact (no TF32)
// cublas_api.h, cublasOperation_t
constexpr int CUBLAS_OP_N = 0;
constexpr int CUBLAS_OP_T = 1;
// cublasLt.h, cublasLtMatmulDescAttributes_t (int32_t cublasOperation_t values)
constexpr int CUBLASLT_MATMUL_DESC_TRANSA = 3;
constexpr int CUBLASLT_MATMUL_DESC_TRANSB = 4;
// cublasLt.h, cublasLtMatrixLayoutAttribute_t
constexpr int CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT = 5;           // int32_t
constexpr int CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET = 6;  // int64_t, in elements
// cublasLt.h, cublasLtMatmulPreferenceAttributes_t
constexpr int CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1;    // uint64_t
constexpr int CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5;  // uint32_t, default 256
constexpr int CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6;
constexpr int CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7;
constexpr int CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8;
// cublasLt.h, cublasLtMatmulAlgoConfigAttributes_t (read for matmul.cu's tuning log)
constexpr int CUBLASLT_ALGO_CONFIG_ID = 0;                // int32_t
constexpr int CUBLASLT_ALGO_CONFIG_TILE_ID = 1;           // uint32_t
constexpr int CUBLASLT_ALGO_CONFIG_SPLITK_NUM = 2;        // uint32_t
constexpr int CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME = 3;  // uint32_t, cublasLtReductionScheme_t
// cublas_api.h, cublasStatus_t
constexpr int CUBLAS_STATUS_NOT_SUPPORTED = 15;

using cublasStatus_t = int;
using cublasLtHandle_t = struct cublasLtContext*;
using cublasLtMatmulDesc_t = struct cublasLtMatmulDescOpaque_t*;
using cublasLtMatrixLayout_t = struct cublasLtMatrixLayoutOpaque_t*;
using cublasLtMatmulPreference_t = struct cublasLtMatmulPreferenceOpaque_t*;
struct cublasLtMatmulAlgo_t { uint64_t data[8]; };
struct cublasLtMatmulHeuristicResult_t {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
};

struct CublasLt {
  bool loaded = false;
  std::string error;
  size_t (*GetVersion)() = nullptr;
  cublasStatus_t (*Create)(cublasLtHandle_t*) = nullptr;
  cublasStatus_t (*Destroy)(cublasLtHandle_t) = nullptr;
  cublasStatus_t (*MatmulDescCreate)(cublasLtMatmulDesc_t*, int computeType, int scaleType) = nullptr;
  cublasStatus_t (*MatmulDescDestroy)(cublasLtMatmulDesc_t) = nullptr;
  cublasStatus_t (*MatmulDescSetAttribute)(cublasLtMatmulDesc_t, int attr, const void* buf, size_t size) = nullptr;
  cublasStatus_t (*MatrixLayoutCreate)(cublasLtMatrixLayout_t*, int type, uint64_t rows, uint64_t cols, int64_t ld) = nullptr;
  cublasStatus_t (*MatrixLayoutDestroy)(cublasLtMatrixLayout_t) = nullptr;
  cublasStatus_t (*MatrixLayoutSetAttribute)(cublasLtMatrixLayout_t, int attr, const void* buf, size_t size) = nullptr;
  cublasStatus_t (*MatmulPreferenceCreate)(cublasLtMatmulPreference_t*) = nullptr;
  cublasStatus_t (*MatmulPreferenceDestroy)(cublasLtMatmulPreference_t) = nullptr;
  cublasStatus_t (*MatmulPreferenceSetAttribute)(cublasLtMatmulPreference_t, int attr, const void* buf, size_t size) = nullptr;
  cublasStatus_t (*MatmulAlgoGetHeuristic)(cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t,
                                           cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                           cublasLtMatmulPreference_t, int requested,
                                           cublasLtMatmulHeuristicResult_t* results, int* returned) = nullptr;
  cublasStatus_t (*Matmul)(cublasLtHandle_t, cublasLtMatmulDesc_t, const void* alpha, const void* A,
                           cublasLtMatrixLayout_t Adesc, const void* B, cublasLtMatrixLayout_t Bdesc, const void* beta,
                           const void* C, cublasLtMatrixLayout_t Cdesc, void* D, cublasLtMatrixLayout_t Ddesc,
                           const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspaceSize,
                           cudaStream_t stream) = nullptr;
  // Optional (loading does not need it): only matmul.cu's tuning log reads an algorithm's config.
  cublasStatus_t (*MatmulAlgoConfigGetAttribute)(const cublasLtMatmulAlgo_t* algo, int attr, void* buf, size_t size,
                                                 size_t* written) = nullptr;
  const char* (*GetStatusName)(cublasStatus_t) = nullptr;
  const char* (*GetStatusString)(cublasStatus_t) = nullptr;
};

// ---- NCCL (the subset of nccl.h we call) ----
// nccl.h, ncclDataType_t
constexpr int ncclInt8 = 0;
constexpr int ncclFloat32 = 7;
constexpr int ncclFloat64 = 8;
constexpr int ncclBfloat16 = 9;
// nccl.h, ncclRedOp_t
constexpr int ncclSum = 0;
constexpr int ncclMax = 2;

using ncclResult_t = int;
using ncclComm_t = struct ncclComm*;
struct ncclUniqueId { char internal[128]; };

struct Nccl {
  bool loaded = false;
  std::string error;
  ncclResult_t (*GetVersion)(int*) = nullptr;
  ncclResult_t (*GetUniqueId)(ncclUniqueId*) = nullptr;
  ncclResult_t (*CommInitRank)(ncclComm_t*, int nranks, ncclUniqueId id, int rank) = nullptr;
  ncclResult_t (*CommInitAll)(ncclComm_t*, int ndev, const int* devlist) = nullptr;
  ncclResult_t (*CommDestroy)(ncclComm_t) = nullptr;
  ncclResult_t (*CommAbort)(ncclComm_t) = nullptr;
  ncclResult_t (*AllReduce)(const void*, void*, size_t count, int datatype, int op, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*AllGather)(const void*, void*, size_t sendcount, int datatype, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*ReduceScatter)(const void*, void*, size_t recvcount, int datatype, int op, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*Broadcast)(const void*, void*, size_t count, int datatype, int root, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*GroupStart)() = nullptr;
  ncclResult_t (*GroupEnd)() = nullptr;
  const char* (*GetErrorString)(ncclResult_t) = nullptr;
};

// Opened once, on first use; `loaded` false with `error` saying what was missing. Opening NCCL
// first sets NCCL_NVLS_ENABLE=0 unless the environment already says otherwise: NVLink multicast
// can take a shared machine's GPUs out of service.
const CublasLt& cublaslt();
const Nccl& nccl();

}  // namespace magix::cuda
