#include "cluster/value_index.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu.h"
#include "common/error.h"

namespace edkm::detail {
namespace {

constexpr int64_t kPatterns = 65536;
// Weights a thread adds into its fp32 gradient-sum tables between flushes into fp64.
constexpr int64_t kSumWindow = int64_t(1) << 20;
// Rows per chunk of the ATen passes: about a million weights at a time bounds the temporaries.
int64_t chunk_rows(int64_t cols) { return std::max<int64_t>(1, (int64_t(1) << 20) / cols); }

// ---------------------------------------------------------------------------------------------
// Shared ATen helpers.

// dL/dw = J^T G + h / s for a chunk of vectors. jac [V, d, d], grad [V, d], h [V, d] in the
// compute dtype; s [rows_c] or undefined, the chunk being rows_c whole rows.
at::Tensor combine_grad(const at::Tensor& jac, const at::Tensor& grad, const at::Tensor& h,
                        const at::Tensor& s, int64_t rows_c) {
  at::Tensor direct = jac.size(-1) == 1 ? jac.view({-1, 1}) * grad
                                        : at::matmul(jac, grad.unsqueeze(-1)).squeeze(-1);
  at::Tensor palette_path = h;
  if (s.defined()) palette_path = (h.reshape({rows_c, -1}) / s.unsqueeze(1)).view_as(h);
  return direct + palette_path;
}

// The message for non-finite values after scaling and rounding: NaN/Inf in the weight itself,
// or finite values beyond the range of the cluster dtype.
[[noreturn]] void throw_nonfinite(const at::Tensor& weight, at::ScalarType rounding) {
  check_finite(weight, "weight");
  throw_invalid("weight values overflow the cluster dtype {} after scaling (largest finite {})",
                c10::toString(rounding), rounding == at::kHalf ? "65504" : "3.39e38");
}

// ---------------------------------------------------------------------------------------------
// Pattern index: 16-bit cluster dtypes, scalar clustering.
//
// Every pass first spreads the per-value table over all 65,536 patterns of each group
// (O(G * 65536), independent of N), so the per-weight loop is one lookup. The loops are
// specialised on the weight type W, the rounding type R and whether rows are scaled; a bf16
// weight clustered in bf16 without scale is its own pattern.

template <typename W>
using acc_t = std::conditional_t<std::is_same_v<W, double>, double, float>;

template <typename T>
uint16_t bits_of(T v) {
  return v.x;
}

// float -> bf16 round-to-nearest-even, bit-identical to c10::BFloat16(float) (NaN -> 0x7FC0),
// written without a branch so the loop stays tight.
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(r);
}

template <typename R>
uint16_t round_bits(float f) {
  if constexpr (std::is_same_v<R, c10::BFloat16>) return bf16_bits(f);
  else return R(f).x;
}

template <typename W>
W from_acc(acc_t<W> v) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) return W(bf16_bits(v), W::from_bits());
  else return static_cast<W>(v);
}

// The pattern of round_R(w / s), exactly as prepare() computes it with ATen ops: division in
// the compute dtype, then a cast (through fp32) to the rounding dtype.
template <typename W, typename R, bool kScaled>
uint16_t pattern_of(W w, acc_t<W> s) {
  if constexpr (std::is_same_v<W, R> && !kScaled) {
    return bits_of(w);
  } else {
    acc_t<W> x = static_cast<acc_t<W>>(w);
    if constexpr (kScaled) x = x / s;
    return round_bits<R>(static_cast<float>(x));
  }
}

// AVX-512 loops for the bf16 cluster dtype (the default) of bf16 weights and of fp32 ones (the
// master weights of training), with or without row scale: sixteen weights at a time, each
// table lookup one gather (the scalar loops spend ~2.5 cycles per weight, most of it on the
// lookups). The arithmetic and the rounding are the scalar loops' own, lane by lane: division
// by the scale, product, then sum, in fp32; bf16_bits() for every rounding to bf16.
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

