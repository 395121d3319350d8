#include "cluster/value_index.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <mutex>
#include <type_traits>
#include <vector>

#include "common/error.h"

namespace edkm::detail {
namespace {

constexpr int64_t kPatterns = 65536;
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
    at::Tensor hist = histogram();  // [G, 65536] int64
    at::Tensor present = hist > 0;
    const uint16_t mask = rounding == at::kHalf ? exponent_mask<c10::Half>()
                                                : exponent_mask<c10::BFloat16>();
    at::Tensor patterns = at::arange(kPatterns, hist.options());
    at::Tensor nonfinite = (patterns.bitwise_and(mask) == mask).unsqueeze(0) & present;
    if (nonfinite.any().item<bool>()) throw_nonfinite(weight_, rounding_);

    at::Tensor pos = present.cumsum(1) - 1;
    umax_ = present.sum(1).max().item<int64_t>();
    slot_ = at::where(present, pos, at::full({}, -1, pos.options())).to(at::kInt);

    const auto cdt = compute_dtype(weight_);
    at::Tensor decoded = patterns.to(at::kShort).view(rounding_).to(cdt);  // every 16-bit value
    at::Tensor gp = present.nonzero();                                     // [M, 2]: (g, pattern)
    at::Tensor g = gp.select(1, 0), p = gp.select(1, 1);
    at::Tensor dst = g * umax_ + pos.index({g, p});
    at::Tensor values = at::zeros({layout_.groups * umax_}, weight_.options().dtype(cdt));
    at::Tensor counts = at::zeros_like(values);
    values.index_put_({dst}, decoded.index_select(0, p));
    counts.index_put_({dst}, hist.index({g, p}).to(cdt));
    values_ = values.view({layout_.groups, umax_, 1});
    counts_ = counts.view({layout_.groups, umax_});
  }

  at::Tensor emit(const at::Tensor& table) const override {
    at::Tensor out = at::empty_like(weight_);
    at::Tensor t = table.contiguous().view({-1});
    if (cpu_kernels_) {
      dispatch([&](auto w_tag, auto r_tag) {
        using W = decltype(w_tag);
        using A = acc_t<W>;
        const A* tab = t.data_ptr<A>();
        W* o = out.data_ptr<W>();
        for_each_row<W>([&](int64_t r, int64_t g, A s, const W* w) {
          const int32_t* slot = slot_.data_ptr<int32_t>() + g * kPatterns;
          const A* tg = tab + g * umax_;
          W* orow = o + r * layout_.cols;
          for (int64_t c = 0; c < layout_.cols; ++c)
            orow[c] = static_cast<W>(scaled(tg[slot[pattern<decltype(r_tag)>(w[c], s)]], s));
        });
      });
      return out;
    }
    at::Tensor out2d = out.view({layout_.rows, layout_.cols});
    for_each_chunk([&](int64_t r0, int64_t rc, const at::Tensor& flat, const at::Tensor& s) {
      at::Tensor y = t.index_select(0, flat).view({rc, layout_.cols});
      if (s.defined()) y = y * s.unsqueeze(1);
      out2d.narrow(0, r0, rc).copy_(y);
    });
    return out;
  }

