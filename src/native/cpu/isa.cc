#include "isa.h"

#include <cstdlib>
#include <string>

namespace magix::cpu {

Isa isa() {
  static const Isa level = [] {
    __builtin_cpu_init();
    const char* env = std::getenv("MAGIX_CPU_ISA");
    const std::string cap = env ? env : "";
    const bool v4 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                    __builtin_cpu_supports("avx512cd");
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("movbe");
    if (v4 && v3 && cap != "avx2" && cap != "base") return Isa::Avx512;
    if (v3 && cap != "base") return Isa::Avx2;
    return Isa::Base;
  }();
  return level;
}

}  // namespace magix::cpu
