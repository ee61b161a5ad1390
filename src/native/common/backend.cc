#include "backend.h"

#include <algorithm>

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
  e.device = device;
  e.live = true;
  e.gen = (e.gen + 1) & 0xfffff;  // ids stay below 2^52, exact as JS numbers
  s.in_use += bytes;
  s.count += 1;
  s.peak = std::max(s.peak, s.in_use);
  return (static_cast<uint64_t>(e.gen) << kSlotBits) | slot;
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
  raw_free(b.device, b.ptr, b.bytes);
  table_[slot].live = false;
  table_[slot].ptr = nullptr;
  free_slots_.push_back(slot);
  stats_[b.device].in_use -= b.bytes;
  stats_[b.device].count -= 1;
}

void Backend::free_all() {
  std::lock_guard<std::mutex> lock(mu_);
  for (uint32_t slot = 0; slot < table_.size(); ++slot) {
    Entry& e = table_[slot];
    if (!e.live) continue;
    raw_free(e.device, e.ptr, e.bytes);
    stats_[e.device].in_use -= e.bytes;
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
  op_fns_[opcode](ctx);
}

}  // namespace magix
