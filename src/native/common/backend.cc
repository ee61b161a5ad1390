#include "backend.h"

#include <algorithm>
#include <cstring>

namespace magix {

std::map<std::string, OpFn>& op_registry(const std::string& kind) {
  static std::map<std::string, std::map<std::string, OpFn>> registries;
  return registries[kind];
}

Backend::Backend(std::string kind, int devices) : kind_(std::move(kind)), stats_(static_cast<size_t>(devices)) {
  for (auto& [name, fn] : op_registry(kind_)) {
    op_names_.push_back(name);
    op_fns_.push_back(fn);
  }
}

Backend::~Backend() = default;

void Backend::check_device(int device) const {
  if (device < 0 || device >= device_count())
    invalid("device " + std::to_string(device) + " does not exist (this backend has " + std::to_string(device_count()) + ")");
}

static constexpr uint64_t kSlotBits = 32;

uint64_t Backend::alloc(int device, size_t bytes) {
  check_device(device);
  std::lock_guard<std::mutex> lock(mu_);
  DeviceStats& s = stats_[device];
  if (s.capacity != 0 && bytes > s.capacity - std::min(s.capacity, s.in_use)) {
    throw MagixError("OUT_OF_MEMORY", "device " + std::to_string(device) + ": out of memory")
        .with("device", device)
        .with("requested", static_cast<double>(bytes))
        .with("free", static_cast<double>(s.capacity - std::min(s.capacity, s.in_use)))
        .with("inUse", static_cast<double>(s.in_use))
        .with("capacity", static_cast<double>(s.capacity));
  }
  // During a capture, memory freed earlier in the same capture is taken first (at most an
  // eighth bigger than asked): the graph keeps it, so the capture's footprint stays its peak.
  if (capture_) {
    auto& pool = capture_->pool;
    size_t best = pool.size();
    for (size_t i = 0; i < pool.size(); ++i)
      if (pool[i].device == device && pool[i].block >= bytes && pool[i].block <= bytes + bytes / 8 &&
          (best == pool.size() || pool[i].block < pool[best].block))
        best = i;
    if (best != pool.size()) {
      const PoolBlock b = pool[best];
      pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(best));
      const uint64_t id = add_entry(b.ptr, bytes, b.block, b.charge, device);
      s.count += 1;
      return id;
    }
  }
  void* ptr = raw_alloc(device, bytes);
  if (ptr == nullptr && bytes != 0) {
    // The five largest live allocations of the device: where the memory went.
    std::vector<size_t> sizes;
    for (const Entry& e : table_)
      if (e.live && e.device == device) sizes.push_back(e.bytes);
    std::sort(sizes.rbegin(), sizes.rend());
    std::string largest;
    for (size_t i = 0; i < sizes.size() && i < 5; ++i)
      largest += (i ? ", " : "") + std::to_string(sizes[i] >> 20) + " MiB";
    throw MagixError("OUT_OF_MEMORY", "device " + std::to_string(device) + ": out of memory")
        .with("device", device)
        .with("requested", static_cast<double>(bytes))
        .with("free", static_cast<double>(device_free(device)))
        .with("inUse", static_cast<double>(s.in_use))
        .with("capacity", static_cast<double>(s.capacity))
        .with("largest", largest.empty() ? std::string("none") : largest);
  }
  s.in_use += bytes;
  s.count += 1;
  s.peak = std::max(s.peak, s.in_use);
  return add_entry(ptr, bytes, bytes, bytes, device);
}

uint64_t Backend::add_entry(void* ptr, size_t bytes, size_t block, size_t charge, int device) {
  uint32_t slot;
  if (!free_slots_.empty()) {
    slot = free_slots_.back();
    free_slots_.pop_back();
  } else {
    slot = static_cast<uint32_t>(table_.size());
    table_.emplace_back();
  }
  Entry& e = table_[slot];
  e.ptr = ptr;
  e.bytes = bytes;
  e.block = block;
  e.charge = charge;
  e.device = device;
  e.live = true;
  e.alias = false;
  e.gen = (e.gen + 1) & 0xfffff;  // ids stay below 2^52, exact as JS numbers
  return (static_cast<uint64_t>(e.gen) << kSlotBits) | slot;
}

uint64_t Backend::alias(uint64_t id, size_t offset, size_t bytes) {
  const BufRef b = lookup(id);
  if (offset > b.bytes || bytes > b.bytes - offset)
    invalid("alias: [" + std::to_string(offset) + ", " + std::to_string(offset + bytes) + ") leaves a buffer of " +
            std::to_string(b.bytes) + " bytes");
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t a = add_entry(static_cast<char*>(b.ptr) + offset, bytes, 0, 0, b.device);
  table_[static_cast<uint32_t>(a & ((uint64_t{1} << kSlotBits) - 1))].alias = true;
  stats_[b.device].count += 1;
  return a;
}