// The streaming loops prefetch their inputs 1 KB ahead, a cache line at a time: the hardware
// prefetchers alone left them 20-30% slower (4096x11008, 2 threads: emit 7.7 ms against 10.9
// and gradient 11.3 against 13.7 for bf16 weights in isolation; the histogram of fp32 weights,
// whose patterns are computed in a pass of their own, 14.4 against 17.0 in place). The
// scatter loops themselves, bound by their stores, got slower with it.
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

template <typename R>
constexpr uint16_t exponent_mask() {
  return std::is_same_v<R, c10::Half> ? 0x7C00 : 0x7F80;
}

class PatternIndex final : public ValueIndex {
 public:
  PatternIndex(const at::Tensor& weight, const GroupLayout& layout, const at::Tensor& scale,
               at::ScalarType rounding, Kernels kernels)
      : weight_(weight.contiguous()),
        layout_(layout),
        scale_(scale),
        rounding_(rounding),
        cpu_kernels_(kernels == Kernels::kAuto && weight.device().is_cpu()) {
    build_tables(histogram());
  }

  at::Tensor emit(const at::Tensor& table) const override {
    at::Tensor lut = spread(table);  // [G * 65536], compute dtype
    at::Tensor out = at::empty_like(weight_);
    if (cpu_kernels_) {
      // Without scale the output is the table itself in the weight's dtype: one load per weight.
      at::Tensor narrow_lut = scale_.defined() ? lut : lut.to(weight_.scalar_type());
      dispatch([&](auto w_tag, auto r_tag, auto scaled_tag) {
        using W = decltype(w_tag);
        using R = decltype(r_tag);
        constexpr bool kScaled = decltype(scaled_tag)::value;
        using L = std::conditional_t<kScaled, acc_t<W>, W>;
        const L* lp = narrow_lut.data_ptr<L>();
        const float* lut32 = nullptr;  // the fp32 table, for the AVX-512 loop
        if constexpr (kVectorised<W, R>) lut32 = cpu_has_avx512bw() ? lut.data_ptr<float>() : nullptr;
        W* o = out.data_ptr<W>();
        for_each_row<W>([&](int64_t r, int64_t g, acc_t<W> s, const W* w) {
          const L* lg = lp + g * kPatterns;
          W* orow = o + r * layout_.cols;
          int64_t c = 0;
          if constexpr (kVectorised<W, R>)
            if (lut32) c = emit_avx512<W, kScaled>(w, s, lut32 + g * kPatterns, orow, layout_.cols);
          for (; c < layout_.cols; ++c) {
            if constexpr (kScaled) orow[c] = from_acc<W>(lg[pattern_of<W, R, true>(w[c], s)] * s);
            else orow[c] = lg[pattern_of<W, R, false>(w[c], s)];
          }
        });
      });
      return out;
    }
    at::Tensor out2d = out.view({layout_.rows, layout_.cols});
    for_each_chunk([&](int64_t r0, int64_t rc, const at::Tensor& keys, const at::Tensor& s) {
      at::Tensor y = lut.index_select(0, keys).view({rc, layout_.cols});
      if (s.defined()) y = y * s.unsqueeze(1);
      out2d.narrow(0, r0, rc).copy_(y);
    });
    return out;
  }

