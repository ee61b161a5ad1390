#include "allocator.h"

#include <algorithm>
#include <vector>

#include "../common/error.h"
#include "check.h"

namespace magix::cuda {

std::string format_bytes(size_t bytes) {
  if (bytes >= (size_t{1} << 20)) return std::to_string(bytes >> 20) + " MiB";
  if (bytes >= (size_t{1} << 10)) return std::to_string(bytes >> 10) + " KiB";
  return std::to_string(bytes) + " B";
}

size_t CachingAllocator::round(size_t bytes) {
  constexpr size_t kSmall = size_t{1} << 20, kSmallStep = 512, kLargeStep = size_t{2} << 20;
  if (bytes == 0) bytes = 1;
  const size_t step = bytes <= kSmall ? kSmallStep : kLargeStep;
  return (bytes + step - 1) / step * step;
}

// A cached block for a request of rounded `size`: the smallest one at least that big and at most
// a quarter bigger (twice for small blocks), so large blocks are not pinned by small requests.
// Sets `real` to the block's size.
void* CachingAllocator::reuse(size_t size, size_t& real) {
  const size_t limit = size <= (size_t{1} << 20) ? 2 * size : size + size / 4;
  auto it = cached_.lower_bound(size);
  if (it == cached_.end() || it->first > limit) return nullptr;
  void* p = it->second;
  real = it->first;
  cached_.erase(it);
  return p;
}

void* CachingAllocator::try_allocate(size_t bytes, const char* what, bool may_empty) {
  const size_t size = round(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  size_t real = size;
  void* p = reuse(size, real);
  if (!p) {
    CUDA_CHECK(cudaSetDevice(device_));
    cudaError_t e = cudaMalloc(&p, size);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // not sticky: clear it
      if (!may_empty) return nullptr;
      free_cached_locked();
      e = cudaMalloc(&p, size);
      if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        return nullptr;
      }
    }
    if (e != cudaSuccess) throw_cuda(e, "cudaMalloc", __FILE__, __LINE__);
    reserved_ += size;
    real = size;
  }
  live_[p] = Live{real, bytes, what};
  in_use_ += bytes;
  return p;
}

void CachingAllocator::release(void* ptr) {
  if (!ptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(ptr);
  if (it == live_.end()) return;
  in_use_ -= it->second.requested;
  const size_t size = it->second.size;
  live_.erase(it);
  cached_.emplace(size, ptr);
}

void CachingAllocator::free_cached_locked() {
  if (cached_.empty()) return;
  cudaSetDevice(device_);
  // Cached blocks may still be read by queued work: let the device finish it first.
  cudaDeviceSynchronize();
  for (auto& [size, p] : cached_) {
    cudaFree(p);
    reserved_ -= size;
  }
  cached_.clear();
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mu_);
  free_cached_locked();
}

size_t CachingAllocator::in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_use_;
}

size_t CachingAllocator::reserved() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reserved_;
}

void CachingAllocator::throw_out_of_memory(size_t bytes, const std::string& context) const {
  size_t free = 0, total = 0;
  if (cudaSetDevice(device_) != cudaSuccess || cudaMemGetInfo(&free, &total) != cudaSuccess) {
    cudaGetLastError();
    free = total = 0;
  }
  std::vector<Live> blocks;
  size_t in_use = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    in_use = in_use_;
    for (const auto& [p, b] : live_) blocks.push_back(b);
  }
  std::sort(blocks.begin(), blocks.end(), [](const Live& a, const Live& b) { return a.requested > b.requested; });
  std::string largest;
  for (size_t i = 0; i < blocks.size() && i < 5; ++i) {
    largest += (i ? ", " : "") + format_bytes(blocks[i].requested);
    if (blocks[i].what && *blocks[i].what) largest += std::string(" (") + blocks[i].what + ")";
  }
  throw MagixError("OUT_OF_MEMORY", "device " + std::to_string(device_) + ": out of memory " + context + ": asked for " +
                                        format_bytes(bytes) + ", " + format_bytes(free) + " free, " + format_bytes(in_use) +
                                        " in use; largest allocations: " + (largest.empty() ? "none" : largest))
      .with("device", device_)
      .with("requested", static_cast<double>(bytes))
      .with("free", static_cast<double>(free))
      .with("inUse", static_cast<double>(in_use))
      .with("capacity", static_cast<double>(total))
      .with("largest", largest.empty() ? std::string("none") : largest);
}

CachingAllocator::~CachingAllocator() {
  // The backend synchronised its stream before destroying us; nothing may still use a block.
  cudaSetDevice(device_);
  for (auto& [size, p] : cached_) cudaFree(p);
  for (auto& [p, b] : live_) cudaFree(p);
  cached_.clear();
  live_.clear();
}

}  // namespace magix::cuda
