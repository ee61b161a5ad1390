// The vector instruction set the CPU kernels run with: the widest this CPU supports, capped by
// MAGIX_CPU_ISA (avx2 or base) so tests and benchmarks can exercise the narrower code paths.
// Kernels compile an always-inline body once per level (target attributes) and dispatch on this.
#pragma once

namespace magix::cpu {

enum class Isa { Base, Avx2, Avx512 };  // x86-64-v2, x86-64-v3, x86-64-v4

Isa isa();

}  // namespace magix::cpu
