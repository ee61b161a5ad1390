#include "backend.h"

#include <string>

#include "check.h"

namespace magix::cuda {

Probe probe() {
  Probe p;
  cudaError_t e = cudaGetDeviceCount(&p.devices);
  cudaRuntimeGetVersion(&p.runtime_version);
  cudaDriverGetVersion(&p.driver_version);
  if (e != cudaSuccess) {
    p.devices = 0;
    p.error = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    cudaGetLastError();  // clear the sticky-free error so later probes start clean
    return p;
  }
  for (int d = 0; d < p.devices; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) continue;
    p.gpus.push_back(GpuInfo{prop.name, prop.totalGlobalMem, prop.major, prop.minor, prop.multiProcessorCount});
  }
  return p;
}

CudaBackend::CudaBackend(int devices) : Backend("cuda", devices) {
  for (int d = 0; d < devices; ++d) {
    CUDA_CHECK(cudaSetDevice(d));
    cudaStream_t s;
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    streams_.push_back(s);
    cudaEvent_t ev;
    CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    events_.push_back(ev);
  }
}

CudaBackend::~CudaBackend() {
  for (int d = 0; d < static_cast<int>(streams_.size()); ++d) {
    cudaSetDevice(d);
    cudaStreamSynchronize(streams_[d]);
  }
  free_all();
  for (int d = 0; d < static_cast<int>(streams_.size()); ++d) {
    cudaSetDevice(d);
    cudaEventDestroy(events_[d]);
    cudaStreamDestroy(streams_[d]);
  }
}

void* CudaBackend::raw_alloc(int device, size_t bytes) {
  CUDA_CHECK(cudaSetDevice(device));
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, bytes == 0 ? 256 : bytes);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    return nullptr;  // reported as OUT_OF_MEMORY with the free bytes by Backend::alloc
  }
  if (e != cudaSuccess) throw_cuda(e, "cudaMalloc", __FILE__, __LINE__);
  return p;
}

void CudaBackend::raw_free(int device, void* ptr, size_t bytes) {
  (void)bytes;
  cudaSetDevice(device);
  // Pending work on the stream may still read this buffer.
  cudaStreamSynchronize(streams_[device]);
  cudaFree(ptr);
}

size_t CudaBackend::device_free(int device) const {
  size_t free = 0, total = 0;
  if (cudaSetDevice(device) != cudaSuccess || cudaMemGetInfo(&free, &total) != cudaSuccess) return 0;
  return free;
}

static void check_range(const BufRef& b, size_t offset, size_t n, const char* what) {
  if (offset > b.bytes || n > b.bytes - offset)
    invalid(std::string(what) + ": range leaves a buffer of " + std::to_string(b.bytes) + " bytes");
}

void CudaBackend::write(const BufRef& dst, size_t offset, const void* src, size_t n) {
  check_range(dst, offset, n, "write");
  if (!n) return;
  CUDA_CHECK(cudaSetDevice(dst.device));
  CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst.ptr) + offset, src, n, cudaMemcpyHostToDevice, streams_[dst.device]));
  // The host buffer belongs to JavaScript and may move or be collected once we return.
  CUDA_CHECK(cudaStreamSynchronize(streams_[dst.device]));
}

void CudaBackend::read(const BufRef& src, size_t offset, void* dst, size_t n) {
  check_range(src, offset, n, "read");
  if (!n) return;
  CUDA_CHECK(cudaSetDevice(src.device));
  CUDA_CHECK(cudaMemcpyAsync(dst, static_cast<const char*>(src.ptr) + offset, n, cudaMemcpyDeviceToHost, streams_[src.device]));
  CUDA_CHECK(cudaStreamSynchronize(streams_[src.device]));
}

void CudaBackend::copy(const BufRef& dst, size_t dst_off, const BufRef& src, size_t src_off, size_t n) {
  check_range(dst, dst_off, n, "copy");
  check_range(src, src_off, n, "copy");
  if (!n) return;
  if (src.device != dst.device) {
    // Order after the work already queued on the source device.
    CUDA_CHECK(cudaSetDevice(src.device));
    CUDA_CHECK(cudaEventRecord(events_[src.device], streams_[src.device]));
    CUDA_CHECK(cudaSetDevice(dst.device));
    CUDA_CHECK(cudaStreamWaitEvent(streams_[dst.device], events_[src.device], 0));
    CUDA_CHECK(cudaMemcpyPeerAsync(static_cast<char*>(dst.ptr) + dst_off, dst.device,
                                   static_cast<const char*>(src.ptr) + src_off, src.device, n, streams_[dst.device]));
    // And keep later writes on the source device from overtaking the copy.
    CUDA_CHECK(cudaEventRecord(events_[dst.device], streams_[dst.device]));
    CUDA_CHECK(cudaSetDevice(src.device));
    CUDA_CHECK(cudaStreamWaitEvent(streams_[src.device], events_[dst.device], 0));
    return;
  }
  CUDA_CHECK(cudaSetDevice(dst.device));
  CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst.ptr) + dst_off, static_cast<const char*>(src.ptr) + src_off, n,
                             cudaMemcpyDeviceToDevice, streams_[dst.device]));
}

void CudaBackend::synchronize(int device) {
  check_device(device);
  CUDA_CHECK(cudaSetDevice(device));
  CUDA_CHECK(cudaStreamSynchronize(streams_[device]));
}

}  // namespace magix::cuda