  at::Tensor aggregate(const at::Tensor& grad) const override {
    at::Tensor acc = at::zeros({layout_.groups * umax_}, weight_.options().dtype(at::kDouble));
    at::Tensor gr = grad.contiguous().view(weight_.sizes());
    if (cpu_kernels_) {
      std::mutex mu;
      double* total = acc.data_ptr<double>();
      dispatch([&](auto w_tag, auto r_tag) {
        using W = decltype(w_tag);
        using A = acc_t<W>;
        const W* gptr = gr.data_ptr<W>();
        // Each thread sums into a buffer for the group its rows are in and flushes the buffer
        // when the group changes: no per-element atomics, and buffers of U entries only.
        at::parallel_for(0, layout_.rows, row_grain(), [&](int64_t r0, int64_t r1) {
          std::vector<double> local(umax_, 0.0);
          int64_t cur = r0 / layout_.rows_per_group;
          auto flush = [&] {
            std::lock_guard<std::mutex> lock(mu);
            double* dst = total + cur * umax_;
            for (int64_t u = 0; u < umax_; ++u) dst[u] += local[u];
            std::fill(local.begin(), local.end(), 0.0);
          };
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t g = r / layout_.rows_per_group;
            if (g != cur) {
              flush();
              cur = g;
            }
            const A s = row_scale<A>(r);
            const W* w = weight_.data_ptr<W>() + r * layout_.cols;
            const W* gw = gptr + r * layout_.cols;
            const int32_t* slot = slot_.data_ptr<int32_t>() + g * kPatterns;
            for (int64_t c = 0; c < layout_.cols; ++c)
              local[slot[pattern<decltype(r_tag)>(w[c], s)]] += scaled(static_cast<A>(gw[c]), s);
          }
          flush();
        });
      });
    } else {
      at::Tensor g2d = gr.view({layout_.rows, layout_.cols});
      for_each_chunk([&](int64_t r0, int64_t rc, const at::Tensor& flat, const at::Tensor& s) {
        at::Tensor v = g2d.narrow(0, r0, rc).to(compute_dtype(weight_));
        if (s.defined()) v = v * s.unsqueeze(1);
        acc.index_add_(0, flat, v.reshape({-1}).to(at::kDouble));
      });
    }
    return acc.view({layout_.groups, umax_, 1});
  }

  at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& jac,
                        const at::Tensor& h) const override {
    at::Tensor out = at::empty_like(weight_);
    at::Tensor gr = grad.contiguous().view(weight_.sizes());
    at::Tensor j = jac.contiguous().view({-1}), hh = h.contiguous().view({-1});
    if (cpu_kernels_) {
      dispatch([&](auto w_tag, auto r_tag) {
        using W = decltype(w_tag);
        using A = acc_t<W>;
        const A* jp = j.data_ptr<A>();
        const A* hp = hh.data_ptr<A>();
        const W* gptr = gr.data_ptr<W>();
        W* o = out.data_ptr<W>();
        for_each_row<W>([&](int64_t r, int64_t g, A s, const W* w) {
          const int32_t* slot = slot_.data_ptr<int32_t>() + g * kPatterns;
          const A* jg = jp + g * umax_;
          const A* hg = hp + g * umax_;
          const W* gw = gptr + r * layout_.cols;
          W* orow = o + r * layout_.cols;
          for (int64_t c = 0; c < layout_.cols; ++c) {
            const int32_t u = slot[pattern<decltype(r_tag)>(w[c], s)];
            const A palette_path = scale_.defined() ? hg[u] / s : hg[u];
            orow[c] = static_cast<W>(jg[u] * static_cast<A>(gw[c]) + palette_path);
          }
        });
      });
      return out;
    }
    at::Tensor g2d = gr.view({layout_.rows, layout_.cols});
    at::Tensor out2d = out.view({layout_.rows, layout_.cols});
    for_each_chunk([&](int64_t r0, int64_t rc, const at::Tensor& flat, const at::Tensor& s) {
      at::Tensor gv = g2d.narrow(0, r0, rc).to(compute_dtype(weight_)).reshape({-1, 1});
      at::Tensor r = combine_grad(j.index_select(0, flat).view({-1, 1, 1}), gv,
                                  hh.index_select(0, flat).view({-1, 1}), s, rc);
      out2d.narrow(0, r0, rc).copy_(r.view({rc, layout_.cols}));
    });
    return out;
  }

 private:
  template <typename W>
  using acc_t = std::conditional_t<std::is_same_v<W, double>, double, float>;

  // The 16-bit pattern of round_R(w / s), exactly as prepare() computes it with ATen ops:
  // division in the compute dtype, then a cast (through fp32) to the rounding dtype.
  template <typename R, typename W, typename A>
  uint16_t pattern(W w, A s) const {
    A x = static_cast<A>(w);
    if (scale_.defined()) x = x / s;
    return R(static_cast<float>(x)).x;
  }
  template <typename A>
  A scaled(A v, A s) const {
    return scale_.defined() ? v * s : v;
  }
  template <typename A>
  A row_scale(int64_t r) const {
    return scale_.defined() ? static_cast<A>(scale_.data_ptr<float>()[r]) : A(1);
  }
  int64_t row_grain() const { return std::max<int64_t>(1, 16384 / layout_.cols); }

  // Calls f(W{}, R{}) with the weight's element type and the rounding type.
  template <typename F>
  void dispatch(F&& f) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight_.scalar_type(), "pattern_index", [&] {
      if (rounding_ == at::kHalf)
        f(scalar_t{}, c10::Half{});
      else
        f(scalar_t{}, c10::BFloat16{});
    });
  }

  // Parallel loop over rows: f(row, group, scale, weight row pointer).
  template <typename W, typename F>
  void for_each_row(F&& f) const {
    const W* w = weight_.data_ptr<W>();
    at::parallel_for(0, layout_.rows, row_grain(), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        f(r, r / layout_.rows_per_group, row_scale<acc_t<W>>(r), w + r * layout_.cols);
    });
  }

  // ATen path: f(first row, row count, flat index into [G * U] tables, scale of the rows).
  template <typename F>
  void for_each_chunk(F&& f) const {
    const int64_t step = chunk_rows(layout_.cols);
    at::Tensor w2d = weight_.view({layout_.rows, layout_.cols});
    at::Tensor slot_flat = slot_.view({-1});
    for (int64_t r0 = 0; r0 < layout_.rows; r0 += step) {
      const int64_t rc = std::min(step, layout_.rows - r0);
      at::Tensor s = scale_.defined() ? scale_.narrow(0, r0, rc) : at::Tensor();
      at::Tensor keys = chunk_patterns(w2d.narrow(0, r0, rc), s);  // [rc, cols] int64
      at::Tensor group = at::arange(r0, r0 + rc, keys.options()).div(layout_.rows_per_group, "floor");
      at::Tensor local = slot_flat.index_select(0, (keys + (group * kPatterns).unsqueeze(1)).view({-1}));
      at::Tensor flat = (local.view({rc, layout_.cols}).to(at::kLong) + (group * umax_).unsqueeze(1)).view({-1});
      f(r0, rc, flat, s);
    }
  }

  at::Tensor chunk_patterns(const at::Tensor& w, const at::Tensor& s) const {
    at::Tensor x = w.to(compute_dtype(weight_));
    if (s.defined()) x = x / s.unsqueeze(1);
    return x.to(rounding_).view(at::kShort).to(at::kLong).bitwise_and(0xFFFF);
  }

  at::Tensor histogram() const {
    at::Tensor hist = at::zeros({layout_.groups, kPatterns},
                                weight_.options().dtype(at::kLong));
    if (cpu_kernels_) {
      std::mutex mu;
      int64_t* total = hist.data_ptr<int64_t>();
      dispatch([&](auto w_tag, auto r_tag) {
        using W = decltype(w_tag);
        using A = acc_t<W>;
        at::parallel_for(0, layout_.rows, row_grain(), [&](int64_t r0, int64_t r1) {
          std::vector<uint32_t> local(kPatterns, 0);
          int64_t cur = r0 / layout_.rows_per_group;
          auto flush = [&] {
            std::lock_guard<std::mutex> lock(mu);
            int64_t* dst = total + cur * kPatterns;
            for (int64_t p = 0; p < kPatterns; ++p) dst[p] += local[p];
            std::fill(local.begin(), local.end(), 0u);
          };
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t g = r / layout_.rows_per_group;
            if (g != cur) {
              flush();
              cur = g;
            }
            const A s = row_scale<A>(r);
            const W* w = weight_.data_ptr<W>() + r * layout_.cols;
            for (int64_t c = 0; c < layout_.cols; ++c) ++local[pattern<decltype(r_tag)>(w[c], s)];
          }
          flush();
        });
      });
      return hist;
    }
    const int64_t step = chunk_rows(layout_.cols);
    at::Tensor w2d = weight_.view({layout_.rows, layout_.cols});
    at::Tensor flat = hist.view({-1});
    for (int64_t r0 = 0; r0 < layout_.rows; r0 += step) {
      const int64_t rc = std::min(step, layout_.rows - r0);
      at::Tensor s = scale_.defined() ? scale_.narrow(0, r0, rc) : at::Tensor();
      at::Tensor keys = chunk_patterns(w2d.narrow(0, r0, rc), s);
      at::Tensor group = at::arange(r0, r0 + rc, keys.options()).div(layout_.rows_per_group, "floor");
      keys = (keys + (group * kPatterns).unsqueeze(1)).view({-1});
      flat.index_add_(0, keys, at::ones_like(keys));
    }
    return hist;
  }

  at::Tensor weight_;
  GroupLayout layout_;
  at::Tensor scale_;
  at::ScalarType rounding_;
  bool cpu_kernels_;
  int64_t umax_ = 0;
  at::Tensor slot_;  // [G, 65536] int32: position of a pattern in its group's list, or -1
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