  at::Tensor aggregate(const at::Tensor& grad) const override {
    at::Tensor gr = grad.contiguous().view(weight_.sizes());
    at::Tensor compact = at::zeros({layout_.groups * umax_}, weight_.options().dtype(at::kDouble));
    if (cpu_kernels_) {
      // Straight into the [G * U] rows: only the patterns the forward found can occur.
      auto present = [&](int64_t g, auto&& f) {
        for (int64_t i = group_begin_[g]; i < group_begin_[g + 1]; ++i) f(patterns_[i], i - group_begin_[g]);
      };
      dispatch([&](auto w_tag, auto r_tag, auto scaled_tag) {
        using W = decltype(w_tag);
        using R = decltype(r_tag);
        using A = acc_t<W>;
        constexpr bool kScaled = decltype(scaled_tag)::value;
        const W* gptr = gr.data_ptr<W>();
        auto sum_in = [&](auto table_tag) {
          using T = decltype(table_tag);
          accumulate_rows<T, W, R, kScaled>(compact.data_ptr<double>(), umax_, kSumWindow, present,
                                            [&](int64_t r, A s, int64_t c) {
                                              A v = static_cast<A>(gptr[r * layout_.cols + c]);
                                              if constexpr (kScaled) v = v * s;
                                              return v;
                                            });
        };
        if (dominant_) sum_in(double{});
        else sum_in(A{});
      });
      return compact.view({layout_.groups, umax_, 1});
    }
    at::Tensor acc = at::zeros({layout_.groups * kPatterns}, compact.options());
    at::Tensor g2d = gr.view({layout_.rows, layout_.cols});
    for_each_chunk([&](int64_t r0, int64_t rc, const at::Tensor& keys, const at::Tensor& s) {
      at::Tensor v = g2d.narrow(0, r0, rc).to(compute_dtype(weight_));
      if (s.defined()) v = v * s.unsqueeze(1);
      acc.index_add_(0, keys, v.reshape({-1}).to(at::kDouble));
    });
    compact.index_put_({slot_}, acc.index_select(0, present_));
    return compact.view({layout_.groups, umax_, 1});
  }

