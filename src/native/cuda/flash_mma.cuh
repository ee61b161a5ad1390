// The tensor-core path of attention (attention.cu holds the contract and the dispatch):
// FlashAttention-2 for bfloat16 with head size 64 or 128, mma.sync m16n8k16 (bf16 → float32)
// through inline PTX, operands from shared memory through ldmatrix, tiles staged by cp.async.
//
// The warp-level primitives (cp.async, ldmatrix, mma, shuffles, barriers, atomics) are the only
// device-specific code. Built with MAGIX_FLASH_EMULATE, the including file supplies host versions
// of them instead (a SIMT emulator with one host thread per CUDA thread), so these exact kernels
// can be checked against a float64 reference on a machine without a GPU.
#pragma once
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#ifndef MAGIX_FLASH_EMULATE
#include <cuda_runtime.h>
#define FLASH_DEVICE __device__ __forceinline__
#define FLASH_KERNEL(threads, minblocks) __global__ void __launch_bounds__(threads, minblocks)
#define FLASH_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace magix::cuda::flash {

using bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything an attention kernel reads: pointers (by role; unused ones null) and the shape.
struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  void* out;  // o (forward)
  float* lse;
  const uint8_t* mask;
  const void* dO;
  const float* D;
  float* dqacc;
  void* dq;
  void* dk;
  void* dv;
  int64_t B, T, S, Hq, Hkv, hd, sMax, window, qOffset;
  int causal;
  float scale, scale_log2;
};

#ifndef MAGIX_FLASH_EMULATE
FLASH_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// 16 bytes global → shared, asynchronously; `valid` false writes zeros and reads nothing.
FLASH_DEVICE void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
FLASH_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
FLASH_DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Four 8×8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, whose fragment
// (row lane/4, columns 2·(lane%4) and +1; with .trans rows 2·(lane%4) and +1 of column lane/4)
// lands in r[i], the lower index in the low half.
FLASH_DEVICE void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
FLASH_DEVICE void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// The same from a shared-memory address (smem_addr): a base register plus constant offsets
// needs no 64-bit pointer per fragment.
FLASH_DEVICE void ldsm_x4(uint32_t (&r)[4], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
FLASH_DEVICE void ldsm_x4_t(uint32_t (&r)[4], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// d += a·b for a 16×16 bf16 A (row), a 16×8 bf16 B (col), float32 C/D. Fragments (g = lane/4,
// q = lane%4): A a0 (g, 2q..2q+1), a1 (g+8, 2q..), a2 (g, 8+2q..), a3 (g+8, 8+2q..); B b0 (k 2q..2q+1,
// n g), b1 (k 8+2q.., n g); C c0, c1 (g, 2q..2q+1), c2, c3 (g+8, 2q..2q+1).
FLASH_DEVICE void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

FLASH_DEVICE float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
FLASH_DEVICE void sync_block() { __syncthreads(); }
FLASH_DEVICE bool any_warp(bool v) { return __any_sync(0xffffffffu, v); }
FLASH_DEVICE void atomic_add2(float* p, float a, float b) { atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b)); }
FLASH_DEVICE int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
FLASH_DEVICE int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }
#endif

// Two floats as one bf16x2 word, `lo` in the low half (the lower index), as mma expects.
FLASH_DEVICE uint32_t pack2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// The A fragments of a 16×16 block (k columns c0..c0+15) from float32 C fragments of two n-tiles.
FLASH_DEVICE void c_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2(lo[0], lo[1]);
  a[1] = pack2(lo[2], lo[3]);
  a[2] = pack2(hi[0], hi[1]);
  a[3] = pack2(hi[2], hi[3]);
}

