#include "backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
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
    cudaGetLastError();  // clear the error so later probes start clean
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
    int sms = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d));
    sms_.push_back(sms);
    allocators_.push_back(std::make_unique<CachingAllocator>(d));
    scratch_.push_back(nullptr);
    scratch_size_.push_back(0);
    lt_.push_back(nullptr);
    lt_ws_.push_back(nullptr);
    cudaEvent_t fork;
    CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    fork_.push_back(fork);
  }
  retired_scratch_.resize(devices);
  staging_.resize(devices);
  rings_.resize(devices);
  read_rings_.resize(devices);
}

CudaBackend::~CudaBackend() {
  for (int d = 0; d < static_cast<int>(streams_.size()); ++d) {
    cudaSetDevice(d);
    cudaStreamSynchronize(streams_[d]);
  }
  if (nccl().loaded)
    for (auto& [id, c] : comms_)
      for (ncclComm_t comm : c.comms) nccl().CommDestroy(comm);
  comms_.clear();
  free_all();
  for (auto& [key, ev] : timing_) {
    cudaSetDevice(key.first);
    cudaEventDestroy(ev);
  }
  for (int d = 0; d < static_cast<int>(streams_.size()); ++d) {
    cudaSetDevice(d);
    if (lt_[d]) cublaslt().Destroy(lt_[d]);
    allocators_[d].reset();  // frees the scratch, the cuBLASLt workspace and every cached block
    for (int k = 0; k < 2; ++k) {
      if (staging_[d].slot[k]) cudaFreeHost(staging_[d].slot[k]);
      if (staging_[d].done[k]) cudaEventDestroy(staging_[d].done[k]);
    }
    for (Ring* r : {&rings_[d], &read_rings_[d].ring}) {
      if (r->base) cudaFreeHost(r->base);
      for (cudaEvent_t e : r->done)
        if (e) cudaEventDestroy(e);
    }
    cudaEventDestroy(events_[d]);
    cudaEventDestroy(fork_[d]);
    cudaStreamDestroy(streams_[d]);
  }
}

void* CudaBackend::allocate(int device, size_t bytes, const char* what, const char* context, bool drop_scratch) {
  CachingAllocator& a = *allocators_[device];
  if (void* p = a.try_allocate(bytes, what, !capturing())) return p;
  // Between ops nothing holds the scratch block: give it back too, and try once more (not while a
  // graph may use it).
  if (drop_scratch && scratch_[device] && !graphs_alive()) {
    a.release(scratch_[device]);
    scratch_[device] = nullptr;
    scratch_size_[device] = 0;
    a.empty_cache();
    if (void* p = a.try_allocate(bytes, what)) return p;
  }
  a.throw_out_of_memory(bytes, context);
}

void* CudaBackend::raw_alloc(int device, size_t bytes) { return allocate(device, bytes, "buffer", "for a buffer", true); }

void CudaBackend::raw_free(int device, void* ptr, size_t bytes) {
  (void)bytes;
  // No synchronisation: work already queued that reads the block runs before any later reuse.
  allocators_[device]->release(ptr);
}

void* CudaBackend::scratch(int device, size_t bytes) {
  check_device(device);
  if (bytes <= scratch_size_[device] && scratch_[device]) return scratch_[device];
  if (!graphs_alive())
    for (void* old : retired_scratch_[device]) allocators_[device]->release(old);
  if (!graphs_alive()) retired_scratch_[device].clear();
  if (scratch_[device]) {
    // A graph bakes in the address of the block it was captured with.
    if (graphs_alive())
      retired_scratch_[device].push_back(scratch_[device]);
    else
      allocators_[device]->release(scratch_[device]);
  }
  scratch_[device] = nullptr;
  scratch_size_[device] = 0;
  const size_t size = CachingAllocator::round(std::max<size_t>(bytes, 1));
  CachingAllocator& a = *allocators_[device];
  void* p = a.try_allocate(size, "op scratch", !capturing());
  if (!p) a.throw_out_of_memory(size, "for an op's scratch memory");
  scratch_[device] = p;
  scratch_size_[device] = size;
  return p;
}

