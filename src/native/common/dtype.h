// Element types shared by every backend. The numbering is part of the TypeScript contract
// (src/core/dtype.ts): change both together.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "error.h"

namespace magix {

enum class DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3, I32 = 4, I64 = 5, U8 = 6, BOOL = 7, I8 = 8, I16 = 9 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: case DType::I32: return 4;
    case DType::F64: case DType::I64: return 8;
    case DType::BF16: case DType::F16: case DType::I16: return 2;
    case DType::U8: case DType::BOOL: case DType::I8: return 1;
  }
  invalid("unknown dtype");
}

inline DType to_dtype(double code) {
  int c = static_cast<int>(code);
  if (c < 0 || c > 9 || c != code) invalid("unknown dtype code " + std::to_string(code));
  return static_cast<DType>(c);
}

// bfloat16 <-> float32 with round-to-nearest-even, NaN kept quiet.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half <-> float32, round-to-nearest-even; used only for reading and writing files.
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

}  // namespace magix
