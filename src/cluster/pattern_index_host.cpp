// The host backend of the pattern index (pattern_index.h): parallel loops over CPU tensors,
// specialised on the weight type W, the rounding type R and whether rows are scaled. A 16-bit
// weight clustered in its own dtype without scale is its own pattern; otherwise each pass
// recomputes the patterns exactly as prepare() does with ATen ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cluster/pattern_avx512.h"
#include "cluster/pattern_index.h"
#include "common/cpu.h"
#include "common/error.h"

namespace edkm::detail {
namespace {

// Weights a thread adds into its fp32 gradient-sum tables between flushes into fp64.
constexpr int64_t kSumWindow = int64_t(1) << 20;

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

class HostPatternIndex final : public PatternIndex {
 public:
  HostPatternIndex(const at::Tensor& weight, const GroupLayout& layout, const at::Tensor& scale,
                   at::ScalarType rounding)
      : PatternIndex(weight, layout, scale, rounding) {
    build_tables(histogram());
  }

  at::Tensor emit(const at::Tensor& table) const override {
    at::Tensor lut = spread(table);  // [G * 65536], compute dtype
    EDKM_ASSERT(lut.numel() == layout_.groups * kPatterns);
    at::Tensor out = at::empty_like(weight_);
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

  at::Tensor aggregate(const at::Tensor& grad) const override {
    at::Tensor gr = grad.contiguous().view(weight_.sizes());
    at::Tensor compact = at::zeros({layout_.groups * umax_}, weight_.options().dtype(at::kDouble));
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

  at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& jac, const at::Tensor& h) const override {
    at::Tensor lj = spread(jac), lh = spread(h);
    EDKM_ASSERT(lj.numel() == layout_.groups * kPatterns && lh.numel() == lj.numel());
    at::Tensor out = at::empty_like(weight_);
    at::Tensor gr = grad.contiguous().view(weight_.sizes());
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

 private:
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
    EDKM_ASSERT(n <= kChunk);  // buf holds kChunk patterns
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
  // L1 cache; hence (BENCHMARKS.md, "Pattern index: design measurements", has the figures):
  //   - four rows at a time, interleaved, each into a table ("way") of its own: the rows'
  //     independent updates overlap, and runs of equal patterns within a row (an all-zero
  //     weight is the worst case) do not serialise on store-to-load forwarding;
  //   - the ways of one pattern side by side (entry p * kWays + k), so that the hot patterns of
  //     a bell-shaped weight share cache lines;
  //   - fp32 tables for the sums of 16-bit and fp32 weights: the ~1,500 patterns that hold 96% of
  //     a N(0, 0.02) bf16 weight then take 24 KB, in L1, against 48 KB in fp64. They are flushed
  //     into the fp64 totals every `window` weights. Where no value holds more than 1/256 of a
  //     group's weights, an entry then adds about 1,000 gradients or fewer in fp32 between
  //     flushes (1e-8..1e-6 from the fp64 sums, as PatternIndex tests measure); where one value
  //     does (pruned zeros, a constant weight), its entry could add 2^18 and fp32 would drift by
  //     up to 0.3%, so those weights keep fp64 tables (`dominant_`).
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

  at::Tensor histogram() const {
    at::Tensor hist = at::zeros({layout_.groups * kPatterns}, weight_.options().dtype(at::kLong));
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
};

}  // namespace

std::unique_ptr<ValueIndex> make_host_pattern_index(const at::Tensor& weight, const GroupLayout& layout,
                                                    const at::Tensor& scale, at::ScalarType rounding) {
  EDKM_ASSERT(weight.device().is_cpu());
  return std::make_unique<HostPatternIndex>(weight, layout, scale, rounding);
}

}  // namespace edkm::detail