  at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& jac,
                        const at::Tensor& h) const override {
    at::Tensor lj = spread(jac), lh = spread(h);
    at::Tensor out = at::empty_like(weight_);
    at::Tensor gr = grad.contiguous().view(weight_.sizes());
    if (cpu_kernels_) {
      dispatch([&](auto w_tag, auto r_tag, auto scaled_tag) {
        using W = decltype(w_tag);
        using R = decltype(r_tag);
        using A = acc_t<W>;
        constexpr bool kScaled = decltype(scaled_tag)::value;
        const A* jp = lj.data_ptr<A>();
        const A* hp = lh.data_ptr<A>();
        const W* gptr = gr.data_ptr<W>();
        W* o = out.data_ptr<W>();
        for_each_row<W>([&](int64_t r, int64_t g, A s, const W* w) {
          const A* jg = jp + g * kPatterns;
          const A* hg = hp + g * kPatterns;
          const W* gw = gptr + r * layout_.cols;
          W* orow = o + r * layout_.cols;
          int64_t c = 0;
          if constexpr (kVectorised<W, R>)
            if (cpu_has_avx512bw()) c = input_grad_avx512<W, kScaled>(w, gw, s, jg, hg, orow, layout_.cols);
          for (; c < layout_.cols; ++c) {
            const uint16_t p = pattern_of<W, R, kScaled>(w[c], s);
            A palette_path = hg[p];
            if constexpr (kScaled) palette_path = palette_path / s;
            orow[c] = from_acc<W>(jg[p] * static_cast<A>(gw[c]) + palette_path);
          }
        });
      });
      return out;
    }
    at::Tensor g2d = gr.view({layout_.rows, layout_.cols});
    at::Tensor out2d = out.view({layout_.rows, layout_.cols});
    for_each_chunk([&](int64_t r0, int64_t rc, const at::Tensor& keys, const at::Tensor& s) {
      at::Tensor gv = g2d.narrow(0, r0, rc).to(compute_dtype(weight_)).reshape({-1, 1});
      at::Tensor r = combine_grad(lj.index_select(0, keys).view({-1, 1, 1}), gv,
                                  lh.index_select(0, keys).view({-1, 1}), s, rc);
      out2d.narrow(0, r0, rc).copy_(r.view({rc, layout_.cols}));
    });
    return out;
  }

 private:
  // A [G, U, ...] per-value table laid out per pattern: [G * 65536] (absent patterns: 0).
  at::Tensor spread(const at::Tensor& table) const {
    at::Tensor flat = table.contiguous().view({-1});
    return at::zeros({layout_.groups * kPatterns}, flat.options()).index_put_({present_}, flat.index_select(0, slot_));
  }

  template <typename A>
  A row_scale(int64_t r) const {
    return scale_.defined() ? static_cast<A>(scale_.data_ptr<float>()[r]) : A(1);
  }
  int64_t row_grain() const { return std::max<int64_t>(1, 16384 / layout_.cols); }

  // Calls f(W{}, R{}, std::integral_constant<bool, scaled>{}) with the weight's element type,
  // the rounding type and whether rows are scaled.
  template <typename F>
  void dispatch(F&& f) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight_.scalar_type(), "pattern_index", [&] {
      auto with_scale = [&](auto r_tag) {
        if (scale_.defined()) f(scalar_t{}, r_tag, std::true_type{});
        else f(scalar_t{}, r_tag, std::false_type{});
      };
      if (rounding_ == at::kHalf) with_scale(c10::Half{});
      else with_scale(c10::BFloat16{});
    });
  }

  // Parallel over row ranges: f(r0, r1, row) where row(r) gives {group, scale, weight row}.
  template <typename W, typename F>
  void for_each_row_range(F&& f) const {
    const W* w = weight_.data_ptr<W>();
    auto row = [&](int64_t r) {
      return std::make_tuple(r / layout_.rows_per_group, row_scale<acc_t<W>>(r), w + r * layout_.cols);
    };
    at::parallel_for(0, layout_.rows, row_grain(), [&](int64_t r0, int64_t r1) { f(r0, r1, row); });
  }

  // The patterns of n weights of a row: a 16-bit weight clustered in its own dtype without
  // scale is its own pattern; otherwise they are computed into buf.
  template <typename W, typename R, bool kScaled>
  static const uint16_t* row_patterns(const W* w, acc_t<W> s, int64_t n, uint16_t* buf) {
    if constexpr (std::is_same_v<W, R> && !kScaled) {
      return &w->x;
    } else {
      int64_t c = 0;
      if constexpr (kVectorised<W, R>)
        if (cpu_has_avx512bw()) c = patterns_avx512<W, kScaled>(w, s, buf, n);
      for (; c < n; ++c) buf[c] = pattern_of<W, R, kScaled>(w[c], s);
      return buf;
    }
  }

  // Scatter-accumulation over rows into per-pattern tables (the histogram and the gradient sum):
  // each weight adds value(row, scale, column) to the entry of its pattern. Where the pattern is
  // not the weight's own bits, a chunk of each row's patterns is computed first (with AVX-512
  // where the loops above apply: fp32 weights, or scaled ones), then added.
  //
  // The loop is bound by its read-modify-writes (one store per weight), by the CPU's guesses
  // about which load depends on which earlier store, and by how much of the tables stays in the
  // L1 cache. Measured on a 4096x11008 bf16 matrix, 2 threads:
  //   - four rows at a time, interleaved, each into a table ("way") of its own: the rows'
  //     independent updates overlap, and runs of equal patterns within a row do not serialise
  //     on store-to-load forwarding. In place, the index took 8.9 ms and the sums 11.4, against
  //     9.7 and 13.2 with two rows at a time over two ways each (8.0 and 10.6 against 11.4 and
  //     13.5 in isolation). For an all-zero weight, the worst case, the sums took 47 ms in
  //     isolation with one table for all rows, and take 16 in place with the four ways;
  //   - the ways of one pattern side by side (entry p * kWays + k), so that the hot patterns of
  //     a bell-shaped weight share cache lines;
  //   - fp32 tables for the sums of 16-bit and fp32 weights: the ~1,500 patterns that hold 96% of
  //     a N(0, 0.02) bf16 weight then take 24 KB, in L1, against 48 KB in fp64 (sums 11.4 ms
  //     against 13.9 in place). They are flushed into the fp64 totals every `window` weights.
  //     Where no value holds more than 1/256 of a group's weights, an entry then adds about
  //     1,000 gradients or fewer in fp32 between flushes (1e-8..1e-6 from the fp64 sums, as
  //     PatternIndex tests measure); where one value does (pruned zeros, a constant weight), its
  //     entry could add 2^18 and fp32 would drift by up to 0.3%, so those weights keep fp64
  //     tables (`dominant_`).
  //
  // Each thread covers a range of rows and flushes its tables into total[group] when the group
  // changes and every `window` weights: no per-weight atomics. visit(g, f) calls
  // f(pattern, entry) for every pattern that group g may hold, entry being its place in
  // total + g * width; only those table entries are cleared and flushed (all 65,536 for the
  // histogram, the U present ones for the sums).
  static constexpr int kWays = 4;
  static constexpr int64_t kChunk = 512;  // columns whose patterns are computed at a time
  template <typename T, typename W, typename R, bool kScaled, typename Total, typename Visit, typename Value>
  void accumulate_rows(Total* total, int64_t width, int64_t window, Visit&& visit, Value&& value) const {
    const int64_t cols = layout_.cols;
    // A thread's first group may continue the previous thread's last: that one goes to a side
    // table, added in row order after the loop, so that floating-point sums do not depend on
    // which thread finishes first. Every other group belongs to one thread alone.
    std::mutex mu;
    std::map<int64_t, std::vector<Total>> shared_first;  // by first row
    for_each_row_range<W>([&](int64_t r0, int64_t r1, auto&& row) {
      std::unique_ptr<T[]> local(new T[kWays * kPatterns]);  // entries outside visit() unused
      T* t = local.get();
      std::vector<uint16_t> patterns(kWays * kChunk);
      int64_t cur = r0 / layout_.rows_per_group;
      const bool continues = r0 % layout_.rows_per_group != 0;
      std::vector<Total> side(continues ? width : 0, Total(0));
      auto clear = [&] {
        visit(cur, [&](int64_t p, int64_t) {
          for (int k = 0; k < kWays; ++k) t[p * kWays + k] = T(0);
        });
      };
      // Adds the tables into the totals and clears them.
      auto flush = [&] {
        Total* dst = continues && cur == r0 / layout_.rows_per_group ? side.data() : total + cur * width;
        visit(cur, [&](int64_t p, int64_t e) {
          Total sum = 0;
          for (int k = 0; k < kWays; ++k) {
            sum += static_cast<Total>(t[p * kWays + k]);
            t[p * kWays + k] = T(0);
          }
          dst[e] += sum;
        });
      };
      // M rows of one group at once, interleaved column by column: row i adds into ways
      // i, i + M, ... in turn, so that every M covers all kWays ways.
      auto add_rows = [&](auto m_tag, int64_t r) {
        constexpr int M = decltype(m_tag)::value;
        constexpr int kTurns = kWays / M;
        acc_t<W> s[M];
        const W* w[M];
        for (int i = 0; i < M; ++i) std::tie(std::ignore, s[i], w[i]) = row(r + i);
        for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
          const int64_t len = std::min(kChunk, cols - c0);
          const uint16_t* pat[M];
          for (int i = 0; i < M; ++i) pat[i] = row_patterns<W, R, kScaled>(w[i] + c0, s[i], len, &patterns[i * kChunk]);
          auto add = [&](int way, int i, int64_t c) { t[pat[i][c] * kWays + way] += value(r + i, s[i], c0 + c); };
          int64_t c = 0;
          for (; c + kTurns <= len; c += kTurns)
            for (int q = 0; q < kTurns; ++q)
              for (int i = 0; i < M; ++i) add(i + M * q, i, c + q);
          for (; c < len; ++c)
            for (int i = 0; i < M; ++i) add(i, i, c);
        }
      };
      clear();
      int64_t pending = 0;  // weights added since the last flush
      for (int64_t r = r0; r < r1;) {
        const int64_t g = r / layout_.rows_per_group;
        if (g != cur) {
          flush();
          cur = g;
          clear();
          pending = 0;
        } else if (pending >= window) {
          flush();
          pending = 0;
        }
        const int64_t m = std::min({int64_t(kWays), r1 - r, (g + 1) * layout_.rows_per_group - r});
        switch (m) {
          case 4: add_rows(std::integral_constant<int, 4>{}, r); break;
          case 3: add_rows(std::integral_constant<int, 3>{}, r); break;
          case 2: add_rows(std::integral_constant<int, 2>{}, r); break;
          default: add_rows(std::integral_constant<int, 1>{}, r); break;
        }
        r += m;
        pending += m * cols;
      }
      flush();
      if (continues) {
        std::lock_guard<std::mutex> lock(mu);
        shared_first.emplace(r0, std::move(side));
      }
    });
    for (const auto& [r0, side] : shared_first) {
      Total* dst = total + (r0 / layout_.rows_per_group) * width;
      for (int64_t e = 0; e < width; ++e) dst[e] += side[e];
    }
  }

  // Parallel loop over rows: f(row, group, scale, weight row pointer).
  template <typename W, typename F>
  void for_each_row(F&& f) const {
    for_each_row_range<W>([&](int64_t r0, int64_t r1, auto&& row) {
      for (int64_t r = r0; r < r1; ++r) {
        auto [g, s, w] = row(r);
        f(r, g, s, w);
      }
    });
  }

  // ATen path: f(first row, row count, keys g * 65536 + pattern [rc * cols], scale of the rows).
  template <typename F>
  void for_each_chunk(F&& f) const {
    const int64_t step = chunk_rows(layout_.cols);
    at::Tensor w2d = weight_.view({layout_.rows, layout_.cols});
    for (int64_t r0 = 0; r0 < layout_.rows; r0 += step) {
      const int64_t rc = std::min(step, layout_.rows - r0);
      at::Tensor s = scale_.defined() ? scale_.narrow(0, r0, rc) : at::Tensor();
      at::Tensor x = w2d.narrow(0, r0, rc).to(compute_dtype(weight_));
      if (s.defined()) x = x / s.unsqueeze(1);
      at::Tensor p = x.to(rounding_).view(at::kShort).to(at::kLong).bitwise_and(0xFFFF);
      at::Tensor group = at::arange(r0, r0 + rc, p.options()).div(layout_.rows_per_group, "floor");
      f(r0, rc, (p + (group * kPatterns).unsqueeze(1)).view({-1}), s);
    }
  }

  at::Tensor histogram() const {
    at::Tensor hist = at::zeros({layout_.groups * kPatterns}, weight_.options().dtype(at::kLong));
    if (cpu_kernels_) {
      dispatch([&](auto w_tag, auto r_tag, auto scaled_tag) {
        using W = decltype(w_tag);
        using R = decltype(r_tag);
        constexpr bool kScaled = decltype(scaled_tag)::value;
        auto all = [](int64_t, auto&& f) {
          for (int64_t p = 0; p < kPatterns; ++p) f(p, p);
        };
        // uint32 counts cannot overflow within 2^31 weights.
        accumulate_rows<uint32_t, W, R, kScaled>(hist.data_ptr<int64_t>(), kPatterns, int64_t(1) << 31, all,
                                                 [](int64_t, acc_t<W>, int64_t) { return uint32_t(1); });
      });
      return hist;
    }
    for_each_chunk([&](int64_t, int64_t, const at::Tensor& keys, const at::Tensor&) {
      hist.index_add_(0, keys, at::ones_like(keys));
    });
    return hist;
  }

  // From the histogram [G * 65536]: the patterns that occur, their rows in the [G * U] tables,
  // their decoded values and their counts. One loop on the host over O(G * 65536) entries:
  // the same with ~20 ATen ops took 0.5 ms per matrix, mostly dispatch.
  void build_tables(const at::Tensor& hist_on_device) {
    const at::Tensor hist = hist_on_device.cpu();
    const int64_t* count = hist.data_ptr<int64_t>();
    const int64_t G = layout_.groups;
    const uint16_t mask = rounding_ == at::kHalf ? exponent_mask<c10::Half>() : exponent_mask<c10::BFloat16>();
    const int64_t group_weights = layout_.rows_per_group * layout_.cols;
    group_begin_.assign(G + 1, 0);
    for (int64_t g = 0; g < G; ++g) {
      int64_t n = 0;
      for (int64_t p = 0; p < kPatterns; ++p) {
        const int64_t c = count[g * kPatterns + p];
        if (c == 0) continue;
        if ((p & mask) == mask) throw_nonfinite(weight_, rounding_);
        dominant_ = dominant_ || c * 256 > group_weights;
        ++n;
      }
      umax_ = std::max(umax_, n);
      group_begin_[g + 1] = group_begin_[g] + n;
    }
    const int64_t total = group_begin_[G];
    patterns_.resize(total);
    at::Tensor present = at::empty({total}, hist.options());
    at::Tensor slot = at::empty({total}, hist.options());
    at::Tensor values = at::zeros({G * umax_}, hist.options().dtype(at::kDouble));
    at::Tensor counts = at::zeros_like(values);
    int64_t *pp = present.data_ptr<int64_t>(), *sp = slot.data_ptr<int64_t>();
    double *vp = values.data_ptr<double>(), *cp = counts.data_ptr<double>();
    for (int64_t g = 0; g < G; ++g)
      for (int64_t p = 0, i = group_begin_[g]; p < kPatterns; ++p) {
        const int64_t n = count[g * kPatterns + p];
        if (n == 0) continue;
        const int64_t row = g * umax_ + (i - group_begin_[g]);
        patterns_[i] = static_cast<uint16_t>(p);
        pp[i] = g * kPatterns + p;
        sp[i] = row;
        vp[row] = rounding_ == at::kHalf ? static_cast<float>(c10::Half(p, c10::Half::from_bits()))
                                         : static_cast<float>(c10::BFloat16(p, c10::BFloat16::from_bits()));
        cp[row] = static_cast<double>(n);
        ++i;
      }
    const auto device = weight_.device();
    const auto cdt = compute_dtype(weight_);
    present_ = present.to(device);
    slot_ = slot.to(device);
    values_ = values.to(device, cdt).view({G, umax_, 1});
    counts_ = counts.to(device, cdt).view({G, umax_});
  }

  at::Tensor weight_;
  GroupLayout layout_;
  at::Tensor scale_;
  at::ScalarType rounding_;
  bool cpu_kernels_;
  int64_t umax_ = 0;
  at::Tensor present_;                 // positions in [G * 65536] of the patterns that occur
  at::Tensor slot_;                    // their rows in the flattened [G * U] tables
  std::vector<uint16_t> patterns_;     // the same patterns, on the host, group by group
  std::vector<int64_t> group_begin_;   // where each group starts in patterns_ (G + 1 entries)
  bool dominant_ = false;              // a value holds more than 1/256 of its group's weights
};

