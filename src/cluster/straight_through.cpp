#include "cluster/straight_through.h"

#include <ATen/ATen.h>

#include <cmath>

#include "cluster/layout.h"
#include "cluster/uniform_grid.h"
#include "common/error.h"

namespace edkm {

namespace {

// y in the forward pass exactly (x - x is exactly 0), with x's gradient in the backward.
at::Tensor straight_through(const at::Tensor& y, const at::Tensor& x) { return y.detach() + (x - x.detach()); }

// round(x) in the forward pass, the identity in the backward.
at::Tensor round_ste(const at::Tensor& x) { return straight_through(at::round(x.detach()), x); }

// The forward value of x, with its gradient multiplied by g (LSQ's gradient scale).
at::Tensor scale_grad(const at::Tensor& x, double g) { return (x - x * g).detach() + x * g; }

}  // namespace

at::Tensor lloyd_update(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                        const at::Tensor& scale, const Importance& importance) {
  using namespace detail;
  at::NoGradGuard no_grad;
  const GroupLayout layout = GroupLayout::of(weight, cfg);
  at::Tensor s = checked_scale(scale, layout, cfg, weight);
  at::Tensor C = checked_palette(palette, layout, cfg, weight).to(at::kFloat);
  const Palettized p = palettize(weight, C, cfg, s);
  at::Tensor x = prepare(weight.detach(), layout, cfg, s).to(at::kFloat).reshape({-1, layout.dim});
  const int64_t k = cfg.k();
  // Slot of each vector: its group's first centroid + its index.
  at::Tensor slot = p.indices.to(at::kLong).view({layout.groups, layout.vectors}) +
                    at::arange(layout.groups, x.options().dtype(at::kLong)).unsqueeze(1) * k;
  slot = slot.view({-1});
  at::Tensor f = importance.defined()
                     ? checked_importance(importance, layout, weight).reshape({-1}).to(at::kDouble)
                     : at::ones({slot.size(0)}, x.options().dtype(at::kDouble));
  at::Tensor sums = at::zeros({layout.groups * k, layout.dim}, x.options().dtype(at::kDouble));
  sums.index_add_(0, slot, x.to(at::kDouble) * f.unsqueeze(1));
  at::Tensor counts = at::zeros({layout.groups * k}, x.options().dtype(at::kDouble));
  counts.index_add_(0, slot, f);
  at::Tensor means = (sums / at::where(counts > 0, counts, at::ones_like(counts)).unsqueeze(1)).to(at::kFloat);
  at::Tensor flat = C.reshape({-1, layout.dim});
  return at::where(counts.unsqueeze(1) > 0, means, flat).view(C.sizes());
}

at::Tensor hard_assign(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                       const at::Tensor& scale) {
  at::Tensor q;
  {
    at::NoGradGuard no_grad;
    q = depalettize(palettize(weight, palette, cfg, scale), weight.scalar_type());
  }
  return straight_through(q, weight);
}

LearnedGrid init_learned_grid(const at::Tensor& weight, int bits) {
  if (bits < 1 || bits > 8) throw_invalid("QAT bits must be in 1..8, got {}", bits);
  if (!weight.defined() || weight.dim() != 2 || weight.numel() == 0)
    throw_invalid("QAT: expected a non-empty [rows, cols] weight");
  detail::check_finite(weight, "weight");
  at::NoGradGuard no_grad;
  const auto g = detail::UniformGrid::fit(weight.detach().to(at::kFloat), bits, /*symmetric=*/false);
  return {g.scale.view({-1}).clone().requires_grad_(true), g.zero.view({-1}).clone().requires_grad_(true)};
}

at::Tensor fake_quantize(const at::Tensor& weight, const LearnedGrid& grid, int bits) {
  const double maxq = double((1 << bits) - 1);
  const double g = 1.0 / std::sqrt(double(weight.size(1)) * maxq);
  // A scale trained to 0 or below would divide by zero: it is held at a small positive floor.
  at::Tensor s = scale_grad(grid.scale, g).clamp_min(1e-8).unsqueeze(1);
  at::Tensor z = scale_grad(grid.zero, g).unsqueeze(1);
  at::Tensor w = weight.to(at::kFloat);
  at::Tensor r = round_ste(w / s + z);
  // The clamp as a selection: a rounded value in [0, maxq] passes with its gradient, one outside
  // is replaced by the bound, a constant. (at::clamp's own derivative at the bounds differs
  // between libtorch 1.x and 2.x: a value rounded onto a bound got no gradient in 2.x.)
  at::Tensor q = at::where(r < 0, at::zeros_like(r), at::where(r > maxq, at::full_like(r, maxq), r));
  return (s * (q - z)).to(weight.scalar_type());
}

at::Tensor grid_palette(const LearnedGrid& grid, int bits) {
  at::NoGradGuard no_grad;
  const int64_t k = int64_t(1) << bits;
  at::Tensor j = at::arange(k, grid.scale.options().dtype(at::kFloat));
  at::Tensor s = grid.scale.detach().clamp_min(1e-8).unsqueeze(1);
  return (s * (j.unsqueeze(0) - grid.zero.detach().unsqueeze(1))).unsqueeze(2);
}

}  // namespace edkm
