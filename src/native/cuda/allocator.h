// A caching allocator per GPU. Requests are rounded to size classes (512 B steps up to 1 MiB,
// 2 MiB steps above: the driver's page size, so the rounding costs no physical memory); a freed
// block goes to a free list and is handed out again to a request of its class (or one a little
// smaller) without any synchronisation: each device has one ordered stream and every op runs on
// it, so work enqueued after the free cannot overtake the last use of the block. When cudaMalloc
// fails the cached blocks are returned to the driver (after a device synchronisation) and the
// request retried; if it still fails, the caller gets OUT_OF_MEMORY with the request, the free
// bytes, the bytes in use and the five largest live allocations.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

namespace magix::cuda {

class CachingAllocator {
 public:
  explicit CachingAllocator(int device) : device_(device) {}
  ~CachingAllocator();
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // A block of at least `bytes` (256-byte aligned), or nullptr when the device cannot hold it even
  // after the cache was emptied. `what` names the block in out-of-memory reports (a string literal).
  // With may_empty false (during a graph capture, where a device synchronisation is illegal) the
  // cache is not emptied before giving up.
  void* try_allocate(size_t bytes, const char* what, bool may_empty = true);
  // Returns a block to the cache; unknown pointers are ignored.
  void release(void* ptr);
  // Gives every cached block back to the driver (synchronises the device first).
  void empty_cache();

  // The OUT_OF_MEMORY error for a failed request of `bytes`.
  [[noreturn]] void throw_out_of_memory(size_t bytes, const std::string& context) const;

  size_t in_use() const;    // bytes requested by live blocks
  size_t reserved() const;  // bytes held from the driver: live and cached
  static size_t round(size_t bytes);

 private:
  struct Live {
    size_t size = 0;       // the block's real (rounded) size
    size_t requested = 0;  // what was asked for
    const char* what = "";
  };
  void* reuse(size_t size, size_t& real);
  void free_cached_locked();

  int device_;
  std::multimap<size_t, void*> cached_;     // free blocks by real size
  std::unordered_map<void*, Live> live_;    // blocks handed out
  size_t reserved_ = 0, in_use_ = 0;
  mutable std::mutex mu_;
};

// "1024 MiB" style sizes for error messages.
std::string format_bytes(size_t bytes);

}  // namespace magix::cuda
