#include "backend.h"

#include <algorithm>
#include <cstdlib>
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
    allocators_.push_back(std::make_unique<CachingAllocator>(d));
    workspace_.push_back(nullptr);
    workspace_size_.push_back(0);
    lt_.push_back(nullptr);
  }
}

CudaBackend::~CudaBackend() {
  for (int d = 0; d < static_cast<int>(streams_.size()); ++d) {
    cudaSetDevice(d);
    cudaStreamSynchronize(streams_[d]);
  }
  for (auto& [id, group] : comms_)
    for (auto& [dev, comm] : group) nccl().CommDestroy(comm);
  free_all();
  for (int d = 0; d < static_cast<int>(streams_.size()); ++d) {
    cudaSetDevice(d);
    if (workspace_[d]) cudaFree(workspace_[d]);
    if (lt_[d]) cublaslt().Destroy(lt_[d]);
    allocators_[d].reset();
    cudaEventDestroy(events_[d]);
    cudaStreamDestroy(streams_[d]);
  }
}

void* CudaBackend::raw_alloc(int device, size_t bytes) {
  // nullptr is reported as OUT_OF_MEMORY with the free bytes and largest blocks by Backend::alloc.
  return allocators_[device]->allocate(bytes);
}

void CudaBackend::raw_free(int device, void* ptr, size_t bytes) {
  // No synchronisation: queued work that still reads the block runs before any later reuse.
  allocators_[device]->release(ptr, bytes);
}

void* CudaBackend::workspace(int device, size_t bytes) {
  check_device(device);
  if (workspace_size_[device] >= bytes) return workspace_[device];
  CUDA_CHECK(cudaSetDevice(device));
  // The old workspace may still be in use by queued ops: wait before handing it back.
  CUDA_CHECK(cudaStreamSynchronize(streams_[device]));
  if (workspace_[device]) CUDA_CHECK(cudaFree(workspace_[device]));
  workspace_[device] = nullptr;
  workspace_size_[device] = 0;
  const size_t size = std::max<size_t>(bytes, 64u << 20);
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, size);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    allocators_[device]->empty_cache();
    e = cudaMalloc(&p, size);
  }
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    throw MagixError("OUT_OF_MEMORY", "device " + std::to_string(device) + ": out of memory for an op's workspace")
        .with("device", device)
        .with("requested", static_cast<double>(size))
        .with("free", static_cast<double>(device_free(device)))
        .with("inUse", static_cast<double>(stats(device).in_use))
        .with("capacity", 0);
  }
  if (e != cudaSuccess) throw_cuda(e, "cudaMalloc", __FILE__, __LINE__);
  workspace_[device] = p;
  workspace_size_[device] = size;
  return p;
}

cublasLtHandle_t CudaBackend::lt(int device) {
  check_device(device);
  if (!lt_[device]) {
    const CublasLt& L = cublaslt();
    if (!L.loaded) throw MagixError("CUBLAS_ERROR", "cuBLASLt could not be loaded: " + L.error).with("library", "cublasLt");
    CUDA_CHECK(cudaSetDevice(device));
    cublasLtHandle_t h = nullptr;
    const int st = L.Create(&h);
    if (st != 0) throw MagixError("CUBLAS_ERROR", "cublasLtCreate failed").with("library", "cublasLt").with("status", st);
    lt_[device] = h;
  }
  return lt_[device];
}

int CudaBackend::create_communicator(const std::vector<int>& devices) {
  const Nccl& N = nccl();
  if (!N.loaded) throw MagixError("NCCL_ERROR", "NCCL could not be loaded: " + N.error).with("library", "nccl");
  for (int d : devices) check_device(d);
  // NVLink multicast stays off: it can take a shared machine's GPUs out of service.
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  std::vector<ncclComm_t> comms(devices.size());
  const int st = N.CommInitAll(comms.data(), static_cast<int>(devices.size()), devices.data());
  if (st != 0)
    throw MagixError("NCCL_ERROR", std::string("ncclCommInitAll failed: ") + N.GetErrorString(st))
        .with("library", "nccl")
        .with("status", st);
  const int id = next_comm_++;
  for (size_t i = 0; i < devices.size(); ++i) comms_[id][devices[i]] = comms[i];
  return id;
}

void CudaBackend::destroy_communicator(int id) {
  auto it = comms_.find(id);
  if (it == comms_.end()) return;
  for (auto& [dev, comm] : it->second) nccl().CommDestroy(comm);
  comms_.erase(it);
}

ncclComm_t CudaBackend::communicator(int id, int device) const {
  auto it = comms_.find(id);
  if (it == comms_.end()) invalid("no NCCL communicator " + std::to_string(id));
  auto jt = it->second.find(device);
  if (jt == it->second.end()) invalid("communicator " + std::to_string(id) + " has no rank on device " + std::to_string(device));
  return jt->second;
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
