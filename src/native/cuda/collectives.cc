// Collectives over the GPUs of a group through NCCL (src/native/OPS.md); rank r is the device of
// the r-th buffer (of the r-th input and output):
//   all_reduce(b_0..b_{k−1}; dtype, n, op, comm):                 b_r = b_0 ⊕ … ⊕ b_{k−1}
//   all_gather(in_0..in_{k−1}, out_0..out_{k−1}; esize, k, nPerRank, comm): out_r[j·n + i] = in_j[i]
//   reduce_scatter(in.., out..; dtype, k, nPerRank, op, comm):     out_r[i] = ⊕_j in_j[r·n + i]
//   broadcast(b_0..b_{k−1}; esize, n, root, comm):                 b_r = b_root
// ⊕ is + (op 0) or max (op 1) over float32, bfloat16 or float64; all_gather and broadcast move
// bytes. One NCCL call per rank inside ncclGroupStart/End, each on its device's stream: nothing
// waits on the host. NCCL's ring and tree algorithms give every rank the same bits.
// `comm` is a communicator id from createCommunicator, made for exactly these devices in this
// order; 0 means "this device list's own communicator", made on first use and kept until the
// backend is disposed. A group of one GPU needs no NCCL: nothing in place, a device copy otherwise.
#include <cstdint>
#include <string>
#include <vector>

#include "../common/dtype.h"
#include "backend.h"
#include "check.h"
#include "dynload.h"

