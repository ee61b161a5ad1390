#pragma once
#include "../common/backend.h"

namespace magix::cpu {

// N virtual devices in host memory, each with its own buffers and accounting. Ops run
// synchronously on the calling thread and the shared worker pool.
class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int devices);
  ~CpuBackend() override;
  void write(const BufRef& dst, size_t offset, const void* src, size_t n) override;
  void read(const BufRef& src, size_t offset, void* dst, size_t n) override;
  void copy(const BufRef& dst, size_t dst_off, const BufRef& src, size_t src_off, size_t n) override;
  void synchronize(int device) override { (void)device; }

 protected:
  void* raw_alloc(int device, size_t bytes) override;
  void raw_free(int device, void* ptr, size_t bytes) override;
};

}  // namespace magix::cpu
