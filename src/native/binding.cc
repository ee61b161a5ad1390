// The addon's JavaScript surface: backends as objects over the checked buffer table, plus a
// host-side box copy. Every native failure becomes a JS Error with `code` and numeric fields,
// which src/native/index.ts turns into typed errors.
#include <napi.h>

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <memory>

#include "common/backend.h"
#include "common/box.h"
#include "cpu/backend.h"
#include "cpu/threadpool.h"
#ifdef MAGIX_WITH_CUDA
#include "cuda/backend.h"
#include "cuda/dynload.h"
#endif

namespace {

using magix::Backend;
using magix::MagixError;

[[noreturn]] void rethrow(Napi::Env env) {
  try {
    throw;
  } catch (const Napi::Error&) {
    throw;
  } catch (const MagixError& e) {
    Napi::Error err = Napi::Error::New(env, e.what());
    err.Set("code", Napi::String::New(env, e.code));
    for (const auto& [k, v] : e.fields) err.Set(k, Napi::Number::New(env, v));
    for (const auto& [k, v] : e.texts) err.Set(k, Napi::String::New(env, v));
    throw err;
  } catch (const std::bad_alloc&) {
    Napi::Error err = Napi::Error::New(env, "host out of memory");
    err.Set("code", Napi::String::New(env, "HOST_OUT_OF_MEMORY"));
    throw err;
  } catch (const std::exception& e) {
    Napi::Error err = Napi::Error::New(env, e.what());
    err.Set("code", Napi::String::New(env, "NATIVE_ERROR"));
    throw err;
  }
}

template <typename F>
auto guarded(Napi::Env env, F f) -> decltype(f()) {
  try {
    return f();
  } catch (...) {
    rethrow(env);
  }
}

uint64_t to_id(const Napi::Value& v) {
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d > 9007199254740991.0 || d != static_cast<double>(static_cast<uint64_t>(d)))
    magix::invalid("buffer ids are non-negative integers");
  return static_cast<uint64_t>(d);
}

size_t to_size(const Napi::Value& v, const char* what) {
  if (!v.IsNumber()) magix::invalid(std::string(what) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d > 9007199254740991.0 || d != static_cast<double>(static_cast<uint64_t>(d)))
    magix::invalid(std::string(what) + " must be a non-negative integer");
  return static_cast<size_t>(d);
}

int to_device(const Napi::Value& v) { return static_cast<int>(to_size(v, "device")); }

// A byte view of any typed array or Buffer.
struct Bytes {
  uint8_t* data;
  size_t length;
};
Bytes bytes_of(const Napi::Value& v, const char* what) {
  if (!v.IsTypedArray()) magix::invalid(std::string(what) + " must be a typed array");
  auto ta = v.As<Napi::TypedArray>();
  auto ab = ta.ArrayBuffer();
  return Bytes{static_cast<uint8_t*>(ab.Data()) + ta.ByteOffset(), ta.ByteLength()};
}

std::vector<double> numbers_of(const Napi::Value& v, const char* what) {
  std::vector<double> out;
  if (v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == napi_float64_array) {
    auto f = v.As<Napi::Float64Array>();
    out.assign(f.Data(), f.Data() + f.ElementLength());
    return out;
  }
  if (!v.IsArray()) magix::invalid(std::string(what) + " must be an array of numbers");
  auto a = v.As<Napi::Array>();
  out.resize(a.Length());
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value e = a.Get(i);
    if (!e.IsNumber()) magix::invalid(std::string(what) + " must be an array of numbers");
    out[i] = e.As<Napi::Number>().DoubleValue();
  }
  return out;
}

