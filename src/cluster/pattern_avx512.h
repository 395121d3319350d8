// Internal to cluster/: AVX-512 versions of the host loops of the pattern index
// (pattern_index_host.cpp) for the bf16 cluster dtype, the default, of bf16 weights and of fp32
// ones (the master weights of training), with or without row scale. Sixteen weights at a time,
// each table lookup one gather: the scalar loops spend most of their time on the lookups. The
// arithmetic and the rounding are the scalar loops' own, lane by lane: division by the scale,
// product, then sum, in fp32; bf16_bits() for every rounding to bf16, so that both give the same
// bits. Callers check cpu_has_avx512bw() first; each loop does the leading multiple of 16 of a
// row and returns how far it got, the scalar loop finishing the row.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

namespace edkm::detail {
// Internal linkage, as in the one file that includes this header: it leaves GCC free to
// specialise the loops for their call sites (constant propagation), which the timings rely on.
namespace {

// The (weight, rounding) types these loops serve.
template <typename W, typename R>
constexpr bool kVectorised = std::is_same_v<R, c10::BFloat16> &&
                             (std::is_same_v<W, c10::BFloat16> || std::is_same_v<W, float>);

// bf16_bits() of 16 floats, in 32-bit lanes.
__attribute__((target("avx512f,avx512bw"))) inline __m512i bf16_bits16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

__attribute__((target("avx512f,avx512bw"))) inline __m512i load_u16x16(const void* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
}

template <typename W>
__attribute__((target("avx512f,avx512bw"))) inline __m512 load16(const W* p) {
  if constexpr (std::is_same_v<W, float>) return _mm512_loadu_ps(p);
  else return _mm512_castsi512_ps(_mm512_slli_epi32(load_u16x16(p), 16));
}

template <typename W>
__attribute__((target("avx512f,avx512bw"))) inline void store16(W* p, __m512 v) {
  if constexpr (std::is_same_v<W, float>) _mm512_storeu_ps(p, v);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits16(v)));
}

// pattern_of() for 16 weights: a bf16 weight without scale is its own pattern.
template <typename W, bool kScaled>
__attribute__((target("avx512f,avx512bw"))) inline __m512i patterns16(const W* w, __m512 s) {
  if constexpr (std::is_same_v<W, c10::BFloat16> && !kScaled) {
    return load_u16x16(w);
  } else {
    __m512 x = load16(w);
    if constexpr (kScaled) x = _mm512_div_ps(x, s);
    return bf16_bits16(x);
  }
}

// The streaming loops prefetch their inputs 1 KB ahead, a cache line at a time, which the
// hardware prefetchers alone do not (BENCHMARKS.md, "Pattern index: design measurements"). The
// scatter loops, bound by their stores, are faster without it.
template <typename W>
__attribute__((target("avx512f,avx512bw"))) inline void prefetch_ahead(const W* p, int64_t c) {
  constexpr int64_t kAhead = 1024 / sizeof(W), kLine = 64 / sizeof(W);
  if (c % kLine == 0) _mm_prefetch(reinterpret_cast<const char*>(p + c + kAhead), _MM_HINT_T0);
}

// out[c] = table[p(w[c])] (* s) in W for the leading multiple of 16 of n; returns how many were
// done.
template <typename W, bool kScaled>
__attribute__((target("avx512f,avx512bw"))) int64_t emit_avx512(const W* w, float s, const float* table, W* out,
                                                                int64_t n) {
  const __m512 sv = _mm512_set1_ps(s);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    prefetch_ahead(w, c);
    __m512 y = _mm512_i32gather_ps(patterns16<W, kScaled>(w + c, sv), table, 4);
    if constexpr (kScaled) y = _mm512_mul_ps(y, sv);
    store16(out + c, y);
  }
  return c;
}

// out[c] = jac[p] * g[c] + h[p] (/ s), p = p(w[c]), likewise.
template <typename W, bool kScaled>
__attribute__((target("avx512f,avx512bw"))) int64_t input_grad_avx512(const W* w, const W* g, float s,
                                                                      const float* jac, const float* h, W* out,
                                                                      int64_t n) {
  const __m512 sv = _mm512_set1_ps(s);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    prefetch_ahead(w, c);
    prefetch_ahead(g, c);
    const __m512i p = patterns16<W, kScaled>(w + c, sv);
    __m512 palette_path = _mm512_i32gather_ps(p, h, 4);
    if constexpr (kScaled) palette_path = _mm512_div_ps(palette_path, sv);
    store16(out + c, _mm512_add_ps(_mm512_mul_ps(_mm512_i32gather_ps(p, jac, 4), load16(g + c)), palette_path));
  }
  return c;
}

// out[c] = p(w[c]) for the leading multiple of 16 of n, likewise.
template <typename W, bool kScaled>
__attribute__((target("avx512f,avx512bw"))) int64_t patterns_avx512(const W* w, float s, uint16_t* out, int64_t n) {
  const __m512 sv = _mm512_set1_ps(s);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    prefetch_ahead(w, c);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), _mm512_cvtepi32_epi16(patterns16<W, kScaled>(w + c, sv)));
  }
  return c;
}

}  // namespace
}  // namespace edkm::detail
