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

// One backend device per GPU, each with its own ordered stream, caching allocator (allocator.h),
// op scratch memory, cuBLASLt handle and workspace. Host calls return once work is enqueued;
// read() waits for the stream. Ops never synchronise the host.
class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int devices);
  ~CudaBackend() override;
  void write(const BufRef& dst, size_t offset, const void* src, size_t n) override;
  void read(const BufRef& src, size_t offset, void* dst, size_t n) override;
  void copy(const BufRef& dst, size_t dst_off, const BufRef& src, size_t src_off, size_t n) override;
  void synchronize(int device) override;
  cudaStream_t stream(int device) const { return streams_[device]; }
  int multiprocessors(int device) const { return sms_[device]; }

  // Scratch memory for one op's temporaries on `device` (256-byte aligned), valid until the next
  // op on that device calls scratch() again: ops run in stream order, so the next op's kernels
  // start after this op's kernels are done with it. Grow-only: a larger request returns the old
  // block to the cache (stream order makes that safe too). An op calls it once and carves its
  // regions out of the block (ScratchLayout). Not for the cuBLASLt workspace, which is separate.
  // A captured CUDA graph bakes in the block's address: capture after a warm-up step has grown
  // the scratch (and made the cuBLASLt handle) so nothing is reallocated afterwards.
  void* scratch(int device, size_t bytes);

  // The cuBLASLt handle of `device` and its workspace (kLtWorkspace bytes), made on first use.
  cublasLtHandle_t lt(int device);
  void* lt_workspace(int device);
  static constexpr size_t kLtWorkspace = size_t{32} << 20;

  // NCCL communicators over groups of this process's GPUs (ncclCommInitAll, rank i on devices[i]);
  // ids are > 0. destroy_communicator of an unknown id is a no-op.
  int create_communicator(const std::vector<int>& devices);
  void destroy_communicator(int id);
  // The communicators of `devices` (in rank order) for collective ops: `id` must have been made
  // for exactly these devices in this order; id 0 makes one on first use for this device list and
  // keeps it until the backend is disposed.
  const std::vector<ncclComm_t>& communicators(int id, const std::vector<int>& devices);

  // Events for timing (the event_record / event_elapsed ops), made on first use.
  cudaEvent_t timing_event(int device, int slot);

 protected:
  // Stream capture into one CUDA graph over every device's stream (fork from device 0's stream,
  // joined back before the end), in relaxed mode so a cache miss may still cudaMalloc.
  void begin_capture() override;
  std::unique_ptr<Graph> end_capture() override;
  void abort_capture() override;
  bool records_on_host() const override { return false; }
  // Up to 256 KiB: a DMA into a pinned slot queued now, an event to wait for at the finish.
  std::unique_ptr<PendingRead> start_read(const BufRef& src, size_t offset, size_t n) override;
  void* raw_alloc(int device, size_t bytes) override;
  void raw_free(int device, void* ptr, size_t bytes) override;
  size_t device_free(int device) const override;

 private:
  // Allocates through the cache; on failure (between ops only: drop_scratch) drops the op
  // scratch, empties the cache, retries, then throws OUT_OF_MEMORY.
  void* allocate(int device, size_t bytes, const char* what, const char* context, bool drop_scratch);

  struct Comm {
    std::vector<int> devices;
    std::vector<ncclComm_t> comms;
  };
  std::vector<cudaStream_t> streams_;
  std::vector<cudaEvent_t> events_;
  std::vector<int> sms_;
  std::vector<std::unique_ptr<CachingAllocator>> allocators_;
  void join_streams();
  std::vector<void*> scratch_;
  // Scratch blocks outgrown while a graph may still use them: freed once no graph exists.
  std::vector<std::vector<void*>> retired_scratch_;
  std::vector<cudaEvent_t> fork_;
  std::vector<size_t> scratch_size_;
  std::vector<cublasLtHandle_t> lt_;
  std::vector<void*> lt_ws_;
  std::map<int, Comm> comms_;
  // Pinned staging for large host transfers (made on first use): two slots per device, so the
  // host copy of one piece overlaps the DMA of the other. Pageable cudaMemcpy measured ~1.7 GB/s
  // device to host on H200, which made checkpoint snapshots and restores copy-bound.
  struct Staging {
    void* slot[2] = {nullptr, nullptr};
    cudaEvent_t done[2] = {nullptr, nullptr};
  };
  static constexpr size_t kStagingPiece = size_t{32} << 20;
  static constexpr size_t kStagingMin = size_t{1} << 20;
  Staging& staging(int device);
  std::vector<Staging> staging_;
  // Small writes (token batches, scalars) go through a ring of pinned slots: the host copies into
  // a slot and returns while the DMA runs, so a write never waits for the device's queued work (a
  // training step placing its next batch while the previous one computes). A slot is refilled
  // only once its last copy is done (its event).
  struct Ring {
    void* base = nullptr;
    cudaEvent_t done[16] = {};
    int next = 0;
  };
  static constexpr size_t kRingSlot = size_t{256} << 10;
  static constexpr int kRingSlots = 16;
  Ring& ring(int device);
  std::vector<Ring> rings_;
  // The same for half-reads (read_start): a slot stays busy until its read is finished.
  struct ReadRing {
    Ring ring;
    bool busy[16] = {};
  };
  std::vector<ReadRing> read_rings_;
  std::map<std::vector<int>, int> auto_comms_;
  std::map<std::pair<int, int>, cudaEvent_t> timing_;
  int next_comm_ = 1;
};

// Offsets of consecutive regions inside one scratch block, each aligned to 256 bytes.
struct ScratchLayout {
  size_t total = 0;
  size_t add(size_t bytes) {
    const size_t at = total;
    total += (bytes + 255) / 256 * 256;
    return at;
  }
};

}  // namespace magix::cuda
