// A caching allocator per GPU: freed blocks go to free lists by rounded size and are reused
// without synchronisation (each device has one ordered stream, so a later op cannot overtake the
// last use of a block freed before it was enqueued). On cudaMalloc failure the cache is released
// and the allocation retried.
#pragma once
#include <cstddef>
#include <map>
#include <mutex>
#include <unordered_map>

namespace magix::cuda {

class CachingAllocator {
 public:
  explicit CachingAllocator(int device) : device_(device) {}
  ~CachingAllocator();
  // nullptr when the device cannot hold `bytes` even after releasing the cache.
  void* allocate(size_t bytes);
  void release(void* ptr, size_t bytes);
  // Returns cached blocks to the driver.
  void empty_cache();
  size_t reserved() const { return reserved_; }
  static size_t rounded(size_t bytes);

 private:
  int device_;
  std::multimap<size_t, void*> free_;
  std::unordered_map<void*, size_t> sizes_;  // every block's real size
  size_t reserved_ = 0;  // bytes obtained from cudaMalloc, in use or cached
  std::mutex mu_;
};

}  // namespace magix::cuda