// Forward block shapes. W warps own RB·16 query rows each (BM = 16·RB·W queries of one (batch,
// head)); keys come in tiles of BN rows, double-buffered. With RB = 2 each K or V fragment read
// from shared memory feeds two mma (the warp's two 16-row blocks), halving the ldmatrix traffic
// per mma, and the two blocks give each warp independent work. QREG keeps the Q fragments in
// registers for the whole block (else they are read again from shared memory for each key
// tile); MINB is the blocks per multiprocessor the registers are sized for (__launch_bounds__).
template <int HD_, int W_, int RB_, int BN_, bool QREG_, int MINB_>
struct FwdShape {
  static constexpr int HD = HD_, W = W_, RB = RB_, BM = 16 * RB_ * W_, BN = BN_, LD = HD_ + 8, THREADS = 32 * W_,
                       MINB = MINB_;
  static constexpr bool QREG = QREG_;
  static constexpr size_t smem = sizeof(bf16) * (BM + 4 * BN) * LD + 2 * BN;
};
// The shapes the dispatch uses (timed on an H200, B 8, causal): for hd 128, 128 queries by 4
// warps of 32 rows, Q re-read from shared memory (registers hold 2×16×128 of O); for hd 64, 64
// queries by 4 warps of 16 rows at 4 blocks per multiprocessor up to T = 2048 (more blocks, less
// work lost on the causal diagonal), and the 128-query shape above that.
using FwdHd128 = FwdShape<128, 4, 2, 64, false, 1>;
using FwdHd64 = FwdShape<64, 4, 1, 64, true, 4>;
using FwdHd64Long = FwdShape<64, 4, 2, 64, true, 1>;

