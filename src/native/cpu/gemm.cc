// C = alpha·op(A)·op(B) + beta·C, blocked for the caches: each task owns an MC×NC block of C,
// packs KC-deep panels of op(A) (MR rows at a time) and op(B) (NR columns at a time) into
// contiguous buffers, and runs an MR×NR register-blocked micro-kernel over them. The float
// version is compiled twice (Haswell: AVX2 + FMA; and baseline x86-64) and picked at run time.
#include "gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "threadpool.h"

namespace magix::cpu {
namespace {

constexpr int64_t MR = 4;
constexpr int64_t NR = 16;
constexpr int64_t KC = 256;
constexpr int64_t MC = 96;
constexpr int64_t NC = 256;

// op(A) rows [i0, i0+mc) × columns [k0, k0+kc) into MR-row panels: ap[p][k][r]; zero beyond M.
template <typename T>
void pack_a(const MatView<T>& A, int64_t M, int64_t i0, int64_t mc, int64_t k0, int64_t kc, T* ap) {
  for (int64_t p = 0; p < mc; p += MR) {
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t r = 0; r < MR; ++r) {
        const int64_t i = i0 + p + r;
        *ap++ = (p + r < mc && i < M) ? A.at(i, k0 + k) : T(0);
      }
    }
  }
}

// op(B) rows [k0, k0+kc) × columns [j0, j0+nc) into NR-column panels: bp[p][k][c]; zero beyond N.
template <typename T>
void pack_b(const MatView<T>& B, int64_t N, int64_t k0, int64_t kc, int64_t j0, int64_t nc, T* bp) {
  for (int64_t p = 0; p < nc; p += NR) {
    const int64_t cols = std::min<int64_t>(NR, std::min(nc - p, N - (j0 + p)));
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t c = 0; c < NR; ++c) *bp++ = c < cols ? B.at(k0 + k, j0 + p + c) : T(0);
    }
  }
}

// acc[MR][NR] (row stride ldacc) += ap[kc][MR] · bp[kc][NR].
template <typename T>
inline __attribute__((always_inline)) void micro_kernel(int64_t kc, const T* __restrict ap, const T* __restrict bp,
                                                        T* __restrict acc, int64_t ldacc) {
  T c[MR][NR];
#pragma GCC unroll 4
  for (int64_t r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int64_t j = 0; j < NR; ++j) c[r][j] = acc[r * ldacc + j];
  for (int64_t k = 0; k < kc; ++k) {
    const T* b = bp + k * NR;
    const T* a = ap + k * MR;
#pragma GCC unroll 4
    for (int64_t r = 0; r < MR; ++r) {
      const T ar = a[r];
#pragma GCC unroll 16
      for (int64_t j = 0; j < NR; ++j) c[r][j] += ar * b[j];
    }
  }
#pragma GCC unroll 4
  for (int64_t r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int64_t j = 0; j < NR; ++j) acc[r * ldacc + j] = c[r][j];
}

// One block: acc[mcp × ncp] += packed panels; mcp, ncp rounded up to MR, NR.
template <typename T>
inline __attribute__((always_inline)) void block_impl(int64_t mcp, int64_t ncp, int64_t kc, const T* ap, const T* bp,
                                                      T* acc) {
  for (int64_t jp = 0; jp < ncp; jp += NR)
    for (int64_t ip = 0; ip < mcp; ip += MR) micro_kernel<T>(kc, ap + ip * kc, bp + jp * kc, acc + ip * ncp + jp, ncp);
}

__attribute__((target_clones("arch=haswell", "default"))) void block_f32(int64_t mcp, int64_t ncp, int64_t kc,
                                                                          const float* ap, const float* bp, float* acc) {
  block_impl<float>(mcp, ncp, kc, ap, bp, acc);
}

void block(int64_t mcp, int64_t ncp, int64_t kc, const float* ap, const float* bp, float* acc) {
  block_f32(mcp, ncp, kc, ap, bp, acc);
}
void block(int64_t mcp, int64_t ncp, int64_t kc, const double* ap, const double* bp, double* acc) {
  block_impl<double>(mcp, ncp, kc, ap, bp, acc);
}

template <typename T>
void tile(int64_t M, int64_t N, int64_t K, T alpha, const MatView<T>& A, const MatView<T>& B, T beta, T* C, int64_t ldc,
          int64_t i0, int64_t j0) {
  const int64_t mc = std::min(MC, M - i0), nc = std::min(NC, N - j0);
  const int64_t mcp = (mc + MR - 1) / MR * MR, ncp = (nc + NR - 1) / NR * NR;
  thread_local std::vector<T> abuf, bbuf, accbuf;
  abuf.resize(static_cast<size_t>(MC * KC));
  bbuf.resize(static_cast<size_t>(NC * KC));
  accbuf.assign(static_cast<size_t>(mcp * ncp), T(0));
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    pack_a(A, M, i0, mcp, k0, kc, abuf.data());
    pack_b(B, N, k0, kc, j0, ncp, bbuf.data());
    block(mcp, ncp, kc, abuf.data(), bbuf.data(), accbuf.data());
  }
  for (int64_t i = 0; i < mc; ++i) {
    T* crow = C + (i0 + i) * ldc + j0;
    const T* arow = accbuf.data() + i * ncp;
    if (beta == T(0))
      for (int64_t j = 0; j < nc; ++j) crow[j] = alpha * arow[j];
    else
      for (int64_t j = 0; j < nc; ++j) crow[j] = alpha * arow[j] + beta * crow[j];
  }
}

}  // namespace

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, T alpha, MatView<T> A, MatView<T> B, T beta, T* C, int64_t ldc, bool parallel) {
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const int64_t mb = (M + MC - 1) / MC, nb = (N + NC - 1) / NC;
  auto run = [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) tile<T>(M, N, K, alpha, A, B, beta, C, ldc, (t / nb) * MC, (t % nb) * NC);
  };
  if (parallel)
    parallel_for(mb * nb, 1, run);
  else
    run(0, mb * nb);
}

template void gemm<float>(int64_t, int64_t, int64_t, float, MatView<float>, MatView<float>, float, float*, int64_t, bool);
template void gemm<double>(int64_t, int64_t, int64_t, double, MatView<double>, MatView<double>, double, double*, int64_t,
                           bool);

}  // namespace magix::cpu
