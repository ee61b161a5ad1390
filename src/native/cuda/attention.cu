// Attention (src/native/OPS.md): q, o [B, T, Hq, hd]; k, v [B, sMax, Hkv, hd] (the first S rows
// used); lse [B, Hq, T] float32; optional keyMask [B, sMax] uint8 (1 = may be attended). Query head
// h reads KV head h / (Hq / Hkv); query t sits at key position qOffset + t. Key s is visible to
// query t when (no mask or keyMask[b, s]) and (not causal or s ≤ qOffset + t) and
// (window = 0 or qOffset + t − s < window).
//   attention_fwd(q, k, v, o, lse[, keyMask]; dtype, B, T, S, Hq, Hkv, hd, scale, causal, window,
//                 qOffset, hasMask, sMax):
//     o = softmax(scale·q·kᵀ over visible keys)·v, lse = log Σ exp(scale·q·kᵀ) over visible keys
//   attention_bwd(q, k, v, o, lse, dO, dq, dk, dv[, keyMask]; same args):
//     D = rowsum(dO·o), p = exp(scale·q·kᵀ − lse), dv = pᵀ·dO, ds = p·(dO·vᵀ − D),
//     dq = scale·ds·k, dk = scale·dsᵀ·q (dk, dv summed over the query heads of a KV head, written
//     for the first S rows only)
// A query with no visible key gets o = 0 and lse = −∞ and contributes nothing to the gradients.
// The score matrix never exists in global memory.
//
// Two paths:
// - bfloat16 with hd 64 or 128: FlashAttention-2 on the tensor cores (mma.sync m16n8k16 bf16 →
//   float32 via inline PTX; operands from shared memory through ldmatrix; tiles staged by cp.async).
//   Forward: a block of 4 warps owns 64 queries (hd 64, T ≤ 2048: 16 rows a warp, 4 blocks per
//   multiprocessor) or 128 (32 rows a warp, two 16-row blocks sharing each K/V fragment) of one
//   (batch, head); each warp keeps its S tile, running max/sum and O accumulator in registers (Q
//   fragments too, except for hd 128). Key/value tiles of 64 rows are double-buffered in shared
//   memory; for each: S = Q·Kᵀ on raw scores, visibility (only where causality, the window, the
//   sequence end or the key mask cut the warp's rows; tiles they hide from all of a warp's rows
//   are skipped by that warp), online softmax in base 2 with the scale folded into the exponent's
//   FFMA (the row max and sum across the 4 threads of an mma quad; O is rescaled only when some
//   row's max grew), P packed to bf16 straight from the S accumulators into A fragments, O += P·V.
//   Backward: first D = rowsum(dO·o) per query row (float32 scratch, 16-byte loads; the same
//   kernel zeroes the float32 dq accumulator). Then a block of 4 warps owns 128 keys (hd 64: 32 key
//   rows a warp) or 64 keys (hd 128: 16 a warp) of one (batch, KV head): K and V stay in shared
//   memory, dK and dV accumulate in registers, and the block walks the query tiles of 32 queries
//   from the last one down, all query heads of the group for each tile (so that the blocks of a
//   KV head started together read the same tiles together; double-buffered Q and dO by cp.async,
//   lse and D read into registers a step ahead): Sᵀ = K·Qᵀ, Pᵀ = exp2(Sᵀ·scale·log2e −
//   lse·log2e), dPᵀ = V·dOᵀ, dSᵀ = Pᵀ·(dPᵀ − D), dV += Pᵀ·dO, dK += dSᵀ·Q (P and dS as A fragments
//   from registers; a warp whose keys no query of the step sees skips all of it); dSᵀ goes to
//   shared memory in bf16 and dQ_tile = dS·K is added into the float32 accumulator with float2
//   atomics; a last kernel converts dq to bf16. MAGIX_FLASH_BWD=64 or 128 forces 64- or 128-key
//   blocks (hd 128 with 128 keys: 8 warps, one block per multiprocessor), for timing.
// - everything else (float32; other head sizes up to 256): one warp per query row (forward, dq)
//   or key row (dk, dv), each lane holding hd/32 dimensions, keys streamed with an online softmax;
//   simple, exact float32 arithmetic, no atomics. MAGIX_ATTENTION=reference in the environment
//   sends bfloat16 through this path too (for checking the fast one).
// By default bfloat16 without window, key mask or offset and with S = T = sMax goes to cuDNN 9's
// fused attention (cudnn.h; same lse, so either backward follows either forward) where cuDNN is
// found and takes the shape: it runs about 2x these kernels on an H200 (bench/NOTES.md). Everything
// else stays here; MAGIX_ATTENTION=flash keeps everything here.
#include <cstdlib>
#include <cstring>
#include <string>

