// Collectives through NCCL over the GPUs of a group (src/native/OPS.md): one call per rank inside
// ncclGroupStart/End, each on its device's stream. `comm` is a communicator made by
// createCommunicator for exactly these devices, in rank order. A group of one GPU needs no NCCL:
// in place it is nothing, out of place a device copy.
#include <string>
#include <vector>

#include "../common/dtype.h"
#include "backend.h"
#include "check.h"
#include "dynload.h"

namespace magix::cuda {
namespace {

// ncclDataType_t and ncclRedOp_t values from nccl.h.
constexpr int ncclInt8 = 0, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9;
constexpr int ncclSum = 0, ncclMax = 2;

int nccl_type(DType t) {
  switch (t) {
    case DType::F32: return ncclFloat32;
    case DType::F64: return ncclFloat64;
    case DType::BF16: return ncclBfloat16;
    default: invalid("collective: reductions take float32, float64 or bfloat16");
  }
}

void nccl_check(int r, const char* what) {
  if (r == 0) return;
  throw MagixError("NCCL_ERROR", std::string(what) + ": " + nccl().GetErrorString(r))
      .with("library", "nccl")
      .with("status", r)
      .with("name", what);
}

CudaBackend& be(OpCtx& c) { return static_cast<CudaBackend&>(c.backend); }

// Runs one call per rank inside a NCCL group.
template <typename F>
void per_rank(OpCtx& c, size_t k, int comm, F call) {
  const Nccl& N = nccl();
  if (!N.loaded) throw MagixError("NCCL_ERROR", "NCCL could not be loaded: " + N.error).with("library", "nccl");
  nccl_check(N.GroupStart(), "ncclGroupStart");
  for (size_t r = 0; r < k; ++r) {
    const int dev = c.bufs[r].device;
    CUDA_CHECK(cudaSetDevice(dev));
    nccl_check(call(r, be(c).communicator(comm, dev), be(c).stream(dev)), c.name.c_str());
  }
  nccl_check(N.GroupEnd(), "ncclGroupEnd");
}

void all_reduce(OpCtx& c) {
  const size_t k = c.bufs.size();
  const DType t = to_dtype(c.f(0));
  const size_t n = c.n(1);
  const int op = c.i(2) == 1 ? ncclMax : ncclSum;
  const int comm = static_cast<int>(c.i(3));
  for (size_t r = 0; r < k; ++r) c.need(r, n, dtype_size(t));
  if ((k == 1 && comm == 0) || n == 0) return;
  per_rank(c, k, comm, [&](size_t r, ncclComm_t cm, cudaStream_t s) {
    return nccl().AllReduce(c.bufs[r].ptr, c.bufs[r].ptr, n, nccl_type(t), op, cm, s);
  });
}

void all_gather(OpCtx& c) {
  const size_t esize = c.n(0), k = c.n(1), n = c.n(2);
  const int comm = static_cast<int>(c.i(3));
  check(k >= 1 && c.bufs.size() == 2 * k, "all_gather: needs k inputs and k outputs");
  for (size_t j = 0; j < k; ++j) c.need(j, n, esize);
  for (size_t r = 0; r < k; ++r) c.need(k + r, n * k, esize);
  if (n == 0) return;
  if (k == 1 && comm == 0) {
    CUDA_CHECK(cudaSetDevice(c.bufs[0].device));
    CUDA_CHECK(cudaMemcpyAsync(c.bufs[1].ptr, c.bufs[0].ptr, n * esize, cudaMemcpyDeviceToDevice, be(c).stream(c.bufs[0].device)));
    return;
  }
  per_rank(c, k, comm, [&](size_t r, ncclComm_t cm, cudaStream_t s) {
    return nccl().AllGather(c.bufs[r].ptr, c.bufs[k + r].ptr, n * esize, ncclInt8, cm, s);
  });
}

void reduce_scatter(OpCtx& c) {
  const DType t = to_dtype(c.f(0));
  const size_t k = c.n(1), n = c.n(2);
  const int op = c.i(3) == 1 ? ncclMax : ncclSum;
  const int comm = static_cast<int>(c.i(4));
  check(k >= 1 && c.bufs.size() == 2 * k, "reduce_scatter: needs k inputs and k outputs");
  const size_t es = dtype_size(t);
  for (size_t j = 0; j < k; ++j) c.need(j, n * k, es);
  for (size_t r = 0; r < k; ++r) c.need(k + r, n, es);
  if (n == 0) return;
  if (k == 1 && comm == 0) {
    CUDA_CHECK(cudaSetDevice(c.bufs[0].device));
    CUDA_CHECK(cudaMemcpyAsync(c.bufs[1].ptr, c.bufs[0].ptr, n * es, cudaMemcpyDeviceToDevice, be(c).stream(c.bufs[0].device)));
    return;
  }
  per_rank(c, k, comm, [&](size_t r, ncclComm_t cm, cudaStream_t s) {
    return nccl().ReduceScatter(c.bufs[r].ptr, c.bufs[k + r].ptr, n, nccl_type(t), op, cm, s);
  });
}

void broadcast(OpCtx& c) {
  const size_t esize = c.n(0), n = c.n(1), root = c.n(2), k = c.bufs.size();
  const int comm = static_cast<int>(c.i(3));
  check(root < k, "broadcast: root is not in the group");
  for (size_t r = 0; r < k; ++r) c.need(r, n, esize);
  if ((k == 1 && comm == 0) || n == 0) return;
  per_rank(c, k, comm, [&](size_t r, ncclComm_t cm, cudaStream_t s) {
    return nccl().Broadcast(c.bufs[r].ptr, c.bufs[r].ptr, n * esize, ncclInt8, static_cast<int>(root), cm, s);
  });
}

MAGIX_REGISTER_OP("cuda", "all_reduce", all_reduce);
MAGIX_REGISTER_OP("cuda", "all_gather", all_gather);
MAGIX_REGISTER_OP("cuda", "reduce_scatter", reduce_scatter);
MAGIX_REGISTER_OP("cuda", "broadcast", broadcast);

}  // namespace
}  // namespace magix::cuda