// ---------------------------------------------------------------------------------------------
// Sorted and identity indices: the prepared weight x [G, n, d] is materialised; `slot_` maps
// each vector to its row of the [G * U] tables (undefined: the identity, U = n).

class GatherIndex final : public ValueIndex {
 public:
  GatherIndex(const at::Tensor& weight, const GroupLayout& layout, const DKMConfig& cfg,
              const at::Tensor& scale, bool distinct)
      : like_(weight), layout_(layout), scale_(scale) {
    at::Tensor x;
    {
      at::NoGradGuard no_grad;
      x = prepare(weight.detach(), layout, cfg, scale);
    }
    at::ScalarType r = rounding_dtype(weight, cfg.cluster_dtype);
    if (r == at::ScalarType::Undefined) {
      check_finite(x, "weight");
    } else {
      try {
        check_finite(x, "weight");
      } catch (const std::invalid_argument&) {
        throw_nonfinite(weight, r);
      }
    }
    if (!distinct) {
      umax_ = layout.vectors;
      values_ = x;
      return;
    }
    std::vector<at::Tensor> uniq, inverse, counts;
    for (int64_t g = 0; g < layout.groups; ++g) {
      at::Tensor u, inv, cnt;
      if (layout.dim == 1) {
        std::tie(u, inv, cnt) = at::_unique2(x[g].view({-1}), true, true, true);
        u = u.unsqueeze(1);
      } else {
        std::tie(u, inv, cnt) = at::unique_dim(x[g], 0, true, true, true);
      }
      umax_ = std::max(umax_, u.size(0));
      uniq.push_back(u);
      inverse.push_back(inv.view({-1}));
      counts.push_back(cnt);
    }
    at::Tensor values = at::zeros({layout.groups, umax_, layout.dim}, x.options());
    at::Tensor cnts = at::zeros({layout.groups, umax_}, x.options());
    for (int64_t g = 0; g < layout.groups; ++g) {
      values[g].narrow(0, 0, uniq[g].size(0)).copy_(uniq[g]);
      cnts[g].narrow(0, 0, counts[g].size(0)).copy_(counts[g]);
      inverse[g] = inverse[g] + g * umax_;
    }
    values_ = values;
    counts_ = cnts;
    slot_ = at::cat(inverse);
  }

