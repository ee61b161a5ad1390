// Matrix products through cuBLASLt for the ops (matmul.cu holds the implementation and the op):
// row-major C = alpha·op(A)·op(B) + beta·C over a strided batch, bf16 or float32 inputs with
// float32 accumulation (exact float32 for float32 inputs: no TF32), C in bf16 or float32.
#pragma once
#include <cstdint>

#include "../common/dtype.h"
#include "backend.h"

namespace magix::cuda {

struct GemmArgs {
  int64_t batch = 1, M = 0, N = 0, K = 0;
  bool transA = false, transB = false;
  float alpha = 1, beta = 0;
  const void* A = nullptr;  // already offset to the first element
  int64_t lda = 0, strideA = 0;
  const void* B = nullptr;
  int64_t ldb = 0, strideB = 0;
  void* C = nullptr;
  int64_t ldc = 0, strideC = 0;
  DType ab = DType::F32;  // dtype of A and B
  DType c = DType::F32;   // dtype of C
};

// Enqueues the product on `device`'s stream. The caller has checked the bounds. K = 0 scales C
// by beta; a strideC of 0 with batch > 1 runs the batch in order. No host synchronisation, except
// on the first call of a large product's plan outside a graph capture, which times cuBLASLt's
// candidate algorithms on A and B (synchronising the stream) before it runs the pick into C once
// (matmul.cu: autotuning; MAGIX_MATMUL_TUNE=0 turns it off). That timing writes a temporary of
// C's extent, never C and never the op scratch, so callers inside another op may hold the scratch.
void gemm(CudaBackend& backend, int device, const GemmArgs& g);

}  // namespace magix::cuda
