#include "allocator.h"

#include <cuda_runtime.h>

#include "check.h"

namespace magix::cuda {

size_t CachingAllocator::rounded(size_t bytes) {
  if (bytes == 0) bytes = 1;
  // Small blocks in 512-byte steps, large ones in 2 MiB steps: few distinct sizes to cache.
  const size_t step = bytes < (1u << 20) ? 512 : (2u << 20);
  return (bytes + step - 1) / step * step;
}

void* CachingAllocator::allocate(size_t bytes) {
  const size_t size = rounded(bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Best fit among cached blocks no more than twice the size (avoids pinning huge blocks).
    auto it = free_.lower_bound(size);
    if (it != free_.end() && it->first <= 2 * size) {
      void* p = it->second;
      free_.erase(it);
      return p;
    }
  }
  CUDA_CHECK(cudaSetDevice(device_));
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, size);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    empty_cache();
    e = cudaMalloc(&p, size);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      return nullptr;
    }
  }
  if (e != cudaSuccess) throw_cuda(e, "cudaMalloc", __FILE__, __LINE__);
  std::lock_guard<std::mutex> lock(mu_);
  reserved_ += size;
  sizes_[p] = size;
  return p;
}

void CachingAllocator::release(void* ptr, size_t bytes) {
  if (!ptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sizes_.find(ptr);
  free_.emplace(it != sizes_.end() ? it->second : rounded(bytes), ptr);
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.empty()) return;
  cudaSetDevice(device_);
  // Cached blocks may still be read by queued work: wait for the device first.
  cudaDeviceSynchronize();
  for (auto& [size, p] : free_) {
    cudaFree(p);
    reserved_ -= size;
    sizes_.erase(p);
  }
  free_.clear();
}

CachingAllocator::~CachingAllocator() { empty_cache(); }

}  // namespace magix::cuda