namespace magix::cuda {
namespace {

CudaBackend& be(OpCtx& c) { return static_cast<CudaBackend&>(c.backend); }

size_t mul(size_t a, size_t b) {
  if (a != 0 && b > SIZE_MAX / a) invalid("size overflow");
  return a * b;
}

int nccl_type(OpCtx& c, DType t) {
  switch (t) {
    case DType::F32: return ncclFloat32;
    case DType::F64: return ncclFloat64;
    case DType::BF16: return ncclBfloat16;
    default: invalid(c.name + ": reductions take float32 (0), float64 (1) or bfloat16 (2)");
  }
}

int reduce_op(OpCtx& c, size_t i) {
  const int64_t op = c.i(i);
  check(op == 0 || op == 1, c.name + ": op must be 0 (sum) or 1 (max)");
  return op == 0 ? ncclSum : ncclMax;
}

int comm_arg(OpCtx& c, size_t i) {
  const int64_t id = c.i(i);
  check(id >= 0 && id <= 0x7fffffff, c.name + ": bad communicator id");
  return static_cast<int>(id);
}

// The devices of ranks 0..k−1 (buffers first..first+k−1), checked distinct; buffers
// [second, second + k) (if second ≥ 0) must be on the same devices.
std::vector<int> rank_devices(OpCtx& c, size_t k, long second = -1) {
  std::vector<int> devs(k);
  for (size_t r = 0; r < k; ++r) {
    devs[r] = c.buf(r).device;
    if (second >= 0)
      check(c.buf(static_cast<size_t>(second) + r).device == devs[r],
            c.name + ": the input and output of rank " + std::to_string(r) + " must be on one GPU");
    for (size_t j = 0; j < r; ++j)
      check(devs[j] != devs[r], c.name + ": ranks " + std::to_string(j) + " and " + std::to_string(r) +
                                    " are both on GPU " + std::to_string(devs[r]) + " (one rank per GPU)");
  }
  return devs;
}

// Runs call(r, comm, stream) for every rank inside one NCCL group; the group is closed on failure.
template <typename F>
void per_rank(OpCtx& c, int comm, const std::vector<int>& devs, F call) {
  const Nccl& N = nccl();
  if (!N.loaded)
    throw MagixError("NCCL_ERROR", "NCCL could not be loaded: " + N.error).with("library", "nccl").with("status", 3);
  const std::vector<ncclComm_t>& comms = be(c).communicators(comm, devs);
  NCCL_CHECK(N.GroupStart());
  try {
    for (size_t r = 0; r < devs.size(); ++r) {
      CUDA_CHECK(cudaSetDevice(devs[r]));
      NCCL_CHECK(call(r, comms[r], be(c).stream(devs[r])));
    }
  } catch (...) {
    N.GroupEnd();
    throw;
  }
  NCCL_CHECK(N.GroupEnd());
}

void copy_on_device(OpCtx& c, const BufRef& dst, const BufRef& src, size_t bytes) {
  if (bytes == 0 || dst.ptr == src.ptr) return;
  CUDA_CHECK(cudaSetDevice(dst.device));
  CUDA_CHECK(cudaMemcpyAsync(dst.ptr, src.ptr, bytes, cudaMemcpyDeviceToDevice, be(c).stream(dst.device)));
}

void all_reduce(OpCtx& c) {
  const size_t k = c.bufs.size();
  check(k >= 1, "all_reduce: no buffers");
  const DType t = to_dtype(c.f(0));
  const int type = nccl_type(c, t);
  const size_t n = c.n(1);
  const int op = reduce_op(c, 2);
  const int comm = comm_arg(c, 3);
  for (size_t r = 0; r < k; ++r) c.need(r, n, dtype_size(t));
  const std::vector<int> devs = rank_devices(c, k);
  if (k == 1 || n == 0) return;
  per_rank(c, comm, devs, [&](size_t r, ncclComm_t cm, cudaStream_t s) {
    return nccl().AllReduce(c.bufs[r].ptr, c.bufs[r].ptr, n, type, op, cm, s);
  });
}

void all_gather(OpCtx& c) {
  const size_t esize = c.n(0), k = c.n(1), n = c.n(2);
  const int comm = comm_arg(c, 3);
  check(k >= 1 && c.bufs.size() == 2 * k, "all_gather: needs k inputs and k outputs");
  check(esize > 0, "all_gather: element size must be positive");
  for (size_t j = 0; j < k; ++j) c.need(j, n, esize);
  for (size_t r = 0; r < k; ++r) c.need(k + r, mul(n, k), esize);
  for (size_t r = 0; r < k; ++r)
    check(k == 1 || c.bufs[r].ptr != c.bufs[k + r].ptr, "all_gather: an output must not alias its input");
  const std::vector<int> devs = rank_devices(c, k, static_cast<long>(k));
  const size_t bytes = mul(n, esize);
  if (bytes == 0) return;
  if (k == 1) return copy_on_device(c, c.bufs[1], c.bufs[0], bytes);
  per_rank(c, comm, devs, [&](size_t r, ncclComm_t cm, cudaStream_t s) {
    return nccl().AllGather(c.bufs[r].ptr, c.bufs[k + r].ptr, bytes, ncclInt8, cm, s);
  });
}

void reduce_scatter(OpCtx& c) {
  const DType t = to_dtype(c.f(0));
  const int type = nccl_type(c, t);
  const size_t k = c.n(1), n = c.n(2);
  const int op = reduce_op(c, 3);
  const int comm = comm_arg(c, 4);
  check(k >= 1 && c.bufs.size() == 2 * k, "reduce_scatter: needs k inputs and k outputs");
  const size_t es = dtype_size(t);
  for (size_t j = 0; j < k; ++j) c.need(j, mul(n, k), es);
  for (size_t r = 0; r < k; ++r) c.need(k + r, n, es);
  for (size_t r = 0; r < k; ++r)
    check(k == 1 || c.bufs[r].ptr != c.bufs[k + r].ptr, "reduce_scatter: an output must not alias its input");
  const std::vector<int> devs = rank_devices(c, k, static_cast<long>(k));
  if (n == 0) return;
  if (k == 1) return copy_on_device(c, c.bufs[1], c.bufs[0], mul(n, es));
  per_rank(c, comm, devs, [&](size_t r, ncclComm_t cm, cudaStream_t s) {
    return nccl().ReduceScatter(c.bufs[r].ptr, c.bufs[k + r].ptr, n, type, op, cm, s);
  });
}

void broadcast(OpCtx& c) {
  const size_t esize = c.n(0), n = c.n(1), root = c.n(2), k = c.bufs.size();
  const int comm = comm_arg(c, 3);
  check(k >= 1, "broadcast: no buffers");
  check(root < k, "broadcast: root is not in the group");
  check(esize > 0, "broadcast: element size must be positive");
  for (size_t r = 0; r < k; ++r) c.need(r, n, esize);
  const std::vector<int> devs = rank_devices(c, k);
  const size_t bytes = mul(n, esize);
  if (k == 1 || bytes == 0) return;
  per_rank(c, comm, devs, [&](size_t r, ncclComm_t cm, cudaStream_t s) {
    return nccl().Broadcast(c.bufs[r].ptr, c.bufs[r].ptr, bytes, ncclInt8, static_cast<int>(root), cm, s);
  });
}

MAGIX_REGISTER_OP("cuda", "all_reduce", all_reduce);
MAGIX_REGISTER_OP("cuda", "all_gather", all_gather);
MAGIX_REGISTER_OP("cuda", "reduce_scatter", reduce_scatter);
MAGIX_REGISTER_OP("cuda", "broadcast", broadcast);

}  // namespace
}  // namespace magix::cuda
