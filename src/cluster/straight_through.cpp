#include "cluster/straight_through.h"

#include <torch/csrc/autograd/custom_function.h>

#include <ATen/ATen.h>

#include <cmath>

#include "cluster/fake_quantize.h"
#include "cluster/layout.h"
#include "cluster/value_index.h"
#include "cluster/uniform_grid.h"
#include "common/error.h"

namespace edkm {

namespace {

// y in the forward pass exactly (x - x is exactly 0), with x's gradient in the backward.
at::Tensor straight_through(const at::Tensor& y, const at::Tensor& x) { return y.detach() + (x - x.detach()); }

// LSQ+ fake quantization (Bhalgat et al. 2020) as one autograd node. Autograd through the
// expression s (clamp(round(w / s + z), 0, 2^b - 1) - z) would save several weight-sized
// intermediates (the quotient, the rounding, the clamp's masks) for every projection through
// the step; this node saves the weight (the caller's tensor) and the grid, and its backward
// recomputes v = w / s + z. With upstream gradient G, r = round(v), c = r - v (the rounding
// residual) and Q = clamp(r, 0, 2^b - 1), differentiating w_q = s (Q - z) with the rounding
// passed straight through:
//   inside the grid (Q = r):  w_q = w + s c       dw = G,  ds = G c,        dz = 0
//   clamped:                  w_q = s (Q - z)     dw = 0,  ds = G (Q - z),  dz = -G s
// ds and dz are summed over each row and multiplied by LSQ's gradient scale
// g = 1 / sqrt(cols (2^b - 1)); a scale below the floor receives none (the clamp).
struct FakeQuantizeFunction : torch::autograd::Function<FakeQuantizeFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight,
                            const at::Tensor& scale, const at::Tensor& zero, int64_t bits) {
    ctx->save_for_backward({weight, scale, zero});
    ctx->saved_data["bits"] = bits;
    return detail::fake_quantize_passes(weight).forward(weight, scale, zero, max_level(bits));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[0], &scale = saved[1], &zero = saved[2];
    const auto bits = static_cast<int>(ctx->saved_data["bits"].toInt());
    FakeQuantizeGrad g = backward_of(weight, scale, zero, bits, grads[0], weight.sizes());
    return {g.weight, g.scale, g.zero, at::Tensor()};
  }

  // weight [rows, cols] and grad alike; dL/dw is made in the shape `out` (a fresh tensor, not a
  // view: the trainer's .grad may not be one).
  static FakeQuantizeGrad backward_of(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero,
                                      int bits, const at::Tensor& grad, at::IntArrayRef out) {
    const double maxq = max_level(bits);
    const double g = 1.0 / std::sqrt(double(weight.size(1)) * maxq);
    detail::FakeQuantizeRowGrads r = detail::fake_quantize_passes(weight).backward(weight, scale, zero, maxq, grad, out);
    return {r.weight, r.scale.mul_(g), r.zero.mul_(g)};
  }

  static double max_level(int64_t bits) { return double((int64_t(1) << bits) - 1); }
};

// For 16-bit scalar clustering the scaled, rounded weights take at most 65,536 values per
// group, and a weight's nearest centroid depends only on its value: the nearest centroid of
// each distinct value (over the pattern index that dkm() uses) serves every weight holding it.
// A step then makes a few passes over the N weights, each without a factor k, instead of N x k
// distances. The other layouts assign each weight (palettize()).
bool by_value(const at::Tensor& weight, const detail::GroupLayout& layout, const DKMConfig& cfg) {
  return detail::is_16bit(detail::rounding_dtype(weight, cfg.cluster_dtype)) && layout.dim == 1;
}