template <class C>
FLASH_KERNEL(C::THREADS, C::MINB) flash_fwd(const Params p) {
  constexpr int HD = C::HD, BM = C::BM, BN = C::BN, LD = C::LD, CH = HD / 8, KC = HD / 16, NT = BN / 8, DT = HD / 8;
  constexpr int RB = C::RB, WR = 16 * RB;  // rows per warp
  FLASH_SMEM(smem);
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* Ks = Qs + BM * LD;      // [2][BN][LD]
  bf16* Vs = Ks + 2 * BN * LD;  // [2][BN][LD]
  uint8_t* Ms = reinterpret_cast<uint8_t*>(Vs + 2 * BN * LD);  // [2][BN]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int64_t BH = p.B * p.Hq, ntq = (p.T + BM - 1) / BM;
  const int64_t qtile = ntq - 1 - static_cast<int64_t>(blockIdx.x) / BH;  // the longest (causal) tiles first
  const int64_t bh = static_cast<int64_t>(blockIdx.x) % BH, b = bh / p.Hq, h = bh % p.Hq, hk = h / (p.Hq / p.Hkv);
  const int64_t t0 = qtile * BM, tend = lmin(p.T, t0 + BM);
  const int64_t qstride = p.Hq * HD, kstride = p.Hkv * HD;
  const bf16* qbase = static_cast<const bf16*>(p.q) + ((b * p.T) * p.Hq + h) * HD;
  const bf16* kbase = static_cast<const bf16*>(p.k) + ((b * p.sMax) * p.Hkv + hk) * HD;
  const bf16* vbase = static_cast<const bf16*>(p.v) + ((b * p.sMax) * p.Hkv + hk) * HD;
  bf16* obase = static_cast<bf16*>(p.out) + ((b * p.T) * p.Hq + h) * HD;
  float* lsebase = p.lse + (b * p.Hq + h) * p.T;

  // The keys any query of this tile may see.
  int64_t klo = 0, khi = p.S;
  if (p.causal) khi = lmin(khi, p.qOffset + tend);
  if (p.window > 0) klo = lmax(int64_t{0}, p.qOffset + t0 - p.window + 1);
  const int ntiles = klo < khi ? static_cast<int>((khi - klo + BN - 1) / BN) : 0;
  if (ntiles == 0) {
    for (int i = tid; i < (tend - t0) * (HD / 2); i += C::THREADS) {
      const int r = i / (HD / 2), d = (i % (HD / 2)) * 2;
      *reinterpret_cast<uint32_t*>(obase + (t0 + r) * qstride + d) = 0u;
    }
    for (int i = tid; i < tend - t0; i += C::THREADS) lsebase[t0 + i] = -INFINITY;
    return;
  }

  for (int i = tid; i < BM * CH; i += C::THREADS) {
    const int r = i / CH, cc = (i % CH) * 8;
    const int64_t t = t0 + r;
    cp_async16(Qs + r * LD + cc, qbase + (t < p.T ? t : 0) * qstride + cc, t < p.T);
  }
  auto load_kv = [&](int stage, int64_t s0) {
    bf16* kd = Ks + stage * BN * LD;
    bf16* vd = Vs + stage * BN * LD;
    for (int i = tid; i < BN * CH; i += C::THREADS) {
      const int r = i / CH, cc = (i % CH) * 8;
      const int64_t s = s0 + r;
      const bool ok = s < p.S;
      const int64_t off = (ok ? s : 0) * kstride + cc;
      cp_async16(kd + r * LD + cc, kbase + off, ok);
      cp_async16(vd + r * LD + cc, vbase + off, ok);
    }
    if (p.mask)
      for (int i = tid; i < BN; i += C::THREADS) {
        const int64_t s = s0 + i;
        Ms[stage * BN + i] = s < p.S ? p.mask[b * p.sMax + s] : 0;
      }
  };
  load_kv(0, klo);
  cp_async_commit();

  // Scores stay raw (unscaled) until the exponent: exp2(s·c − m·c) is one FFMA, with
  // c = |scale|·log2(e) > 0. A negative scale negates the Q fragments instead (exact in bf16),
  // so that the running max of the raw scores is the max of the scaled ones; a zero scale
  // becomes the smallest normal float (every exponent rounds to 0, as it should).
  const float c = fmaxf(fabsf(p.scale_log2), 1.17549435e-38f);
  const uint32_t qneg = p.scale_log2 < 0.f ? 0x80008000u : 0u;
  // This warp's query rows [qa, qa + WR − 1] (positions in the key sequence) and whether any is real.
  const int64_t qa = p.qOffset + t0 + warp * WR;
  const bool wlive = t0 + warp * WR < p.T;
  // Shared-memory byte addresses of this lane's ldmatrix rows; the fragment loops add constants.
  constexpr uint32_t RS = LD * sizeof(bf16);  // bytes per row
  const uint32_t aQ = smem_addr(Qs + (warp * WR + (lane & 15)) * LD + (lane >> 4) * 8);
  const uint32_t aK = smem_addr(Ks + ((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8);
  const uint32_t aV = smem_addr(Vs + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8);

  float o[RB][DT][4];
#pragma unroll
  for (int rb = 0; rb < RB; ++rb)
#pragma unroll
    for (int i = 0; i < DT; ++i) o[rb][i][0] = o[rb][i][1] = o[rb][i][2] = o[rb][i][3] = 0.f;
  // Row r of the thread: block r / 2, g + 8·(r % 2).
  float mrow[2 * RB], lrow[2 * RB];
#pragma unroll
  for (int r = 0; r < 2 * RB; ++r) mrow[r] = -INFINITY, lrow[r] = 0.f;
  uint32_t qf[C::QREG ? RB : 1][C::QREG ? KC : 1][4];

  for (int j = 0; j < ntiles; ++j) {
    cp_async_wait_all();
    sync_block();  // tile j has landed; everyone is done with tile j − 1's buffers
    if (C::QREG && j == 0) {
#pragma unroll
      for (int rb = 0; rb < (C::QREG ? RB : 0); ++rb)
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) {
          ldsm_x4(qf[C::QREG ? rb : 0][C::QREG ? kc : 0], aQ + rb * 16 * RS + kc * 32);
#pragma unroll
          for (int e = 0; e < 4; ++e) qf[C::QREG ? rb : 0][C::QREG ? kc : 0][e] ^= qneg;
        }
    }
    if (j + 1 < ntiles) load_kv((j + 1) & 1, klo + static_cast<int64_t>(j + 1) * BN);
    cp_async_commit();
    const int64_t s0 = klo + static_cast<int64_t>(j) * BN;
    // Tiles that causality or the window hide from every row of this warp (rows past T too)
    // change nothing: skip them (warp-uniform; the block still meets at the barrier).
    if (!wlive || (p.causal && s0 > qa + WR - 1) || (p.window > 0 && qa - (s0 + BN - 1) >= p.window)) continue;
    const uint32_t aKt = aK + (j & 1) * BN * RS, aVt = aV + (j & 1) * BN * RS;
    const uint8_t* Mt = Ms + (j & 1) * BN;

    // S = Q·Kᵀ: WR rows × BN keys per warp.
    float sacc[RB][NT][4];
#pragma unroll
    for (int rb = 0; rb < RB; ++rb)
#pragma unroll
      for (int i = 0; i < NT; ++i) sacc[rb][i][0] = sacc[rb][i][1] = sacc[rb][i][2] = sacc[rb][i][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      uint32_t qs[RB][4];
      if (!C::QREG) {
#pragma unroll
        for (int rb = 0; rb < RB; ++rb) {
          ldsm_x4(qs[rb], aQ + rb * 16 * RS + kc * 32);
#pragma unroll
          for (int e = 0; e < 4; ++e) qs[rb][e] ^= qneg;
        }
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t bb[4];
        ldsm_x4(bb, aKt + np * 16 * RS + kc * 32);
#pragma unroll
        for (int rb = 0; rb < RB; ++rb) {
          const uint32_t(&qk)[4] = C::QREG ? qf[C::QREG ? rb : 0][C::QREG ? kc : 0] : qs[rb];
          mma16816(sacc[rb][2 * np], qk, bb[0], bb[1]);
          mma16816(sacc[rb][2 * np + 1], qk, bb[2], bb[3]);
        }
      }
    }
    // Hide what a row may not see, only on tiles that cut something for this warp's rows.
    const bool full = !p.mask && s0 + BN <= p.S && (!p.causal || s0 + BN - 1 <= qa) &&
                      (p.window == 0 || qa + WR - 1 - s0 < p.window);
    if (!full) {
#pragma unroll
      for (int rb = 0; rb < RB; ++rb)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = nt * 8 + 2 * tq + (e & 1);
            const int64_t qpos = qa + rb * 16 + g + (e >= 2 ? 8 : 0), s = s0 + col;
            const bool vis = s < p.S && (!p.mask || Mt[col]) && (!p.causal || s <= qpos) && (p.window == 0 || qpos - s < p.window);
            if (!vis) sacc[rb][nt][e] = -INFINITY;
          }
        }
    }
    // Online softmax; a row lives on the 4 threads of a quad.
    float corr[2 * RB];
    bool grew = false;
#pragma unroll
    for (int r = 0; r < 2 * RB; ++r) {
      const int rb = r >> 1, h2 = 2 * (r & 1);
      float mx = mrow[r];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(sacc[rb][nt][h2], sacc[rb][nt][h2 + 1]));
      mx = fmaxf(mx, shfl_xor(mx, 1));
      mx = fmaxf(mx, shfl_xor(mx, 2));
      const float mc = mx == -INFINITY ? 0.f : mx * c;  // a row with nothing visible yet stays at 0
      corr[r] = mx == mrow[r] ? 1.f : exp2f(mrow[r] * c - mc);
      grew |= mx != mrow[r];
      mrow[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float p0 = exp2f(fmaf(sacc[rb][nt][h2], c, -mc)), p1 = exp2f(fmaf(sacc[rb][nt][h2 + 1], c, -mc));
        sacc[rb][nt][h2] = p0;
        sacc[rb][nt][h2 + 1] = p1;
        sum += p0 + p1;
      }
      lrow[r] = lrow[r] * corr[r] + sum;
    }
    // O *= corr, skipped when no row of the warp found a larger max (corr = 1 exactly then).
    if (any_warp(grew)) {
#pragma unroll
      for (int rb = 0; rb < RB; ++rb)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          o[rb][dt][0] *= corr[2 * rb];
          o[rb][dt][1] *= corr[2 * rb];
          o[rb][dt][2] *= corr[2 * rb + 1];
          o[rb][dt][3] *= corr[2 * rb + 1];
        }
    }
    // O += P·V
