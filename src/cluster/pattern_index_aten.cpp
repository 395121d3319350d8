// The ATen backend of the pattern index (pattern_index.h): each pass over chunks of rows, with
// gathers and scatters of ATen ops, so that it runs wherever the tensors are.
#include <ATen/ATen.h>

#include "cluster/pattern_index.h"

namespace edkm::detail {
namespace {

class AtenPatternIndex final : public PatternIndex {
 public:
  AtenPatternIndex(const at::Tensor& weight, const GroupLayout& layout, const at::Tensor& scale,
                   at::ScalarType rounding)
      : PatternIndex(weight, layout, scale, rounding) {
    build_tables(histogram());
  }

  at::Tensor emit(const at::Tensor& table) const override {
    at::Tensor lut = spread(table);
    at::Tensor out = at::empty_like(weight_);
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

  at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& jac, const at::Tensor& h) const override {
    at::Tensor lj = spread(jac), lh = spread(h);
    at::Tensor out = at::empty_like(weight_);
    at::Tensor g2d = grad.contiguous().view({layout_.rows, layout_.cols});
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
  // f(first row, row count, keys g * 65536 + pattern [rc * cols], scale of the rows).
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
    for_each_chunk([&](int64_t, int64_t, const at::Tensor& keys, const at::Tensor&) {
      hist.index_add_(0, keys, at::ones_like(keys));
    });
    return hist;
  }
};

}  // namespace

std::unique_ptr<ValueIndex> make_aten_pattern_index(const at::Tensor& weight, const GroupLayout& layout,
                                                    const at::Tensor& scale, at::ScalarType rounding) {
  return std::make_unique<AtenPatternIndex>(weight, layout, scale, rounding);
}

}  // namespace edkm::detail
