// General matrix multiply on the CPU: C = alpha·op(A)·op(B) + beta·C over strided row-major
// views. Used by the matmul op and, on blocks, by attention and the fused cross-entropy.
#pragma once
#include <cstddef>
#include <cstdint>

namespace magix::cpu {

template <typename T>
struct MatView {
  const T* data;
  int64_t ld;     // elements between rows of the stored matrix
  bool trans;     // op(X) = Xᵀ: element (i, k) of op(X) is data[k·ld + i]
  T at(int64_t i, int64_t k) const { return trans ? data[k * ld + i] : data[i * ld + k]; }
};

// C[M, N] (leading dimension ldc) = alpha·op(A)[M, K]·op(B)[K, N] + beta·C; beta = 0 never reads C.
// `parallel` spreads the blocks over the thread pool (false inside an already-parallel kernel).
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, T alpha, MatView<T> A, MatView<T> B, T beta, T* C, int64_t ldc,
          bool parallel = true);

}  // namespace magix::cpu
