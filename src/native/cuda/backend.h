#pragma once
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "../common/backend.h"

namespace magix::cuda {

struct GpuInfo {
  std::string name;
  size_t total_memory = 0;
  int major = 0, minor = 0, multiprocessors = 0;
};

// What the runtime sees: device count and names, or why there are none.
struct Probe {
  int devices = 0;
  std::string error;
  std::vector<GpuInfo> gpus;
  int runtime_version = 0, driver_version = 0;
};
Probe probe();

// One backend device per GPU, each with its own ordered stream. Host calls return once work
// is enqueued; read() waits for the device's stream.
class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int devices);
  ~CudaBackend() override;
  void write(const BufRef& dst, size_t offset, const void* src, size_t n) override;
  void read(const BufRef& src, size_t offset, void* dst, size_t n) override;
  void copy(const BufRef& dst, size_t dst_off, const BufRef& src, size_t src_off, size_t n) override;
  void synchronize(int device) override;
  cudaStream_t stream(int device) const { return streams_[device]; }

 protected:
  void* raw_alloc(int device, size_t bytes) override;
  void raw_free(int device, void* ptr, size_t bytes) override;
  size_t device_free(int device) const override;

 private:
  std::vector<cudaStream_t> streams_;
  std::vector<cudaEvent_t> events_;
};

}  // namespace magix::cuda