class BackendWrap : public Napi::ObjectWrap<BackendWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeBackend",
                       {
                           InstanceAccessor<&BackendWrap::Kind>("kind"),
                           InstanceAccessor<&BackendWrap::DeviceCount>("deviceCount"),
                           InstanceMethod<&BackendWrap::Alloc>("alloc"),
                           InstanceMethod<&BackendWrap::Free>("free"),
                           InstanceMethod<&BackendWrap::Alias>("alias"),
                           InstanceMethod<&BackendWrap::FreeAll>("freeAll"),
                           InstanceMethod<&BackendWrap::Size>("size"),
                           InstanceMethod<&BackendWrap::Write>("write"),
                           InstanceMethod<&BackendWrap::Read>("read"),
                           InstanceMethod<&BackendWrap::Copy>("copy"),
                           InstanceMethod<&BackendWrap::ReadStart>("readStart"),
                           InstanceMethod<&BackendWrap::ReadFinish>("readFinish"),
                           InstanceMethod<&BackendWrap::Stats>("stats"),
                           InstanceMethod<&BackendWrap::ResetPeak>("resetPeak"),
                           InstanceMethod<&BackendWrap::SetCapacity>("setCapacity"),
                           InstanceMethod<&BackendWrap::Synchronize>("synchronize"),
                           InstanceMethod<&BackendWrap::OpNames>("opNames"),
                           InstanceMethod<&BackendWrap::Exec>("exec"),
                           InstanceMethod<&BackendWrap::Dispose>("dispose"),
                           InstanceMethod<&BackendWrap::CreateCommunicator>("createCommunicator"),
                           InstanceMethod<&BackendWrap::DestroyCommunicator>("destroyCommunicator"),
                           InstanceMethod<&BackendWrap::CaptureBegin>("captureBegin"),
                           InstanceMethod<&BackendWrap::CaptureEnd>("captureEnd"),
                           InstanceMethod<&BackendWrap::CaptureAbort>("captureAbort"),
                           InstanceMethod<&BackendWrap::GraphLaunch>("graphLaunch"),
                           InstanceMethod<&BackendWrap::GraphDestroy>("graphDestroy"),
                           InstanceMethod<&BackendWrap::GraphNodes>("graphNodes"),
                       });
  }

  BackendWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<BackendWrap>(info) {
    auto ext = info[0].As<Napi::External<Backend>>();
    backend_.reset(ext.Data());
  }

 private:
  Backend& be(Napi::Env env) {
    if (!backend_) {
      Napi::Error err = Napi::Error::New(env, "this backend was disposed");
      err.Set("code", Napi::String::New(env, "DISPOSED"));
      throw err;
    }
    return *backend_;
  }

  Napi::Value Kind(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), be(info.Env()).kind()); }
  Napi::Value DeviceCount(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), be(info.Env()).device_count());
  }
  Napi::Value Alloc(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&] {
      uint64_t id = be(info.Env()).alloc(to_device(info[0]), to_size(info[1], "bytes"));
      return Napi::Number::New(info.Env(), static_cast<double>(id));
    });
  }
  Napi::Value Alias(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&] {
      const uint64_t id =
          be(info.Env()).alias(to_id(info[0]), to_size(info[1], "offset"), to_size(info[2], "bytes"));
      return Napi::Number::New(info.Env(), static_cast<double>(id));
    });
  }
  void Free(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] { be(info.Env()).free(to_id(info[0])); });
  }
  void FreeAll(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] { be(info.Env()).free_all(); });
  }
  Napi::Value Size(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&] {
      auto b = be(info.Env()).lookup(to_id(info[0]));
      Napi::Object o = Napi::Object::New(info.Env());
      o.Set("bytes", static_cast<double>(b.bytes));
      o.Set("device", b.device);
      return o;
    });
  }
  void Write(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] {
      Backend& b = be(info.Env());
      Bytes src = bytes_of(info[2], "data");
      b.write_id(to_id(info[0]), to_size(info[1], "offset"), src.data, src.length);
    });
  }
  Napi::Value Read(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&] {
      Backend& b = be(info.Env());
      const uint64_t src = to_id(info[0]);
      b.lookup(src);
      size_t offset = to_size(info[1], "offset"), n = to_size(info[2], "length");
      if (info.Length() > 3 && !info[3].IsUndefined()) {  // into a caller's array: no allocation
        Bytes dst = bytes_of(info[3], "out");
        if (dst.length < n) magix::invalid("read: output array is smaller than the length");
        b.read_id(src, offset, dst.data, n);
        return info[3];
      }
      auto out = Napi::Buffer<uint8_t>::New(info.Env(), n);
      b.read_id(src, offset, out.Data(), n);
      return static_cast<Napi::Value>(out);
    });
  }
  Napi::Value ReadStart(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&] {
      const uint64_t t =
          be(info.Env()).read_start(to_id(info[0]), to_size(info[1], "offset"), to_size(info[2], "length"));
      return Napi::Number::New(info.Env(), static_cast<double>(t));
    });
  }
  Napi::Value ReadFinish(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&] {
      const uint64_t t = to_size(info[0], "ticket");
      const size_t n = to_size(info[1], "length");
      auto out = Napi::Buffer<uint8_t>::New(info.Env(), n);
      be(info.Env()).read_finish(t, out.Data(), n);
      return static_cast<Napi::Value>(out);
    });
  }
  void Copy(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] {
      Backend& b = be(info.Env());
      b.copy_id(to_id(info[0]), to_size(info[1], "dstOffset"), to_id(info[2]), to_size(info[3], "srcOffset"),
                to_size(info[4], "bytes"));
    });
  }
  Napi::Value Stats(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&] {
      auto s = be(info.Env()).stats(to_device(info[0]));
      Napi::Object o = Napi::Object::New(info.Env());
      o.Set("inUse", static_cast<double>(s.in_use));
      o.Set("peak", static_cast<double>(s.peak));
      o.Set("capacity", static_cast<double>(s.capacity));
      o.Set("count", static_cast<double>(s.count));
      return o;
    });
  }
  void ResetPeak(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] { be(info.Env()).reset_peak(to_device(info[0])); });
  }
  void SetCapacity(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] { be(info.Env()).set_capacity(to_device(info[0]), to_size(info[1], "bytes")); });
  }
  void Synchronize(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] { be(info.Env()).synchronize(to_device(info[0])); });
  }
  Napi::Value OpNames(const Napi::CallbackInfo& info) {
    const auto& names = be(info.Env()).op_names();
    Napi::Array a = Napi::Array::New(info.Env(), names.size());
    for (uint32_t i = 0; i < names.size(); ++i) a.Set(i, names[i]);
    return a;
  }
  void Exec(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] {
      size_t code = to_size(info[0], "op code");
      std::vector<double> idsd = numbers_of(info[1], "buffers");
      std::vector<uint64_t> ids;
      ids.reserve(idsd.size());
      for (double d : idsd) {
        if (!(d >= 0) || d != static_cast<double>(static_cast<uint64_t>(d))) magix::invalid("buffer ids are integers");
        ids.push_back(static_cast<uint64_t>(d));
      }
      std::vector<double> args = numbers_of(info[2], "arguments");
      be(info.Env()).exec(code, ids, args.data(), args.size());
    });
  }
  // NCCL communicators over groups of this backend's GPUs (CUDA only; the CPU needs none).
  Napi::Value CreateCommunicator(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&]() -> Napi::Value {
      std::vector<double> devs = numbers_of(info[0], "devices");
#ifdef MAGIX_WITH_CUDA
      if (auto* cb = dynamic_cast<magix::cuda::CudaBackend*>(&be(info.Env()))) {
        std::vector<int> d;
        for (double x : devs) {
          if (!(x >= 0) || x > 65535 || x != static_cast<double>(static_cast<int>(x)))
            magix::invalid("createCommunicator: devices are non-negative integers");
          d.push_back(static_cast<int>(x));
        }
        return Napi::Number::New(info.Env(), cb->create_communicator(d));
      }
#endif
      (void)devs;
      return Napi::Number::New(info.Env(), 0);
    });
  }
  void DestroyCommunicator(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] {
      const int id = static_cast<int>(to_size(info[0], "communicator"));
#ifdef MAGIX_WITH_CUDA
      if (auto* cb = dynamic_cast<magix::cuda::CudaBackend*>(&be(info.Env()))) cb->destroy_communicator(id);
#endif
      (void)id;
    });
  }
  // Graphs (see common/backend.h): capture a stretch of exec/copy calls, then launch it again.
  void CaptureBegin(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] { be(info.Env()).capture_begin(); });
  }
  Napi::Value CaptureEnd(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&] { return Napi::Number::New(info.Env(), be(info.Env()).capture_end()); });
  }
  void CaptureAbort(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] { be(info.Env()).capture_abort(); });
  }
  static uint32_t to_graph(const Napi::Value& v) {
    const size_t g = to_size(v, "graph");
    if (g > 0xffffffffu) magix::invalid("graph ids are 32-bit");
    return static_cast<uint32_t>(g);
  }
  void GraphLaunch(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] { be(info.Env()).graph_launch(to_graph(info[0])); });
  }
  void GraphDestroy(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] { be(info.Env()).graph_destroy(to_graph(info[0])); });
  }
  Napi::Value GraphNodes(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&] {
      return Napi::Number::New(info.Env(), static_cast<double>(be(info.Env()).graph_nodes(to_graph(info[0]))));
    });
  }
  void Dispose(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] { backend_.reset(); });
  }

  std::unique_ptr<Backend> backend_;
};