  at::Tensor emit(const at::Tensor& table) const override {
    at::Tensor y = gather(table.reshape({-1, layout_.dim}));
    return restore(y.view({layout_.groups, layout_.vectors, layout_.dim}), layout_, scale_, like_);
  }

  at::Tensor aggregate(const at::Tensor& grad) const override {
    at::Tensor g = grad.reshape({layout_.rows, layout_.cols}).to(compute_dtype(like_));
    if (scale_.defined()) g = g * scale_.unsqueeze(1);
    g = g.reshape({-1, layout_.dim});
    if (!slot_.defined()) return g.view({layout_.groups, umax_, layout_.dim});
    at::Tensor acc = at::zeros({layout_.groups * umax_, layout_.dim}, g.options().dtype(at::kDouble));
    acc.index_add_(0, slot_, g.to(at::kDouble));
    return acc.view({layout_.groups, umax_, layout_.dim});
  }

  at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& jac,
                        const at::Tensor& h) const override {
    const int64_t d = layout_.dim;
    at::Tensor g2d = grad.reshape({layout_.rows, layout_.cols});
    at::Tensor out = at::empty({layout_.rows, layout_.cols}, like_.options());
    at::Tensor jflat = jac.reshape({-1, d, d}), hflat = h.reshape({-1, d});
    const int64_t step = chunk_rows(layout_.cols);
    const int64_t per_row = layout_.cols / d;
    for (int64_t r0 = 0; r0 < layout_.rows; r0 += step) {
      const int64_t rc = std::min(step, layout_.rows - r0);
      at::Tensor idx = slot_.defined() ? slot_.narrow(0, r0 * per_row, rc * per_row)
                                       : at::arange(r0 * per_row, (r0 + rc) * per_row,
                                                    grad.options().dtype(at::kLong));
      at::Tensor s = scale_.defined() ? scale_.narrow(0, r0, rc) : at::Tensor();
      at::Tensor gv = g2d.narrow(0, r0, rc).to(compute_dtype(like_)).reshape({-1, d});
      at::Tensor r = combine_grad(jflat.index_select(0, idx), gv, hflat.index_select(0, idx), s, rc);
      out.narrow(0, r0, rc).copy_(r.view({rc, layout_.cols}));
    }
    return out.view(like_.sizes());
  }

 private:
  at::Tensor gather(const at::Tensor& rows) const {
    return slot_.defined() ? rows.index_select(0, slot_) : rows;
  }

  at::Tensor like_;
  GroupLayout layout_;
  at::Tensor scale_;
  int64_t umax_ = 0;
  at::Tensor slot_;  // [G * n] int64, or undefined for the identity
};

}  // namespace

std::unique_ptr<ValueIndex> make_pattern_index(const at::Tensor& weight, const GroupLayout& layout,
                                               const DKMConfig& cfg, const at::Tensor& scale,
                                               Kernels kernels) {
  at::ScalarType r = rounding_dtype(weight, cfg.cluster_dtype);
  if (!is_16bit(r) || layout.dim != 1)
    throw_invalid("the pattern index needs a 16-bit cluster dtype and cluster_dim 1");
  return std::make_unique<PatternIndex>(weight.detach(), layout, scale, r, kernels);
}

std::unique_ptr<ValueIndex> make_sorted_index(const at::Tensor& weight, const GroupLayout& layout,
                                              const DKMConfig& cfg, const at::Tensor& scale) {
  return std::make_unique<GatherIndex>(weight, layout, cfg, scale, /*distinct=*/true);
}

std::unique_ptr<ValueIndex> make_identity_index(const at::Tensor& weight, const GroupLayout& layout,
                                                const DKMConfig& cfg, const at::Tensor& scale) {
  return std::make_unique<GatherIndex>(weight, layout, cfg, scale, /*distinct=*/false);
}

}  // namespace edkm::detail
