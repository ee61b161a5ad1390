// Checks the tensor-core attention kernels (src/native/cuda/flash_mma.cuh) on a machine without a
// GPU: a SIMT emulator runs the exact kernel code with one host thread per CUDA thread, the
// warp-level primitives (ldmatrix, mma.m16n8k16, shuffles, barriers, cp.async) written from the PTX
// ISA's fragment tables, against a float64 reference of src/native/OPS.md attention (forward and
// backward; causal, grouped-query, window, key mask, qOffset with sMax > S, fully masked rows).
// Shared memory starts as NaN, so a read of anything unwritten shows. Not part of the addon:
//   g++ -std=c++20 -O1 -pthread -isystem /usr/local/cuda/include -Isrc/native/cuda \
//       test/gpu/flash_emulate.cc -o /tmp/flash_emulate && /tmp/flash_emulate    (about 1.5 minutes)
#define MAGIX_FLASH_EMULATE 1
#include <cuda_bf16.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct Dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx;

struct EmuBlock {
  std::vector<unsigned char> smem;
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> wbar;
  std::vector<uint64_t> ex;
  EmuBlock(size_t bytes, int threads) : smem(bytes + 16), bar(threads) {
    for (int w = 0; w < threads / 32; ++w) wbar.push_back(std::make_unique<std::barrier<>>(32));
    ex.resize(static_cast<size_t>(threads) * 8);
  }
};
thread_local EmuBlock* blk;

#define FLASH_DEVICE inline
#define FLASH_KERNEL(threads, minblocks) void
#define FLASH_SMEM(name) unsigned char* name = blk->smem.data()

namespace magix::cuda::flash {
inline int lane_id() { return threadIdx.x & 31; }
inline int warp_id() { return threadIdx.x >> 5; }
inline void warp_sync() { blk->wbar[warp_id()]->arrive_and_wait(); }
inline uint64_t* slot(int lane) { return &blk->ex[(warp_id() * 32 + lane) * 8]; }

inline void cp_async16(void* d, const void* s, bool v) {
  if (v) std::memcpy(d, s, 16);
  else std::memset(d, 0, 16);
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}
inline uint16_t get16(const char* p) {
  uint16_t x;
  std::memcpy(&x, p, 2);
  return x;
}
inline void check_smem(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < blk->smem.data() || c + 16 > blk->smem.data() + blk->smem.size() || (reinterpret_cast<uintptr_t>(c) - reinterpret_cast<uintptr_t>(blk->smem.data())) % 16)
    { std::fprintf(stderr, "ldmatrix address outside shared memory or misaligned\n"); std::abort(); }
}
inline void ldsm(uint32_t (&r)[4], const void* p, bool trans) {
  check_smem(p);
  const int l = lane_id();
  slot(l)[0] = reinterpret_cast<uintptr_t>(p);
  warp_sync();
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      const char* row = reinterpret_cast<const char*>(slot(8 * i + l / 4)[0]);
      uint32_t w;
      std::memcpy(&w, row + 4 * (l % 4), 4);
      r[i] = w;
    } else {
      const char* r0 = reinterpret_cast<const char*>(slot(8 * i + 2 * (l % 4))[0]);
      const char* r1 = reinterpret_cast<const char*>(slot(8 * i + 2 * (l % 4) + 1)[0]);
      r[i] = get16(r0 + 2 * (l / 4)) | (static_cast<uint32_t>(get16(r1 + 2 * (l / 4))) << 16);
    }
  }
  warp_sync();
}
inline void ldsm_x4(uint32_t (&r)[4], const void* p) { ldsm(r, p, false); }
inline void ldsm_x4_t(uint32_t (&r)[4], const void* p) { ldsm(r, p, true); }
// Shared-memory addresses are byte offsets into the block's shared memory here.
inline uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - blk->smem.data()); }
inline void ldsm_x4(uint32_t (&r)[4], uint32_t a) { ldsm(r, blk->smem.data() + a, false); }
inline void ldsm_x4_t(uint32_t (&r)[4], uint32_t a) { ldsm(r, blk->smem.data() + a, true); }
inline float bfv(uint32_t w, int half) {
  const uint32_t u = (half ? (w >> 16) : (w & 0xffff)) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int l = lane_id(), g = l / 4, q = l % 4;
  uint64_t* s = slot(l);
  for (int i = 0; i < 4; ++i) s[i] = a[i];
  s[4] = b0, s[5] = b1;
  warp_sync();
  auto A = [&](int r, int k) { return bfv(static_cast<uint32_t>(slot((r % 8) * 4 + (k % 8) / 2)[(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)]), k % 2); };
  auto B = [&](int k, int n) { return bfv(static_cast<uint32_t>(slot(n * 4 + (k % 8) / 2)[4 + (k >= 8 ? 1 : 0)]), k % 2); };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * q + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[e] = acc;
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}
inline float shfl_xor(float v, int o) {
  const int l = lane_id();
  uint32_t u;
  std::memcpy(&u, &v, 4);
  slot(l)[0] = u;
  warp_sync();
  const uint32_t w = static_cast<uint32_t>(slot(l ^ o)[0]);
  warp_sync();
  float r;
  std::memcpy(&r, &w, 4);
  return r;
}
inline void sync_block() { blk->bar.arrive_and_wait(); }
inline bool any_warp(bool v) {
  slot(lane_id())[0] = v;
  warp_sync();
  bool r = false;
  for (int l = 0; l < 32; ++l) r |= slot(l)[0] != 0;
  warp_sync();
  return r;
}
inline std::mutex atomic_mu;
inline void atomic_add2(float* p, float a, float b) {
  std::lock_guard<std::mutex> lock(atomic_mu);
  p[0] += a;
  p[1] += b;
}
inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }
}  // namespace magix::cuda::flash

