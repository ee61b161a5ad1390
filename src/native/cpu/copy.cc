// Data movement on the CPU backend:
//   fill(dst; dtype, n, v):               dst[i] = v                        for i < n
//   cast(src, dst; from, to, n):          dst[i] = convert(src[i])          (bf16/f16 round to nearest even)
//   copy_box(src, dst; esize, box...):    dst[dstStart + j] = src[srcStart + j] for j in the box
// src and dst of copy_box may live on different virtual devices: all are host memory.
#include <cstring>

#include "../common/backend.h"
#include "../common/box.h"
#include "elementwise.h"
#include "threadpool.h"

namespace magix::cpu {
namespace {

void fill(OpCtx& c) {
  const DType t = to_dtype(c.f(0));
  const size_t n = c.n(1);
  const double v = c.f(2);
  const BufRef& dst = c.need(0, n, dtype_size(t));
  if (t == DType::F32) {
    float* p = dst.as<float>();
    const float fv = static_cast<float>(v);
    parallel_for(static_cast<int64_t>(n), 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) p[i] = fv;
    });
    return;
  }
  parallel_for(static_cast<int64_t>(n), 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) store_from_double(dst.ptr, static_cast<size_t>(i), t, v);
  });
}

void cast(OpCtx& c) {
  const DType from = to_dtype(c.f(0)), to = to_dtype(c.f(1));
  const size_t n = c.n(2);
  const BufRef& src = c.need(0, n, dtype_size(from));
  const BufRef& dst = c.need(1, n, dtype_size(to));
  if (from == to) {
    std::memmove(dst.ptr, src.ptr, n * dtype_size(from));
    return;
  }
  if (from == DType::F32 && to == DType::BF16) {
    const float* s = src.as<float>();
    uint16_t* d = dst.as<uint16_t>();
    parallel_for(static_cast<int64_t>(n), 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) d[i] = f32_to_bf16(s[i]);
    });
    return;
  }
  if (from == DType::BF16 && to == DType::F32) {
    const uint16_t* s = src.as<uint16_t>();
    float* d = dst.as<float>();
    parallel_for(static_cast<int64_t>(n), 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) d[i] = bf16_to_f32(s[i]);
    });
    return;
  }
  parallel_for(static_cast<int64_t>(n), 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      store_from_double(dst.ptr, static_cast<size_t>(i), to, load_as_double(src.ptr, static_cast<size_t>(i), from));
  });
}

void copy_box(OpCtx& c) {
  const size_t esize = c.n(0);
  check(esize == 1 || esize == 2 || esize == 4 || esize == 8, "copy_box: element size must be 1, 2, 4 or 8");
  BoxCopy b = parse_box(c.args, c.nargs, 1, esize, "copy_box");
  const BufRef& src = c.buf(0);
  const BufRef& dst = c.buf(1);
  check(box_array_bytes(b.src_shape, esize) <= src.bytes, "copy_box: source shape is larger than its buffer");
  check(box_array_bytes(b.dst_shape, esize) <= dst.bytes, "copy_box: destination shape is larger than its buffer");
  const char* s = src.as<const char>();
  char* d = dst.as<char>();
  for_each_box_run(b, [&](size_t so, size_t dof, size_t len) { std::memmove(d + dof, s + so, len); });
}

MAGIX_REGISTER_OP("cpu", "fill", fill);
MAGIX_REGISTER_OP("cpu", "cast", cast);
MAGIX_REGISTER_OP("cpu", "copy_box", copy_box);

}  // namespace
}  // namespace magix::cpu