#include "common.cuh"
#include "cudnn.h"
#include "flash_mma.cuh"

namespace magix::cuda {
namespace {

using flash::flash_bwd;
using flash::flash_fwd;
using flash::kLog2e;
using flash::Params;

// ======================= the reference path: one warp per row =======================

constexpr int kMaxPerLane = 8;  // hd ≤ 256
constexpr int kRefWarps = 4;

template <typename T>
__device__ __forceinline__ void load_row(const T* row, int hd, int lane, float (&x)[kMaxPerLane]) {
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    x[i] = d < hd ? to_f(row[d]) : 0.f;
  }
}

__device__ __forceinline__ float dot_row(const float (&a)[kMaxPerLane], const float (&b)[kMaxPerLane]) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) s += a[i] * b[i];
  return warp_sum(s);
}

// Rows are (b, h, t) in that order, so neighbouring warps share keys.
template <typename T>
__global__ void ref_fwd(const Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t w = blockIdx.x * (int64_t)kRefWarps + (threadIdx.x >> 5);
  if (w >= p.B * p.Hq * p.T) return;
  const int hd = static_cast<int>(p.hd);
  const int64_t t = w % p.T, h = (w / p.T) % p.Hq, b = w / (p.T * p.Hq), hk = h / (p.Hq / p.Hkv);
  const T* q = static_cast<const T*>(p.q) + ((b * p.T + t) * p.Hq + h) * p.hd;
  float qr[kMaxPerLane], acc[kMaxPerLane];
  load_row(q, hd, lane, qr);
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) acc[i] = 0.f;
  const int64_t qpos = p.qOffset + t;
  const int64_t lo = p.window > 0 ? max((int64_t)0, qpos - p.window + 1) : 0;
  const int64_t hi = p.causal ? min(p.S, qpos + 1) : p.S;
  float m = -INFINITY, l = 0.f;
  for (int64_t s = lo; s < hi; ++s) {
    if (p.mask && !p.mask[b * p.sMax + s]) continue;
    const int64_t kv = ((b * p.sMax + s) * p.Hkv + hk) * p.hd;
    float kr[kMaxPerLane], vr[kMaxPerLane];
    load_row(static_cast<const T*>(p.k) + kv, hd, lane, kr);
    load_row(static_cast<const T*>(p.v) + kv, hd, lane, vr);
    const float sc = dot_row(qr, kr) * p.scale;
    const float mn = fmaxf(m, sc);
    const float corr = __expf(m - mn), e = __expf(sc - mn);
    l = l * corr + e;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) acc[i] = acc[i] * corr + e * vr[i];
    m = mn;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* o = static_cast<T*>(p.out) + ((b * p.T + t) * p.Hq + h) * p.hd;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) o[d] = from_f<T>(acc[i] * inv);
  }
  if (lane == 0) p.lse[(b * p.Hq + h) * p.T + t] = l > 0.f ? m + logf(l) : -INFINITY;
}

// D[b, h, t] = Σ_d dO·o, one warp per row; also zeroes the row of the dq accumulator (fast path).
template <typename T>
__global__ void delta_kernel(const Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t w = blockIdx.x * (int64_t)kRefWarps + (threadIdx.x >> 5);
  if (w >= p.B * p.Hq * p.T) return;
  const int64_t t = w % p.T, h = (w / p.T) % p.Hq, b = w / (p.T * p.Hq);
  const int64_t base = ((b * p.T + t) * p.Hq + h) * p.hd;
  const T* o = static_cast<const T*>(p.o) + base;
  const T* dO = static_cast<const T*>(p.dO) + base;
  float acc = 0.f;
  for (int64_t d = lane; d < p.hd; d += 32) acc += to_f(o[d]) * to_f(dO[d]);
  acc = warp_sum(acc);
  if (lane == 0) const_cast<float*>(p.D)[w] = acc;
  if (p.dqacc)
    for (int64_t d = lane; d < p.hd; d += 32) p.dqacc[base + d] = 0.f;
}