cublasLtHandle_t CudaBackend::lt(int device) {
  check_device(device);
  if (!lt_[device]) {
    const CublasLt& L = cublaslt();
    if (!L.loaded)
      throw MagixError("CUBLAS_ERROR", "cuBLASLt could not be loaded: " + L.error)
          .with("library", "cublasLt")
          .with("status", 1)
          .with("name", "CUBLAS_STATUS_NOT_INITIALIZED");
    CUDA_CHECK(cudaSetDevice(device));
    if (!lt_ws_[device]) lt_ws_[device] = allocate(device, kLtWorkspace, "cuBLASLt workspace", "for the cuBLASLt workspace", false);
    cublasLtHandle_t h = nullptr;
    CUBLAS_CHECK(L.Create(&h));
    lt_[device] = h;
  }
  return lt_[device];
}

void* CudaBackend::lt_workspace(int device) {
  lt(device);
  return lt_ws_[device];
}

int CudaBackend::create_communicator(const std::vector<int>& devices) {
  const Nccl& N = nccl();
  if (!N.loaded)
    throw MagixError("NCCL_ERROR", "NCCL could not be loaded: " + N.error).with("library", "nccl").with("status", 3);
  check(!devices.empty(), "createCommunicator: no devices");
  for (size_t i = 0; i < devices.size(); ++i) {
    check_device(devices[i]);
    for (size_t j = 0; j < i; ++j)
      check(devices[i] != devices[j], "createCommunicator: device " + std::to_string(devices[i]) + " appears twice");
  }
  // NVLink multicast stays off (nccl() set it at load; this keeps it for a late first load).
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  Comm c;
  c.devices = devices;
  c.comms.assign(devices.size(), nullptr);
  NCCL_CHECK(N.CommInitAll(c.comms.data(), static_cast<int>(devices.size()), devices.data()));
  const int id = next_comm_++;
  comms_[id] = std::move(c);
  return id;
}

void CudaBackend::destroy_communicator(int id) {
  auto it = comms_.find(id);
  if (it == comms_.end()) return;
  // Collectives already queued on the streams finish first.
  for (int d : it->second.devices) {
    CUDA_CHECK(cudaSetDevice(d));
    CUDA_CHECK(cudaStreamSynchronize(streams_[d]));
  }
  for (ncclComm_t comm : it->second.comms) NCCL_CHECK(nccl().CommDestroy(comm));
  for (auto a = auto_comms_.begin(); a != auto_comms_.end();) a = a->second == id ? auto_comms_.erase(a) : std::next(a);
  comms_.erase(it);
}

const std::vector<ncclComm_t>& CudaBackend::communicators(int id, const std::vector<int>& devices) {
  if (id == 0) {
    auto a = auto_comms_.find(devices);
    if (a == auto_comms_.end()) a = auto_comms_.emplace(devices, create_communicator(devices)).first;
    id = a->second;
  }
  auto it = comms_.find(id);
  if (it == comms_.end()) invalid("no NCCL communicator " + std::to_string(id) + " (createCommunicator makes them)");
  if (it->second.devices != devices) {
    std::string want, have;
    for (int d : it->second.devices) have += (have.empty() ? "" : ",") + std::to_string(d);
    for (int d : devices) want += (want.empty() ? "" : ",") + std::to_string(d);
    invalid("communicator " + std::to_string(id) + " spans devices [" + have + "] in rank order, the buffers are on [" +
            want + "]");
  }
  return it->second.comms;
}

cudaEvent_t CudaBackend::timing_event(int device, int slot) {
  check_device(device);
  auto key = std::make_pair(device, slot);
  auto it = timing_.find(key);
  if (it != timing_.end()) return it->second;
  CUDA_CHECK(cudaSetDevice(device));
  cudaEvent_t ev;
  CUDA_CHECK(cudaEventCreate(&ev));
  timing_[key] = ev;
  return ev;
}

