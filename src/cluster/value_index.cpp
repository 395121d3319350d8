// The value indices that materialise the prepared weight (sorted, identity), and the helpers
// the ATen passes share. The pattern index is in pattern_index.h.
#include "cluster/value_index.h"

#include <ATen/ATen.h>

#include <memory>
#include <tuple>
#include <vector>

#include "cluster/pattern_index.h"
#include "common/error.h"

namespace edkm::detail {

int64_t chunk_rows(int64_t cols) { return std::max<int64_t>(1, (int64_t(1) << 20) / cols); }

at::Tensor combine_grad(const at::Tensor& jac, const at::Tensor& grad, const at::Tensor& h,
                        const at::Tensor& s, int64_t rows_c) {
  at::Tensor direct = jac.size(-1) == 1 ? jac.view({-1, 1}) * grad
                                        : at::matmul(jac, grad.unsqueeze(-1)).squeeze(-1);
  at::Tensor palette_path = h;
  if (s.defined()) palette_path = (h.reshape({rows_c, -1}) / s.unsqueeze(1)).view_as(h);
  return direct + palette_path;
}

at::Tensor value_weights(const ValueIndex& index, const at::Tensor& fv, const GroupLayout& layout,
                         const at::Tensor& scale, const at::Tensor& weight) {
  // aggregate() sums s_r t_i over the weights of each value, component by component: with
  // t_i = fv / (d s_r) on each of a vector's d components, the sum over components is sum fv.
  at::Tensor t = spread_vectors(fv / double(layout.dim), layout);
  if (scale.defined()) t = t / scale.unsqueeze(1);
  return index.aggregate(t.to(weight.scalar_type()).view(weight.sizes())).sum(-1);
}

void throw_nonfinite(const at::Tensor& weight, at::ScalarType rounding) {
  check_finite(weight, "weight");
  throw_invalid("weight values overflow the cluster dtype {} after scaling (largest finite {})",
                c10::toString(rounding), rounding == at::kHalf ? "65504" : "3.39e38");
}

namespace {

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

std::unique_ptr<ValueIndex> make_sorted_index(const at::Tensor& weight, const GroupLayout& layout,
                                              const DKMConfig& cfg, const at::Tensor& scale) {
  return std::make_unique<GatherIndex>(weight, layout, cfg, scale, /*distinct=*/true);
}

std::unique_ptr<ValueIndex> make_identity_index(const at::Tensor& weight, const GroupLayout& layout,
                                                const DKMConfig& cfg, const at::Tensor& scale) {
  return std::make_unique<GatherIndex>(weight, layout, cfg, scale, /*distinct=*/false);
}

}  // namespace edkm::detail
