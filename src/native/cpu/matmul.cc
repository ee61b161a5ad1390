// matmul(A, B, C; dtype, batch, M, N, K, transA, transB, alpha, beta, lda, ldb, ldc,
//               strideA, strideB, strideC, offA, offB, offC[, cdtype]):
//   C[offC + b·strideC + i·ldc + j] = alpha·Σ_k opA(b,i,k)·opB(b,k,j) + beta·C[...]
//   opA(b,i,k) = A[offA + b·strideA + (transA ? k·lda + i : i·lda + k)], opB likewise with ldb.
// beta = 0 never reads C; a stride of 0 broadcasts one matrix over the batch.
#include "gemm.h"
#include "kernel.h"

namespace magix::cpu {
namespace {

// One past the highest element a strided batch of matrices reaches, for the bounds check; every
// step is checked, so huge strides fail instead of wrapping around.
size_t extent(int64_t batch, int64_t rows, int64_t cols, bool trans, int64_t ld, int64_t stride, int64_t off) {
  if (batch == 0 || rows == 0 || cols == 0) return 0;
  const auto u = [](int64_t v) { return static_cast<size_t>(v); };
  const size_t last = trans ? add(mul(u(cols - 1), u(ld)), u(rows - 1)) : add(mul(u(rows - 1), u(ld)), u(cols - 1));
  return add(add(u(off), mul(u(batch - 1), u(stride))), add(last, 1));
}

void matmul(OpCtx& c) {
  const int64_t batch = c.i(1), M = c.i(2), N = c.i(3), K = c.i(4);
  const bool ta = c.i(5) != 0, tb = c.i(6) != 0;
  const double alpha = c.f(7), beta = c.f(8);
  const int64_t lda = c.i(9), ldb = c.i(10), ldc = c.i(11);
  const int64_t sa = c.i(12), sb = c.i(13), sc = c.i(14);
  const int64_t oa = c.i(15), ob = c.i(16), oc = c.i(17);
  for (int64_t v : {batch, M, N, K, lda, ldb, ldc, sa, sb, sc, oa, ob, oc})
    check(v >= 0, "matmul: sizes, strides and offsets must be non-negative");
  check(ldc >= N, "matmul: ldc is smaller than N");
  if (c.nargs > 18) check(c.i(18) == c.i(0), "matmul: the CPU backend writes C in the dtype of A and B");
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    const T* A = c.need(0, extent(batch, M, K, ta, lda, sa, oa), sizeof(T)).as<T>();
    const T* B = c.need(1, extent(batch, K, N, tb, ldb, sb, ob), sizeof(T)).as<T>();
    T* C = c.need(2, extent(batch, M, N, false, ldc, sc, oc), sizeof(T)).as<T>();
    check(!(c.buf(2).ptr == c.buf(0).ptr || c.buf(2).ptr == c.buf(1).ptr), "matmul: C must not alias A or B");
    // Batches run in parallel, so their outputs must be disjoint.
    check(batch <= 1 || M == 0 || N == 0 || static_cast<size_t>(sc) >= extent(1, M, N, false, ldc, 0, 0),
          "matmul: strideC makes the batch's outputs overlap");
    const bool perBatch = batch >= num_threads();
    auto one = [&](int64_t b, bool parallel) {
      gemm<T>(M, N, K, static_cast<T>(alpha), MatView<T>{A + oa + b * sa, lda, ta}, MatView<T>{B + ob + b * sb, ldb, tb},
              static_cast<T>(beta), C + oc + b * sc, ldc, parallel);
    };
    if (perBatch)
      parallel_for(batch, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) one(b, false);
      });
    else
      for (int64_t b = 0; b < batch; ++b) one(b, true);
  });
}

MAGIX_REGISTER_OP("cpu", "matmul", matmul);

}  // namespace
}  // namespace magix::cpu