Napi::FunctionReference* g_backend_ctor = nullptr;

Napi::Value Wrap(Napi::Env env, Backend* b) {
  return g_backend_ctor->New({Napi::External<Backend>::New(env, b)});
}

Napi::Value CreateCpu(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&] {
    size_t devices = to_size(info[0], "devices");
    if (devices < 1 || devices > 4096) magix::invalid("devices must be between 1 and 4096");
    auto* b = new magix::cpu::CpuBackend(static_cast<int>(devices));
    return Wrap(info.Env(), b);
  });
}

Napi::Value CudaProbe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
#ifdef MAGIX_WITH_CUDA
  auto p = magix::cuda::probe();
  o.Set("built", true);
  o.Set("devices", p.devices);
  o.Set("error", p.error);
  o.Set("runtimeVersion", p.runtime_version);
  o.Set("driverVersion", p.driver_version);
  Napi::Array gpus = Napi::Array::New(env, p.gpus.size());
  for (uint32_t i = 0; i < p.gpus.size(); ++i) {
    Napi::Object g = Napi::Object::New(env);
    g.Set("name", p.gpus[i].name);
    g.Set("totalMemory", static_cast<double>(p.gpus[i].total_memory));
    g.Set("computeCapability", std::to_string(p.gpus[i].major) + "." + std::to_string(p.gpus[i].minor));
    g.Set("multiprocessors", p.gpus[i].multiprocessors);
    gpus.Set(i, g);
  }
  o.Set("gpus", gpus);
  const auto& lt = magix::cuda::cublaslt();
  o.Set("cublasLt", lt.loaded ? Napi::Value(Napi::Number::New(env, static_cast<double>(lt.GetVersion())))
                              : Napi::Value(Napi::String::New(env, lt.error)));
  const auto& nc = magix::cuda::nccl();
  int ncv = 0;
  if (nc.loaded) nc.GetVersion(&ncv);
  o.Set("nccl", nc.loaded ? Napi::Value(Napi::Number::New(env, ncv)) : Napi::Value(Napi::String::New(env, nc.error)));
