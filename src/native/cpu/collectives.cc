// Collectives over the buffers of a group of virtual devices, in process, in rank order (rank =
// position in the buffer list), so every member receives the same bits:
//   all_reduce(b_0..b_{k-1}; dtype, n, op, comm):          b_r = b_0 ⊕ … ⊕ b_{k-1}
//   all_gather(in_0..in_{k-1}, out_0..out_{k-1}; esize, k, nPerRank, comm): out_r[j·n + i] = in_j[i]
//   reduce_scatter(in.., out..; dtype, k, nPerRank, op, comm): out_r[i] = ⊕_j in_j[r·n + i]
//   broadcast(b_0..b_{k-1}; esize, n, root, comm):          b_r = b_root
// ⊕ is + (op 0) or max (op 1). `comm` names an NCCL communicator on CUDA; it is ignored here.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernel.h"

namespace magix::cpu {
namespace {

constexpr int64_t kGrain = 1 << 14;

template <typename T>
inline T combine(T a, T b, int op) {
  return op == 0 ? a + b : std::max(a, b);
}

int reduce_op(OpCtx& c, size_t i) {
  const int64_t op = c.i(i);
  check(op == 0 || op == 1, c.name + ": op must be 0 (sum) or 1 (max)");
  return static_cast<int>(op);
}

void all_reduce(OpCtx& c) {
  const size_t k = c.bufs.size();
  check(k >= 1, "all_reduce: no buffers");
  const size_t n = c.n(1);
  const int op = reduce_op(c, 2);
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    std::vector<T*> b(k);
    for (size_t r = 0; r < k; ++r) b[r] = c.need(r, n, sizeof(T)).as<T>();
    parallel_for(static_cast<int64_t>(n), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        T acc = b[0][i];
        for (size_t r = 1; r < k; ++r) acc = combine(acc, b[r][i], op);
        for (size_t r = 0; r < k; ++r) b[r][i] = acc;
      }
    });
  });
}

void all_gather(OpCtx& c) {
  const size_t esize = c.n(0), k = c.n(1), n = c.n(2);
  check(k >= 1 && c.bufs.size() == 2 * k, "all_gather: needs k inputs and k outputs");
  const size_t bytes = mul(n, esize);
  for (size_t j = 0; j < k; ++j) c.need(j, n, esize);
  for (size_t r = 0; r < k; ++r) c.need(k + r, mul(n, k), esize);
  parallel_for(static_cast<int64_t>(k * k), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const size_t r = static_cast<size_t>(t) / k, j = static_cast<size_t>(t) % k;
      std::memcpy(c.bufs[k + r].as<char>() + j * bytes, c.bufs[j].as<const char>(), bytes);
    }
  });
}

void reduce_scatter(OpCtx& c) {
  const size_t k = c.n(1), n = c.n(2);
  const int op = reduce_op(c, 3);
  check(k >= 1 && c.bufs.size() == 2 * k, "reduce_scatter: needs k inputs and k outputs");
  MAGIX_FLOAT_DISPATCH(c, dtype_arg(c, 0), {
    std::vector<const T*> in(k);
    std::vector<T*> out(k);
    for (size_t j = 0; j < k; ++j) in[j] = c.need(j, mul(n, k), sizeof(T)).as<const T>();
    for (size_t r = 0; r < k; ++r) out[r] = c.need(k + r, n, sizeof(T)).as<T>();
    parallel_for(static_cast<int64_t>(n * k), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const size_t r = static_cast<size_t>(t) / n, i = static_cast<size_t>(t) % n;
        T acc = in[0][r * n + i];
        for (size_t j = 1; j < k; ++j) acc = combine(acc, in[j][r * n + i], op);
        out[r][i] = acc;
      }
    });
  });
}

void broadcast(OpCtx& c) {
  const size_t esize = c.n(0), n = c.n(1), root = c.n(2), k = c.bufs.size();
  check(root < k, "broadcast: root is not in the group");
  const size_t bytes = mul(n, esize);
  for (size_t r = 0; r < k; ++r) c.need(r, n, esize);
  for (size_t r = 0; r < k; ++r)
    if (r != root) std::memcpy(c.bufs[r].ptr, c.bufs[root].ptr, bytes);
}

MAGIX_REGISTER_OP("cpu", "all_reduce", all_reduce);
MAGIX_REGISTER_OP("cpu", "all_gather", all_gather);
MAGIX_REGISTER_OP("cpu", "reduce_scatter", reduce_scatter);
MAGIX_REGISTER_OP("cpu", "broadcast", broadcast);

}  // namespace
}  // namespace magix::cpu