#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
      uint32_t a[RB][4];
#pragma unroll
      for (int rb = 0; rb < RB; ++rb) c_to_a(a[rb], sacc[rb][2 * kc], sacc[rb][2 * kc + 1]);
#pragma unroll
      for (int dp = 0; dp < HD / 16; ++dp) {
        uint32_t bb[4];
        ldsm_x4_t(bb, aVt + kc * 16 * RS + dp * 32);
#pragma unroll
        for (int rb = 0; rb < RB; ++rb) {
          mma16816(o[rb][2 * dp], a[rb], bb[0], bb[1]);
          mma16816(o[rb][2 * dp + 1], a[rb], bb[2], bb[3]);
        }
      }
    }
  }
  cp_async_wait_all();  // nothing may still be in flight when the block ends

#pragma unroll
  for (int r = 0; r < 2 * RB; ++r) {
    const int rb = r >> 1, h2 = 2 * (r & 1);
    float l = lrow[r];
    l += shfl_xor(l, 1);
    l += shfl_xor(l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int64_t t = t0 + warp * WR + rb * 16 + g + (r & 1) * 8;
    if (t < p.T) {
      bf16* orow = obase + t * qstride;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * tq) = pack2(o[rb][dt][h2] * inv, o[rb][dt][h2 + 1] * inv);
      if (tq == 0) lsebase[t] = l > 0.f ? (mrow[r] * c + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

// Backward block shapes. W warps own 16·KB key rows each (BN = 16·KB·W keys of one (batch, KV
// head), K and V in shared memory, dK and dV in registers); the block walks the query tiles of BM
// rows of every query head of the group. With KB = 2 each Q or dO fragment read from shared
// memory feeds two mma (the warp's two 16-key blocks). A larger BN halves the float32 dQ atomics
// and the Q/dO reads per key. dQ = dS·K for the step's BM × HD is tiled over the W warps: BM/16
// row blocks, DQC columns each. MINB is the blocks per multiprocessor the registers are sized for.
template <int HD_, int W_, int KB_, int BM_, int MINB_>
struct BwdShape {
  static constexpr int HD = HD_, W = W_, KB = KB_, BM = BM_, MINB = MINB_, WK = 16 * KB_, BN = 16 * KB_ * W_,
                       LD = HD_ + 8, LDS = BM_ + 8, THREADS = 32 * W_, RBQ = BM_ / 16, DQC = HD_ * (BM_ / 16) / W_;
  static_assert(W_ % (BM_ / 16) == 0 && DQC % 16 == 0, "dQ tiling");
  static constexpr size_t smem = sizeof(bf16) * ((2 * BN + 4 * BM) * LD + BN * LDS) + sizeof(float) * 4 * BM + BN;
};
// The shapes the dispatch uses: hd 64, 128 keys by 4 warps of 32 key rows, 32 queries a step; hd 128,
// 64 keys by 4 warps of 16 (dK, dV take 128 registers a thread), 32 queries a step. The *Narrow /
// *Wide ones are the alternatives (MAGIX_FLASH_BWD=64 or 128 picks 64- or 128-key blocks).
using BwdHd64 = BwdShape<64, 4, 2, 32, 2>;
using BwdHd64Narrow = BwdShape<64, 4, 1, 64, 1>;
using BwdHd128 = BwdShape<128, 4, 1, 32, 1>;
using BwdHd128Wide = BwdShape<128, 8, 1, 32, 1>;

template <class C>
FLASH_KERNEL(C::THREADS, C::MINB) flash_bwd(const Params p) {
  constexpr int HD = C::HD, BN = C::BN, BM = C::BM, LD = C::LD, LDS = C::LDS, CH = HD / 8, KC = HD / 16, NQ = BM / 8,
                DT = HD / 8, KB = C::KB, WK = C::WK, DQC = C::DQC, RBQ = C::RBQ;
  FLASH_SMEM(smem);
  bf16* Ks = reinterpret_cast<bf16*>(smem);
  bf16* Vs = Ks + BN * LD;
  bf16* Qs = Vs + BN * LD;       // [2][BM][LD]
  bf16* dOs = Qs + 2 * BM * LD;  // [2][BM][LD]
  bf16* dSs = dOs + 2 * BM * LD; // [BN][LDS]: dSᵀ, key rows
  float* Ls = reinterpret_cast<float*>(dSs + BN * LDS);  // [2][BM]: lse·log2e, +∞ for rows that see nothing
  float* Ds = Ls + 2 * BM;                               // [2][BM]
  uint8_t* Mk = reinterpret_cast<uint8_t*>(Ds + 2 * BM); // [BN]: key s < S and not masked
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int64_t BHk = p.B * p.Hkv;
  const int64_t ktile = static_cast<int64_t>(blockIdx.x) / BHk;  // causal: the first key tiles see the most queries
  const int64_t bhk = static_cast<int64_t>(blockIdx.x) % BHk, b = bhk / p.Hkv, hk = bhk % p.Hkv;
  const int64_t s0 = ktile * BN;
  const int64_t qstride = p.Hq * HD, kstride = p.Hkv * HD, group = p.Hq / p.Hkv;
  const bf16* kbase = static_cast<const bf16*>(p.k) + ((b * p.sMax) * p.Hkv + hk) * HD;
  const bf16* vbase = static_cast<const bf16*>(p.v) + ((b * p.sMax) * p.Hkv + hk) * HD;

  // The queries that may see some key of this tile.
  int64_t tlo = p.causal ? lmax(int64_t{0}, s0 - p.qOffset) : 0;
  int64_t thi = p.T;
  if (p.window > 0) thi = lmin(thi, lmax(int64_t{0}, s0 + BN - 1 + p.window - p.qOffset));
  const int64_t nq = tlo < thi ? (thi - tlo + BM - 1) / BM : 0;
  const int64_t steps = nq * group;
  // Step `it`: query tile nq − 1 − it / group (the last first, so that the blocks of one KV head
  // started together walk the same tiles together, sharing them in L2), head it % group.
  auto step_h = [&](int64_t it) { return hk * group + it % group; };
  auto step_q0 = [&](int64_t it) { return tlo + (nq - 1 - it / group) * BM; };

  for (int i = tid; i < BN * CH; i += C::THREADS) {
    const int r = i / CH, cc = (i % CH) * 8;
    const int64_t s = s0 + r;
    const bool ok = s < p.S;
    const int64_t off = (ok ? s : 0) * kstride + cc;
    cp_async16(Ks + r * LD + cc, kbase + off, ok);
    cp_async16(Vs + r * LD + cc, vbase + off, ok);
  }
  for (int i = tid; i < BN; i += C::THREADS) {
    const int64_t s = s0 + i;
    Mk[i] = s < p.S && (!p.mask || p.mask[b * p.sMax + s]) ? 1 : 0;
  }
  auto load_q = [&](int stage, int64_t it) {
    const int64_t h = step_h(it), q0 = step_q0(it);
    const bf16* qb = static_cast<const bf16*>(p.q) + ((b * p.T) * p.Hq + h) * HD;
    const bf16* db = static_cast<const bf16*>(p.dO) + ((b * p.T) * p.Hq + h) * HD;
    for (int i = tid; i < BM * CH; i += C::THREADS) {
      const int r = i / CH, cc = (i % CH) * 8;
      const int64_t t = q0 + r;
      const bool ok = t < p.T;
      const int64_t off = (ok ? t : 0) * qstride + cc;
      cp_async16(Qs + stage * BM * LD + r * LD + cc, qb + off, ok);
      cp_async16(dOs + stage * BM * LD + r * LD + cc, db + off, ok);
    }
  };
  // lse and D of a step's rows: threads tid < BM read row tid into registers one step ahead and
  // store it (lse·log2e, +∞ where lse = −∞) late in the step, so the global latency is hidden.
  float nextL = -INFINITY, nextD = 0.f;
  auto fetch_ld = [&](int64_t it) {
    nextL = -INFINITY, nextD = 0.f;
    const int64_t t = step_q0(it) + tid;
    if (tid < BM && t < p.T) {
      const int64_t row = (b * p.Hq + step_h(it)) * p.T + t;
      nextL = p.lse[row];
      nextD = p.D[row];
    }
  };
  auto store_ld = [&](int stage) {
    if (tid < BM) {
      Ls[stage * BM + tid] = nextL == -INFINITY ? INFINITY : nextL * kLog2e;
      Ds[stage * BM + tid] = nextD;
    }
  };
  if (steps > 0) {
    load_q(0, 0);
    fetch_ld(0);
    store_ld(0);
  }
  cp_async_commit();

  float dk[KB][DT][4], dv[KB][DT][4];
#pragma unroll
  for (int kb = 0; kb < KB; ++kb)
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      dk[kb][i][0] = dk[kb][i][1] = dk[kb][i][2] = dk[kb][i][3] = 0.f;
      dv[kb][i][0] = dv[kb][i][1] = dv[kb][i][2] = dv[kb][i][3] = 0.f;
    }
  constexpr uint32_t RS = LD * sizeof(bf16);  // bytes per row
  // This lane's ldmatrix rows: the warp's key rows (A of Sᵀ, dPᵀ), Q/dO rows as B (Sᵀ, dPᵀ) and
  // transposed as B (dV, dK).
  const uint32_t aK = smem_addr(Ks + (warp * WK + (lane & 15)) * LD + (lane >> 4) * 8);
  const uint32_t aV = smem_addr(Vs + (warp * WK + (lane & 15)) * LD + (lane >> 4) * 8);
  const uint32_t oB = ((lane & 7) + (lane >> 4) * 8) * RS + ((lane >> 3) & 1) * 16;
  const uint32_t oBt = ((lane & 7) + ((lane >> 3) & 1) * 8) * RS + (lane >> 4) * 16;
  const uint32_t aQ = smem_addr(Qs), adO = smem_addr(dOs);

  // Whether key rows [k0, k0 + n) of the block see no query of the step at q0 (causality, the
  // window, the sequence end); warp-uniform.
  auto hidden = [&](int64_t k0, int n, int64_t q0) {
    const int64_t qa = p.qOffset + q0;
    return k0 >= p.S || (p.causal && k0 > qa + BM - 1) || (p.window > 0 && qa - (k0 + n - 1) >= p.window);
  };

  for (int64_t it = 0; it < steps; ++it) {
    cp_async_wait_all();
    sync_block();  // step `it` has landed; the previous step's buffers and dSᵀ are free
    if (it + 1 < steps) {
      load_q((it + 1) & 1, it + 1);
      fetch_ld(it + 1);
    }
    cp_async_commit();
    const int stage = static_cast<int>(it & 1);
    const int64_t h = step_h(it), q0 = step_q0(it);
    const uint32_t aQt = aQ + stage * BM * RS, adOt = adO + stage * BM * RS;
    const float* Lt = Ls + stage * BM;
    const float* Dt = Ds + stage * BM;
    const int64_t kw = s0 + warp * WK;  // this warp's first key

    if (!hidden(kw, WK, q0)) {
      // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: this warp's WK keys × BM queries.
      float st[KB][NQ][4], dpt[KB][NQ][4];
#pragma unroll
      for (int kb = 0; kb < KB; ++kb)
#pragma unroll
        for (int i = 0; i < NQ; ++i) {
          st[kb][i][0] = st[kb][i][1] = st[kb][i][2] = st[kb][i][3] = 0.f;
          dpt[kb][i][0] = dpt[kb][i][1] = dpt[kb][i][2] = dpt[kb][i][3] = 0.f;
        }
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        uint32_t ak[KB][4], av[KB][4];
#pragma unroll
        for (int kb = 0; kb < KB; ++kb) {
          ldsm_x4(ak[kb], aK + kb * 16 * RS + kc * 32);
          ldsm_x4(av[kb], aV + kb * 16 * RS + kc * 32);
        }
#pragma unroll
        for (int np = 0; np < NQ / 2; ++np) {
          uint32_t bq[4], bd[4];
          ldsm_x4(bq, aQt + oB + np * 16 * RS + kc * 32);
          ldsm_x4(bd, adOt + oB + np * 16 * RS + kc * 32);
#pragma unroll
          for (int kb = 0; kb < KB; ++kb) {
            mma16816(st[kb][2 * np], ak[kb], bq[0], bq[1]);
            mma16816(st[kb][2 * np + 1], ak[kb], bq[2], bq[3]);
            mma16816(dpt[kb][2 * np], av[kb], bd[0], bd[1]);
            mma16816(dpt[kb][2 * np + 1], av[kb], bd[2], bd[3]);
          }
        }
      }
      // Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e) on visible entries; dSᵀ = Pᵀ·(dPᵀ − D).
      const int64_t qa = p.qOffset + q0;
      const bool full = !p.mask && kw + WK <= p.S && (!p.causal || kw + WK - 1 <= qa) &&
                        (p.window == 0 || qa + BM - 1 - kw < p.window);
#pragma unroll
      for (int kb = 0; kb < KB; ++kb)
#pragma unroll
        for (int nt = 0; nt < NQ; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = warp * WK + kb * 16 + g + (e >= 2 ? 8 : 0), col = nt * 8 + 2 * tq + (e & 1);
            float pr = exp2f(st[kb][nt][e] * p.scale_log2 - Lt[col]);
            if (!full) {
              const int64_t s = s0 + row, qpos = qa + col;
              const bool vis = Mk[row] && (!p.causal || s <= qpos) && (p.window == 0 || qpos - s < p.window);
              if (!vis) pr = 0.f;
            }
            st[kb][nt][e] = pr;
            dpt[kb][nt][e] = pr == 0.f ? 0.f : pr * (dpt[kb][nt][e] - Dt[col]);
          }
        }
      // dV += Pᵀ·dO and dK += dSᵀ·Q (the k dimension is this step's queries).
#pragma unroll
      for (int kc = 0; kc < BM / 16; ++kc) {
        uint32_t ap[KB][4], as[KB][4];
#pragma unroll
        for (int kb = 0; kb < KB; ++kb) {
          c_to_a(ap[kb], st[kb][2 * kc], st[kb][2 * kc + 1]);
          c_to_a(as[kb], dpt[kb][2 * kc], dpt[kb][2 * kc + 1]);
        }
#pragma unroll
        for (int dp = 0; dp < HD / 16; ++dp) {
          uint32_t bo[4], bq[4];
          ldsm_x4_t(bo, adOt + oBt + kc * 16 * RS + dp * 32);
          ldsm_x4_t(bq, aQt + oBt + kc * 16 * RS + dp * 32);
#pragma unroll
          for (int kb = 0; kb < KB; ++kb) {
            mma16816(dv[kb][2 * dp], ap[kb], bo[0], bo[1]);
            mma16816(dv[kb][2 * dp + 1], ap[kb], bo[2], bo[3]);
            mma16816(dk[kb][2 * dp], as[kb], bq[0], bq[1]);
            mma16816(dk[kb][2 * dp + 1], as[kb], bq[2], bq[3]);
          }
        }
      }
      // dSᵀ to shared memory (bf16), for dQ = dS·K across the block's keys (hidden warps write
      // nothing: the dQ loop skips their rows).
#pragma unroll
      for (int kb = 0; kb < KB; ++kb)
#pragma unroll
        for (int nt = 0; nt < NQ; ++nt) {
          const int row = warp * WK + kb * 16 + g, col = nt * 8 + 2 * tq;
          *reinterpret_cast<uint32_t*>(dSs + row * LDS + col) = pack2(dpt[kb][nt][0], dpt[kb][nt][1]);
          *reinterpret_cast<uint32_t*>(dSs + (row + 8) * LDS + col) = pack2(dpt[kb][nt][2], dpt[kb][nt][3]);
        }
    }
    if (it + 1 < steps) store_ld((it + 1) & 1);  // read after the next step's first barrier
    sync_block();
    // dQ: warp (rb, cb) computes query rows [16·rb, 16·rb + 16) × columns [cb·DQC, cb·DQC + DQC).
    {
      const int rb = warp % RBQ, cb = warp / RBQ;
      float dq[DQC / 8][4];
#pragma unroll
      for (int i = 0; i < DQC / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
      bool any = false;
#pragma unroll
      for (int kc = 0; kc < BN / 16; ++kc) {
        if (hidden(s0 + (kc * 16 / WK) * WK, WK, q0)) continue;  // that warp's dSᵀ rows are zero
        any = true;
        uint32_t a[4];
        ldsm_x4_t(a, dSs + (kc * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + rb * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int dp = 0; dp < DQC / 16; ++dp) {
          uint32_t bk[4];
          ldsm_x4_t(bk, Ks + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + cb * DQC + dp * 16 + (lane >> 4) * 8);
          mma16816(dq[2 * dp], a, bk[0], bk[1]);
          mma16816(dq[2 * dp + 1], a, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t t = q0 + rb * 16 + g + r * 8;
        if (any && t < p.T) {
          float* dst = p.dqacc + ((b * p.T + t) * p.Hq + h) * HD + cb * DQC + 2 * tq;
#pragma unroll
          for (int dt = 0; dt < DQC / 8; ++dt)
            atomic_add2(dst + dt * 8, dq[dt][2 * r] * p.scale, dq[dt][2 * r + 1] * p.scale);
        }
      }
    }
  }

  cp_async_wait_all();  // nothing may still be in flight when the block ends (steps = 0)
  // dk = scale·dK, dv = dV for the keys s < S of this warp.
#pragma unroll
  for (int kb = 0; kb < KB; ++kb)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t s = s0 + warp * WK + kb * 16 + g + r * 8;
      if (s < p.S) {
        const int64_t off = ((b * p.sMax + s) * p.Hkv + hk) * HD + 2 * tq;
        bf16* dko = static_cast<bf16*>(p.dk) + off;
        bf16* dvo = static_cast<bf16*>(p.dv) + off;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          *reinterpret_cast<uint32_t*>(dko + dt * 8) = pack2(dk[kb][dt][2 * r] * p.scale, dk[kb][dt][2 * r + 1] * p.scale);
          *reinterpret_cast<uint32_t*>(dvo + dt * 8) = pack2(dv[kb][dt][2 * r], dv[kb][dt][2 * r + 1]);
        }
      }
    }
}

}  // namespace magix::cuda::flash
