// Counter-based normal numbers, the same function as src/core/random.ts: element i of stream
// `key` is a pure function of (key, i), so a device generates exactly its block of a parameter
// and every sharding (and the TypeScript reference) yields the same values.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MAGIX_HD __host__ __device__ __forceinline__
#else
#define MAGIX_HD inline
#endif

namespace magix {

MAGIX_HD uint32_t rng_mix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

MAGIX_HD double rng_uniform(uint32_t key, uint32_t counter) {
  const uint32_t a = rng_mix(key ^ rng_mix(counter));
  const uint32_t b = rng_mix(a ^ 0x9e3779b9u ^ (counter * 0x27d4eb2du));
  return ((a >> 5) * 67108864.0 + (b >> 6) + 0.5) / 9007199254740992.0;
}

MAGIX_HD double rng_normal(uint32_t key, uint64_t index) {
  const uint32_t pair = static_cast<uint32_t>(index / 2);
  const double u1 = rng_uniform(key, 2 * pair), u2 = rng_uniform(key, 2 * pair + 1);
  const double r = sqrt(-2.0 * log(u1));
  return (index % 2 == 0) ? r * cos(6.283185307179586 * u2) : r * sin(6.283185307179586 * u2);
}

}  // namespace magix
