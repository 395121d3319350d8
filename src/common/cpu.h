// Instruction sets of the CPU we run on, checked once at run time: the vectorised kernels are
// compiled per function (target attributes) and chosen by these, so one binary runs anywhere.
#pragma once

namespace edkm {

inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// AVX-512 with byte/word instructions (Skylake-X and later).
inline bool cpu_has_avx512bw() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
}

// ... and the byte permutes of VBMI (Ice Lake, Zen 4 and later).
inline bool cpu_has_avx512_vbmi() {
  static const bool ok = cpu_has_avx512bw() && __builtin_cpu_supports("avx512vbmi");
  return ok;
}

}  // namespace edkm