// The fast path's D and dq zeroing: rows in memory order ((b, t, h)), HD/8 threads a row, each
// with 16-byte loads of o and dO and two float4 zero stores into the dq accumulator.
template <int HD>
__global__ void flash_delta(const Params p, int64_t rows) {
  constexpr int TPR = HD / 8;  // threads per row: 8 or 16, within a warp
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t m = i / TPR;  // (b·T + t)·Hq + h
  const int c = static_cast<int>(i % TPR) * 8;
  float acc = 0.f;
  if (m < rows) {
    const uint4 a = *reinterpret_cast<const uint4*>(static_cast<const bf16*>(p.o) + m * HD + c);
    const uint4 d = *reinterpret_cast<const uint4*>(static_cast<const bf16*>(p.dO) + m * HD + c);
    const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, dw[4] = {d.x, d.y, d.z, d.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 af = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&aw[j]));
      const float2 df = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&dw[j]));
      acc = fmaf(af.x, df.x, fmaf(af.y, df.y, acc));
    }
    float4* z = reinterpret_cast<float4*>(p.dqacc + m * HD + c);
    z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (m < rows && c == 0) {
    const int64_t h = m % p.Hq, bt = m / p.Hq, t = bt % p.T, b = bt / p.T;
    const_cast<float*>(p.D)[(b * p.Hq + h) * p.T + t] = acc;
  }
}

template <typename T>
__global__ void ref_dq(const Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t w = blockIdx.x * (int64_t)kRefWarps + (threadIdx.x >> 5);
  if (w >= p.B * p.Hq * p.T) return;
  const int hd = static_cast<int>(p.hd);
  const int64_t t = w % p.T, h = (w / p.T) % p.Hq, b = w / (p.T * p.Hq), hk = h / (p.Hq / p.Hkv);
  const int64_t base = ((b * p.T + t) * p.Hq + h) * p.hd;
  float qr[kMaxPerLane], dor[kMaxPerLane], acc[kMaxPerLane];
  load_row(static_cast<const T*>(p.q) + base, hd, lane, qr);
  load_row(static_cast<const T*>(p.dO) + base, hd, lane, dor);
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) acc[i] = 0.f;
  const float L = p.lse[w], Dt = p.D[w];
  if (L != -INFINITY) {
    const int64_t qpos = p.qOffset + t;
    const int64_t lo = p.window > 0 ? max((int64_t)0, qpos - p.window + 1) : 0;
    const int64_t hi = p.causal ? min(p.S, qpos + 1) : p.S;
    for (int64_t s = lo; s < hi; ++s) {
      if (p.mask && !p.mask[b * p.sMax + s]) continue;
      const int64_t kv = ((b * p.sMax + s) * p.Hkv + hk) * p.hd;
      float kr[kMaxPerLane], vr[kMaxPerLane];
      load_row(static_cast<const T*>(p.k) + kv, hd, lane, kr);
      load_row(static_cast<const T*>(p.v) + kv, hd, lane, vr);
      const float pr = __expf(dot_row(qr, kr) * p.scale - L);
      const float ds = pr * (dot_row(dor, vr) - Dt);
#pragma unroll
      for (int i = 0; i < kMaxPerLane; ++i) acc[i] += ds * kr[i];
    }
  }
  T* dq = static_cast<T*>(p.dq) + base;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) dq[d] = from_f<T>(acc[i] * p.scale);
  }
}

// Rows are key rows (b, hk, s) for s < S.
template <typename T>
__global__ void ref_dkdv(const Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t w = blockIdx.x * (int64_t)kRefWarps + (threadIdx.x >> 5);
  if (w >= p.B * p.Hkv * p.S) return;
  const int hd = static_cast<int>(p.hd);
  const int64_t s = w % p.S, hk = (w / p.S) % p.Hkv, b = w / (p.S * p.Hkv);
  const int64_t kv = ((b * p.sMax + s) * p.Hkv + hk) * p.hd;
  float kr[kMaxPerLane], vr[kMaxPerLane], dk[kMaxPerLane], dv[kMaxPerLane];
  load_row(static_cast<const T*>(p.k) + kv, hd, lane, kr);
  load_row(static_cast<const T*>(p.v) + kv, hd, lane, vr);
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) dk[i] = dv[i] = 0.f;
  if (!p.mask || p.mask[b * p.sMax + s]) {
    const int64_t group = p.Hq / p.Hkv;
    const int64_t tlo = p.causal ? max((int64_t)0, s - p.qOffset) : 0;
    const int64_t thi = p.window > 0 ? min(p.T, s + p.window - p.qOffset) : p.T;
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      for (int64_t t = tlo; t < thi; ++t) {
        const int64_t row = (b * p.Hq + h) * p.T + t;
        const float L = p.lse[row];
        if (L == -INFINITY) continue;
        const int64_t base = ((b * p.T + t) * p.Hq + h) * p.hd;
        float qr[kMaxPerLane], dor[kMaxPerLane];
        load_row(static_cast<const T*>(p.q) + base, hd, lane, qr);
        load_row(static_cast<const T*>(p.dO) + base, hd, lane, dor);
        const float pr = __expf(dot_row(qr, kr) * p.scale - L);
        const float ds = pr * (dot_row(dor, vr) - p.D[row]);
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) {
          dv[i] += pr * dor[i];
          dk[i] += ds * qr[i];
        }
      }
    }
  }
  T* dko = static_cast<T*>(p.dk) + kv;
  T* dvo = static_cast<T*>(p.dv) + kv;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) {
      dko[d] = from_f<T>(dk[i] * p.scale);
      dvo[d] = from_f<T>(dv[i]);
    }
  }
}