BufRef Backend::lookup(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t slot = id & ((uint64_t{1} << kSlotBits) - 1);
  uint32_t gen = static_cast<uint32_t>(id >> kSlotBits);
  if (slot >= table_.size() || !table_[slot].live || table_[slot].gen != gen)
    invalid("buffer " + std::to_string(id) + " does not exist or was already freed");
  const Entry& e = table_[slot];
  return BufRef{e.ptr, e.bytes, e.device};
}

void Backend::free(uint64_t id) {
  BufRef b = lookup(id);
  std::lock_guard<std::mutex> lock(mu_);
  uint32_t slot = static_cast<uint32_t>(id & ((uint64_t{1} << kSlotBits) - 1));
  Entry& e = table_[slot];
  if (e.alias) {
    if (capture_) capture_->used.erase(id);
  } else if (capture_) {
    // The record may still use this memory: it joins the graph's pool, still counted in use.
    capture_->pool.push_back(PoolBlock{e.ptr, e.block, e.charge, e.device});
    capture_->used.erase(id);
  } else {
    raw_free(b.device, b.ptr, e.block);
    stats_[b.device].in_use -= e.charge;
  }
  e.live = false;
  e.alias = false;
  e.ptr = nullptr;
  free_slots_.push_back(slot);
  stats_[b.device].count -= 1;
}

void Backend::free_all() {
  destroy_graphs();
  reads_.clear();
  std::lock_guard<std::mutex> lock(mu_);
  for (uint32_t slot = 0; slot < table_.size(); ++slot) {
    Entry& e = table_[slot];
    if (!e.live) continue;
    if (!e.alias) raw_free(e.device, e.ptr, e.block);
    e.alias = false;
    stats_[e.device].in_use -= e.charge;
    stats_[e.device].count -= 1;
    e.live = false;
    e.ptr = nullptr;
    free_slots_.push_back(slot);
  }
}

DeviceStats Backend::stats(int device) const {
  check_device(device);
  std::lock_guard<std::mutex> lock(mu_);
  return stats_[device];
}

void Backend::reset_peak(int device) {
  check_device(device);
  std::lock_guard<std::mutex> lock(mu_);
  stats_[device].peak = stats_[device].in_use;
}

void Backend::set_capacity(int device, size_t bytes) {
  check_device(device);
  std::lock_guard<std::mutex> lock(mu_);
  stats_[device].capacity = bytes;
}

void Backend::exec(size_t opcode, const std::vector<uint64_t>& ids, const double* args, size_t nargs) {
  if (opcode >= op_fns_.size()) invalid("unknown op code " + std::to_string(opcode));
  OpCtx ctx{*this, {}, args, nargs, op_names_[opcode]};
  ctx.bufs.reserve(ids.size());
  for (uint64_t id : ids) ctx.bufs.push_back(lookup(id));
  if (capture_) {
    for (uint64_t id : ids) note_used(id);
    if (records_on_host()) {
      // The op runs at launch, over the same memory and a copy of the arguments.
      capture_->host_record.push_back(
          [this, fn = op_fns_[opcode], bufs = ctx.bufs, a = std::vector<double>(args, args + nargs), opcode] {
            OpCtx c{*this, bufs, a.data(), a.size(), op_names_[opcode]};
            fn(c);
          });
      return;
    }
  }
  op_fns_[opcode](ctx);
}

void Backend::write_id(uint64_t dst, size_t offset, const void* src, size_t n) {
  if (capture_) invalid("write: host data cannot enter a graph capture (it would synchronise the host); write before capture_begin");
  write(lookup(dst), offset, src, n);
}

void Backend::read_id(uint64_t src, size_t offset, void* dst, size_t n) {
  if (capture_) invalid("read: a graph capture cannot read device memory (it would synchronise the host); read after capture_end");
  read(lookup(src), offset, dst, n);
}

namespace {
struct HostRead final : Backend::PendingRead {
  std::vector<unsigned char> bytes;
  void finish(void* dst, size_t n) override { std::memcpy(dst, bytes.data(), std::min(n, bytes.size())); }
};
}  // namespace

std::unique_ptr<Backend::PendingRead> Backend::start_read(const BufRef& src, size_t offset, size_t n) {
  auto r = std::make_unique<HostRead>();
  r->bytes.resize(n);
  read(src, offset, r->bytes.data(), n);
  return r;
}