#else
  o.Set("built", false);
  o.Set("devices", 0);
  o.Set("error", "this build of the addon has no CUDA backend (nvcc was not found when it was built)");
  o.Set("gpus", Napi::Array::New(env, 0));
#endif
  return o;
}

Napi::Value CreateCuda(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
#ifdef MAGIX_WITH_CUDA
    auto p = magix::cuda::probe();
    if (p.devices == 0)
      throw MagixError("NO_GPU", p.error.empty() ? "no CUDA device found" : p.error);
    size_t want = info.Length() > 0 && !info[0].IsUndefined() ? to_size(info[0], "devices") : p.devices;
    if (want < 1 || static_cast<int>(want) > p.devices)
      throw MagixError("NO_GPU", "asked for " + std::to_string(want) + " GPUs, " + std::to_string(p.devices) + " present");
    return Wrap(info.Env(), new magix::cuda::CudaBackend(static_cast<int>(want)));
#else
    (void)info;
    throw MagixError("NO_CUDA_BUILD", "this build of the addon has no CUDA backend (nvcc was not found when it was built)");
#endif
  });
}

// copyBox(src, dst, elemSize, boxArgs): the box copy of copy_box between host typed arrays.
void CopyBox(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] {
    Bytes src = bytes_of(info[0], "src"), dst = bytes_of(info[1], "dst");
    size_t esize = to_size(info[2], "elemSize");
    std::vector<double> args = numbers_of(info[3], "box");
    magix::BoxCopy b = magix::parse_box(args.data(), args.size(), 0, esize, "copyBox");
    if (magix::box_array_bytes(b.src_shape, esize) > src.length) magix::invalid("copyBox: source shape is larger than its array");
    if (magix::box_array_bytes(b.dst_shape, esize) > dst.length) magix::invalid("copyBox: destination shape is larger than its array");
    magix::for_each_box_run(b, [&](size_t so, size_t dof, size_t len) { std::memmove(dst.data + dof, src.data + so, len); });
  });
}

