// The native side of the op table: a backend owns per-device memory (a checked buffer table)
// and runs named ops over buffers. CPU and CUDA implement it; binding.cc exposes it to JS.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "error.h"

namespace magix {

struct BufRef {
  void* ptr = nullptr;
  size_t bytes = 0;
  int device = 0;
  template <typename T> T* as() const { return static_cast<T*>(ptr); }
};

struct DeviceStats {
  size_t in_use = 0, peak = 0, capacity = 0, count = 0, reserved = 0;
};

class Backend;

// What one op call sees: its buffers (already looked up and live), its numeric arguments,
// and the backend (for the CUDA stream of a device).
struct OpCtx {
  Backend& backend;
  std::vector<BufRef> bufs;
  const double* args;
  size_t nargs;
  const std::string& name;

  const BufRef& buf(size_t i) const {
    check(i < bufs.size(), name + ": missing buffer " + std::to_string(i));
    return bufs[i];
  }
  double f(size_t i) const {
    check(i < nargs, name + ": missing argument " + std::to_string(i));
    return args[i];
  }
  int64_t i(size_t k) const {
    double v = f(k);
    check(v == static_cast<double>(static_cast<int64_t>(v)), name + ": argument " + std::to_string(k) + " must be an integer");
    return static_cast<int64_t>(v);
  }
  // A non-negative size argument.
  size_t n(size_t k) const {
    int64_t v = i(k);
    check(v >= 0, name + ": argument " + std::to_string(k) + " must be non-negative");
    return static_cast<size_t>(v);
  }
  // Fails unless buffer i holds at least `elems` elements of `elem_size` bytes: no kernel
  // reads or writes past a buffer.
  const BufRef& need(size_t i, size_t elems, size_t elem_size) const {
    const BufRef& b = buf(i);
    if (elem_size != 0 && elems > b.bytes / elem_size)
      invalid(name + ": buffer " + std::to_string(i) + " holds " + std::to_string(b.bytes) + " bytes, needs " +
              std::to_string(elems * elem_size));
    return b;
  }
};

using OpFn = void (*)(OpCtx&);

// Ops register themselves by name at load time, one table per backend kind.
std::map<std::string, OpFn>& op_registry(const std::string& kind);
struct OpRegistration {
  OpRegistration(const char* kind, const char* name, OpFn fn) { op_registry(kind)[name] = fn; }
};
#define MAGIX_OP_CAT2(a, b) a##b
#define MAGIX_OP_CAT(a, b) MAGIX_OP_CAT2(a, b)
#define MAGIX_REGISTER_OP(kind, name, fn) \
  static ::magix::OpRegistration MAGIX_OP_CAT(magix_op_reg_, __COUNTER__)(kind, name, fn)

class Backend {
 public:
  explicit Backend(std::string kind, int devices);
  virtual ~Backend();

  const std::string& kind() const { return kind_; }
  int device_count() const { return static_cast<int>(stats_.size()); }

  uint64_t alloc(int device, size_t bytes);
  // A buffer id for bytes [offset, offset + bytes) of buffer `id`: a view that owns nothing, so
  // freeing it frees no memory (the caller keeps `id` alive while the view is used). Lets a
  // planner place many short-lived buffers in one block (jit's graph capture does).
  uint64_t alias(uint64_t id, size_t offset, size_t bytes);
  void free(uint64_t id);
  void free_all();
  BufRef lookup(uint64_t id) const;
  DeviceStats stats(int device) const;
  void reset_peak(int device);
  void set_capacity(int device, size_t bytes);

  virtual void write(const BufRef& dst, size_t offset, const void* src, size_t n) = 0;
  virtual void read(const BufRef& src, size_t offset, void* dst, size_t n) = 0;
  virtual void copy(const BufRef& dst, size_t dst_off, const BufRef& src, size_t src_off, size_t n) = 0;
  virtual void synchronize(int device) = 0;

  const std::vector<std::string>& op_names() const { return op_names_; }
  void exec(size_t opcode, const std::vector<uint64_t>& ids, const double* args, size_t nargs);
  // Buffer-id forms of write/read/copy (what the binding calls): they refuse host transfers
  // during a capture and record copies into it.
  void write_id(uint64_t dst, size_t offset, const void* src, size_t n);
  void read_id(uint64_t src, size_t offset, void* dst, size_t n);
  // A read in two halves: read_start queues the copy of n bytes behind the work queued so far and
  // returns a ticket; read_finish waits for that copy only (not for work queued after it) and
  // fills dst. A training loop starts reading step i's loss, queues step i + 1, then finishes
  // the read while step i + 1 runs. Each ticket is finished once.
  uint64_t read_start(uint64_t src, size_t offset, size_t n);
  void read_finish(uint64_t ticket, void* dst, size_t n);
  void copy_id(uint64_t dst, size_t dst_off, uint64_t src, size_t src_off, size_t n);

