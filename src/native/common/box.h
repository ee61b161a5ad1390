// Copying an n-dimensional box between two row-major arrays: the shard <-> slice traffic of
// placement, gathering, resharding and checkpoints. Every index is checked before any byte moves.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace magix {

struct BoxCopy {
  size_t elem_size = 0;
  std::vector<int64_t> src_shape, src_start, dst_shape, dst_start, box;
};

// Parses `rank, srcShape[rank], srcStart[rank], dstShape[rank], dstStart[rank], box[rank]` from
// args[first...] and checks that the box lies inside both arrays.
BoxCopy parse_box(const double* args, size_t nargs, size_t first, size_t elem_size, const char* what);

// Bytes an array of this shape occupies.
size_t box_array_bytes(const std::vector<int64_t>& shape, size_t elem_size);

// Calls run(src_offset_bytes, dst_offset_bytes, length_bytes) for each contiguous run of the box.
template <typename Run>
void for_each_box_run(const BoxCopy& b, Run run) {
  const size_t rank = b.box.size();
  for (int64_t d : b.box)
    if (d == 0) return;
  // Merge trailing dimensions where the box spans the whole of both arrays: longer runs.
  size_t inner = rank;  // dims [inner, rank) form one contiguous run
  int64_t run_elems = 1;
  while (inner > 0) {
    size_t d = inner - 1;
    run_elems *= b.box[d];
    inner = d;
    if (!(b.box[d] == b.src_shape[d] && b.box[d] == b.dst_shape[d] && b.src_start[d] == 0 && b.dst_start[d] == 0))
      break;
  }
  std::vector<int64_t> src_stride(rank, 1), dst_stride(rank, 1);
  for (size_t d = rank; d-- > 1;) {
    src_stride[d - 1] = src_stride[d] * b.src_shape[d];
    dst_stride[d - 1] = dst_stride[d] * b.dst_shape[d];
  }
  std::vector<int64_t> idx(inner, 0);
  const size_t run_bytes = static_cast<size_t>(run_elems) * b.elem_size;
  for (;;) {
    int64_t so = 0, dof = 0;
    for (size_t d = 0; d < rank; ++d) {
      int64_t i = d < inner ? idx[d] : 0;
      so += (b.src_start[d] + i) * src_stride[d];
      dof += (b.dst_start[d] + i) * dst_stride[d];
    }
    run(static_cast<size_t>(so) * b.elem_size, static_cast<size_t>(dof) * b.elem_size, run_bytes);
    size_t d = inner;
    while (d > 0) {
      --d;
      if (++idx[d] < b.box[d]) break;
      idx[d] = 0;
      if (d == 0) return;
    }
    if (inner == 0) return;
  }
}

}  // namespace magix