uint64_t Backend::read_start(uint64_t src, size_t offset, size_t n) {
  if (capture_) invalid("read_start: a graph capture cannot read device memory; read after capture_end");
  const BufRef b = lookup(src);
  if (offset > b.bytes || n > b.bytes - offset)
    invalid("read_start: range [" + std::to_string(offset) + ", " + std::to_string(offset + n) +
            ") leaves a buffer of " + std::to_string(b.bytes) + " bytes");
  const uint64_t ticket = next_read_++;
  reads_.emplace(ticket, std::make_pair(n, start_read(b, offset, n)));
  return ticket;
}

void Backend::read_finish(uint64_t ticket, void* dst, size_t n) {
  auto it = reads_.find(ticket);
  if (it == reads_.end()) invalid("read_finish: no pending read " + std::to_string(ticket) + " (each finishes once)");
  if (n < it->second.first) invalid("read_finish: the output holds fewer bytes than the read");
  auto pending = std::move(it->second.second);
  const size_t bytes = it->second.first;
  reads_.erase(it);
  pending->finish(dst, bytes);
}

void Backend::copy_id(uint64_t dst, size_t dst_off, uint64_t src, size_t src_off, size_t n) {
  const BufRef d = lookup(dst), s = lookup(src);
  if (capture_) {
    note_used(dst);
    note_used(src);
    if (records_on_host()) {
      if (dst_off > d.bytes || n > d.bytes - dst_off || src_off > s.bytes || n > s.bytes - src_off)
        invalid("copy: range leaves a buffer");
      capture_->host_record.push_back([this, d, dst_off, s, src_off, n] { copy(d, dst_off, s, src_off, n); });
      return;
    }
  }
  copy(d, dst_off, s, src_off, n);
}

namespace {
struct HostGraph final : Backend::Graph {
  std::vector<std::function<void()>> ops;
  void launch() override {
    for (auto& f : ops) f();
  }
  size_t nodes() const override { return ops.size(); }
};
}  // namespace

std::unique_ptr<Backend::Graph> Backend::end_capture() {
  auto g = std::make_unique<HostGraph>();
  g->ops = std::move(capture_->host_record);
  return g;
}

void Backend::capture_begin() {
  if (capture_) invalid("capture_begin: a capture is already running; end it with capture_end or capture_abort");
  capture_ = std::make_unique<Capture>();
  try {
    begin_capture();
  } catch (...) {
    capture_.reset();
    throw;
  }
}

uint32_t Backend::capture_end() {
  if (!capture_) invalid("capture_end: no capture is running (capture_begin starts one)");
  std::unique_ptr<Graph> g;
  try {
    g = end_capture();
  } catch (...) {
    release_pool(capture_->pool);
    capture_.reset();
    throw;
  }
  GraphEntry entry;
  entry.graph = std::move(g);
  entry.pool = std::move(capture_->pool);
  entry.used.assign(capture_->used.begin(), capture_->used.end());
  capture_.reset();
  const uint32_t id = next_graph_++;
  graphs_.emplace(id, std::move(entry));
  return id;
}

void Backend::capture_abort() {
  if (!capture_) return;
  try {
    abort_capture();
  } catch (...) {
  }
  release_pool(capture_->pool);
  capture_.reset();
}

void Backend::release_pool(std::vector<PoolBlock>& pool) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const PoolBlock& b : pool) {
    raw_free(b.device, b.ptr, b.block);
    stats_[b.device].in_use -= b.charge;
  }
  pool.clear();
}

void Backend::graph_launch(uint32_t id) {
  if (capture_) invalid("graph_launch: a capture is running; end it first");
  auto it = graphs_.find(id);
  if (it == graphs_.end()) invalid("graph " + std::to_string(id) + " does not exist or was destroyed");
  // Every buffer the record uses outside its pool must still be live: launching over freed memory
  // would write into whatever took it.
  for (uint64_t b : it->second.used) lookup(b);
  it->second.graph->launch();
}

size_t Backend::graph_nodes(uint32_t id) const {
  auto it = graphs_.find(id);
  if (it == graphs_.end()) invalid("graph " + std::to_string(id) + " does not exist or was destroyed");
  return it->second.graph->nodes();
}

void Backend::graph_destroy(uint32_t id) {
  auto it = graphs_.find(id);
  if (it == graphs_.end()) return;
  it->second.graph.reset();
  release_pool(it->second.pool);
  graphs_.erase(it);
}

void Backend::destroy_graphs() {
  capture_abort();
  while (!graphs_.empty()) graph_destroy(graphs_.begin()->first);
}

}  // namespace magix