  // Graphs: between capture_begin and capture_end, exec and copy_id are recorded instead of run
  // (a CUDA graph on the GPU, an op list on the CPU); graph_launch runs the record again over the
  // same buffers with no per-op host work. A buffer freed during the capture keeps its memory in
  // the graph's pool (later allocations of the same capture reuse it, as a step reuses freed
  // activations) until graph_destroy; every other buffer the record uses must stay live, which
  // graph_launch checks. Host transfers (write_id, read_id) are refused while capturing: a
  // captured step has no host synchronisation.
  void capture_begin();
  uint32_t capture_end();
  // Ends a capture that failed part-way: its pool is freed and nothing is kept.
  void capture_abort();
  void graph_launch(uint32_t id);
  void graph_destroy(uint32_t id);
  // Nodes (kernels, copies, collectives) of a graph: what one launch replaces.
  size_t graph_nodes(uint32_t id) const;
  bool capturing() const { return capture_ != nullptr; }
  // A capture is running or a graph exists: memory a graph may use (op scratch) must not move.
  bool graphs_alive() const { return capture_ != nullptr || !graphs_.empty(); }
  // A started read (read_start): finish waits for its copy and fills dst.
  struct PendingRead {
    virtual ~PendingRead() = default;
    virtual void finish(void* dst, size_t n) = 0;
  };
  // What a kind's capture produces.
  struct Graph {
    virtual ~Graph() = default;
    virtual void launch() = 0;
    virtual size_t nodes() const = 0;
  };

 protected:
  // Hooks for the kind's own capture. The default records on the host: exec and copies become
  // closures (the CPU backend); CUDA captures its streams instead.
  virtual void begin_capture() {}
  virtual std::unique_ptr<Graph> end_capture();
  virtual void abort_capture() {}
  virtual bool records_on_host() const { return true; }
  // The kind's half-reads. The default reads at once into host memory the ticket keeps.
  virtual std::unique_ptr<PendingRead> start_read(const BufRef& src, size_t offset, size_t n);
  void destroy_graphs();

  virtual void* raw_alloc(int device, size_t bytes) = 0;
  virtual void raw_free(int device, void* ptr, size_t bytes) = 0;
  // Bytes the device can still give, for out-of-memory reports; 0 where unknown.
  virtual size_t device_free(int device) const { (void)device; return 0; }
  void check_device(int device) const;

 private:
  struct Entry {
    void* ptr = nullptr;
    size_t bytes = 0;
    size_t block = 0;   // bytes of the memory block behind ptr (>= bytes when taken from a pool)
    size_t charge = 0;  // bytes counted in the device's in_use for this block
    int device = 0;
    uint32_t gen = 0;
    bool live = false;
    bool alias = false;  // a view of another entry's memory: freeing it releases nothing
  };
  struct PoolBlock {
    void* ptr;
    size_t block, charge;
    int device;
  };
  struct Capture {
    std::vector<PoolBlock> pool;
    std::set<uint64_t> used;  // ids the record reads or writes
    std::vector<std::function<void()>> host_record;
  };
  struct GraphEntry {
    std::unique_ptr<Graph> graph;
    std::vector<PoolBlock> pool;
    std::vector<uint64_t> used;  // ids outside the pool, checked live at launch
  };
  void release_pool(std::vector<PoolBlock>& pool);
  uint64_t add_entry(void* ptr, size_t bytes, size_t block, size_t charge, int device);
  void note_used(uint64_t id) {
    if (capture_) capture_->used.insert(id);
  }
  std::unique_ptr<Capture> capture_;
  std::map<uint64_t, std::pair<size_t, std::unique_ptr<PendingRead>>> reads_;
  uint64_t next_read_ = 1;
  std::map<uint32_t, GraphEntry> graphs_;
  uint32_t next_graph_ = 1;
  std::string kind_;
  std::vector<Entry> table_;
  std::vector<uint32_t> free_slots_;
  std::vector<DeviceStats> stats_;
  std::vector<std::string> op_names_;
  std::vector<OpFn> op_fns_;
  mutable std::mutex mu_;
};

}  // namespace magix
