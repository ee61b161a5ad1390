// CUDA-only ops for benchmarks (bench/ops-gpu.ts): device-side timing with CUDA events, so the
// time of queued work is measured on the GPU, not on the host.
//   event_record(; device, slot):                   records event `slot` on the device's stream
//   event_elapsed(out float64 [1]; device, start, end): waits for event `end` (the host blocks:
//                                                   benchmarks only), out[0] = milliseconds between them
#include <cstdint>
#include <string>

#include "backend.h"
#include "check.h"

namespace magix::cuda {
namespace {

CudaBackend& be(OpCtx& c) { return static_cast<CudaBackend&>(c.backend); }

int slot_arg(OpCtx& c, size_t i) {
  const int64_t s = c.i(i);
  check(s >= 0 && s < 1024, c.name + ": event slots are 0..1023");
  return static_cast<int>(s);
}

void event_record(OpCtx& c) {
  const int dev = static_cast<int>(c.i(0));
  cudaEvent_t ev = be(c).timing_event(dev, slot_arg(c, 1));
  CUDA_CHECK(cudaSetDevice(dev));
  CUDA_CHECK(cudaEventRecord(ev, be(c).stream(dev)));
}

void event_elapsed(OpCtx& c) {
  const BufRef& out = c.need(0, 1, 8);
  const int dev = static_cast<int>(c.i(0));
  cudaEvent_t a = be(c).timing_event(dev, slot_arg(c, 1)), b = be(c).timing_event(dev, slot_arg(c, 2));
  CUDA_CHECK(cudaSetDevice(dev));
  CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  const double v = ms;
  c.backend.write(out, 0, &v, sizeof(v));
}

MAGIX_REGISTER_OP("cuda", "event_record", event_record);
MAGIX_REGISTER_OP("cuda", "event_elapsed", event_elapsed);

}  // namespace
}  // namespace magix::cuda