#include "flash_mma.cuh"

using namespace magix::cuda::flash;

template <typename K>
void launch(K kernel, int64_t grid, int threads, size_t smem, const Params& p) {
  for (int64_t b = 0; b < grid; ++b) {
    EmuBlock B(smem, threads);
    std::memset(B.smem.data(), 0xff, B.smem.size());  // unwritten shared memory reads as NaN
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, t] {
        threadIdx = Dim3{static_cast<unsigned>(t)};
        blockIdx = Dim3{static_cast<unsigned>(b)};
        blk = &B;
        kernel(p);
      });
    for (auto& t : ts) t.join();
  }
}

static uint32_t rng = 12345;
float uni() { rng = rng * 1103515245u + 12345u; return (rng >> 8) / 16777216.0f * 2 - 1; }
float rb(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

struct Case { const char* name; int B, T, S, sMax, Hq, Hkv, causal, window, qOffset; bool mask; double scaleMul = 1; };

double relerr(const std::vector<double>& a, const std::vector<double>& b, bool& nan) {
  double num = 0, den = 0;
  nan = false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) { nan = true; continue; }
    if (std::isinf(b[i])) { if (a[i] != b[i]) nan = true; continue; }
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// The forward shape F, then the backward shapes G... on the emulated forward's o and lse.
template <class F, class... G>
bool run_case(const Case& k) {
  constexpr int HD = F::HD;
  const int hd = HD;
  const size_t qn = (size_t)k.B * k.T * k.Hq * hd, kn = (size_t)k.B * k.sMax * k.Hkv * hd;
  std::vector<float> q(qn), kk(kn), v(kn), dO(qn);
  for (auto& x : q) x = rb(uni());
  for (auto& x : kk) x = rb(uni());
  for (auto& x : v) x = rb(uni());
  for (auto& x : dO) x = rb(uni());
  std::vector<uint8_t> mask(k.B * k.sMax, 1);
  if (k.mask) for (size_t i = 0; i < mask.size(); ++i) mask[i] = (k.T == 40 ? (i % k.sMax < 5 ? 0 : 1) : (i % 7 == 3 ? 0 : 1));
  const double scale = k.scaleMul / std::sqrt((double)hd);
  auto vis = [&](int b, int t, int s) {
    if (s >= k.S) return false;
    if (k.mask && !mask[b * k.sMax + s]) return false;
    const int qp = k.qOffset + t;
    if (k.causal && s > qp) return false;
    if (k.window > 0 && qp - s >= k.window) return false;
    return true;
  };
  // reference
  std::vector<double> o_ref(qn, 0), lse_ref(k.B * k.Hq * k.T), dq_ref(qn, 0), dk_ref(kn, 0), dv_ref(kn, 0);
  const int group = k.Hq / k.Hkv;
  for (int b = 0; b < k.B; ++b)
    for (int h = 0; h < k.Hq; ++h)
      for (int t = 0; t < k.T; ++t) {
        const int hk = h / group;
        std::vector<double> sc(k.S, -INFINITY);
        double m = -INFINITY;
        for (int s = 0; s < k.S; ++s) if (vis(b, t, s)) {
          double d = 0;
          for (int e = 0; e < hd; ++e) d += (double)q[((size_t)(b * k.T + t) * k.Hq + h) * hd + e] * kk[((size_t)(b * k.sMax + s) * k.Hkv + hk) * hd + e];
          sc[s] = d * scale; m = std::max(m, sc[s]);
        }
        double l = 0;
        for (int s = 0; s < k.S; ++s) if (sc[s] != -INFINITY) l += std::exp(sc[s] - m);
        const size_t orow = ((size_t)(b * k.T + t) * k.Hq + h) * hd;
        lse_ref[(b * k.Hq + h) * k.T + t] = l > 0 ? m + std::log(l) : -INFINITY;
        if (l == 0) continue;
        const double L = m + std::log(l);
        std::vector<double> P(k.S, 0);
        for (int s = 0; s < k.S; ++s) if (sc[s] != -INFINITY) P[s] = std::exp(sc[s] - L);
        for (int e = 0; e < hd; ++e) { double a = 0; for (int s = 0; s < k.S; ++s) a += P[s] * v[((size_t)(b * k.sMax + s) * k.Hkv + hk) * hd + e]; o_ref[orow + e] = a; }
        double D = 0;
        for (int e = 0; e < hd; ++e) D += o_ref[orow + e] * dO[orow + e];
        for (int s = 0; s < k.S; ++s) if (P[s] != 0) {
          const size_t krow = ((size_t)(b * k.sMax + s) * k.Hkv + hk) * hd;
          double dp = 0;
          for (int e = 0; e < hd; ++e) dp += (double)dO[orow + e] * v[krow + e];
          const double ds = P[s] * (dp - D);
          for (int e = 0; e < hd; ++e) {
            dv_ref[krow + e] += P[s] * dO[orow + e];
            dk_ref[krow + e] += scale * ds * q[orow + e];
            dq_ref[orow + e] += scale * ds * kk[krow + e];
          }
        }
      }
  // emulated kernels
  std::vector<bf16> qb(qn), kb(kn), vb(kn), ob(qn, __float2bfloat16_rn(NAN)), dOb(qn), dqb(qn), dkb(kn, __float2bfloat16_rn(NAN)), dvb(kn, __float2bfloat16_rn(NAN));
  for (size_t i = 0; i < qn; ++i) qb[i] = __float2bfloat16_rn(q[i]), dOb[i] = __float2bfloat16_rn(dO[i]);
  for (size_t i = 0; i < kn; ++i) kb[i] = __float2bfloat16_rn(kk[i]), vb[i] = __float2bfloat16_rn(v[i]);
  std::vector<float> lse(k.B * k.Hq * k.T, NAN);
  Params p{};
  p.q = qb.data(); p.k = kb.data(); p.v = vb.data(); p.out = ob.data(); p.lse = lse.data();
  p.mask = k.mask ? mask.data() : nullptr;
  p.B = k.B; p.T = k.T; p.S = k.S; p.Hq = k.Hq; p.Hkv = k.Hkv; p.hd = hd; p.sMax = k.sMax; p.window = k.window; p.qOffset = k.qOffset;
  p.causal = k.causal; p.scale = (float)scale; p.scale_log2 = (float)scale * kLog2e;
  launch(flash_fwd<F>, (k.T + F::BM - 1) / F::BM * k.B * k.Hq, F::THREADS, F::smem, p);
  std::vector<double> o(qn), l2(lse.begin(), lse.end());
  for (size_t i = 0; i < qn; ++i) o[i] = __bfloat162float(ob[i]);
  // backward on the emulated forward's o and lse
  std::vector<float> D(k.B * k.Hq * k.T), acc(qn, 0.f);
  for (int b = 0; b < k.B; ++b) for (int h = 0; h < k.Hq; ++h) for (int t = 0; t < k.T; ++t) {
    float d = 0; const size_t row = ((size_t)(b * k.T + t) * k.Hq + h) * hd;
    for (int e = 0; e < hd; ++e) d += __bfloat162float(ob[row + e]) * __bfloat162float(dOb[row + e]);
    D[(b * k.Hq + h) * k.T + t] = d;
  }
  p.o = ob.data(); p.dO = dOb.data(); p.D = D.data(); p.dqacc = acc.data(); p.dk = dkb.data(); p.dv = dvb.data();
  bool ok = true;
  auto report = [&](const char* what, const std::vector<double>& a, const std::vector<double>& b) {
    bool nan; const double e = relerr(a, b, nan);
    const bool pass = !nan && e < 1e-2;
    ok &= pass;
    std::printf("  %-4s %s %.2e%s\n", what, pass ? "ok  " : "FAIL", e, nan ? " (NaN/inf mismatch)" : "");
  };
  std::printf("hd %d, forward %d warps of %d rows, %d-key tiles: %s\n", HD, F::W, 16 * F::RB, F::BN, k.name);
  report("o", o, o_ref);
  report("lse", l2, lse_ref);
  auto backward = [&]<class C>() {
    static_assert(C::HD == HD);
    std::fill(acc.begin(), acc.end(), 0.f);
    std::fill(dkb.begin(), dkb.end(), __float2bfloat16_rn(NAN));
    std::fill(dvb.begin(), dvb.end(), __float2bfloat16_rn(NAN));
    launch(flash_bwd<C>, (k.S + C::BN - 1) / C::BN * k.B * k.Hkv, C::THREADS, C::smem, p);
    std::vector<double> dq(acc.begin(), acc.end()), dk, dv, dk_r, dv_r;
    for (int b = 0; b < k.B; ++b) for (size_t i = 0; i < (size_t)k.S * k.Hkv * hd; ++i) {
      const size_t j = (size_t)b * k.sMax * k.Hkv * hd + i;
      dk.push_back(__bfloat162float(dkb[j])); dv.push_back(__bfloat162float(dvb[j]));
      dk_r.push_back(dk_ref[j]); dv_r.push_back(dv_ref[j]);
    }
    // dk, dv past S stay untouched (NaN here).
    bool untouched = true;
    for (int b = 0; b < k.B; ++b) for (size_t i = (size_t)k.S * k.Hkv * hd; i < (size_t)k.sMax * k.Hkv * hd; ++i) {
      const size_t j = (size_t)b * k.sMax * k.Hkv * hd + i;
      untouched &= std::isnan(__bfloat162float(dkb[j])) && std::isnan(__bfloat162float(dvb[j]));
    }
    if (!untouched) { ok = false; std::printf("  dk/dv past S written: FAIL\n"); }
    std::printf(" backward %d warps of %d keys, %d queries a step\n", C::W, C::WK, C::BM);
    report("dq", dq, dq_ref);
    report("dk", dk, dk_r);
    report("dv", dv, dv_r);
  };
  (backward.template operator()<G>(), ...);
  return ok;
}

int main(int argc, char** argv) {
  const Case cases[] = {
      {"causal GQA", 2, 150, 150, 150, 4, 2, 1, 0, 0, false},
      {"sliding window", 1, 150, 150, 150, 4, 1, 1, 37, 0, false},
      {"key mask", 2, 90, 90, 90, 2, 2, 1, 0, 0, true},
      {"not causal", 1, 70, 130, 130, 2, 1, 0, 0, 0, false},
      {"qOffset, sMax > S", 2, 33, 100, 120, 4, 2, 1, 0, 67, true},
      {"fully masked rows", 1, 40, 40, 40, 2, 1, 1, 3, 0, true},
      {"one full tile", 1, 64, 64, 64, 1, 1, 0, 0, 0, false},
      {"long causal GQA, negative scale", 1, 300, 300, 300, 2, 1, 1, 0, 0, false, -1.5},
      {"long window, qOffset, zero scale", 1, 260, 290, 300, 2, 2, 1, 70, 30, false, 0},
      {"window not causal, qOffset", 1, 100, 200, 200, 2, 1, 0, 50, 60, false},
  };
  bool ok = true;
  const int only = argc > 1 ? std::atoi(argv[1]) : -1;
  for (int i = 0; i < (int)(sizeof(cases) / sizeof(cases[0])); ++i) {
    if (only >= 0 && i != only) continue;
    ok &= run_case<FwdHd64, BwdHd64>(cases[i]);
    ok &= run_case<FwdHd64Long, BwdHd64Narrow>(cases[i]);
    ok &= run_case<FwdHd128, BwdHd128, BwdHd128Wide>(cases[i]);
  }
  std::printf(ok ? "ALL OK\n" : "FAILURES\n");
  return ok ? 0 : 1;
}
