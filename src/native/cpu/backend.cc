#include "backend.h"

#include <cstdlib>
#include <cstring>
#include <string>

namespace magix::cpu {

CpuBackend::CpuBackend(int devices) : Backend("cpu", devices) {}
CpuBackend::~CpuBackend() { free_all(); }

void* CpuBackend::raw_alloc(int device, size_t bytes) {
  (void)device;
  // 64-byte alignment: whole cache lines, and aligned vector loads in the kernels.
  size_t rounded = ((bytes + 63) / 64) * 64;
  if (rounded == 0) rounded = 64;
  return std::aligned_alloc(64, rounded);
}

void CpuBackend::raw_free(int device, void* ptr, size_t bytes) {
  (void)device;
  (void)bytes;
  std::free(ptr);
}

static void check_range(const BufRef& b, size_t offset, size_t n, const char* what) {
  if (offset > b.bytes || n > b.bytes - offset)
    invalid(std::string(what) + ": range [" + std::to_string(offset) + ", " + std::to_string(offset + n) +
            ") leaves a buffer of " + std::to_string(b.bytes) + " bytes");
}

void CpuBackend::write(const BufRef& dst, size_t offset, const void* src, size_t n) {
  check_range(dst, offset, n, "write");
  if (n) std::memcpy(static_cast<char*>(dst.ptr) + offset, src, n);
}

void CpuBackend::read(const BufRef& src, size_t offset, void* dst, size_t n) {
  check_range(src, offset, n, "read");
  if (n) std::memcpy(dst, static_cast<const char*>(src.ptr) + offset, n);
}

void CpuBackend::copy(const BufRef& dst, size_t dst_off, const BufRef& src, size_t src_off, size_t n) {
  check_range(dst, dst_off, n, "copy");
  check_range(src, src_off, n, "copy");
  if (n) std::memmove(static_cast<char*>(dst.ptr) + dst_off, static_cast<const char*>(src.ptr) + src_off, n);
}

}  // namespace magix::cpu