// dq = bf16(accumulator), 8 at a time (n is a multiple of 8: hd is).
__global__ void dq_convert(const float* __restrict acc, bf16* __restrict dq, size_t n8) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n8; i += (size_t)gridDim.x * blockDim.x) {
    const float4 v = reinterpret_cast<const float4*>(acc)[2 * i], w = reinterpret_cast<const float4*>(acc)[2 * i + 1];
    uint4 u;
    u.x = pack_bf16x2(v.x, v.y);
    u.y = pack_bf16x2(v.z, v.w);
    u.z = pack_bf16x2(w.x, w.y);
    u.w = pack_bf16x2(w.z, w.w);
    reinterpret_cast<uint4*>(dq)[i] = u;
  }
}

// ======================= the ops =======================

Params parse(OpCtx& c, size_t maskIndex) {
  Params p{};
  p.B = c.i(1), p.T = c.i(2), p.S = c.i(3), p.Hq = c.i(4), p.Hkv = c.i(5), p.hd = c.i(6);
  p.scale = static_cast<float>(c.f(7));
  p.scale_log2 = p.scale * kLog2e;
  p.causal = c.i(8) != 0;
  p.window = c.i(9);
  p.qOffset = c.i(10);
  const bool hasMask = c.i(11) != 0;
  p.sMax = c.i(12);
  for (int64_t v : {p.B, p.T, p.S, p.Hq, p.Hkv, p.hd, p.window, p.qOffset, p.sMax})
    check(v >= 0, c.name + ": sizes must be non-negative");
  check(p.Hkv > 0 && p.Hq % p.Hkv == 0, c.name + ": query heads must be a multiple of KV heads");
  check(p.S <= p.sMax, c.name + ": S exceeds sMax");
  check(p.hd <= 32 * kMaxPerLane, c.name + ": head size " + std::to_string(p.hd) + " is above 256");
  p.mask = hasMask ? c.need(maskIndex, mul(p.B, p.sMax), 1).as<uint8_t>() : nullptr;
  return p;
}

bool reference_forced() {
  const char* e = std::getenv("MAGIX_ATTENTION");
  return e && std::strcmp(e, "reference") == 0;
}

// Raises a kernel's dynamic shared memory limit once per device.
template <typename K>
void allow_smem(K kernel, size_t bytes, int device, unsigned long long& done) {
  if (bytes <= 48 * 1024 || device >= 64 || (done >> device) & 1ull) return;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  done |= 1ull << device;
}

unsigned warp_blocks(int64_t rows) { return static_cast<unsigned>((rows + kRefWarps - 1) / kRefWarps); }