// argmin_j |v_u - c_j|^2 (- prune_threshold for j = 0) of values [G, U, 1] against palettes
// [G, k, 1], as palettize() computes it: [G, U] (int64). In chunks of groups, so that the
// [G, U, k] distances stay ~16 MB.
at::Tensor nearest_centroid(const at::Tensor& values, const at::Tensor& C, const DKMConfig& cfg) {
  const int64_t G = values.size(0), U = values.size(1), k = C.size(1);
  at::Tensor out = at::empty({G, U}, values.options().dtype(at::kLong));
  const int64_t step = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, U * k));
  for (int64_t g0 = 0; g0 < G; g0 += step) {
    const int64_t len = std::min(step, G - g0);
    at::Tensor D = (values.narrow(0, g0, len) - C.narrow(0, g0, len).transpose(1, 2)).pow(2);
    if (cfg.prune_threshold > 0) D.select(-1, 0).sub_(cfg.prune_threshold);
    out.narrow(0, g0, len).copy_(D.argmin(-1));
  }
  return out;
}

// The Lloyd step's centroids [G, k, d] (fp32): each the mean of the points x [G, M, d] nearest
// to it, weighted by f [G, M]; a centroid that no point of positive weight is nearest keeps its
// value in C [G, k, d] (fp32).
at::Tensor lloyd_means(const at::Tensor& x, const at::Tensor& f, const at::Tensor& nearest, const at::Tensor& C,
                       const detail::GroupLayout& layout, int64_t k) {
  // Slot of each point: its group's first centroid + its nearest.
  const at::Tensor slot =
      (nearest + at::arange(layout.groups, nearest.options()).unsqueeze(1) * k).view({-1});
  const at::Tensor fd = f.to(at::kDouble).view({-1});
  at::Tensor sums = at::zeros({layout.groups * k, layout.dim}, x.options().dtype(at::kDouble));
  sums.index_add_(0, slot, x.reshape({-1, layout.dim}).to(at::kDouble) * fd.unsqueeze(1));
  at::Tensor counts = at::zeros({layout.groups * k}, x.options().dtype(at::kDouble));
  counts.index_add_(0, slot, fd);
  at::Tensor means = (sums / at::where(counts > 0, counts, at::ones_like(counts)).unsqueeze(1)).to(at::kFloat);
  at::Tensor flat = C.reshape({-1, layout.dim});
  return at::where(counts.unsqueeze(1) > 0, means, flat).view(C.sizes());
}

// The Lloyd step over the distinct values of a pattern index: the values' nearest centroids in
// the checked palette Cc (compute dtype), weighted by their counts or summed importances.
at::Tensor lloyd_by_value(const detail::ValueIndex& index, const at::Tensor& Cc, const DKMConfig& cfg,
                          const detail::GroupLayout& layout, const at::Tensor& s, const Importance& importance,
                          const at::Tensor& weight) {
  using namespace detail;
  const at::Tensor f = importance.defined()
                           ? value_weights(index, checked_importance(importance, layout, weight), layout, s, weight)
                           : index.counts();
  return lloyd_means(index.values().to(at::kFloat), f, nearest_centroid(index.values(), Cc, cfg), Cc.to(at::kFloat),
                     layout, cfg.k());
}

// The layouts without a pattern index: every weight (vector) at its nearest centroid, as the
// export assigns it, in the weight's dtype.
at::Tensor assign_each_weight(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                              const at::Tensor& scale) {
  return depalettize(palettize(weight, palette, cfg, scale), weight.scalar_type());
}

// The hard-assigned value of each distinct value of an index, [G, U, 1] in the index's dtype.
at::Tensor nearest_table(const detail::ValueIndex& index, const at::Tensor& Cc, const DKMConfig& cfg) {
  return Cc.gather(1, nearest_centroid(index.values(), Cc, cfg).unsqueeze(-1)).to(index.values().scalar_type());
}

}  // namespace

at::Tensor lloyd_update(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                        const at::Tensor& scale, const Importance& importance) {
  using namespace detail;
  at::NoGradGuard no_grad;
  const GroupLayout layout = GroupLayout::of(weight, cfg);
  at::Tensor s = checked_scale(scale, layout, cfg, weight);
  const at::Tensor Cc = checked_palette(palette, layout, cfg, weight);  // in the compute dtype, as palettize()'s
  if (by_value(weight, layout, cfg))
    return lloyd_by_value(*make_pattern_index(weight, layout, cfg, s), Cc, cfg, layout, s, importance, weight);
  // Per vector: the prepared vectors, their importances (or 1) and their nearest centroids.
  const at::Tensor C = Cc.to(at::kFloat);
  const at::Tensor x = prepare(weight.detach(), layout, cfg, s).to(at::kFloat);
  const at::Tensor nearest = palettize(weight, C, cfg, s).indices.to(at::kLong).view({layout.groups, layout.vectors});
  const at::Tensor f = importance.defined() ? checked_importance(importance, layout, weight)
                                            : at::ones({layout.groups, layout.vectors}, x.options());
  return lloyd_means(x, f, nearest, C, layout, cfg.k());
}