// hostBuffer(bytes, pinned): host memory for large transfers, as an ArrayBuffer freed when
// collected. Pinned (cudaHostAlloc) where asked and a GPU takes it: device copies then DMA straight
// from or into it. Otherwise 2 MiB-aligned and advised for transparent huge pages: first touches
// of fresh pages cost more than the copies themselves on the hosts measured (~1.6 GB/s).
Napi::Value HostBuffer(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const size_t bytes = to_size(info[0], "bytes");
    const bool want_pinned = info.Length() > 1 && info[1].ToBoolean().Value();
    Napi::Env env = info.Env();
    if (bytes == 0) return Napi::ArrayBuffer::New(env, 0);
#ifdef MAGIX_WITH_CUDA
    void* pinned = nullptr;
    if (want_pinned && cudaHostAlloc(&pinned, bytes, cudaHostAllocPortable) == cudaSuccess) {
      Napi::MemoryManagement::AdjustExternalMemory(env, static_cast<int64_t>(bytes));
      return Napi::ArrayBuffer::New(env, pinned, bytes, [bytes](Napi::Env e, void* p) {
        cudaFreeHost(p);
        Napi::MemoryManagement::AdjustExternalMemory(e, -static_cast<int64_t>(bytes));
      });
    }
    cudaGetLastError();  // a refused pinned allocation falls back to pageable memory
#else
    (void)want_pinned;
#endif
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, rounded) != 0) throw std::bad_alloc();
    madvise(p, rounded, MADV_HUGEPAGE);  // advice only: ignored where THP is off
    Napi::MemoryManagement::AdjustExternalMemory(env, static_cast<int64_t>(bytes));
    return Napi::ArrayBuffer::New(env, p, bytes, [bytes](Napi::Env e, void* q) {
      std::free(q);
      Napi::MemoryManagement::AdjustExternalMemory(e, -static_cast<int64_t>(bytes));
    });
  });
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  g_backend_ctor = new Napi::FunctionReference(Napi::Persistent(BackendWrap::Define(env)));
  exports.Set("createCpu", Napi::Function::New(env, CreateCpu));
  exports.Set("createCuda", Napi::Function::New(env, CreateCuda));
  exports.Set("cudaProbe", Napi::Function::New(env, CudaProbe));
  exports.Set("copyBox", Napi::Function::New(env, CopyBox));
  exports.Set("hostBuffer", Napi::Function::New(env, HostBuffer));
  exports.Set("cpuThreads", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), magix::cpu::num_threads());
  }));
  exports.Set("abiVersion", Napi::Number::New(env, MAGIX_ABI_VERSION));
#ifdef MAGIX_WITH_CUDA
  exports.Set("withCuda", Napi::Boolean::New(env, true));
#else
  exports.Set("withCuda", Napi::Boolean::New(env, false));
#endif
  return exports;
}

}  // namespace

NODE_API_MODULE(magix, Init)
