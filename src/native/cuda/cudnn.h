// cuDNN 9's fused flash attention (scaled dot-product attention), reached through the backend
// (graph) API of a library opened at run time: dlopen("libcudnn.so.9"), or the file named by
// MAGIX_CUDNN_PATH, with the few declarations and enum values we use written out in cudnn.cc.
// Nothing here needs cuDNN's headers or libraries at build time.
//
// Scope (attention.cu sends only this here; everything else keeps our kernels): bfloat16, head
// size 64 or 128, causal (top-left: key s visible to query t when s ≤ t) or not, grouped-query
// (Hq a multiple of Hkv), no window, no key mask, qOffset 0, S = T = sMax. Layouts are ours
// (OPS.md): q, o, dO, dq [B, T, Hq, hd]; k, v, dk, dv [B, T, Hkv, hd]; lse float32 [B, Hq, T].
// cuDNN's softmax statistics ("Stats": max + log Σ exp, natural log, of the scaled masked scores)
// are the same quantity as our lse, written straight into our lse buffer, so our backward can
// follow cuDNN's forward and the other way round.
//
// Each graph is built once per (device, B, T, Hq, Hkv, hd, causal, scale): the finalized
// execution plan and its workspace size are cached, so executing it afterwards allocates nothing
// and never synchronises (safe inside CUDA stream capture). One cudnnHandle per device.
// The workspace is the caller's (the op scratch in the addon), at least *_workspace() bytes,
// 256-byte aligned; the backward keeps its float32 dQ accumulator and rowsum(dO·o) there too.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace magix::cuda::cudnn {

struct SdpaShape {
  int64_t B = 0, T = 0, Hq = 0, Hkv = 0, hd = 0;
  bool causal = false;
  float scale = 1.f;
};

// The library opened and new enough (9.x); the reason when not.
bool sdpa_available();
const std::string& sdpa_unavailable_reason();
size_t version();  // cudnnGetVersion(), e.g. 91000 for 9.10.0; 0 when not loaded

// Within the scope above for the loaded version (sizes only; the pointers' 16-byte alignment is
// the caller's). Following cudnn-frontend's own checks: nothing on cuDNN 9.10.0/9.10.1 (known
// bf16 SDPA bugs), T > 1. (Up to 9.15.0 a backward with T not a multiple of 128 is built with the
// frontend's workaround: a padding mask of full lengths, kept in a few bytes of device memory
// allocated with the plan.)
bool sdpa_in_scope(const SdpaShape& s, bool backward);

// Build the plan (first call for a shape) and return its workspace bytes. Throw CUDNN_ERROR
// (MagixError with the cuDNN status name and cudnnGetLastErrorString text) when cuDNN rejects the
// graph; a rejected shape stays rejected (the same error again, without rebuilding).
size_t sdpa_fwd_workspace(const SdpaShape& s, int device);
size_t sdpa_bwd_workspace(const SdpaShape& s, int device);

// For dispatch: true with the workspace size when a plan for this shape exists or can be built
// now; false (never throws) when cuDNN is unavailable, the shape is out of scope or rejected, or
// the plan is not built yet and `stream` is capturing (building may allocate and synchronise).
bool sdpa_fwd_ready(const SdpaShape& s, int device, cudaStream_t stream, size_t& workspace);
bool sdpa_bwd_ready(const SdpaShape& s, int device, cudaStream_t stream, size_t& workspace);

// Enqueue on `stream` (device `device` must be current). Builds the plan if needed.
void sdpa_fwd(const SdpaShape& s, int device, const void* q, const void* k, const void* v, void* o, float* lse,
              void* workspace, cudaStream_t stream);
void sdpa_bwd(const SdpaShape& s, int device, const void* q, const void* k, const void* v, const void* o,
              const float* lse, const void* dO, void* dq, void* dk, void* dv, void* workspace, cudaStream_t stream);

}  // namespace magix::cuda::cudnn
