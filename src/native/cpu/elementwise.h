// Reading and writing any dtype element as double: used by the dtype-generic CPU ops
// (fill, cast) where speed matters less than covering every type.
#pragma once
#include <cstdint>
#include <cstring>

#include "../common/dtype.h"

namespace magix::cpu {

inline double load_as_double(const void* base, size_t i, DType t) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(base)[i];
    case DType::F64: return static_cast<const double*>(base)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::I32: return static_cast<const int32_t*>(base)[i];
    case DType::I64: return static_cast<double>(static_cast<const int64_t*>(base)[i]);
    case DType::U8: case DType::BOOL: return static_cast<const uint8_t*>(base)[i];
    case DType::I8: return static_cast<const int8_t*>(base)[i];
    case DType::I16: return static_cast<const int16_t*>(base)[i];
  }
  return 0;
}

inline void store_from_double(void* base, size_t i, DType t, double v) {
  switch (t) {
    case DType::F32: static_cast<float*>(base)[i] = static_cast<float>(v); break;
    case DType::F64: static_cast<double*>(base)[i] = v; break;
    case DType::BF16: static_cast<uint16_t*>(base)[i] = f32_to_bf16(static_cast<float>(v)); break;
    case DType::F16: static_cast<uint16_t*>(base)[i] = f32_to_f16(static_cast<float>(v)); break;
    case DType::I32: static_cast<int32_t*>(base)[i] = static_cast<int32_t>(v); break;
    case DType::I64: static_cast<int64_t*>(base)[i] = static_cast<int64_t>(v); break;
    case DType::U8: static_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(v); break;
    case DType::BOOL: static_cast<uint8_t*>(base)[i] = v != 0 ? 1 : 0; break;
    case DType::I8: static_cast<int8_t*>(base)[i] = static_cast<int8_t>(v); break;
    case DType::I16: static_cast<int16_t*>(base)[i] = static_cast<int16_t>(v); break;
  }
}

}  // namespace magix::cpu
