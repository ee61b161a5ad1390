// C = alpha·op(A)·op(B) + beta·C, blocked for the caches as BLIS does: each task owns an mc×nc
// tile of C; for each KC-deep slice it packs op(A) into MR-row panels and op(B) into NR-column
// panels (transposes are absorbed here), and an MR×NR micro-kernel keeps its block of C in vector
// registers while it streams the two panels. The tile code is compiled three times, for AVX-512,
// AVX2 + FMA and the SSE4.2 baseline, each with the register block that fills its register file,
// and the one isa() names is picked once.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "gemm.h"
#include "isa.h"
#include "threadpool.h"

namespace magix::cpu {
namespace {

constexpr int64_t KC = 256;     // depth of a packed slice: an NR-column panel of B stays in L1
constexpr int64_t MC_MAX = 120;  // rows of a tile: its packed A slice stays in L2
constexpr int64_t NC_MAX = 256;  // columns of a tile

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

// Per-thread scratch, 64-byte aligned, grown on demand and kept for the next call.
template <typename T, int Slot>
T* scratch(size_t n) {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<T, Free> buf;
  thread_local size_t cap = 0;
  if (n > cap) {
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    buf.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (!buf) throw std::bad_alloc();
    cap = n;
  }
  return buf.get();
}

template <typename T>
struct Problem {
  int64_t M, N, K;
  T alpha, beta;
  MatView<T> A, B;
  T* C;
  int64_t ldc;
};

// op(A) rows [i0, i0 + mcp) × depth [k0, k0 + kc) as MR-row panels ap[panel][k][r], zero past M.
template <typename T, int64_t MR>
inline __attribute__((always_inline)) void pack_a(const Problem<T>& p, int64_t i0, int64_t mcp, int64_t k0, int64_t kc,
                                                  T* __restrict ap) {
  for (int64_t ip = 0; ip < mcp; ip += MR, ap += MR * kc) {
    const int64_t rows = std::min(MR, p.M - (i0 + ip));
    if (p.A.trans) {
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = p.A.data + (k0 + k) * p.A.ld + i0 + ip;
        for (int64_t r = 0; r < MR; ++r) ap[k * MR + r] = r < rows ? src[r] : T(0);
      }
    } else {
      for (int64_t r = 0; r < MR; ++r) {
        const T* src = p.A.data + (i0 + ip + r) * p.A.ld + k0;
        if (r < rows)
          for (int64_t k = 0; k < kc; ++k) ap[k * MR + r] = src[k];
        else
          for (int64_t k = 0; k < kc; ++k) ap[k * MR + r] = T(0);
      }
    }
  }
}

// op(B) depth [k0, k0 + kc) × columns [j0, j0 + ncp) as NR-column panels bp[panel][k][c], zero past N.
template <typename T, int64_t NR>
inline __attribute__((always_inline)) void pack_b(const Problem<T>& p, int64_t j0, int64_t ncp, int64_t k0, int64_t kc,
                                                  T* __restrict bp) {
  for (int64_t jp = 0; jp < ncp; jp += NR, bp += NR * kc) {
    const int64_t cols = std::min(NR, p.N - (j0 + jp));
    if (p.B.trans) {
      for (int64_t c = 0; c < NR; ++c) {
        const T* src = p.B.data + (j0 + jp + c) * p.B.ld + k0;
        if (c < cols)
          for (int64_t k = 0; k < kc; ++k) bp[k * NR + c] = src[k];
        else
          for (int64_t k = 0; k < kc; ++k) bp[k * NR + c] = T(0);
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = p.B.data + (k0 + k) * p.B.ld + j0 + jp;
        if (cols == NR)
          for (int64_t c = 0; c < NR; ++c) bp[k * NR + c] = src[c];
        else
          for (int64_t c = 0; c < NR; ++c) bp[k * NR + c] = c < cols ? src[c] : T(0);
      }
    }
  }
}

// acc[MR][NR] (row stride ld) = (first ? 0 : acc) + ap[kc][MR]·bp[kc][NR], with NR = two vectors
// of VB bytes: 2·MR accumulators live in registers for the whole slice.
template <typename T, int VB, int64_t MR>
inline __attribute__((always_inline)) void micro_kernel(int64_t kc, const T* __restrict ap, const T* __restrict bp,
                                                        T* __restrict acc, int64_t ld, bool first) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int64_t L = VB / sizeof(T), NR = 2 * L;
  V c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int64_t r = 0; r < MR; ++r) {
    if (first) {
      c0[r] = V{};
      c1[r] = V{};
    } else {
      std::memcpy(&c0[r], acc + r * ld, VB);
      std::memcpy(&c1[r], acc + r * ld + L, VB);
    }
  }
  for (int64_t k = 0; k < kc; ++k, ap += MR, bp += NR) {
    V b0, b1;
    std::memcpy(&b0, bp, VB);
    std::memcpy(&b1, bp + L, VB);
#pragma GCC unroll 16
    for (int64_t r = 0; r < MR; ++r) {
      const T a = ap[r];
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
#pragma GCC unroll 16
  for (int64_t r = 0; r < MR; ++r) {
    std::memcpy(acc + r * ld, &c0[r], VB);
    std::memcpy(acc + r * ld + L, &c1[r], VB);
  }
}

// One tile of C: rows [i0, i0 + mc), columns [j0, j0 + nc).
template <typename T, int VB, int64_t MR>
inline __attribute__((always_inline)) void tile(const Problem<T>& p, int64_t i0, int64_t mc, int64_t j0, int64_t nc) {
  constexpr int64_t NR = 2 * VB / static_cast<int64_t>(sizeof(T));
  const int64_t mcp = round_up(mc, MR), ncp = round_up(nc, NR);
  T* ap = scratch<T, 0>(static_cast<size_t>(mcp * KC));
  T* bp = scratch<T, 1>(static_cast<size_t>(ncp * KC));
  T* acc = scratch<T, 2>(static_cast<size_t>(mcp * ncp));
  for (int64_t k0 = 0; k0 < p.K; k0 += KC) {
    const int64_t kc = std::min(KC, p.K - k0);
    pack_a<T, MR>(p, i0, mcp, k0, kc, ap);
    pack_b<T, NR>(p, j0, ncp, k0, kc, bp);
    for (int64_t jp = 0; jp < ncp; jp += NR)
      for (int64_t ip = 0; ip < mcp; ip += MR)
        micro_kernel<T, VB, MR>(kc, ap + ip * kc, bp + jp * kc, acc + ip * ncp + jp, ncp, k0 == 0);
  }
  for (int64_t i = 0; i < mc; ++i) {
    T* c = p.C + (i0 + i) * p.ldc + j0;
    const T* a = acc + i * ncp;
    if (p.beta == T(0))
      for (int64_t j = 0; j < nc; ++j) c[j] = p.alpha * a[j];
    else
      for (int64_t j = 0; j < nc; ++j) c[j] = p.alpha * a[j] + p.beta * c[j];
  }
}

template <typename T>
using TileFn = void (*)(const Problem<T>&, int64_t, int64_t, int64_t, int64_t);

// 32 zmm registers: 16 accumulators of 8 rows × 2 vectors.
__attribute__((target("arch=x86-64-v4"))) void tile_avx512(const Problem<float>& p, int64_t i0, int64_t mc, int64_t j0,
                                                         int64_t nc) {
  tile<float, 64, 8>(p, i0, mc, j0, nc);
}
__attribute__((target("arch=x86-64-v4"))) void tile_avx512(const Problem<double>& p, int64_t i0, int64_t mc, int64_t j0,
                                                         int64_t nc) {
  tile<double, 64, 8>(p, i0, mc, j0, nc);
}
// 16 ymm registers: 12 accumulators, two B vectors and a broadcast.
__attribute__((target("arch=x86-64-v3"))) void tile_avx2(const Problem<float>& p, int64_t i0, int64_t mc, int64_t j0,
                                                       int64_t nc) {
  tile<float, 32, 6>(p, i0, mc, j0, nc);
}
__attribute__((target("arch=x86-64-v3"))) void tile_avx2(const Problem<double>& p, int64_t i0, int64_t mc, int64_t j0,
                                                       int64_t nc) {
  tile<double, 32, 6>(p, i0, mc, j0, nc);
}
// 16 xmm registers, no FMA.
void tile_base(const Problem<float>& p, int64_t i0, int64_t mc, int64_t j0, int64_t nc) {
  tile<float, 16, 6>(p, i0, mc, j0, nc);
}
void tile_base(const Problem<double>& p, int64_t i0, int64_t mc, int64_t j0, int64_t nc) {
  tile<double, 16, 6>(p, i0, mc, j0, nc);
}

struct Kernel {
  int64_t mr, nrBytes;  // register block: MR rows × nrBytes / sizeof(T) columns
  TileFn<float> f32;
  TileFn<double> f64;
  TileFn<float> get(float) const { return f32; }
  TileFn<double> get(double) const { return f64; }
};

const Kernel& kernel() {
  static const Kernel k = isa() == Isa::Avx512 ? Kernel{8, 128, tile_avx512, tile_avx512}
                          : isa() == Isa::Avx2 ? Kernel{6, 64, tile_avx2, tile_avx2}
                                               : Kernel{6, 32, tile_base, tile_base};
  return k;
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
  const Kernel& kern = kernel();
  const int64_t MR = kern.mr, NR = kern.nrBytes / static_cast<int64_t>(sizeof(T));
  // Tiles of at most MC_MAX × NC_MAX, and in parallel enough of them for every thread to stay
  // busy to the end (smaller tiles cost more packing, so only then).
  const int64_t threads = parallel ? num_threads() : 1;
  int64_t mb = cdiv(M, MC_MAX), nb = cdiv(N, NC_MAX);
  while (threads > 1 && mb * nb < 4 * threads) {
    const int64_t mc = cdiv(M, mb), nc = cdiv(N, nb);
    if (mc > 2 * MR && (mc >= nc || nc <= 2 * NR)) ++mb;
    else if (nc > 2 * NR) ++nb;
    else break;
  }
  const int64_t mc = round_up(cdiv(M, mb), MR), nc = round_up(cdiv(N, nb), NR);
  mb = cdiv(M, mc);
  nb = cdiv(N, nc);
  const Problem<T> p{M, N, K, alpha, beta, A, B, C, ldc};
  const TileFn<T> fn = kern.get(T());
  auto run = [&](int64_t t) {
    const int64_t i0 = (t / nb) * mc, j0 = (t % nb) * nc;
    fn(p, i0, std::min(mc, M - i0), j0, std::min(nc, N - j0));
  };
  const int64_t tiles = mb * nb;
  if (threads == 1 || tiles == 1) {
    for (int64_t t = 0; t < tiles; ++t) run(t);
    return;
  }
  // Threads take tiles one at a time, so a thread slowed by other work takes fewer.
  std::atomic<int64_t> next{0};
  parallel_for(std::min(tiles, threads), 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1)) < tiles;) run(t);
  });
}

template void gemm<float>(int64_t, int64_t, int64_t, float, MatView<float>, MatView<float>, float, float*, int64_t, bool);
template void gemm<double>(int64_t, int64_t, int64_t, double, MatView<double>, MatView<double>, double, double*, int64_t,
                           bool);

}  // namespace magix::cpu