size_t CudaBackend::device_free(int device) const {
  size_t free = 0, total = 0;
  if (cudaSetDevice(device) != cudaSuccess || cudaMemGetInfo(&free, &total) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return free;
}

static void check_range(const BufRef& b, size_t offset, size_t n, const char* what) {
  if (offset > b.bytes || n > b.bytes - offset)
    invalid(std::string(what) + ": range leaves a buffer of " + std::to_string(b.bytes) + " bytes");
}

// Host memory that cudaHostAlloc made (hostBuffer with pinned): copies DMA straight from or into it.
static bool pinned_host(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeHost;
}

void CudaBackend::write(const BufRef& dst, size_t offset, const void* src, size_t n) {
  check_range(dst, offset, n, "write");
  if (!n) return;
  CUDA_CHECK(cudaSetDevice(dst.device));
  cudaStream_t st = streams_[dst.device];
  char* to = static_cast<char*>(dst.ptr) + offset;
  if (n <= kRingSlot) {
    // Copied into a pinned slot before returning: the caller's memory is free at once, and the
    // DMA runs in stream order without the host waiting for it.
    Ring& r = ring(dst.device);
    const int k = r.next;
    r.next = (r.next + 1) % kRingSlots;
    CUDA_CHECK(cudaEventSynchronize(r.done[k]));
    char* slot = static_cast<char*>(r.base) + static_cast<size_t>(k) * kRingSlot;
    std::memcpy(slot, src, n);
    CUDA_CHECK(cudaMemcpyAsync(to, slot, n, cudaMemcpyHostToDevice, st));
    CUDA_CHECK(cudaEventRecord(r.done[k], st));
    return;
  }
  if (n < kStagingMin || pinned_host(src)) {
    CUDA_CHECK(cudaMemcpyAsync(to, src, n, cudaMemcpyHostToDevice, st));
    // The DMA reads the caller's memory, which belongs to JavaScript and may move or be
    // collected once we return.
    CUDA_CHECK(cudaStreamSynchronize(st));
    return;
  }
  // Fill one pinned slot while the other's DMA runs; a slot is refilled only after its last copy.
  // Every byte is in a slot before the loop ends, so the caller's memory is free when we return.
  Staging& sg = staging(dst.device);
  const char* from = static_cast<const char*>(src);
  for (size_t off = 0, i = 0; off < n; off += kStagingPiece, ++i) {
    const size_t len = std::min(kStagingPiece, n - off);
    const int k = static_cast<int>(i & 1);
    CUDA_CHECK(cudaEventSynchronize(sg.done[k]));
    std::memcpy(sg.slot[k], from + off, len);
    CUDA_CHECK(cudaMemcpyAsync(to + off, sg.slot[k], len, cudaMemcpyHostToDevice, st));
    CUDA_CHECK(cudaEventRecord(sg.done[k], st));
  }
}

void CudaBackend::read(const BufRef& src, size_t offset, void* dst, size_t n) {
  check_range(src, offset, n, "read");
  if (!n) return;
  CUDA_CHECK(cudaSetDevice(src.device));
  cudaStream_t st = streams_[src.device];
  const char* from = static_cast<const char*>(src.ptr) + offset;
  if (n < kStagingMin || pinned_host(dst)) {
    CUDA_CHECK(cudaMemcpyAsync(dst, from, n, cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    return;
  }
  // Piece i+1's DMA runs while piece i is copied out of its pinned slot.
  Staging& sg = staging(src.device);
  char* to = static_cast<char*>(dst);
  const size_t pieces = (n + kStagingPiece - 1) / kStagingPiece;
  auto issue = [&](size_t i) {
    const size_t off = i * kStagingPiece;
    const int k = static_cast<int>(i & 1);
    CUDA_CHECK(cudaMemcpyAsync(sg.slot[k], from + off, std::min(kStagingPiece, n - off), cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaEventRecord(sg.done[k], st));
  };
  issue(0);
  for (size_t i = 0; i < pieces; ++i) {
    if (i + 1 < pieces) issue(i + 1);
    const int k = static_cast<int>(i & 1);
    CUDA_CHECK(cudaEventSynchronize(sg.done[k]));
    const size_t off = i * kStagingPiece;
    std::memcpy(to + off, sg.slot[k], std::min(kStagingPiece, n - off));
  }
}

namespace {
struct CudaRead final : Backend::PendingRead {
  cudaEvent_t done = nullptr;
  const void* slot = nullptr;
  bool* busy = nullptr;
  int device = 0;
  void finish(void* dst, size_t n) override {
    cudaSetDevice(device);
    const cudaError_t e = cudaEventSynchronize(done);
    if (e == cudaSuccess) std::memcpy(dst, slot, n);
    *busy = false;
    if (e != cudaSuccess) throw_cuda(e, "cudaEventSynchronize", __FILE__, __LINE__);
  }
  ~CudaRead() override {
    if (busy) *busy = false;
  }
};
}  // namespace

std::unique_ptr<Backend::PendingRead> CudaBackend::start_read(const BufRef& src, size_t offset, size_t n) {
  ReadRing& rr = read_rings_[src.device];
  Ring& r = rr.ring;
  if (!r.base) {
    CUDA_CHECK(cudaHostAlloc(&r.base, kRingSlot * kRingSlots, cudaHostAllocDefault));
    for (cudaEvent_t& e : r.done) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  const int k = r.next;
  // Large reads, or every slot still waiting for its finish: read now.
  if (n > kRingSlot || rr.busy[k]) return Backend::start_read(src, offset, n);
  r.next = (r.next + 1) % kRingSlots;
  rr.busy[k] = true;
  auto p = std::make_unique<CudaRead>();
  p->done = r.done[k];
  p->slot = static_cast<char*>(r.base) + static_cast<size_t>(k) * kRingSlot;
  p->busy = &rr.busy[k];
  p->device = src.device;
  CUDA_CHECK(cudaSetDevice(src.device));
  CUDA_CHECK(cudaMemcpyAsync(const_cast<void*>(p->slot), static_cast<const char*>(src.ptr) + offset, n,
                             cudaMemcpyDeviceToHost, streams_[src.device]));
  CUDA_CHECK(cudaEventRecord(r.done[k], streams_[src.device]));
  return p;
}

CudaBackend::Ring& CudaBackend::ring(int device) {
  Ring& r = rings_[device];
  if (!r.base) {
    CUDA_CHECK(cudaHostAlloc(&r.base, kRingSlot * kRingSlots, cudaHostAllocDefault));
    for (cudaEvent_t& e : r.done) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  return r;
}

CudaBackend::Staging& CudaBackend::staging(int device) {
  Staging& sg = staging_[device];
  if (!sg.slot[0]) {
    for (int k = 0; k < 2; ++k) {
      CUDA_CHECK(cudaHostAlloc(&sg.slot[k], kStagingPiece, cudaHostAllocDefault));
      CUDA_CHECK(cudaEventCreateWithFlags(&sg.done[k], cudaEventDisableTiming));
    }
  }
  return sg;
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

namespace {
struct CudaGraph final : Backend::Graph {
  cudaGraphExec_t exec = nullptr;
  cudaStream_t stream = nullptr;
  std::vector<cudaStream_t> others;
  std::vector<cudaEvent_t> events;  // [0]: device 0's; [d]: device d's
  size_t count = 0;
  void launch() override {
    CUDA_CHECK(cudaSetDevice(0));
    // Work queued earlier on the other devices' streams comes first; their later work after.
    for (size_t d = 1; d <= others.size(); ++d) {
      CUDA_CHECK(cudaSetDevice(static_cast<int>(d)));
      CUDA_CHECK(cudaEventRecord(events[d], others[d - 1]));
      CUDA_CHECK(cudaSetDevice(0));
      CUDA_CHECK(cudaStreamWaitEvent(stream, events[d], 0));
    }
    CUDA_CHECK(cudaGraphLaunch(exec, stream));
    if (!others.empty()) {
      CUDA_CHECK(cudaEventRecord(events[0], stream));
      for (size_t d = 1; d <= others.size(); ++d) {
        CUDA_CHECK(cudaSetDevice(static_cast<int>(d)));
        CUDA_CHECK(cudaStreamWaitEvent(others[d - 1], events[0], 0));
      }
    }
  }
  size_t nodes() const override { return count; }
  ~CudaGraph() override {
    if (exec) cudaGraphExecDestroy(exec);
  }
};
}  // namespace

void CudaBackend::begin_capture() {
  CUDA_CHECK(cudaSetDevice(0));
  CUDA_CHECK(cudaStreamBeginCapture(streams_[0], cudaStreamCaptureModeRelaxed));
  // The other streams join the capture by waiting on an event of the capturing one.
  if (streams_.size() > 1) {
    CUDA_CHECK(cudaEventRecord(fork_[0], streams_[0]));
    for (int d = 1; d < static_cast<int>(streams_.size()); ++d) {
      CUDA_CHECK(cudaSetDevice(d));
      CUDA_CHECK(cudaStreamWaitEvent(streams_[d], fork_[0], 0));
    }
  }
}

void CudaBackend::join_streams() {
  for (int d = 1; d < static_cast<int>(streams_.size()); ++d) {
    CUDA_CHECK(cudaSetDevice(d));
    CUDA_CHECK(cudaEventRecord(fork_[d], streams_[d]));
    CUDA_CHECK(cudaSetDevice(0));
    CUDA_CHECK(cudaStreamWaitEvent(streams_[0], fork_[d], 0));
  }
  CUDA_CHECK(cudaSetDevice(0));
}

std::unique_ptr<Backend::Graph> CudaBackend::end_capture() {
  join_streams();
  cudaGraph_t graph = nullptr;
  const cudaError_t e = cudaStreamEndCapture(streams_[0], &graph);
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (graph) cudaGraphDestroy(graph);
    throw MagixError("GRAPH_CAPTURE_FAILED",
                     std::string("the captured work could not become a CUDA graph (") + cudaGetErrorName(e) + ": " +
                         cudaGetErrorString(e) + "); a host synchronisation or another stream's work inside the capture " +
                         "invalidates it")
        .with("status", static_cast<int>(e));
  }
  auto g = std::make_unique<CudaGraph>();
  g->stream = streams_[0];
  g->events.push_back(fork_[0]);
  for (size_t d = 1; d < streams_.size(); ++d) {
    g->others.push_back(streams_[d]);
    g->events.push_back(fork_[d]);
  }
  cudaError_t ie = cudaGraphGetNodes(graph, nullptr, &g->count);
  if (ie == cudaSuccess) ie = cudaGraphInstantiate(&g->exec, graph, 0);
  cudaGraphDestroy(graph);
  if (ie != cudaSuccess) throw_cuda(ie, "cudaGraphInstantiate", __FILE__, __LINE__);
  return g;
}

void CudaBackend::abort_capture() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaSetDevice(0);
  if (cudaStreamIsCapturing(streams_[0], &status) == cudaSuccess && status != cudaStreamCaptureStatusNone) {
    for (int d = 1; d < static_cast<int>(streams_.size()); ++d) {
      cudaSetDevice(d);
      cudaEventRecord(fork_[d], streams_[d]);
      cudaSetDevice(0);
      cudaStreamWaitEvent(streams_[0], fork_[d], 0);
    }
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(streams_[0], &graph);
    if (graph) cudaGraphDestroy(graph);
  }
  cudaGetLastError();
}

}  // namespace magix::cuda
