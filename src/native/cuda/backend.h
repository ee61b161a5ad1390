#pragma once
#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "../common/backend.h"
#include "allocator.h"
#include "dynload.h"

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

// One backend device per GPU, each with its own ordered stream, caching allocator, cuBLASLt handle
// and scratch workspace. Host calls return once work is enqueued; read() waits for the stream.
class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int devices);
  ~CudaBackend() override;
  void write(const BufRef& dst, size_t offset, const void* src, size_t n) override;
  void read(const BufRef& src, size_t offset, void* dst, size_t n) override;
  void copy(const BufRef& dst, size_t dst_off, const BufRef& src, size_t src_off, size_t n) override;
  void synchronize(int device) override;
  cudaStream_t stream(int device) const { return streams_[device]; }

  // Scratch memory for one op's temporaries on `device`, valid until the next call on that
  // device (ops on one stream run in order). Grows, never shrinks.
  void* workspace(int device, size_t bytes);
  cublasLtHandle_t lt(int device);

  // NCCL communicators over groups of this process's GPUs: ids are > 0.
  int create_communicator(const std::vector<int>& devices);
  void destroy_communicator(int id);
  // The communicator of `device` in group `id`.
  ncclComm_t communicator(int id, int device) const;

 protected:
  void* raw_alloc(int device, size_t bytes) override;
  void raw_free(int device, void* ptr, size_t bytes) override;
  size_t device_free(int device) const override;

 private:
  std::vector<cudaStream_t> streams_;
  std::vector<cudaEvent_t> events_;
  std::vector<std::unique_ptr<CachingAllocator>> allocators_;
  std::vector<void*> workspace_;
  std::vector<size_t> workspace_size_;
  std::vector<cublasLtHandle_t> lt_;
  std::map<int, std::map<int, ncclComm_t>> comms_;
  int next_comm_ = 1;
};

}  // namespace magix::cuda
