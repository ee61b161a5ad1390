#include "box.h"

#include <string>

#include "error.h"

namespace magix {

size_t box_array_bytes(const std::vector<int64_t>& shape, size_t elem_size) {
  size_t n = elem_size;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

BoxCopy parse_box(const double* args, size_t nargs, size_t first, size_t elem_size, const char* what) {
  auto at = [&](size_t k) {
    check(first + k < nargs, std::string(what) + ": missing box argument");
    double v = args[first + k];
    check(v >= 0 && v == static_cast<double>(static_cast<int64_t>(v)) && v < 9.0e15,
          std::string(what) + ": box arguments must be non-negative integers");
    return static_cast<int64_t>(v);
  };
  BoxCopy b;
  b.elem_size = elem_size;
  const int64_t rank = at(0);
  check(rank <= 16, std::string(what) + ": rank above 16");
  for (int64_t d = 0; d < rank; ++d) {
    b.src_shape.push_back(at(1 + d));
    b.src_start.push_back(at(1 + rank + d));
    b.dst_shape.push_back(at(1 + 2 * rank + d));
    b.dst_start.push_back(at(1 + 3 * rank + d));
    b.box.push_back(at(1 + 4 * rank + d));
  }
  for (int64_t d = 0; d < rank; ++d) {
    check(b.src_start[d] + b.box[d] <= b.src_shape[d], std::string(what) + ": box leaves the source array");
    check(b.dst_start[d] + b.box[d] <= b.dst_shape[d], std::string(what) + ": box leaves the destination array");
  }
  return b;
}

}  // namespace magix