at::Tensor hard_assign(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                       const at::Tensor& scale) {
  using namespace detail;
  at::Tensor q;
  {
    at::NoGradGuard no_grad;
    const GroupLayout layout = GroupLayout::of(weight, cfg);
    if (by_value(weight, layout, cfg)) {
      const ScaleAndPalette args = checked_scale_and_palette(scale, palette, layout, cfg, weight);
      const auto index = make_pattern_index(weight, layout, cfg, args.scale);
      q = index->emit(nearest_table(*index, args.palette, cfg));
    } else {
      q = assign_each_weight(weight, palette, cfg, scale);
    }
  }
  return straight_through(q, weight);
}

struct DeferredHardAssign::State {
  at::Tensor weight;
  int64_t version = 0;
  DKMConfig cfg;
  at::Tensor scale;
  std::unique_ptr<detail::ValueIndex> index;  // with the pattern index
  at::Tensor table;                           // its hard-assigned values
};

DeferredHardAssign::DeferredHardAssign(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                                       const at::Tensor& scale, const Importance& importance, bool update)
    : state_(std::make_unique<State>()) {
  using namespace detail;
  at::NoGradGuard no_grad;
  const GroupLayout layout = GroupLayout::of(weight, cfg);
  State& st = *state_;
  st.weight = weight.detach();
  st.version = weight._version();
  st.cfg = cfg;
  st.scale = scale;
  if (!by_value(weight, layout, cfg)) {
    palette_ = update ? lloyd_update(weight, palette, cfg, scale, importance) : palette;
    return;
  }
  const ScaleAndPalette args = checked_scale_and_palette(scale, palette, layout, cfg, weight);
  st.index = make_pattern_index(weight, layout, cfg, args.scale);
  palette_ = update ? lloyd_by_value(*st.index, args.palette, cfg, layout, args.scale, importance, weight) : palette;
  st.table = nearest_table(*st.index, update ? palette_.to(compute_dtype(weight)) : args.palette, cfg);
}

DeferredHardAssign::~DeferredHardAssign() = default;
DeferredHardAssign::DeferredHardAssign(DeferredHardAssign&&) noexcept = default;
DeferredHardAssign& DeferredHardAssign::operator=(DeferredHardAssign&&) noexcept = default;

at::Tensor DeferredHardAssign::weight() const {
  const State& st = *state_;
  detail::check_unchanged(st.weight, st.version, "DeferredHardAssign: the weight was modified after the Lloyd step ran on it");
  at::NoGradGuard no_grad;
  return st.index ? st.index->emit(st.table) : assign_each_weight(st.weight, palette_, st.cfg, st.scale);
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
  return FakeQuantizeFunction::apply(weight, grid.scale, grid.zero, bits);
}

FakeQuantizeGrad fake_quantize_backward(const at::Tensor& weight, const LearnedGrid& grid, int bits,
                                        const at::Tensor& grad) {
  at::NoGradGuard no_grad;
  const at::Tensor w2 = weight.detach().reshape({weight.size(0), -1});
  return FakeQuantizeFunction::backward_of(w2, grid.scale.detach(), grid.zero.detach(), bits,
                                           grad.reshape(w2.sizes()), weight.sizes());
}

at::Tensor grid_palette(const LearnedGrid& grid, int bits) {
  at::NoGradGuard no_grad;
  const int64_t k = int64_t(1) << bits;
  at::Tensor j = at::arange(k, grid.scale.options().dtype(at::kFloat));
  at::Tensor s = grid.scale.detach().clamp_min(detail::kScaleFloor).unsqueeze(1);
  return (s * (j.unsqueeze(0) - grid.zero.detach().unsqueeze(1))).unsqueeze(2);
}

}  // namespace edkm
