// Every CUDA runtime, cuBLASLt and NCCL call goes through these checks, so a failure reaches
// TypeScript as a typed error carrying the library, its code and its text.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "../common/error.h"

namespace magix::cuda {

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* expr, const char* file, int line) {
  throw MagixError("CUDA_ERROR", std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e) + " (" + expr +
                                     " at " + file + ":" + std::to_string(line) + ")")
      .with("status", static_cast<double>(e))
      .with("library", "cuda")
      .with("name", cudaGetErrorName(e));
}

}  // namespace magix::cuda

#define CUDA_CHECK(expr)                                                                    \
  do {                                                                                      \
    cudaError_t magix_err_ = (expr);                                                        \
    if (magix_err_ != cudaSuccess) ::magix::cuda::throw_cuda(magix_err_, #expr, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: launch-configuration errors surface here, not at the next sync.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