template <class C>
void launch_fwd(const Params& p, int dev, cudaStream_t s) {
  static unsigned long long done = 0;
  allow_smem(flash_fwd<C>, C::smem, dev, done);
  const int64_t blocks = (p.T + C::BM - 1) / C::BM * p.B * p.Hq;
  flash_fwd<C><<<static_cast<unsigned>(blocks), C::THREADS, C::smem, s>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <class C>
void launch_bwd(const Params& p, int dev, cudaStream_t s) {
  static unsigned long long done = 0;
  allow_smem(flash_bwd<C>, C::smem, dev, done);
  const int64_t blocks = (p.S + C::BN - 1) / C::BN * p.B * p.Hkv;
  flash_bwd<C><<<static_cast<unsigned>(blocks), C::THREADS, C::smem, s>>>(p);
  CUDA_CHECK_LAUNCH();
}

// MAGIX_FLASH_BWD=64 or 128: the backward's keys per block for both head sizes (for timing the
// alternatives); unset, hd 64 takes 128 and hd 128 takes 64.
int bwd_keys_forced() {
  static const int v = [] {
    const char* e = std::getenv("MAGIX_FLASH_BWD");
    return e ? std::atoi(e) : 0;
  }();
  return v;
}

// cuDNN's fused attention (cudnn.h) for bfloat16 where its scope allows (no window, key mask or
// offset; S = T = sMax; 16-byte aligned); elsewhere, or where cuDNN is missing or refuses the
// shape, the kernels below, silently. The workspace is this op's scratch. MAGIX_ATTENTION=flash
// or =reference turns it off (to time or check our kernels); unset or =cudnn leaves it on.
// Read at every call, like reference_forced(), so a test can switch paths within one process.
bool cudnn_requested() {
  const char* e = std::getenv("MAGIX_ATTENTION");
  return !e || *e == 0 || std::strcmp(e, "cudnn") == 0;
}

bool try_cudnn(OpCtx& c, const Params& p, bool bwd, int dev, cudaStream_t s) {
  if (!cudnn_requested() || p.mask || p.window != 0 || p.qOffset != 0 || p.S != p.T || p.sMax != p.T) return false;
  if (!aligned16(p.q, p.k, p.v) || !(bwd ? aligned16(p.o, p.dO, p.dq, p.dk, p.dv) : aligned16(p.out))) return false;
  cudnn::SdpaShape sh;
  sh.B = p.B, sh.T = p.T, sh.Hq = p.Hq, sh.Hkv = p.Hkv, sh.hd = p.hd, sh.causal = p.causal != 0, sh.scale = p.scale;
  size_t bytes = 0;
  if (!(bwd ? cudnn::sdpa_bwd_ready(sh, dev, s, bytes) : cudnn::sdpa_fwd_ready(sh, dev, s, bytes))) return false;
  void* ws = bytes ? cuda_backend(c).scratch(dev, bytes) : nullptr;
  if (bwd) cudnn::sdpa_bwd(sh, dev, p.q, p.k, p.v, p.o, p.lse, p.dO, p.dq, p.dk, p.dv, ws, s);
  else cudnn::sdpa_fwd(sh, dev, p.q, p.k, p.v, p.out, p.lse, ws, s);
  return true;
}

void check_grid(OpCtx& c, int64_t blocks) { check(blocks < 0x7fffffff, c.name + ": problem too large for one launch"); }

void attention_fwd(OpCtx& c) {
  Params p = parse(c, 5);
  cudaStream_t s = op_stream(c);
  const int dev = op_device(c);
  const DType dt = compute_dtype(c);
  MAGIX_CUDA_DISPATCH(c, dt, {
    const size_t qn = mul(p.B, p.T, p.Hq, p.hd), kn = mul(p.B, p.sMax, p.Hkv, p.hd);
    p.q = c.need(0, qn, sizeof(T)).ptr;
    p.k = c.need(1, kn, sizeof(T)).ptr;
    p.v = c.need(2, kn, sizeof(T)).ptr;
    p.out = c.need(3, qn, sizeof(T)).ptr;
    p.lse = c.need(4, mul(p.B, p.Hq, p.T), 4).as<float>();  // stats: float32
    if (p.B * p.Hq * p.T == 0) return;
    if (sizeof(T) == 2 && try_cudnn(c, p, false, dev, s)) return;
    const bool fast = sizeof(T) == 2 && (p.hd == 64 || p.hd == 128) && !reference_forced() && aligned16(p.q, p.k, p.v, p.out);
    if (fast) {
      check_grid(c, (p.T + 63) / 64 * p.B * p.Hq);  // blocks of 64 or 128 queries
      if (p.hd == 128) launch_fwd<flash::FwdHd128>(p, dev, s);
      else if (p.T > 2048) launch_fwd<flash::FwdHd64Long>(p, dev, s);
      else launch_fwd<flash::FwdHd64>(p, dev, s);
    } else {
      check_grid(c, p.B * p.Hq * p.T / kRefWarps + 1);
      ref_fwd<T><<<warp_blocks(p.B * p.Hq * p.T), 32 * kRefWarps, 0, s>>>(p);
      CUDA_CHECK_LAUNCH();
    }
  });
}

void attention_bwd(OpCtx& c) {
  Params p = parse(c, 9);
  cudaStream_t s = op_stream(c);
  const int dev = op_device(c);
  const DType dt = compute_dtype(c);
  MAGIX_CUDA_DISPATCH(c, dt, {
    const size_t qn = mul(p.B, p.T, p.Hq, p.hd), kn = mul(p.B, p.sMax, p.Hkv, p.hd), rows = mul(p.B, p.Hq, p.T);
    p.q = c.need(0, qn, sizeof(T)).ptr;
    p.k = c.need(1, kn, sizeof(T)).ptr;
    p.v = c.need(2, kn, sizeof(T)).ptr;
    p.o = c.need(3, qn, sizeof(T)).ptr;
    p.lse = c.need(4, rows, 4).as<float>();
    p.dO = c.need(5, qn, sizeof(T)).ptr;
    p.dq = c.need(6, qn, sizeof(T)).ptr;
    p.dk = c.need(7, kn, sizeof(T)).ptr;
    p.dv = c.need(8, kn, sizeof(T)).ptr;
    const bool fast = sizeof(T) == 2 && (p.hd == 64 || p.hd == 128) && !reference_forced() &&
                      aligned16(p.q, p.k, p.v, p.o, p.dO, p.dq, p.dk, p.dv);
    const int64_t keyRows = p.B * p.Hkv * p.S;
    if (rows == 0) {
      // No queries: dk and dv (first S rows) are zero.
      if (keyRows > 0) {
        for (int64_t b = 0; b < p.B; ++b)
          for (void* d : {p.dk, p.dv})
            CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(d) + b * p.sMax * p.Hkv * p.hd * sizeof(T), 0,
                                       p.S * p.Hkv * p.hd * sizeof(T), s));
      }
      return;
    }
    if (sizeof(T) == 2 && try_cudnn(c, p, true, dev, s)) return;
    ScratchLayout lay;
    const size_t oD = lay.add(rows * 4);
    const size_t oAcc = fast ? lay.add(mul(qn, 4)) : 0;
    char* ws = static_cast<char*>(cuda_backend(c).scratch(dev, lay.total));
    p.D = reinterpret_cast<float*>(ws + oD);
    p.dqacc = fast ? reinterpret_cast<float*>(ws + oAcc) : nullptr;
    check_grid(c, static_cast<int64_t>(rows) / kRefWarps + 1);
    if (fast) {
      const int64_t threads = static_cast<int64_t>(rows) * (p.hd / 8);
      check_grid(c, threads / 256 + 1);
      const unsigned blocks = static_cast<unsigned>((threads + 255) / 256);
      if (p.hd == 64) flash_delta<64><<<blocks, 256, 0, s>>>(p, static_cast<int64_t>(rows));
      else flash_delta<128><<<blocks, 256, 0, s>>>(p, static_cast<int64_t>(rows));
      CUDA_CHECK_LAUNCH();
      if (p.S > 0) {
        check_grid(c, (p.S + 63) / 64 * p.B * p.Hkv);
        const int keys = bwd_keys_forced();
        if (p.hd == 64) {
          if (keys == 64) launch_bwd<flash::BwdHd64Narrow>(p, dev, s);
          else launch_bwd<flash::BwdHd64>(p, dev, s);
        } else {
          if (keys == 128) launch_bwd<flash::BwdHd128Wide>(p, dev, s);
          else launch_bwd<flash::BwdHd128>(p, dev, s);
        }
      }
      dq_convert<<<grid_for(qn / 8, 256, 8192), 256, 0, s>>>(p.dqacc, static_cast<bf16*>(p.dq), qn / 8);
      CUDA_CHECK_LAUNCH();
    } else {
      delta_kernel<T><<<warp_blocks(static_cast<int64_t>(rows)), 32 * kRefWarps, 0, s>>>(p);
      CUDA_CHECK_LAUNCH();
      ref_dq<T><<<warp_blocks(static_cast<int64_t>(rows)), 32 * kRefWarps, 0, s>>>(p);
      CUDA_CHECK_LAUNCH();
      if (keyRows > 0) {
        check_grid(c, keyRows / kRefWarps + 1);
        ref_dkdv<T><<<warp_blocks(keyRows), 32 * kRefWarps, 0, s>>>(p);
        CUDA_CHECK_LAUNCH();
      }
    }
  });
}

MAGIX_REGISTER_OP("cuda", "attention_fwd", attention_fwd);
MAGIX_REGISTER_OP("cuda", "attention_bwd", attention_bwd);

}  // namespace
}  // namespace magix::cuda
