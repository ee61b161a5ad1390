// Every CUDA runtime, cuBLASLt and NCCL call goes through these checks, so a failure reaches
// TypeScript as a typed error carrying the library, its code and its text:
//   CUDA_CHECK(expr)    cudaError_t    -> CUDA_ERROR   (library "cuda", status, name)
//   CUDA_CHECK_LAUNCH() after a launch: configuration errors surface here, not at the next sync
//   CUBLAS_CHECK(expr)  cublasStatus_t -> CUBLAS_ERROR (library "cublasLt", status, name)
//   NCCL_CHECK(expr)    ncclResult_t   -> NCCL_ERROR   (library "nccl", status, name)
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "../common/error.h"
#include "dynload.h"

namespace magix::cuda {

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* expr, const char* file, int line) {
  throw MagixError("CUDA_ERROR", std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e) + " (" + expr +
                                     " at " + file + ":" + std::to_string(line) + ")")
      .with("status", static_cast<double>(e))
      .with("library", "cuda")
      .with("name", cudaGetErrorName(e));
}

// The names of cublasStatus_t (cublas_api.h), for when cublasLtGetStatusName is missing.
inline const char* cublas_status_fallback(int s) {
  switch (s) {
    case 0: return "CUBLAS_STATUS_SUCCESS";
    case 1: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case 3: return "CUBLAS_STATUS_ALLOC_FAILED";
    case 7: return "CUBLAS_STATUS_INVALID_VALUE";
    case 8: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case 11: return "CUBLAS_STATUS_MAPPING_ERROR";
    case 13: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case 14: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case 15: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case 16: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

[[noreturn]] inline void throw_cublas(int status, const std::string& what, const char* file, int line) {
  const CublasLt& L = cublaslt();
  const std::string name = L.GetStatusName ? L.GetStatusName(status) : cublas_status_fallback(status);
  const std::string text = L.GetStatusString ? L.GetStatusString(status) : "";
  throw MagixError("CUBLAS_ERROR", name + (text.empty() ? "" : ": " + text) + " (" + what + " at " + file + ":" +
                                       std::to_string(line) + ")")
      .with("status", static_cast<double>(status))
      .with("library", "cublasLt")
      .with("name", name);
}

[[noreturn]] inline void throw_nccl(int result, const std::string& what, const char* file, int line) {
  const Nccl& N = nccl();
  const std::string text = N.GetErrorString ? N.GetErrorString(result) : "unknown NCCL error";
  throw MagixError("NCCL_ERROR", "NCCL error " + std::to_string(result) + ": " + text + " (" + what + " at " + file +
                                     ":" + std::to_string(line) + ")")
      .with("status", static_cast<double>(result))
      .with("library", "nccl")
      .with("name", text);
}

}  // namespace magix::cuda

#define CUDA_CHECK(expr)                                                                             \
  do {                                                                                               \
    cudaError_t magix_err_ = (expr);                                                                 \
    if (magix_err_ != cudaSuccess) ::magix::cuda::throw_cuda(magix_err_, #expr, __FILE__, __LINE__); \
  } while (0)

#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

#define CUBLAS_CHECK(expr)                                                                    \
  do {                                                                                        \
    const int magix_st_ = static_cast<int>(expr);                                             \
    if (magix_st_ != 0) ::magix::cuda::throw_cublas(magix_st_, #expr, __FILE__, __LINE__);    \
  } while (0)

#define NCCL_CHECK(expr)                                                                    \
  do {                                                                                      \
    const int magix_nr_ = static_cast<int>(expr);                                           \
    if (magix_nr_ != 0) ::magix::cuda::throw_nccl(magix_nr_, #expr, __FILE__, __LINE__);    \
  } while (0)
